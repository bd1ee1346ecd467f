"""What flashing tests write to: small images made like the real ones, and loop devices.

A loop device stands in for a card: a block device backed by a file in the test's own folder,
attached here and always detached on the way out. No test writes to a real disk.
"""

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from builder.assemble import assemble_image, plan_layout
from builder.buildlog import BuildLog
from builder.imagelabel import LABEL_FILE, image_label
from builder.pipeline import artifact_paths

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")


def make_role_image(out_dir: Path, role: str, site: str = "lab") -> Path:
    """out_dir/ROLE/okome-ROLE.img as `build` leaves it: image, block map, a manifest."""
    final = artifact_paths(out_dir, role)
    work = out_dir / f"{role}-tree"
    rootfs, bootfs = work / "rootfs", work / "bootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "boot/firmware").mkdir(parents=True)
    # Data of its own in several places, so the block map has ranges to check.
    (rootfs / "etc/hostname").write_text(f"okome-{role}\n")
    (rootfs / "etc/payload").write_bytes(os.urandom(3 * 2**20))
    bootfs.mkdir()
    (bootfs / "config.txt").write_text("kernel=vmlinuz\ninitramfs initrd.img followkernel\n")
    (bootfs / "cmdline.txt").write_text("root=PARTUUID=4f4b4f4d-02 rootwait\n")
    (bootfs / LABEL_FILE).write_text(image_label(role, site))

    final.image.parent.mkdir(parents=True, exist_ok=True)
    layout = plan_layout(rootfs, boot_mib=80, headroom_mib=0)
    assemble_image(BuildLog(None), final.image, layout, bootfs, rootfs)
    subprocess.run(["bmaptool", "--quiet", "create", "-o", str(final.bmap), str(final.image)],
                   check=True)
    final.manifest.write_text(json.dumps({
        "role": role, "site": site, "built_at": "2025-01-01T00:00:00+00:00",
        "image": {"file": final.image.name, "size": layout.size}}))
    return final.image


@contextmanager
def loop_device(backing: Path, size: int, partitions: str | None = None,
                read_only: bool = False) -> Iterator[Path]:
    """A loop device over a new sparse file; `partitions` is an sfdisk script."""
    with backing.open("wb") as f:
        f.truncate(size)
    if partitions:
        subprocess.run(["sfdisk", "--quiet", str(backing)], input=partitions, text=True,
                       check=True)
    argv = ["losetup", "--show", "--find", "--partscan"] + (["--read-only"] if read_only else [])
    device = Path(subprocess.run(argv + [str(backing)], capture_output=True, text=True,
                                 check=True).stdout.strip())
    try:
        if partitions:
            # Without udev the partitions' nodes may need a nudge to appear.
            subprocess.run(["partx", "--add", str(device)], capture_output=True)
            deadline = time.monotonic() + 5
            while not Path(f"{device}p1").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        yield device
    finally:
        subprocess.run(["partx", "--delete", str(device)], capture_output=True)
        subprocess.run(["losetup", "--detach", str(device)], check=True)


@contextmanager
def mounted(device: Path, mount_point: Path) -> Iterator[Path]:
    """An ext4 filesystem made on `device` and mounted, unmounted on the way out."""
    subprocess.run(["mkfs.ext4", "-q", "-F", str(device)], check=True)
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", str(device), str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
