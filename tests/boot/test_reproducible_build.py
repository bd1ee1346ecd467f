"""The same inputs give the same image, byte for byte; and the step cache reuses what an input
change did not touch.

Two builds of the lab frontend with SOURCE_DATE_EPOCH set must give identical images; where
they do not, the failure names the first differing file. The first starts from a cache holding
only the bootstrapped base (every later step runs); the second from a cache holding only the
downloaded packages, so it bootstraps its own base too: the same package versions, nothing else
carried over.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.bootstrap import bootstrap_recipe, newest_base
from builder.cache import BuildCache
from builder.cli import default_cache_dir
from builder.paths import PROJECT_DIR
from builder.pipeline import artifact_paths, load_inputs
from tests.imagediff import describe_difference

pytestmark = pytest.mark.boot  # needs the real base, which the boot tests' build makes

ROLE = "frontend"
EPOCH = "1700000000"


def cache_with_only_the_base(target: Path) -> Path:
    """A cache folder holding the shared cache's base for the lab frontend, and nothing else."""
    inputs = load_inputs(ROLE, "lab", None)
    shared = BuildCache(default_cache_dir())
    key = newest_base(shared, bootstrap_recipe(inputs.spec.base, inputs.packages, inputs.mirror))
    assert key, "no cached base: the frontend build should have made it"
    cache = BuildCache(target)
    cache.bootstrap_dir.mkdir(parents=True)
    for source, copy in ((shared.bootstrap_tarball(key), cache.bootstrap_tarball(key)),
                         (shared.bootstrap_meta(key), cache.bootstrap_meta(key))):
        try:
            os.link(source, copy)  # entries are only ever replaced whole
        except OSError:
            shutil.copyfile(source, copy)
    return target


def cache_with_only_the_packages(target: Path) -> Path:
    """A cache folder holding the shared cache's downloaded .deb files, and nothing else."""
    shared = default_cache_dir() / "debs"
    (target / "debs").mkdir(parents=True)
    for deb in shared.glob("*.deb"):
        try:
            os.link(deb, target / "debs" / deb.name)
        except OSError:
            shutil.copyfile(deb, target / "debs" / deb.name)
    return target


# The lab site's secrets, set in every build's environment as an operator's shell may have
# them: a build must carry none of them into anything it writes.
SECRETS = {"OKOME_LAB_REDIS_GATEWAY_PASSWORD": secrets.token_hex(24),
           "OKOME_LAB_REDIS_METRICS_PASSWORD": secrets.token_hex(24)}


def build(cache: Path, out: Path, project: Path = PROJECT_DIR) -> dict:
    env = {**os.environ, "OKOME_IMAGE_CACHE": str(cache), "OKOME_IMAGE_PROJECT": str(project),
           "SOURCE_DATE_EPOCH": EPOCH, **SECRETS}
    result = subprocess.run([sys.executable, "-m", "builder", "build", "--role", ROLE,
                             "--site", "lab", "--out", str(out)],
                            env=env, capture_output=True, text=True)
    log = artifact_paths(out, ROLE).log
    assert result.returncode == 0, f"build failed ({log}): {result.stderr[-2000:]}"
    return json.loads(artifact_paths(out, ROLE).manifest.read_text())


def hits(manifest: dict) -> dict[str, bool]:
    return {entry["step"]: entry["hit"] for entry in manifest["cache"]}


@pytest.fixture(scope="module")
def two_builds(built_image, tmp_path_factory):
    built_image(ROLE)  # makes the shared base if this session has not yet
    work = tmp_path_factory.mktemp("reproducible")
    first = build(cache_with_only_the_base(work / "cache-1"), work / "out-1")
    second = build(cache_with_only_the_packages(work / "cache-2"), work / "out-2")
    yield work, first, second
    shutil.rmtree(work)  # gigabytes of stage entries and images, which pytest would keep


def test_two_builds_from_scratch_give_the_same_image(two_builds):
    work, first, second = two_builds
    assert not any(hit for step, hit in hits(first).items() if step != "bootstrap")
    assert not any(hits(second).values())
    image_1 = artifact_paths(work / "out-1", ROLE).image
    image_2 = artifact_paths(work / "out-2", ROLE).image
    difference = describe_difference(image_1, image_2)
    assert difference is None, f"the two builds differ first in {difference}"


def test_secrets_in_the_builds_environment_reach_nothing_it_writes(two_builds):
    """The raw images, bmaps, manifests, logs and every cache entry of both builds."""
    work, _, _ = two_builds
    written = [path for path in work.rglob("*") if path.is_file() and "debs" not in path.parts]
    assert any(path.suffix == ".tar" for path in written)  # the cold build's base and stages
    found = subprocess.run(["grep", "-l", "-a", "-F", *[f"-e{v}" for v in SECRETS.values()],
                            *map(str, written)], capture_output=True, text=True)
    assert found.returncode == 1 and found.stdout == "", found.stdout or found.stderr


def test_a_build_with_nothing_changed_comes_from_the_cache_whole(two_builds):
    work, first, _ = two_builds
    again = build(work / "cache-1", work / "out-again")
    assert all(hits(again).values()), hits(again)
    assert describe_difference(artifact_paths(work / "out-1", ROLE).image,
                               artifact_paths(work / "out-again", ROLE).image) is None


def test_an_overlay_change_reuses_every_stage(two_builds):
    work, _, _ = two_builds
    project = work / "project"
    for folder in ("images", "stages", "overlays", "sites"):
        shutil.copytree(PROJECT_DIR / folder, project / folder, symlinks=True)
    hosts = project / "overlays/common/etc/hosts.j2"
    hosts.write_text(hosts.read_text() + "# one more line\n")

    changed = build(work / "cache-2", work / "out-changed", project)
    steps = hits(changed)
    assert all(hit for step, hit in steps.items() if step.startswith(("bootstrap", "stage ")))
    assert not steps["overlays"] and not steps["image"]
    assert "one more line" in subprocess.run(
        ["debugfs", "-R", "cat /etc/hosts",
         f"{artifact_paths(work / 'out-changed', ROLE).image}"
         f"?offset={changed['partitions']['root']['start']}"],
        capture_output=True, text=True).stdout
