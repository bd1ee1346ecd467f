"""Overlays render from the site: values land where they belong, and a missing one is an error."""

import pytest

from builder.assemble import BOOT_PARTUUID, ROOT_PARTUUID
from builder.errors import UserError
from builder.imagespec import load_image_spec
from builder.overlay import render_overlay, render_template
from builder.site import load_site


def context(site_name="lab", role="frontend"):
    return {"site": load_site(site_name), "role": role, "image": load_image_spec(role),
            "partitions": {"boot": BOOT_PARTUUID, "root": ROOT_PARTUUID}}


@pytest.fixture
def rendered(tmp_path):
    written = render_overlay("common", tmp_path, context())
    return tmp_path, written


def test_templates_lose_their_suffix_and_files_keep_their_paths(rendered):
    root, written = rendered
    assert (root / "etc/fstab").exists() and not (root / "etc/fstab.j2").exists()
    assert not any(str(path).endswith(".j2") for path in written)


def test_fstab_mounts_both_partitions_by_partuuid(rendered):
    root, _ = rendered
    fields = [line.split() for line in (root / "etc/fstab").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ["PARTUUID=" + ROOT_PARTUUID, "/", "ext4"] == fields[0][:3]
    assert ["PARTUUID=" + BOOT_PARTUUID, "/boot/firmware", "vfat"] == fields[1][:3]


def test_sudoers_dropin_names_the_sites_admin_with_sudo_mode(rendered):
    root, _ = rendered
    dropin = root / "etc/sudoers.d/okome-admin"
    assert dropin.read_text().splitlines()[-1].startswith("okome ALL=")
    assert dropin.stat().st_mode & 0o777 == 0o440


def test_scripts_stay_executable_and_plain_files_do_not(rendered):
    root, _ = rendered
    assert (root / "usr/local/sbin/okome-apply-identity").stat().st_mode & 0o777 == 0o755
    assert (root / "etc/ssh/sshd_config.d/okome.conf").stat().st_mode & 0o777 == 0o644


def test_sshd_dropin_allows_keys_only(rendered):
    root, _ = rendered
    settings = dict(line.split(None, 1) for line in
                    (root / "etc/ssh/sshd_config.d/okome.conf").read_text().splitlines()
                    if line and not line.startswith("#"))
    assert settings["PasswordAuthentication"] == "no"
    assert settings["PermitRootLogin"] == "no"
    assert settings["AuthenticationMethods"] == "publickey"


def test_a_missing_value_is_an_error_naming_template_and_value(tmp_path):
    template = tmp_path / "x.conf.j2"
    template.write_text("upstream {{ site.gateway.hots }};\n")
    with pytest.raises(UserError) as err:
        render_template(template, context())
    assert str(template) in err.value.message and "hots" in err.value.message


def test_template_syntax_error_names_the_line(tmp_path):
    template = tmp_path / "x.conf.j2"
    template.write_text("a\n{% if %}\n")
    with pytest.raises(UserError) as err:
        render_template(template, context())
    assert f"{template}:2:" in err.value.message


def test_unknown_overlay_lists_the_known_ones(tmp_path):
    with pytest.raises(UserError) as err:
        render_overlay("commn", tmp_path, context())
    assert "common" in err.value.hint
