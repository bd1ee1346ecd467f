"""Image specs and sites: valid files load; every mistake is one line naming file, line, key."""

import textwrap

import pytest

from builder.errors import UserError
from builder.imagespec import ImageSpec, known_roles, load_image_spec
from builder.site import Site, load_site
from builder.yamlfile import load_model


def write(tmp_path, text, name="site.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


LAB_LIKE = """\
    name: t
    network:
      prefix: 10.86.0.0/24
      router: 10.86.0.1
      dns: [10.86.0.1]
      admin_networks: [10.86.0.0/24]
      monitoring_networks: [10.86.0.0/24]
    vip: 10.86.0.18
    gateway: {host: 10.86.0.25}
    admin:
      authorized_keys: {env: KEYS}
    nodes:
      a: {role: frontend, address: 10.86.0.20}
"""


@pytest.mark.parametrize("role", ["frontend", "backend"])
def test_every_role_image_loads(role):
    spec = load_image_spec(role)
    assert spec.stages and spec.overlays


def test_known_roles_are_the_image_files():
    assert {"frontend", "backend"} <= set(known_roles())


@pytest.mark.parametrize("name", ["production", "lab"])
def test_both_sites_load(name):
    site = load_site(name)
    assert {"frontend-a", "frontend-b", "backend"} <= set(site.nodes)


def test_production_site_is_one_network_with_distinct_addresses():
    """The cluster's shape, without repeating its addresses: they live in the site file only."""
    site = load_site("production")
    addresses = [site.vip, site.gateway.host, *(node.address for node in site.nodes.values())]
    assert all(address in site.network.prefix for address in addresses)
    assert len(set(addresses)) == len(addresses)
    roles = {name: node.role for name, node in site.nodes.items()}
    assert roles == {"frontend-a": "frontend", "frontend-b": "frontend", "backend": "backend"}
    states = {node.vrrp.state for node in site.nodes.values() if node.vrrp}
    assert states == {"MASTER", "BACKUP"}


def test_lab_site_shares_no_address_with_production():
    production, lab = load_site("production"), load_site("lab")
    assert not lab.network.prefix.overlaps(production.network.prefix)


def test_unknown_role_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        load_image_spec("fronted")
    assert "unknown role 'fronted'" in err.value.message
    assert "frontend" in err.value.hint and "backend" in err.value.hint


def test_unknown_site_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        load_site("staging")
    assert "lab" in err.value.hint and "production" in err.value.hint


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: t\nnetwork: [unclosed\nvip: 1\n")
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert str(path) in err.value.message and ":3:" in err.value.message
    assert "malformed YAML" in err.value.message


def test_unknown_key_names_file_line_key_and_the_known_keys(tmp_path):
    path = write(tmp_path, LAB_LIKE.replace("    vip: 10.86.0.18\n",
                                            "    vip: 10.86.0.18\n    vipp: 1\n"))
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert f"{path}:9: unknown key 'vipp'" == err.value.message
    assert "vip" in err.value.hint and "gateway" in err.value.hint


def test_nested_unknown_key_is_found_at_its_line(tmp_path):
    path = write(tmp_path, LAB_LIKE.replace("gateway: {host: 10.86.0.25}",
                                            "gateway:\n      host: 10.86.0.25\n      prot: 1"))
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert err.value.message == f"{path}:11: unknown key 'gateway.prot'"
    assert "port" in err.value.hint


def test_bad_value_names_the_key(tmp_path):
    path = write(tmp_path, LAB_LIKE.replace("vip: 10.86.0.18", "vip: not-an-address"))
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert err.value.message.startswith(f"{path}:8: vip:")


def test_node_outside_the_prefix_is_refused(tmp_path):
    path = write(tmp_path, LAB_LIKE.replace("address: 10.86.0.20", "address: 10.99.0.20"))
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert err.value.message == \
        f"{path}:13: nodes.a.address: 10.99.0.20 is outside network.prefix 10.86.0.0/24"


def test_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, LAB_LIKE + "    vip: 10.86.0.19\n")
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert "'vip' appears twice" in err.value.message


def test_secret_source_needs_exactly_one_of_env_or_file(tmp_path):
    path = write(tmp_path, LAB_LIKE.replace("{env: KEYS}", "{env: KEYS, file: /k}"))
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert "exactly one" in err.value.message


def test_image_spec_unknown_key(tmp_path):
    path = write(tmp_path, "description: x\nstages: []\noverlays: []\npackges: [a]\n",
                 "role.yaml")
    with pytest.raises(UserError) as err:
        load_model(path, ImageSpec)
    assert err.value.message == f"{path}:4: unknown key 'packges'"
    assert "packages" in err.value.hint


@pytest.mark.parametrize("change, line, message", [
    (("address: 10.86.0.20}",
      "address: 10.86.0.20}\n      b: {role: backend, address: 10.86.0.20}"),
     14, "nodes.b.address: 10.86.0.20 is already a's"),
    (("vip: 10.86.0.18", "vip: 10.86.0.20"), 13, "nodes.a.address: 10.86.0.20 is already vip's"),
    (("vip: 10.86.0.18", "vip: 10.9.0.18"), 8, "vip: 10.9.0.18 is outside network.prefix"),
    (("role: frontend", "role: fronted"), 13, "nodes.a.role: unknown role 'fronted' (known roles:"),
    (("address: 10.86.0.20}", "address: 10.86.0.20, vrrp: {state: MASTER, priority: 9}}\n"
      "      b: {role: frontend, address: 10.86.0.21, vrrp: {state: MASTER, priority: 8}}"),
     14, "nodes.b.vrrp.state: a is the MASTER already"),
])
def test_checks_across_keys_name_the_key_and_its_line(tmp_path, change, line, message):
    path = write(tmp_path, LAB_LIKE.replace(*change))
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert err.value.message.startswith(f"{path}:{line}: {message}"), err.value.message


def test_a_misspelt_key_is_named_rather_than_the_one_it_should_be(tmp_path):
    path = write(tmp_path, LAB_LIKE.replace("vip: 10.86.0.18", "vipp: 10.86.0.18"))
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert err.value.message == f"{path}:8: unknown key 'vipp'"
    assert "vip" in err.value.hint.split(": ", 1)[1].split(", ")


def test_an_unknown_key_of_a_node_lists_the_nodes_keys(tmp_path):
    path = write(tmp_path, LAB_LIKE.replace("address: 10.86.0.20", "adress: 10.86.0.20"))
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert err.value.message == f"{path}:13: unknown key 'nodes.a.adress'"
    assert err.value.hint == "known keys here: address, role, vrrp"


@pytest.mark.parametrize("content, message", [
    (None, "is a folder, not a YAML file"),
    (b"\xff\xfe\x00binary", "is not a text file"),
    (b"- just\n- a list\n", ":1: expected keys and values"),
])
def test_a_site_that_is_no_yaml_mapping_is_one_error(tmp_path, content, message):
    path = tmp_path / "site.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_model(path, Site)
    assert message in err.value.message
