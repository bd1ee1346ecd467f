"""Running things inside the root filesystem, with every mount and process confined to the
command's life.

Each command runs in private mount and PID namespaces (util-linux `unshare`): /proc, /sys and
/dev are mounted inside them, and when the command ends, whatever way it ends, the kernel drops
the mounts and kills every process left in the namespace. The host's mount table never sees
the mounts, so an interrupted build leaves neither a mount nor a stray process behind.
"""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from builder.buildlog import BuildLog

# Runs inside the new namespace: mount what package scripts expect, then enter the root.
# /boot/firmware is bound onto itself because on a node it is a mount point (the boot
# partition), and raspi-firmware's hooks refuse to write into it otherwise; the PID namespace
# hides the chroot from their `ischroot` test.
_ENTER = ('set -eu; root=$1; shift; '
          'mount -t proc proc "$root/proc"; '
          'mount -t sysfs -o ro sysfs "$root/sys"; '
          'mount --rbind /dev "$root/dev"; '
          'mount -t tmpfs -o mode=0755 tmpfs "$root/run"; '
          'if [ -d "$root/boot/firmware" ]; then '
          'mount --bind "$root/boot/firmware" "$root/boot/firmware"; fi; '
          'exec chroot "$root" "$@"')

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Keeps package scripts from starting services during the build (see invoke-rc.d(8)).
POLICY_RC_D = "#!/bin/sh\n# okome-image: no service starts while the image is built.\nexit 101\n"


def namespaced(argv: list[str]) -> list[str]:
    """`argv` in private mount and PID namespaces, all of it killed if okome-image dies."""
    return ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
            *argv]


def chroot_command(rootfs: Path, argv: list[str]) -> list[str]:
    return namespaced(["sh", "-c", _ENTER, "okome-chroot", str(rootfs), *argv])


def chroot_env(extra: dict[str, str]) -> dict[str, str]:
    """A clean environment for commands in the image: no host locale, no prompts."""
    env = {
        "PATH": CHROOT_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "SYSTEMD_OFFLINE": "1",
    }
    if "SOURCE_DATE_EPOCH" in os.environ:
        env["SOURCE_DATE_EPOCH"] = os.environ["SOURCE_DATE_EPOCH"]
    env.update(extra)
    return env


def run_in_chroot(log: BuildLog, rootfs: Path, argv: list[str], what: str,
                  env: dict[str, str] | None = None) -> None:
    log.run(chroot_command(rootfs, argv), what, env=chroot_env(env or {}))


def run_script_in_chroot(log: BuildLog, rootfs: Path, script: Path, what: str,
                         env: dict[str, str]) -> None:
    """Copy a script into the root filesystem, run it there, and remove it again."""
    inside = Path("/root/okome-substage.sh")
    target = rootfs / inside.relative_to("/")
    target.write_bytes(script.read_bytes())
    target.chmod(0o755)
    try:
        run_in_chroot(log, rootfs, ["/bin/bash", str(inside)], what, env)
    finally:
        target.unlink(missing_ok=True)


@contextmanager
def services_held_back(rootfs: Path) -> Iterator[None]:
    """policy-rc.d that forbids starting services, in place only while the block runs."""
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text(POLICY_RC_D)
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` in this process's namespace (should always be none)."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found
