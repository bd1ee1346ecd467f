"""Step cache keys: a change to one input changes the key of the step that reads it and of every
step after it, and of none before it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.paths import PROJECT_DIR

# Keys are computed in a child process, because the definitions folder is fixed at import
# (builder/paths.py); the mirror is given, so the host's apt sources play no part.
KEYS_SCRIPT = """
import json, sys
from builder.bootstrap import bootstrap_key, bootstrap_recipe
from builder.pipeline import load_inputs, plan_steps
inputs = load_inputs("frontend", "lab", "http://mirror.example/debian")
base = bootstrap_key(bootstrap_recipe(inputs.spec.base, inputs.packages, inputs.mirror),
                     sys.argv[2])
installed = json.loads(sys.argv[1])
keys = {"bootstrap": base}
keys.update({step.name: step.key for step in plan_steps(inputs, base, installed)})
print(json.dumps(keys))
"""
INSTALLED = ["nginx=1.22.1-9:arm64", "systemd=252.30-1~deb12u2:arm64"]


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    for folder in ("images", "stages", "overlays", "sites"):
        shutil.copytree(PROJECT_DIR / folder, root / folder, symlinks=True)
    return root


def keys(project: Path, installed=INSTALLED, epoch="1700000000",
         release="digest-of-the-mirror's-release-file") -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OKOME_IMAGE_PROJECT": str(project),
           "SOURCE_DATE_EPOCH": epoch}
    result = subprocess.run([sys.executable, "-c", KEYS_SCRIPT, json.dumps(installed), release],
                            capture_output=True, text=True, env=env, cwd=PROJECT_DIR, check=True)
    found = json.loads(result.stdout)
    assert list(found)[0] == "bootstrap" and list(found)[-2:] == ["overlays", "image"]
    return found


@pytest.fixture
def before(project):
    return keys(project)


def changed_from(before: dict, after: dict) -> str:
    """The first step whose key changed; every step after it must have changed too."""
    assert list(before) == list(after)
    changed = [step for step in before if before[step] != after[step]]
    assert changed == list(before)[len(before) - len(changed):], "a change invalidates a tail"
    return changed[0]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_same_inputs_give_the_same_keys(project, before):
    assert keys(project) == before


def test_one_overlay_file_rebuilds_from_the_overlay_step(project, before):
    hosts = project / "overlays/common/etc/hosts.j2"
    hosts.write_text(hosts.read_text() + "# one more line\n")
    assert changed_from(before, keys(project)) == "overlays"


def test_an_overlay_file_made_executable_counts(project, before):
    plain = next(p for p in sorted((project / "overlays/common/etc").rglob("*"))
                 if p.is_file() and not p.is_symlink() and p.suffix != ".j2")
    plain.chmod(0o755)
    assert changed_from(before, keys(project)) == "overlays"


def test_a_site_value_a_template_uses_rebuilds_from_the_overlay_step(project, before):
    edit(project / "sites/lab.yaml", "port: 8000", "port: 8001")
    assert changed_from(before, keys(project)) == "overlays"


def test_a_site_value_the_stages_use_rebuilds_from_the_first_stage(project, before):
    edit(project / "sites/lab.yaml", "user: okome", "user: okadmin")
    assert changed_from(before, keys(project)) == "stage 00-base"


def test_a_stage_file_rebuilds_from_its_stage(project, before):
    script = project / "stages/20-system/00-admin/00-run-chroot.sh"
    script.write_text(script.read_text() + "true\n")
    assert changed_from(before, keys(project)) == "stage 20-system"


def test_a_stage_package_list_rebuilds_from_the_bootstrap(project, before):
    packages = project / "stages/20-system/10-hardening/packages"
    packages.write_text(packages.read_text() + "less\n")
    assert changed_from(before, keys(project)) == "bootstrap"


def test_an_image_package_rebuilds_from_the_bootstrap(project, before):
    edit(project / "images/frontend.yaml", "  - keepalived\n", "  - keepalived\n  - less\n")
    assert changed_from(before, keys(project)) == "bootstrap"


def test_a_mirror_with_new_versions_rebuilds_from_the_bootstrap(project, before):
    assert changed_from(before, keys(project, release="the-next-point-release")) == "bootstrap"


def test_without_the_mirror_the_newest_base_of_the_same_recipe_is_used(tmp_path):
    from builder.bootstrap import newest_base
    from builder.cache import BuildCache, write_json_atomically

    cache = BuildCache(tmp_path)
    cache.bootstrap_dir.mkdir()
    for key, recipe, created in [("a" * 64, "r1", 100), ("b" * 64, "r1", 200),
                                 ("c" * 64, "r2", 300), ("d" * 64, "r1", 400)]:
        write_json_atomically(cache.bootstrap_meta(key), {"key": key, "recipe": recipe,
                                                          "created": created, "packages": []})
        if key != "d" * 64:  # its tarball never finished
            cache.bootstrap_tarball(key).write_bytes(b"")
    assert newest_base(cache, "r1") == "b" * 64
    assert newest_base(cache, "r3") is None


def test_an_unreachable_mirror_without_a_cached_base_is_one_error(tmp_path):
    # Port 1 on loopback: refused at once.
    result = subprocess.run(
        [sys.executable, "-m", "builder", "build", "--role", "frontend", "--site", "lab",
         "--mirror", "http://127.0.0.1:1/debian", "--out", str(tmp_path / "out"),
         "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [next(line for line in result.stderr.splitlines()
                           if line.startswith("error: the mirror http://127.0.0.1:1/debian "
                                              "does not answer for bookworm"))]
    assert "Traceback" not in result.stderr
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no work folder left
    assert not (tmp_path / "out/frontend/okome-frontend.img").exists()


def test_a_new_package_version_rebuilds_everything_after_the_bootstrap(project, before):
    newer = ["nginx=1.22.1-9+deb12u1:arm64", INSTALLED[1]]
    assert changed_from(before, keys(project, installed=newer)) == "stage 00-base"


def test_an_image_option_the_stages_read_rebuilds_from_the_first_stage(project, before):
    spec = project / "images/frontend.yaml"
    spec.write_text(spec.read_text() + "read_only_root: true\n")
    assert changed_from(before, keys(project)) == "stage 00-base"


def test_partition_sizes_rebuild_only_the_image(project, before):
    edit(project / "images/frontend.yaml", "root_headroom_mib: 256", "root_headroom_mib: 300")
    assert changed_from(before, keys(project)) == "image"


def test_units_to_enable_rebuild_from_the_overlay_step(project, before):
    edit(project / "images/frontend.yaml", "  - okome-prewarm.timer\n", "")
    assert changed_from(before, keys(project)) == "overlays"


def test_checks_rebuild_only_the_image(project, before):
    spec = project / "images/frontend.yaml"
    edit(spec, "checks:\n", "checks:\n  - \"true\"\n")
    assert changed_from(before, keys(project)) == "image"


def test_source_date_epoch_rebuilds_from_the_first_stage(project, before):
    # Stage scripts see it (the initramfs's file times), so it is an input of every stage.
    assert changed_from(before, keys(project, epoch="1700000001")) == "stage 00-base"


def test_a_key_covers_the_step_its_inputs_and_the_previous_key():
    from builder.cache import step_key
    assert step_key("x", "p", a=1, b=[1, 2]) == step_key("x", "p", b=[1, 2], a=1)
    assert step_key("x", "p", a=1) != step_key("x", "q", a=1)
    assert step_key("x", "p", a=1) != step_key("y", "p", a=1)


def test_a_sparse_file_hashes_as_its_full_contents(tmp_path):
    import hashlib

    from builder.pipeline import sha256_file
    sparse = tmp_path / "sparse.img"
    with sparse.open("wb") as f:
        f.write(b"start")
        f.seek(9 * 2**20 + 7)
        f.write(b"middle")
        f.truncate(20 * 2**20 + 3)  # ends in a hole
    assert sha256_file(sparse) == hashlib.sha256(sparse.read_bytes()).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_definitions_outside_git_count_from_their_newest_file(project):
    """Without SOURCE_DATE_EPOCH or git, the epoch is the definitions' newest file time: the
    same tree gives the same epoch (and cache keys), a changed file a later one."""
    def epoch() -> int:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OKOME_IMAGE_PROJECT": str(project)}
        script = "from builder.pipeline import default_source_date_epoch as e; print(e())"
        return int(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                  text=True, env=env, cwd=PROJECT_DIR, check=True).stdout)

    newest = max(int(p.lstat().st_mtime) for p in project.rglob("*"))
    assert epoch() == newest == epoch()
    hosts = project / "overlays/common/etc/hosts.j2"
    os.utime(hosts, (newest + 100, newest + 100))
    assert epoch() == newest + 100
