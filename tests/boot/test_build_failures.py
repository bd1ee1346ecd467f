"""A build that fails or is interrupted names what failed and leaves nothing behind: no mount,
no process, no work folder, no half-written artifact."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.cli import default_cache_dir
from builder.paths import PROJECT_DIR

pytestmark = pytest.mark.boot  # needs a real bootstrap

# The frontend's stages and packages, so the two share one bootstrapped base in the cache
# (whichever builds first makes it), plus stage 05-test, which breaks.
ROLE = """\
description: a frontend whose build breaks on purpose
stages: [00-base, 05-test, 10-boot, 20-system, 30-frontend]
packages: [nginx, keepalived]
overlays: [common]
"""


@pytest.fixture
def project(tmp_path):
    """A copy of the project's definitions with a role whose stage 05-test runs `script`."""
    root = tmp_path / "project"
    for folder in ("images", "stages", "overlays", "sites"):
        shutil.copytree(PROJECT_DIR / folder, root / folder, symlinks=True)
    (root / "images/broken.yaml").write_text(ROLE)
    substage = root / "stages/05-test/00-break"
    substage.mkdir(parents=True)

    def with_script(text: str) -> Path:
        script = substage / "00-run-chroot.sh"
        script.write_text("#!/bin/bash\nset -euo pipefail\n" + text)
        script.chmod(0o755)
        return root

    return with_script


def start_build(project: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OKOME_IMAGE_PROJECT": str(project)}
    return subprocess.Popen(
        [sys.executable, "-m", "builder", "build", "--role", "broken", "--site", "lab",
         "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


def leftovers(out: Path) -> list[str]:
    """Anything a build of role `broken` could have left: work folders, mounts, processes,
    artifacts."""
    found = [str(p) for p in default_cache_dir().glob("build-broken-*")]
    mountinfo = Path("/proc/self/mountinfo").read_text()
    found += [line for line in mountinfo.splitlines() if "build-broken-" in line]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    found += [line for line in ps.splitlines()
              if "build-broken-" in line or "okome-substage" in line or "sleep 613" in line]
    found += [str(p) for p in (out / "broken").glob("*") if p.name != "build.log"]
    return found


def test_failing_substage_is_named_and_leaves_nothing(project, tmp_path):
    root = project("echo 'something went wrong in the stage' >&2\nexit 3\n")
    build = start_build(root, tmp_path / "out")
    output, _ = build.communicate(timeout=1800)

    assert build.returncode == 1, output
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1, output
    assert "substage 05-test/00-break: 00-run-chroot.sh failed (exit 3)" in error[0]
    assert "something went wrong in the stage" in error[0]
    assert "Traceback" not in output
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_build_stops_everything_and_leaves_nothing(project, tmp_path, how):
    root = project("echo started-the-long-substage\nsleep 613\n")
    build = start_build(root, tmp_path / "out")
    log = tmp_path / "out/broken/build.log"
    deadline = time.monotonic() + 1800
    while "started-the-long-substage" not in (log.read_text() if log.exists() else ""):
        assert build.poll() is None, build.stdout.read()
        assert time.monotonic() < deadline, "the build never reached the long substage"
        time.sleep(1)

    if how == "ctrl-c":
        os.killpg(build.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    else:
        build.send_signal(signal.SIGTERM)  # only okome-image itself
    output, _ = build.communicate(timeout=120)

    assert build.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    assert leftovers(tmp_path / "out") == []
