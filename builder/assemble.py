"""Image assembly without loop mounts: an MBR, a FAT32 boot partition filled with mtools and an
ext4 root filled from the directory by mke2fs -d, written straight into the image file.

Identifiers are fixed, so the kernel command line and fstab name the root and boot partitions
the same way in every image (PARTUUID), and builds of the same inputs stay identical.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from builder.buildlog import BuildLog

SECTOR = 512
MIB = 1024 * 1024
BOOT_START_MIB = 4  # leaves the first 4 MiB alone, aligned for SD cards' erase blocks

DISK_ID = "4f4b4f4d"  # "OKOM": the MBR disk identifier; PARTUUIDs are DISK_ID-01 and DISK_ID-02
BOOT_PARTUUID = f"{DISK_ID}-01"
ROOT_PARTUUID = f"{DISK_ID}-02"
ROOT_FS_UUID = "4f4b4f4d-0000-4000-8000-000000000002"


@dataclass(frozen=True)
class Partition:
    start: int  # bytes
    size: int  # bytes


@dataclass(frozen=True)
class DiskLayout:
    boot: Partition
    root: Partition

    @property
    def size(self) -> int:
        return self.root.start + self.root.size


def tree_size(path: Path) -> int:
    """Bytes the tree occupies, counting each hard-linked file once, in 4 KiB blocks."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += (st.st_size + 4095) // 4096 * 4096 + 256  # 256: an inode
    return total


def plan_layout(rootfs: Path, boot_mib: int, headroom_mib: int) -> DiskLayout:
    """Partition sizes: the boot size from the spec, the root sized to its contents."""
    used = tree_size(rootfs)
    # ext4 needs room of its own: the journal, group descriptors, bitmaps and inode tables.
    root_mib = (used * 110 // 100) // MIB + 64 + headroom_mib
    boot = Partition(BOOT_START_MIB * MIB, boot_mib * MIB)
    root = Partition(boot.start + boot.size, root_mib * MIB)
    return DiskLayout(boot, root)


def write_partition_table(log: BuildLog, image: Path, layout: DiskLayout) -> None:
    table = (
        "label: dos\n"
        f"label-id: 0x{DISK_ID}\n"
        "unit: sectors\n"
        f"start={layout.boot.start // SECTOR}, size={layout.boot.size // SECTOR}, "
        "type=c, bootable\n"
        f"start={layout.root.start // SECTOR}, size={layout.root.size // SECTOR}, type=83\n"
    )
    table_file = image.with_suffix(".sfdisk")
    table_file.write_text(table)
    try:
        with table_file.open() as stdin:
            log.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image], "sfdisk",
                    stdin=stdin)
    finally:
        table_file.unlink(missing_ok=True)


def write_boot_partition(log: BuildLog, image: Path, part: Partition, bootfs: Path) -> None:
    """FAT32 with 1 KiB clusters: a small FAT32 needs them to have enough clusters at all."""
    log.run(["mkfs.vfat", "-F", "32", "-s", "2", "-n", "BOOT", "--invariant",
             "--offset", str(part.start // SECTOR), image,
             str(part.size // 1024)], "mkfs.vfat")
    entries = sorted(bootfs.iterdir())
    if entries:
        log.run(["mcopy", "-s", "-p", "-m", "-i", f"{image}@@{part.start}", *entries, "::/"],
                "mcopy into the boot partition", env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})


def write_root_partition(log: BuildLog, image: Path, part: Partition, rootfs: Path) -> None:
    env = dict(os.environ)
    if "SOURCE_DATE_EPOCH" in env:
        env["E2FSPROGS_FAKE_TIME"] = env["SOURCE_DATE_EPOCH"]
    log.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "1", "-L", "root",
             "-U", ROOT_FS_UUID,
             "-E", f"offset={part.start},hash_seed={ROOT_FS_UUID},root_owner=0:0",
             "-d", rootfs, image, str(part.size // 4096)], "mke2fs -d", env=env)


def assemble_image(log: BuildLog, image: Path, layout: DiskLayout, bootfs: Path,
                   rootfs: Path) -> None:
    """Write a sparse image file holding the partition table and both filesystems."""
    with image.open("wb") as f:
        f.truncate(layout.size)
    write_partition_table(log, image, layout)
    write_boot_partition(log, image, layout.boot, bootfs)
    write_root_partition(log, image, layout.root, rootfs)
