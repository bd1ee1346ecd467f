"""`okome-image boot` as an engineer runs it: it prints how to connect, the printed `ssh` command
logs in to the guest, Ctrl-C stops it and removes its files, and the image is left unchanged."""

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.pipeline import sha256_file

pytestmark = pytest.mark.boot


def test_boot_prints_an_ssh_command_that_works_and_ctrl_c_cleans_up(built_image):
    image = built_image("backend")
    before = sha256_file(image)
    boot = subprocess.Popen([sys.executable, "-m", "builder", "boot", "--image", str(image),
                             "--site", "lab", "--name", "engineer-test"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = []
    try:
        deadline = time.monotonic() + 600
        while not any(line.startswith("SSH is up") for line in said):
            line = boot.stderr.readline()
            assert line or boot.poll() is None, f"boot ended early: {''.join(said)}"
            said.append(line)
            assert time.monotonic() < deadline, "".join(said)
        ssh = next(line for line in said if line.startswith("connect with: "))
        ssh_argv = shlex.split(ssh.removeprefix("connect with: "))
        work_dir = Path(re.search(r"serial console log: (\S+)/console\.log",
                                  "".join(said)).group(1))

        login = subprocess.run([*ssh_argv[:-1], "-o", "BatchMode=yes", ssh_argv[-1], "hostname"],
                               capture_output=True, text=True, timeout=120)
        assert login.returncode == 0, login.stderr
        assert login.stdout.strip() == "engineer-test"
    finally:
        boot.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does
        boot.communicate(timeout=60)

    assert boot.returncode == 130
    assert not work_dir.exists()
    qemu = subprocess.run(["pgrep", "-f", str(work_dir)], capture_output=True, text=True)
    assert qemu.stdout == ""
    assert sha256_file(image) == before
