"""Reading and writing an image's FAT boot partition with mtools: no mount, no loop device."""

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from builder.errors import UserError

MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


@dataclass(frozen=True)
class PartitionEntry:
    number: int
    start: int  # bytes
    size: int  # bytes
    partuuid: str


def partitions(image: Path) -> list[PartitionEntry]:
    """The MBR's partitions, as sfdisk reads them."""
    result = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{image}: no readable partition table ({result.stderr.strip()})",
                        "is this an okome-image image?")
    table = json.loads(result.stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    disk_id = table.get("id", "0x0").removeprefix("0x")
    return [PartitionEntry(number=i + 1, start=p["start"] * sector, size=p["size"] * sector,
                           partuuid=f"{disk_id}-{i + 1:02d}")
            for i, p in enumerate(table["partitions"])]


def boot_partition(image: Path) -> PartitionEntry:
    found = partitions(image)
    if not found:
        raise UserError(f"{image}: the partition table is empty")
    return found[0]


def _mtools(argv: list[str], what: str) -> str:
    result = subprocess.run(argv, capture_output=True, env=MTOOLS_ENV)
    if result.returncode != 0:
        raise UserError(f"{what} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout.decode(errors="replace")


def read_boot_file(image: Path, name: str) -> bytes:
    """One file of the boot partition."""
    part = boot_partition(image)
    result = subprocess.run(["mtype", "-i", f"{image}@@{part.start}", f"::/{name}"],
                            capture_output=True, env=MTOOLS_ENV)
    if result.returncode != 0:
        raise UserError(f"{image}: no {name} on the boot partition")
    return result.stdout


def copy_boot_file(image: Path, name: str, target: Path) -> None:
    part = boot_partition(image)
    _mtools(["mcopy", "-n", "-i", f"{image}@@{part.start}", f"::/{name}", str(target)],
            f"copying {name} out of the boot partition")


def write_boot_files(image: Path, folder: str, files: dict[str, bytes], staging: Path) -> None:
    """Replace the boot partition's `folder` with `files` (name → content)."""
    part = boot_partition(image)
    target = f"{image}@@{part.start}"
    subprocess.run(["mdeltree", "-i", target, f"::/{folder}"], capture_output=True,
                   env=MTOOLS_ENV)
    _mtools(["mmd", "-i", target, f"::/{folder}"], f"creating {folder}/ on the boot partition")
    for name, content in files.items():
        local = staging / name
        local.write_bytes(content)
        try:
            _mtools(["mcopy", "-o", "-i", target, str(local), f"::/{folder}/{name}"],
                    f"writing {folder}/{name}")
        finally:
            local.unlink()
