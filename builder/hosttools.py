"""What the build host must provide: tools (named with their Debian package) and arm64 binfmt."""

import shutil
import subprocess
from pathlib import Path

from builder.errors import UserError

# Each tool the build or the boot runs, with the Debian package that provides it.
BUILD_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "unshare": "util-linux",
    "tar": "tar",
    "dpkg-query": "dpkg",
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "bmaptool": "bmap-tools",
    "zstd": "zstd",
}
BOOT_TOOLS = {
    "qemu-system-aarch64": "qemu-system-arm",
    "mcopy": "mtools",
    "sfdisk": "fdisk",
    "ssh-keygen": "openssh-client",
}

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_AARCH64 = Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P")


def require_tools(tools: dict[str, str]) -> None:
    """Fail with the Debian packages to install when any tool is missing."""
    missing = {tool: package for tool, package in tools.items() if not shutil.which(tool)}
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        raise UserError(f"missing host tools: {', '.join(sorted(missing))}",
                        f"apt-get install {packages} (or run `make deps`)")


def ensure_arm64_binfmt() -> None:
    """Make sure arm64 binaries run through qemu-user, registering the handler when needed.

    The handler must have the F (fix binary) flag: the root filesystem holds no qemu binary,
    so the kernel has to keep the host's interpreter open across the chroot.
    """
    entry = BINFMT_DIR / "qemu-aarch64"
    if not entry.exists():
        if not QEMU_AARCH64.exists():
            raise UserError("arm64 emulation is not installed",
                            "apt-get install qemu-user-static binfmt-support")
        if not (BINFMT_DIR / "register").exists():
            _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                 "mounting binfmt_misc", "the build must run as root on a host that allows it")
        if not shutil.which("update-binfmts"):
            raise UserError("cannot register arm64 emulation: update-binfmts is missing",
                            "apt-get install binfmt-support")
        _run(["update-binfmts", "--enable", "qemu-aarch64"], "registering qemu-aarch64",
             "check `update-binfmts --display qemu-aarch64`")

    status = entry.read_text()
    if not status.startswith("enabled"):
        _run(["update-binfmts", "--enable", "qemu-aarch64"], "enabling qemu-aarch64",
             "check `update-binfmts --display qemu-aarch64`")
        status = entry.read_text()
    flags = next((line.split(":", 1)[1].strip() for line in status.splitlines()
                  if line.startswith("flags:")), "")
    if "F" not in flags:
        raise UserError(f"the qemu-aarch64 binfmt handler lacks the F flag (flags: {flags})",
                        "use Debian's qemu-user-static, whose handler is registered with it")


def _run(argv: list[str], what: str, hint: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{what} failed: {result.stderr.strip() or result.stdout.strip()}", hint)
