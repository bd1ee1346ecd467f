"""Assembly is reproducible on tiny trees, and when two images differ the comparison names the
file: the tool the reproducible-build test reports with."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from builder.assemble import assemble_image, plan_layout
from builder.buildlog import BuildLog
from tests.imagediff import describe_difference

EPOCH = 1700000000


def make_trees(work: Path, hello: str = "from the root\n", config: str = "kernel=x\n"):
    rootfs, bootfs = work / "rootfs", work / "bootfs"
    for name in ("etc/b", "etc/a", "usr/bin", "boot/firmware"):
        (rootfs / name).mkdir(parents=True)
    (rootfs / "etc/hello").write_text(hello)
    (rootfs / "etc/a/one").write_text("1\n")
    (rootfs / "usr/bin/tool").write_bytes(b"\x7fELF" + b"\0" * 9000)
    os.symlink("../etc/hello", rootfs / "usr/hello")
    (bootfs / "overlays").mkdir(parents=True)
    (bootfs / "config.txt").write_text(config)
    (bootfs / "overlays/a.dtbo").write_bytes(b"\0" * 4096)
    for tree in (rootfs, bootfs):
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in dirnames + filenames + [""]:
                os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    return rootfs, bootfs


def assemble(work: Path, **contents) -> Path:
    work.mkdir()
    rootfs, bootfs = make_trees(work, **contents)
    (rootfs / "etc/hello").read_text()  # an access time of its own
    image = work / "disk.img"
    layout = plan_layout(rootfs, boot_mib=128, headroom_mib=0)
    assemble_image(BuildLog(None), image, layout, bootfs, rootfs, source_date_epoch=EPOCH)
    return image


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return assemble(tmp_path_factory.mktemp("first") / "w")


def test_the_same_trees_made_at_different_times_give_the_same_bytes(first, tmp_path):
    time.sleep(1.1)  # the second tree's change and access times are a second later
    assert describe_difference(first, assemble(tmp_path / "w")) is None


def test_a_changed_file_is_named(first, tmp_path):
    other = assemble(tmp_path / "w", hello="from THE root\n")  # the same size
    assert describe_difference(first, other) == "root partition: the contents of /etc/hello"


def test_a_file_of_another_size_is_named_by_its_metadata(first, tmp_path):
    other = assemble(tmp_path / "w", hello="from a longer root\n")
    assert describe_difference(first, other) == (
        "root partition: the metadata (times, mode, owner, size) of /etc/hello")


def test_changed_metadata_is_named_with_its_file(first, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    rootfs, bootfs = make_trees(work)
    os.chmod(rootfs / "usr/bin/tool", 0o700)
    os.utime(rootfs / "usr/bin/tool", (EPOCH, EPOCH))
    image = work / "disk.img"
    assemble_image(BuildLog(None), image, plan_layout(rootfs, 128, 0), bootfs, rootfs,
                   source_date_epoch=EPOCH)
    assert describe_difference(first, image) == (
        "root partition: the metadata (times, mode, owner, size) of /usr/bin/tool")


def test_a_changed_boot_file_is_named(first, tmp_path):
    other = assemble(tmp_path / "w", config="kernel=y\n")
    assert describe_difference(first, other) == "boot partition: the contents of /config.txt"


def test_the_root_filesystem_carries_no_time_of_the_build(first):
    from builder.bootpart import partitions
    root = partitions(first)[1]
    header = subprocess.run(["dumpe2fs", "-h", f"{first}?offset={root.start}"],
                            capture_output=True, text=True, env={**os.environ, "TZ": "UTC"}).stdout
    stamps = [line.split(":", 1)[1].strip() for line in header.splitlines()
              if line.startswith(("Filesystem created:", "Last write time:"))]
    assert stamps and set(stamps) == {time.strftime("%a %b %e %H:%M:%S %Y",
                                                    time.gmtime(EPOCH))}
