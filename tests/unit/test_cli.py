"""The command line: user mistakes end in one error line and a non-zero exit, no traceback."""

import os
import shutil
import subprocess
import sys

import pytest

from builder.paths import PROJECT_DIR


def okome_image(*args, env=None):
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True,
                          text=True, env=env)


@pytest.mark.parametrize("args, message", [
    (["build", "--role", "nope", "--site", "lab"], "error: unknown role 'nope'"),
    (["build", "--role", "frontend", "--site", "nowhere"], "error: unknown site 'nowhere'"),
    (["boot"], "error: give either --role or --image"),
    (["boot", "--image", "/nonexistent/okome.img"], "error: /nonexistent/okome.img"),
    (["boot", "--role", "frontend", "--out", "/nonexistent"], "error: no frontend image at"),
])
def test_mistakes_are_one_line_and_exit_non_zero(args, message):
    result = okome_image(*args)
    assert result.returncode == 1
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1


def test_broken_site_file_is_reported_with_file_and_line(tmp_path):
    site = tmp_path / "broken.yaml"
    site.write_text("name: broken\nnetwork: {prefix: 10.0.0.0/24\n")
    result = okome_image("build", "--role", "frontend", "--site", str(site))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {site}:3: malformed YAML"), result.stderr


def test_help_lists_the_commands():
    result = okome_image("--help")
    assert result.returncode == 0
    assert "build" in result.stdout and "boot" in result.stdout


def one_error(result, starts: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr
    assert result.stderr.startswith(f"error: {starts}"), result.stderr


def test_paths_of_the_wrong_kind_are_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_error(okome_image("build", "--role", "frontend", "--site", str(tmp_path)),
              f"{tmp_path} is a folder, not a YAML file")
    one_error(okome_image("build", "--role", "frontend", "--site", "lab", "--out", str(a_file),
                          "--cache-dir", str(tmp_path / "cache")), f"{a_file}/frontend: ")
    one_error(okome_image("cache", "list", "--cache-dir", str(tmp_path / "nope")),
              f"no cache folder at {tmp_path / 'nope'}")


@pytest.mark.parametrize("mirror", ["notaurl", "http://", "file:///nonexistent", ""])
def test_a_mirror_that_cannot_be_one_is_refused_before_the_build(tmp_path, mirror):
    one_error(okome_image("build", "--role", "frontend", "--site", "lab", "--mirror", mirror,
                          "--cache-dir", str(tmp_path / "cache")),
              f"--mirror '{mirror}' is not a Debian mirror URL")
    assert not (tmp_path / "cache").exists()


def test_boot_refuses_what_cannot_boot_before_copying_anything(tmp_path):
    compressed = tmp_path / "okome-frontend.img.zst"
    compressed.write_bytes(b"(\xb5/\xfd")
    one_error(okome_image("boot", "--image", str(compressed)), f"{compressed} is compressed")
    noise = tmp_path / "noise.img"
    noise.write_bytes(bytes(range(256)) * 64)
    one_error(okome_image("boot", "--image", str(noise)), f"{noise}: ")
    one_error(okome_image("boot", "--role", "nosuch"), "unknown role 'nosuch'")
    one_error(okome_image("boot", "--image", str(noise), "--name", "a b/../c"),
              "--name 'a b/../c' is not a usable hostname")


def test_definition_mistakes_stop_the_build_before_it_starts(tmp_path):
    """An unknown overlay (file and line) and a template naming a value the site lacks, both
    reported before anything is bootstrapped."""
    project = tmp_path / "project"
    for folder in ("images", "stages", "overlays", "sites"):
        shutil.copytree(PROJECT_DIR / folder, project / folder, symlinks=True)
    env = {**os.environ, "OKOME_IMAGE_PROJECT": str(project)}
    spec = project / "images/frontend.yaml"
    spec.write_text(spec.read_text().replace("overlays: [common,", "overlays: [comon,"))
    result = okome_image("build", "--role", "frontend", "--site", "lab", "--cache-dir",
                         str(tmp_path / "cache"), env=env)
    one_error(result, f"{spec}:6: overlays: unknown overlay 'comon'")

    spec.write_text(spec.read_text().replace("overlays: [comon,", "overlays: [common,"))
    hosts = project / "overlays/common/etc/hosts.j2"
    hosts.write_text(hosts.read_text() + "{{ site.no_such_value }}\n")
    result = okome_image("build", "--role", "frontend", "--site", "lab", "--cache-dir",
                         str(tmp_path / "cache"), env=env)
    one_error(result, f"{hosts}: ")
    assert "no_such_value" in result.stderr
    assert not (tmp_path / "cache").exists()
