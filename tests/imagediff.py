"""Where two images differ, in words: the first differing byte, mapped to the partition table,
or to the file (or the file's metadata) it belongs to in the boot or root filesystem."""

import filecmp
import os
import re
import subprocess
from pathlib import Path

from builder.bootpart import MTOOLS_ENV, partitions

BLOCK = 4096
INODE_SIZE = 256  # mke2fs's default for ext4, which assemble.py uses


def first_differing_offset(a: Path, b: Path) -> int | None:
    """The first byte offset where the files differ (None if identical)."""
    result = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    match = re.search(r"differ: (?:byte|char) (\d+)", result.stdout)
    if match:
        return int(match.group(1)) - 1
    return min(a.stat().st_size, b.stat().st_size)  # "EOF on ...": one is a prefix


def describe_difference(a: Path, b: Path) -> str | None:
    """None when the images are byte-identical; otherwise what differs first."""
    offset = first_differing_offset(a, b)
    if offset is None:
        return None
    found = partitions(a)
    for part in found:
        if part.start <= offset < part.start + part.size:
            within = offset - part.start
            if part.number == 1:
                return f"boot partition: {describe_fat_difference(a, b, part.start, within)}"
            return f"root partition: {describe_ext4_difference(a, part.start, within)}"
    return f"byte {offset}, outside the partitions (the partition table or the gaps)"


def _debugfs(image: Path, start: int, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, f"{image}?offset={start}"],
                          capture_output=True, text=True).stdout


def _path_of_inode(image: Path, start: int, inode: int) -> str:
    listing = _debugfs(image, start, f"ncheck {inode}")
    lines = listing.strip().splitlines()[1:]  # after the "Inode\tPathname" header
    return lines[0].split("\t", 1)[1] if lines else f"inode {inode} (no path: reserved)"


def describe_ext4_difference(image: Path, start: int, within: int) -> str:
    """The file whose data holds the byte, or whose inode does, or the metadata it is in."""
    block = within // BLOCK
    owner = re.search(r"^\d+\t(\d+)$", _debugfs(image, start, f"icheck {block}"), re.M)
    if owner:
        return f"the contents of {_path_of_inode(image, start, int(owner.group(1)))}"

    header = subprocess.run(["dumpe2fs", f"{image}?offset={start}"], capture_output=True,
                            text=True).stdout
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)", header, re.M).group(1))
    tables = re.findall(r"^Group (\d+):.*?Inode table at (\d+)-(\d+)", header, re.M | re.S)
    for group, first, last in tables:
        if int(first) <= block <= int(last):
            index = ((block - int(first)) * BLOCK + within % BLOCK) // INODE_SIZE
            inode = int(group) * per_group + index + 1
            return (f"the metadata (times, mode, owner, size) of "
                    f"{_path_of_inode(image, start, inode)}")
    return f"filesystem metadata in block {block} (superblock, bitmaps or a directory index)"


def describe_fat_difference(a: Path, b: Path, start: int, within: int) -> str:
    """The first path (sorted) whose contents differ; else the FAT's own metadata."""
    trees = []
    for image, name in ((a, "a"), (b, "b")):
        target = a.parent / f".imagediff-boot-{name}"
        subprocess.run(["rm", "-rf", str(target)], check=True)
        target.mkdir()
        subprocess.run(["mcopy", "-s", "-n", "-i", f"{image}@@{start}", "::/*", str(target)],
                       capture_output=True, env=MTOOLS_ENV, check=True)
        trees.append(target)
    try:
        differing = first_differing_path(*trees)
    finally:
        for tree in trees:
            subprocess.run(["rm", "-rf", str(tree)], check=True)
    if differing:
        return f"the contents of /{differing}"
    return (f"FAT metadata at byte {within} (times, directory order or allocation); every "
            f"file's contents are the same")


def first_differing_path(a: Path, b: Path) -> str | None:
    """The first path, in sorted order, that exists in only one tree or differs in contents."""
    def listing(root: Path) -> set[str]:
        return {os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files}

    in_a, in_b = listing(a), listing(b)
    for path in sorted(in_a | in_b):
        if path not in in_a or path not in in_b:
            return path
        left, right = a / path, b / path
        if left.is_file() and not filecmp.cmp(left, right, shallow=False):
            return path
    return None
