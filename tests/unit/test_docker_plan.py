"""`build --in-docker` without an engine, and what the build container is made of."""

import os
import subprocess
import sys
from pathlib import Path

from builder.docker_build import BuilderRecipe, container_options, plan_container
from builder.paths import PROJECT_DIR


def test_no_engine_is_one_clear_line(tmp_path):
    socket = tmp_path / "no-engine.sock"
    result = subprocess.run(
        [sys.executable, "-m", "builder", "build", "--role", "frontend", "--site", "lab",
         "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--in-docker"],
        env={**os.environ, "DOCKER_HOST": f"unix://{socket}"}, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: no docker engine answers at unix://{socket}"), \
        result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert not (tmp_path / "out" / "frontend").exists()


def test_a_mistake_is_reported_before_the_engine_is_asked(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "builder", "build", "--role", "nope", "--site", "lab",
         "--in-docker"],
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/none.sock"},
        capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: unknown role 'nope'")


def test_the_container_reads_the_checkout_and_writes_only_out_and_cache(tmp_path):
    plan = plan_container("okome-image-builder:0123", "frontend", "lab", tmp_path / "out",
                          tmp_path / "cache", "http://mirror.invalid/debian", 1700000000,
                          uid=1000, gid=1000)
    modes = {Path(path): bind["mode"] for path, bind in plan.binds.items()}
    assert modes[PROJECT_DIR] == "ro"
    writable = {path for path, mode in modes.items() if mode == "rw"}
    assert writable == {(tmp_path / "out").resolve(), (tmp_path / "cache").resolve()}
    assert all(path == bind["bind"] for path, bind in plan.binds.items())  # same paths inside
    assert plan.environment["SOURCE_DATE_EPOCH"] == "1700000000"
    build = plan.command[plan.command.index("--") + 1:]
    assert build == ["build", "--role", "frontend", "--site", "lab",
                     "--out", str((tmp_path / "out").resolve()),
                     "--cache-dir", str((tmp_path / "cache").resolve()),
                     "--mirror", "http://mirror.invalid/debian"]


def test_the_container_is_made_from_the_local_image_and_never_privileged(tmp_path):
    plan = plan_container("okome-image-builder:0123", "frontend", "lab", tmp_path / "out",
                          tmp_path / "cache", "http://mirror.invalid/debian", 1700000000)
    options = container_options(plan)
    assert options["image"] == "okome-image-builder:0123"
    assert not options.get("privileged")
    assert options["network_mode"] == "host"  # the engine makes no network for it


def test_the_builder_image_is_named_by_everything_that_makes_it():
    recipe = BuilderRecipe(mirror="http://a.invalid/debian", architecture="amd64",
                           packages=("mmdebstrap",), requirements=("click>=8",))
    other_mirror = BuilderRecipe(mirror="http://b.invalid/debian", architecture="amd64",
                                 packages=("mmdebstrap",), requirements=("click>=8",))
    more = BuilderRecipe(mirror="http://a.invalid/debian", architecture="amd64",
                         packages=("mmdebstrap", "zstd"), requirements=("click>=8",))
    assert len({recipe.tag, other_mirror.tag, more.tag}) == 3
    assert recipe.tag == BuilderRecipe(**recipe.__dict__).tag
    assert recipe.tag.startswith("okome-image-builder:")
