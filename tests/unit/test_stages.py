"""Stage discovery in pi-gen's form: order, SKIP, packages, scripts, mistakes."""

import pytest

from builder.errors import UserError
from builder.imagespec import load_image_spec
from builder.stages import load_stages, read_packages


def make_substage(root, stage, name, **entries):
    path = root / stage / name
    path.mkdir(parents=True)
    for entry, content in entries.items():
        (path / entry.replace("_", "-").replace("-sh", ".sh")).write_text(content)
    return path


def test_substages_run_stage_by_stage_in_number_order(tmp_path):
    make_substage(tmp_path, "10-two", "00-a", packages="x\n")
    make_substage(tmp_path, "00-one", "10-late", **{"00-run.sh": "true"})
    make_substage(tmp_path, "00-one", "02-early", **{"00-run-chroot.sh": "true"})
    order = [s.label for s in load_stages(["00-one", "10-two"], tmp_path)]
    assert order == ["00-one/02-early", "00-one/10-late", "10-two/00-a"]


def test_scripts_keep_their_number_order_and_kind(tmp_path):
    path = make_substage(tmp_path, "00-s", "00-x")
    for name in ["01-run-chroot.sh", "00-run.sh", "02-run.sh"]:
        (path / name).write_text("true\n")
    scripts = load_stages(["00-s"], tmp_path)[0].scripts
    assert [(s.path.name, s.in_chroot) for s in scripts] == [
        ("00-run.sh", False), ("01-run-chroot.sh", True), ("02-run.sh", False)]


def test_skip_leaves_out_a_substage_or_a_whole_stage(tmp_path):
    make_substage(tmp_path, "00-s", "00-kept")
    make_substage(tmp_path, "00-s", "01-skipped", SKIP="")
    make_substage(tmp_path, "10-off", "00-x")
    (tmp_path / "10-off" / "SKIP").write_text("")
    assert [s.label for s in load_stages(["00-s", "10-off"], tmp_path)] == ["00-s/00-kept"]


def test_packages_file_allows_comments_and_several_per_line(tmp_path):
    path = tmp_path / "packages"
    path.write_text("# comment\nnginx-light  curl # trailing\n\nredis-server\n")
    assert read_packages(path) == ("nginx-light", "curl", "redis-server")


def test_unknown_stage_lists_the_known_ones(tmp_path):
    make_substage(tmp_path, "00-base", "00-x")
    with pytest.raises(UserError) as err:
        load_stages(["20-nope"], tmp_path)
    assert "unknown stage '20-nope'" in err.value.message and "00-base" in err.value.hint


def test_unexpected_entry_in_a_substage_is_named(tmp_path):
    path = make_substage(tmp_path, "00-s", "00-x")
    (path / "run.sh").write_text("true\n")
    with pytest.raises(UserError) as err:
        load_stages(["00-s"], tmp_path)
    assert "run.sh: unexpected entry" in err.value.message


def test_the_project_stages_load_for_every_role():
    for role in ["frontend", "backend"]:
        substages = load_stages(load_image_spec(role).stages)
        packages = {p for s in substages for p in s.packages}
        assert {"linux-image-arm64", "raspi-firmware", "openssh-server"} <= packages
