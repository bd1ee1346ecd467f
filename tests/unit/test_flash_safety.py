"""The checks before `flash` writes anything: each unsafe target is refused in one line saying
why and what to do. Checking never writes; targets are tmp files and loop devices."""

import os
import subprocess
from pathlib import Path

import pytest

from builder.errors import UserError
from builder.flash import Target, check_target, refuse_unsafe_target, system_devices
from tests.flash_fixtures import loop_device, mounted, needs_root

MIB = 2**20
IMAGE_SIZE = 64 * MIB


def refusal(path: Path, image_size: int | None = IMAGE_SIZE, force: bool = False) -> UserError:
    with pytest.raises(UserError) as raised:
        check_target(path, image_size, force)
    assert "\n" not in str(raised.value)
    return raised.value


def test_a_missing_path_is_refused_rather_than_made_a_file(tmp_path):
    # bmaptool would create /dev/sdx as a file when sdx is mistyped; flash refuses instead.
    error = refusal(tmp_path / "sdx")
    assert "does not exist" in error.message and "touch" in error.hint


def test_a_directory_is_refused(tmp_path):
    assert "is a directory" in refusal(tmp_path).message


def test_a_character_device_is_refused():
    assert "neither a block device nor a regular file" in refusal(Path("/dev/null")).message


def test_an_existing_file_of_any_size_is_a_target(tmp_path):
    """A file grows to the image's size, so its size now does not matter."""
    card = tmp_path / "card.img"
    card.touch()
    target = check_target(card, IMAGE_SIZE)
    assert not target.is_block_device and target.kind == "file"


def test_the_image_itself_is_refused(tmp_path):
    image = tmp_path / "okome-frontend.img"
    image.write_bytes(b"\0" * 512)
    with pytest.raises(UserError, match="is the image itself"):
        check_target(image, 512, image_path=image)


@needs_root
def test_a_disk_that_is_not_removable_needs_force(tmp_path):
    with loop_device(tmp_path / "disk", IMAGE_SIZE) as device:
        error = refusal(device)
        assert "not a removable disk" in error.message and "--force" in error.hint
        assert check_target(device, IMAGE_SIZE, force=True).is_block_device


@needs_root
def test_a_file_that_backs_a_loop_device_is_refused(tmp_path):
    with loop_device(tmp_path / "disk", IMAGE_SIZE) as device:
        error = refusal(tmp_path / "disk")
        assert f"in use as loop device {device}" in error.message


@needs_root
def test_a_card_smaller_than_the_image_is_refused_even_with_force(tmp_path):
    with loop_device(tmp_path / "small", 16 * MIB) as device:
        error = refusal(device, force=True)
        assert "0.02 GiB; the image needs 0.06 GiB" in error.message


@needs_root
def test_a_mounted_device_is_refused_even_with_force(tmp_path):
    with loop_device(tmp_path / "disk", IMAGE_SIZE) as device, \
            mounted(device, tmp_path / "mnt") as mount_point:
        error = refusal(device, force=True)
        assert f"{device} on {mount_point}" in error.message
        assert "unmount" in error.hint


@needs_root
def test_a_device_with_a_mounted_partition_is_refused(tmp_path):
    table = "label: dos\nstart=2048, size=40960, type=83\n"
    with loop_device(tmp_path / "disk", IMAGE_SIZE, partitions=table) as device:
        partition = Path(f"{device}p1")
        if not partition.exists():
            pytest.skip("the kernel made no partition device for the loop device")
        with mounted(partition, tmp_path / "mnt") as mount_point:
            error = refusal(device, force=True)
            assert f"{partition} on {mount_point}" in error.message


@needs_root
def test_a_partition_is_refused_naming_its_disk(tmp_path):
    table = "label: dos\nstart=2048, size=40960, type=83\n"
    with loop_device(tmp_path / "disk", IMAGE_SIZE, partitions=table) as device:
        partition = Path(f"{device}p1")
        if not partition.exists():
            pytest.skip("the kernel made no partition device for the loop device")
        error = refusal(partition, image_size=None, force=True)
        assert "is a partition" in error.message and str(device) in error.hint


@needs_root
def test_a_read_only_card_is_refused(tmp_path):
    with loop_device(tmp_path / "disk", IMAGE_SIZE, read_only=True) as device:
        assert "read-only" in refusal(device, force=True).message


def root_disk() -> Path | None:
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True,
                            text=True).stdout.strip().split("[")[0]
    if not source.startswith("/dev/") or not Path(source).is_block_device():
        return None
    parent = subprocess.run(["lsblk", "-n", "-d", "-o", "PKNAME", source], capture_output=True,
                            text=True).stdout.strip()
    return Path(f"/dev/{parent}") if parent else Path(source)


def test_the_disk_holding_this_machines_root_is_refused_even_with_force():
    disk = root_disk()
    if disk is None:
        pytest.skip("/ is not on a block device here")
    error = refusal(disk, image_size=1, force=True)
    assert "holds this machine's own /" in error.message


def test_system_devices_include_the_root_filesystems_own_device():
    number = os.stat("/").st_dev
    if not Path(f"/sys/dev/block/{os.major(number)}:{os.minor(number)}").exists():
        pytest.skip("/ is on no block device (an overlay or a network filesystem)")
    assert system_devices()[number] == "/"


def test_a_system_disk_behind_lvm_or_crypt_is_refused_by_its_device_number():
    """The disk's number is among the system's whatever the layers above it; this checks the
    decision alone, with a disk made up for it."""
    disk = Target(path=Path("/dev/sdz"), device=Path("/dev/sdz"), is_block_device=True,
                  size=64 * 2**30, kind="disk", removable=True, read_only=False,
                  device_numbers={os.makedev(8, 0), os.makedev(8, 1)})
    with pytest.raises(UserError, match="holds this machine's own /boot"):
        refuse_unsafe_target(disk, IMAGE_SIZE, {os.makedev(8, 1): "/boot"}, force=True)
