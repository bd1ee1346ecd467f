"""The same inputs give the same image, byte for byte; and the step cache reuses what an input
change did not touch.

Two builds of the lab frontend, each from a cache holding only the bootstrapped base (every
later step runs from scratch), with SOURCE_DATE_EPOCH set, must give identical images; where
they do not, the failure names the first differing file. The base itself is shared rather than
made twice: a cold mmdebstrap costs minutes under emulation, and its own reproducibility is
what `bench/reproducible_bootstrap.py` checks.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.bootstrap import bootstrap_key
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
    key = bootstrap_key(inputs.spec.base, inputs.packages, inputs.mirror)
    shared = BuildCache(default_cache_dir())
    tarball = shared.bootstrap_tarball(key)
    assert tarball.exists(), f"no cached base {key[:12]}: the frontend build should have made it"
    cache = BuildCache(target)
    cache.bootstrap_dir.mkdir(parents=True)
    try:
        os.link(tarball, cache.bootstrap_tarball(key))  # tarballs are only ever replaced whole
    except OSError:
        shutil.copyfile(tarball, cache.bootstrap_tarball(key))
    return target


def build(cache: Path, out: Path, project: Path = PROJECT_DIR) -> dict:
    env = {**os.environ, "OKOME_IMAGE_CACHE": str(cache), "OKOME_IMAGE_PROJECT": str(project),
           "SOURCE_DATE_EPOCH": EPOCH}
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
    second = build(cache_with_only_the_base(work / "cache-2"), work / "out-2")
    yield work, first, second
    shutil.rmtree(work)  # gigabytes of stage entries and images, which pytest would keep


def test_two_builds_from_scratch_give_the_same_image(two_builds):
    work, first, second = two_builds
    for manifest in (first, second):
        assert not any(hit for step, hit in hits(manifest).items() if step != "bootstrap")
    image_1 = artifact_paths(work / "out-1", ROLE).image
    image_2 = artifact_paths(work / "out-2", ROLE).image
    difference = describe_difference(image_1, image_2)
    assert difference is None, f"the two builds differ first in {difference}"


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
