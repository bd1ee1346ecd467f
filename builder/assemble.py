"""Image assembly without loop mounts: an MBR, a FAT32 boot partition filled with mtools and an
ext4 root filled from the directory by mke2fs -d, written straight into the image file.

Identifiers are fixed, so the kernel command line and fstab name the root and boot partitions
the same way in every image (PARTUUID), and builds of the same inputs stay identical.
"""

import os
import re
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


def write_root_partition(log: BuildLog, image: Path, part: Partition, rootfs: Path,
                         source_date_epoch: int | None) -> None:
    env = dict(os.environ)
    if source_date_epoch is not None:
        env["E2FSPROGS_FAKE_TIME"] = str(source_date_epoch)  # the superblock's times
    log.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "1", "-L", "root",
             "-U", ROOT_FS_UUID,
             "-E", f"offset={part.start},hash_seed={ROOT_FS_UUID},root_owner=0:0",
             "-d", rootfs, image, str(part.size // 4096)], "mke2fs -d", env=env)
    if source_date_epoch is not None:
        clamp_inode_times(log, image, part, source_date_epoch)


def used_inodes(log: BuildLog, filesystem: str) -> list[int]:
    """Inode numbers in use, from the free ranges dumpe2fs lists per block group."""
    listing = log.output(["dumpe2fs", filesystem], "dumpe2fs")
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)", listing, re.M).group(1))
    used = []
    groups = re.findall(r"^\s+Free inodes: ?(.*)$", listing, re.M)
    for group, ranges in enumerate(groups):
        free = set()
        for part in filter(None, (r.strip() for r in ranges.split(","))):
            low, _, high = part.partition("-")
            free.update(range(int(low), int(high or low) + 1))
        first = group * per_group + 1
        used += [ino for ino in range(first, first + per_group) if ino not in free]
    return used


def clamp_inode_times(log: BuildLog, image: Path, part: Partition, epoch: int) -> None:
    """mke2fs -d copies each file's access and change times from the build's tree, where
    they are the time of the build (a change time cannot be set from user space); set both
    to SOURCE_DATE_EPOCH on every used inode, so the same tree makes the same bytes."""
    filesystem = f"{image}?offset={part.start}"
    commands = "".join(f"sif <{ino}> {field} {epoch}\n"
                       for ino in used_inodes(log, filesystem) for field in ("atime", "ctime"))
    script = image.with_name(image.name + ".debugfs")
    script.write_text(commands)
    try:
        # output(): debugfs echoes each of its tens of thousands of commands to stdout. The fake
        # time keeps it from stamping the superblock's last write time with the clock.
        log.output(["debugfs", "-w", "-f", script, filesystem], "debugfs: clamping inode times",
                   env={**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch)})
    finally:
        script.unlink(missing_ok=True)


def assemble_image(log: BuildLog, image: Path, layout: DiskLayout, bootfs: Path,
                   rootfs: Path, source_date_epoch: int | None = None) -> None:
    """Write a sparse image file holding the partition table and both filesystems.

    With `source_date_epoch` (or $SOURCE_DATE_EPOCH), the same trees give the same bytes.
    """
    if source_date_epoch is None and "SOURCE_DATE_EPOCH" in os.environ:
        source_date_epoch = int(os.environ["SOURCE_DATE_EPOCH"])
    with image.open("wb") as f:
        f.truncate(layout.size)
    write_partition_table(log, image, layout)
    write_boot_partition(log, image, layout.boot, bootfs)
    write_root_partition(log, image, layout.root, rootfs, source_date_epoch)
