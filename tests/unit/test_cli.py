"""The command line: user mistakes end in one error line and a non-zero exit, no traceback."""

import subprocess
import sys

import pytest


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
