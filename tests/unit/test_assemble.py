"""Assembly with the real tools on a tiny tree: partition table, FAT boot, ext4 root, no mounts."""

import subprocess

import pytest

from builder import bootpart
from builder.assemble import (
    BOOT_PARTUUID,
    DISK_ID,
    ROOT_FS_UUID,
    ROOT_PARTUUID,
    assemble_image,
    plan_layout,
)
from builder.buildlog import BuildLog


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    work = tmp_path_factory.mktemp("assemble")
    rootfs, bootfs = work / "rootfs", work / "bootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/hello").write_text("from the root\n")
    (rootfs / "boot/firmware").mkdir(parents=True)
    (bootfs / "overlays").mkdir(parents=True)
    (bootfs / "config.txt").write_text("kernel=vmlinuz-x\ninitramfs initrd.img-x followkernel\n")
    (bootfs / "overlays/a.dtbo").write_bytes(b"\0" * 4096)
    layout = plan_layout(rootfs, boot_mib=128, headroom_mib=0)
    path = work / "disk.img"
    assemble_image(BuildLog(work / "build.log"), path, layout, bootfs, rootfs)
    return path, layout


def test_partition_table_has_fixed_ids_and_planned_offsets(image):
    path, layout = image
    parts = bootpart.partitions(path)
    assert [p.partuuid for p in parts] == [BOOT_PARTUUID, ROOT_PARTUUID]
    assert BOOT_PARTUUID.startswith(DISK_ID)
    assert (parts[0].start, parts[0].size) == (layout.boot.start, layout.boot.size)
    assert (parts[1].start, parts[1].size) == (layout.root.start, layout.root.size)
    assert path.stat().st_size == layout.size


def test_boot_partition_is_fat32_holding_the_boot_files(image):
    path, _ = image
    assert bootpart.read_boot_file(path, "config.txt").startswith(b"kernel=vmlinuz-x")
    assert len(bootpart.read_boot_file(path, "overlays/a.dtbo")) == 4096
    info = subprocess.run(["minfo", "-i", f"{path}@@{image[1].boot.start}", "::"],
                          capture_output=True, text=True, env=bootpart.MTOOLS_ENV).stdout
    assert "FAT32" in info


def test_root_partition_is_ext4_with_the_tree(image, tmp_path):
    path, layout = image
    root = tmp_path / "root.ext4"
    with path.open("rb") as src, root.open("wb") as dst:
        src.seek(layout.root.start)
        dst.write(src.read(layout.root.size))
    header = subprocess.run(["dumpe2fs", "-h", str(root)], capture_output=True,
                            text=True).stdout
    assert f"Filesystem UUID:          {ROOT_FS_UUID}" in header
    content = subprocess.run(["debugfs", "-R", "cat /etc/hello", str(root)],
                             capture_output=True, text=True).stdout
    assert content == "from the root\n"
    assert subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True).returncode == 0


def test_image_is_sparse(image):
    path, layout = image
    assert path.stat().st_blocks * 512 < layout.size // 4


def test_identity_files_can_be_written_without_mounting(image, tmp_path):
    path, _ = image
    bootpart.write_boot_files(path, "okome", {"hostname": b"frontend-b\n"}, tmp_path)
    bootpart.write_boot_files(path, "okome", {"hostname": b"frontend-a\n"}, tmp_path)
    assert bootpart.read_boot_file(path, "okome/hostname") == b"frontend-a\n"
    assert list(tmp_path.iterdir()) == []
