"""Flashing a card for one node, and rebuilding a dead node, in the order it happens:

    find the image → make the node's identity (secrets are read now) → check the target →
    confirm → write the mapped blocks (bmaptool copy) → read them back against the block map →
    write the identity onto the boot partition (mtools, nothing mounted) → read it back

bmaptool checks the image's data against the block map's checksums while it writes, which
catches a damaged image file; the read-back here catches what the card (or its reader) did not
store. The identity is written after the read-back because it changes the boot partition's
blocks, whose checksums then no longer match the image's.
"""

import errno
import fcntl
import hashlib
import json
import os
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.prompt import Confirm

from builder import bootpart
from builder.buildlog import BuildLog
from builder.errors import UserError
from builder.hosttools import require_tools
from builder.identity import IDENTITY_FOLDER, find_node, node_identity
from builder.imagelabel import LABEL_FILE, parse_image_label
from builder.site import Site, load_site

FLASH_TOOLS = {
    "bmaptool": "bmap-tools",
    "lsblk": "util-linux",
    "findmnt": "util-linux",
    "losetup": "mount",
    "blockdev": "util-linux",
    "sfdisk": "fdisk",
    "mcopy": "mtools",
}

GIB = 2**30
MIB = 2**20
READ_CHUNK = 4 * MIB
COMPRESSED_SUFFIXES = (".zst", ".gz", ".xz", ".bz2")

# The mount points whose disks are this machine's own; `flash` never writes to them.
SYSTEM_MOUNT_POINTS = ("/", "/boot", "/boot/firmware", "/boot/efi")

BLKFLSBUF = 0x1261  # ioctl: write out and drop a block device's buffer cache


# -- the image and its block map -------------------------------------------------------------

@dataclass(frozen=True)
class MappedRange:
    first: int  # block numbers, inclusive
    last: int
    checksum: str


@dataclass(frozen=True)
class BlockMap:
    """What bmaptool writes: the ranges of blocks that hold data, each with its checksum."""

    image_size: int
    block_size: int
    checksum_type: str
    ranges: list[MappedRange]

    @property
    def mapped_bytes(self) -> int:
        return sum(end - start for start, end in map(self.range_bytes, self.ranges))

    def range_bytes(self, mapped: MappedRange) -> tuple[int, int]:
        """Start and end offsets of a range; the last block may end past the image's end."""
        return (mapped.first * self.block_size,
                min((mapped.last + 1) * self.block_size, self.image_size))


def read_block_map(path: Path) -> BlockMap:
    try:
        root = ElementTree.parse(path).getroot()
        ranges = []
        for element in root.find("BlockMap"):
            first, _, last = element.text.strip().partition("-")
            ranges.append(MappedRange(int(first), int(last or first), element.get("chksum")))
        checksum_type = root.findtext("ChecksumType", "sha1").strip()
        block_map = BlockMap(image_size=int(root.findtext("ImageSize")),
                             block_size=int(root.findtext("BlockSize")),
                             checksum_type=checksum_type, ranges=ranges)
    except (OSError, ElementTree.ParseError, AttributeError, TypeError, ValueError) as err:
        raise UserError(f"{path}: not a readable block map ({err})",
                        "make it again: bmaptool create -o IMAGE.bmap IMAGE") from None
    if not all(r.checksum for r in ranges):
        raise UserError(f"{path}: the block map has no checksums, so nothing can be verified",
                        "make it with bmap-tools 3.x: bmaptool create -o IMAGE.bmap IMAGE")
    return block_map


@dataclass(frozen=True)
class ImageToFlash:
    path: Path
    block_map_path: Path
    block_map: BlockMap
    role: str | None  # from the manifest beside the image, when there is one
    site: str | None
    built_at: str | None

    def describe(self) -> str:
        built = [f"role {self.role}" if self.role else "",
                 f"site {self.site}" if self.site else "",
                 f"built {self.built_at}" if self.built_at else ""]
        details = ", ".join(part for part in built if part)
        return f"{self.path}" + (f" ({details})" if details else "")


def find_image(out_dir: Path, role: str, site_name: str,
               image: Path | None = None) -> ImageToFlash:
    """The image to flash: the one given, or the role's latest build in out_dir/ROLE/."""
    from builder.pipeline import artifact_paths

    if image is None:
        image = artifact_paths(out_dir, role).image
        if not image.is_file():
            raise UserError(f"no {role} image at {image}",
                            f"build it: okome-image build --role {role} --site {site_name} "
                            f"--out {out_dir}")
    elif not image.is_file():
        raise UserError(f"{image}: no such image file")

    candidates = [Path(f"{image}.bmap")]
    if image.suffix in COMPRESSED_SUFFIXES:
        candidates.append(image.with_suffix("").with_name(image.with_suffix("").name + ".bmap"))
    block_map_path = next((path for path in candidates if path.is_file()), None)
    if block_map_path is None:
        raw = image.with_suffix("") if image.suffix in COMPRESSED_SUFFIXES else image
        raise UserError(f"{image}: no block map beside it ({candidates[-1].name})",
                        f"put the build's {raw.name}.bmap beside it, or make one from the raw "
                        f"image: bmaptool create -o {raw}.bmap {raw}")

    # The manifest beside the image says what it was built for, if it is this image's.
    manifest = image.parent / "manifest.json"
    built = {}
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        built_file = data.get("image", {}).get("file")
        if built_file and (image.name == built_file or image.name.startswith(built_file + ".")):
            built = data
    return ImageToFlash(path=image, block_map_path=block_map_path,
                        block_map=read_block_map(block_map_path), role=built.get("role"),
                        site=built.get("site"), built_at=built.get("built_at"))


def check_image_fits_node(image: ImageToFlash, site: Site, node_name: str) -> None:
    """An image built for another role or site would boot with the wrong config: refuse it."""
    node = find_node(site, node_name)
    if image.role and image.role != node.role:
        raise UserError(f"{image.path} is the {image.role} image; {node_name} runs {node.role}",
                        f"flash okome-{node.role}.img for {node_name}")
    if image.site and image.site != site.name:
        raise UserError(f"{image.path} was built for site {image.site}, not {site.name}",
                        f"build it for this site: okome-image build --role {node.role} "
                        f"--site {site.name}")


# -- the target and the checks before anything is written ------------------------------------

@dataclass(frozen=True)
class Target:
    """A block device or a regular file, with what the checks need to know about it."""

    path: Path  # as given
    device: Path  # symlinks (/dev/disk/by-id/...) resolved
    is_block_device: bool
    size: int
    kind: str  # lsblk's TYPE (disk, loop, part, ...) or "file"
    removable: bool
    read_only: bool
    model: str = ""
    transport: str = ""
    parent: str = ""  # for a partition, its disk
    # (device, mount point) of the target and of its partitions; swap shows as [SWAP]
    mounts: list[tuple[str, str]] = field(default_factory=list)
    # device numbers of the target and its partitions
    device_numbers: set[int] = field(default_factory=set)
    # for a file: the loop devices it backs, which would see it change under them
    loop_devices: list[str] = field(default_factory=list)
    allocated: int = 0  # for a file: the bytes it takes now, freed when it is rewritten

    def describe(self) -> str:
        if not self.is_block_device:
            return f"{self.path} (a file)"
        details = [self.model, self.transport, f"{self.size / GIB:.1f} GiB",
                   "removable" if self.removable else "not removable"]
        return f"{self.path} ({', '.join(part for part in details if part)})"


def check_card_holds_role(target: Target, role: str, site_name: str) -> None:
    """A card that gets only a new identity must hold the node's role image, built for the
    same site: its boot partition's label says which (builder/imagelabel.py)."""
    try:
        label = parse_image_label(bootpart.read_boot_file(target.device, LABEL_FILE).decode())
    except UserError:
        raise UserError(f"{target.path} holds no okome-image card (no {LABEL_FILE} on a boot "
                        "partition)", "flash the whole image: okome-image flash --node NODE "
                        "IMAGE TARGET") from None
    if label.get("role") != role or label.get("site") != site_name:
        raise UserError(f"{target.path} holds the {label.get('role')} image of site "
                        f"{label.get('site')}; this node runs the {role} image of site "
                        f"{site_name}", f"flash the whole {role} image for it (without "
                        "--identity-only)")


def _lsblk(*args: str) -> list[dict]:
    result = subprocess.run(["lsblk", "--json", "--bytes", *args], capture_output=True,
                            text=True)
    if result.returncode != 0:
        device = args[-1]
        raise UserError(f"{device}: not a usable block device "
                        f"({result.stderr.strip() or 'lsblk cannot read it'})",
                        "an unattached loop device or a card reader without a card has no "
                        "size; check `lsblk`")
    return json.loads(result.stdout)["blockdevices"]


def _device_number(text: str) -> int:
    major, minor = text.split(":")
    return os.makedev(int(major), int(minor))


def _walk(devices: list[dict]) -> Iterator[dict]:
    for device in devices:
        yield device
        yield from _walk(device.get("children", []))


def inspect_target(path: Path) -> Target:
    """What the target is; a missing path, a directory or anything else is refused here."""
    if not path.exists():
        raise UserError(f"{path} does not exist",
                        "give the card's device (lsblk lists them), or to flash into a file, "
                        f"create it first: touch {path}")
    device = path.resolve()
    mode = device.stat().st_mode
    if stat.S_ISDIR(mode):
        raise UserError(f"{path} is a directory",
                        "give the card's device (/dev/sdX, /dev/mmcblkN) or an image file")
    if stat.S_ISREG(mode):
        loops = subprocess.run(["losetup", "--noheadings", "--output", "NAME",
                                "--associated", str(device)], capture_output=True, text=True)
        return Target(path=path, device=device, is_block_device=False,
                      size=device.stat().st_size, kind="file", removable=True,
                      read_only=not os.access(device, os.W_OK),
                      loop_devices=loops.stdout.split(),
                      allocated=device.stat().st_blocks * 512)
    if not stat.S_ISBLK(mode):
        raise UserError(f"{path} is neither a block device nor a regular file",
                        "give the card's device (/dev/sdX, /dev/mmcblkN) or an image file")

    columns = "PATH,MAJ:MIN,TYPE,SIZE,RM,HOTPLUG,RO,TRAN,MODEL,PKNAME,MOUNTPOINTS"
    tree = _lsblk("--output", columns, str(device))
    top = tree[0]
    mounts = [(entry["path"], mount) for entry in _walk(tree)
              for mount in entry.get("mountpoints") or [] if mount]
    # Built-in SD slots often call their cards fixed; an mmcblk disk is still a card.
    removable = bool(top.get("rm") or top.get("hotplug") or top.get("tran") == "usb"
                     or device.name.startswith("mmcblk"))
    return Target(path=path, device=device, is_block_device=True, size=int(top["size"]),
                  kind=top.get("type") or "disk", removable=removable,
                  read_only=bool(top.get("ro")), model=(top.get("model") or "").strip(),
                  transport=top.get("tran") or "", parent=top.get("pkname") or "",
                  mounts=mounts,
                  device_numbers={_device_number(entry["maj:min"]) for entry in _walk(tree)})


def system_devices() -> dict[int, str]:
    """Device number → mount point, for every block device beneath this machine's / and /boot:
    the partition, its disk, and any LVM, crypt or RAID layer between them."""
    found: dict[int, str] = {}
    for mount_point in SYSTEM_MOUNT_POINTS:
        if not os.path.exists(mount_point):
            continue
        sources = set()
        # The filesystem's own device number finds the disk even where findmnt shows none
        # (an overlay root shows "overlay", btrfs a subvolume).
        number = os.stat(mount_point).st_dev
        sysfs = Path(f"/sys/dev/block/{os.major(number)}:{os.minor(number)}")
        if sysfs.exists():
            sources.add(f"/dev/{sysfs.resolve().name}")
        result = subprocess.run(["findmnt", "--noheadings", "--first-only", "--output",
                                 "SOURCE", "--target", mount_point],
                                capture_output=True, text=True)
        source = result.stdout.strip().split("[", 1)[0]
        if source.startswith("/dev/"):
            sources.add(source)
        for source in sources:
            if not os.path.exists(source):
                continue
            for entry in _walk(_lsblk("--inverse", "--output", "PATH,MAJ:MIN", source)):
                found.setdefault(_device_number(entry["maj:min"]), mount_point)
    return found


def refuse_unsafe_target(target: Target, image_size: int | None, system: dict[int, str],
                         force: bool = False, image_path: Path | None = None,
                         mapped_bytes: int | None = None) -> None:
    """Every refusal, decided from what inspect_target found; `force` only allows a disk that
    says it is not removable. image_size None skips the size check (not built yet), and
    mapped_bytes None the free-space check for a file."""
    if target.kind == "part":
        disk = f"/dev/{target.parent}" if target.parent else "the whole disk"
        raise UserError(f"{target.path} is a partition, not a whole card",
                        f"give the whole disk: {disk}")

    system_mounts = sorted({system[n] for n in target.device_numbers if n in system})
    if system_mounts:
        raise UserError(f"{target.path} holds this machine's own {', '.join(system_mounts)}",
                        "that is this computer's disk, never a card: pick the card's device "
                        "from `lsblk` (plug it in and out to see which one it is)")

    if target.mounts:
        where = ", ".join(f"{device} on {mount}" for device, mount in target.mounts)
        raise UserError(f"{target.path} is in use: {where}",
                        "unmount it first (umount, or eject it in the file manager); writing "
                        "now would corrupt what is mounted")

    if target.loop_devices:
        devices = ", ".join(target.loop_devices)
        raise UserError(f"{target.path} is in use as loop device {devices}",
                        f"detach it first (losetup --detach {target.loop_devices[0]}), or "
                        "flash the loop device instead")

    if image_path is not None and not target.is_block_device and \
            os.path.samefile(target.device, image_path):
        raise UserError(f"{target.path} is the image itself", "give another file or a card")

    if not target.is_block_device and (target.device.parent / "manifest.json").is_file():
        raise UserError(f"{target.path} is in a build's output folder "
                        f"({target.device.parent}), among the artifacts of a golden image",
                        "flash into a file elsewhere, or onto a card")

    if target.is_block_device and image_size is not None and target.size < image_size:
        raise UserError(f"{target.path} is {target.size / GIB:.2f} GiB; the image needs "
                        f"{image_size / GIB:.2f} GiB", "use a larger card")

    if target.read_only:
        hint = ("slide the card's lock switch to unlocked" if target.is_block_device
                else "check the file's permissions")
        raise UserError(f"{target.path} is read-only", hint)

    if not target.is_block_device and mapped_bytes is not None:
        space = os.statvfs(target.device.parent)
        free = space.f_bavail * space.f_frsize + target.allocated
        if free < mapped_bytes:
            raise UserError(f"{target.device.parent} has {free / MIB:.0f} MiB free; the image "
                            f"writes {mapped_bytes / MIB:.0f} MiB into {target.path.name}",
                            "free some space, or flash into a file on another disk")

    if target.is_block_device and not target.removable and not force:
        raise UserError(f"{target.describe()} is not a removable disk",
                        "if it really is the card (some built-in readers call cards fixed), "
                        "add --force")


def check_target(path: Path, image_size: int | None, force: bool = False,
                 image_path: Path | None = None, mapped_bytes: int | None = None) -> Target:
    """Inspect the target and refuse it unless it is safe to overwrite."""
    target = inspect_target(path)
    refuse_unsafe_target(target, image_size, system_devices(), force, image_path,
                         mapped_bytes)
    if target.is_block_device:
        _refuse_busy_device(target)
    return target


def _refuse_busy_device(target: Target) -> None:
    """The kernel's own answer: an exclusive open fails while anything holds the device (a
    mount in another namespace, LVM, RAID), which lsblk in this namespace may not show."""
    try:
        descriptor = os.open(target.device, os.O_RDONLY | os.O_EXCL)
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise UserError(f"{target.path} is in use (mounted elsewhere, or part of LVM or "
                            "RAID)", "stop whatever uses it, then try again") from None
        if err.errno == errno.EACCES:
            raise UserError(f"{target.path}: permission denied",
                            "writing a device needs root: run it with sudo") from None
        raise UserError(f"{target.path}: cannot open it: {err.strerror}") from None
    os.close(descriptor)
    if not os.access(target.device, os.W_OK):
        raise UserError(f"{target.path}: permission denied",
                        "writing a device needs root: run it with sudo")


def ask_on_terminal(question: str) -> bool:
    """The confirmation `flash` asks for, unless --yes; nobody at a terminal is not a yes."""
    if not os.isatty(0):
        raise UserError("nobody is at the terminal to confirm overwriting the target",
                        "add --yes to confirm in advance")
    return Confirm.ask(question, console=Console(stderr=True, highlight=False), default=False)


# -- writing and reading back ----------------------------------------------------------------

def _byte_progress(log: BuildLog) -> Progress:
    return Progress(TextColumn("  {task.description}"), BarColumn(),
                    DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=log.console,
                    transient=True, disable=not log.console.is_terminal)


def _bytes_written_by(pid: int) -> int:
    """What a process has written so far (/proc/PID/io): bmaptool's progress, whatever its
    destination is."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _state_after_failed_write(target: Target) -> str:
    """What a write that stopped half-way leaves behind. How far bmaptool got is not known
    exactly (the page cache still writes after it ends), so this assumes the worst."""
    emptied = "" if target.is_block_device else "was emptied and "
    return (f"{target.path} {emptied}may be partly written: it will not boot, and what it "
            "held before is damaged; flash it again")


def write_image(image: ImageToFlash, target: Target, log: BuildLog) -> float:
    """bmaptool copy: only the mapped blocks, checked against the block map while read.

    Returns the seconds it took. A failure says what state the target is left in.
    """
    total = image.block_map.mapped_bytes
    argv = ["bmaptool", "--quiet", "copy", "--bmap", str(image.block_map_path),
            "--no-sig-verify", str(image.path), str(target.device)]
    log.write("$ " + " ".join(argv))
    started = time.monotonic()
    written = 0
    with tempfile.TemporaryFile() as errors, _byte_progress(log) as progress:
        task = progress.add_task(f"write {target.path.name}", total=total)
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errors,
                                   stderr=errors)
        try:
            while process.poll() is None:
                written = max(written, _bytes_written_by(process.pid))
                progress.update(task, completed=min(written, total))
                time.sleep(0.2)
        except BaseException:
            process.terminate()
            process.wait()
            log.info(f"[red]interrupted:[/] {_state_after_failed_write(target)}")
            raise
        errors.seek(0)
        output = errors.read().decode(errors="replace").strip()
    for line in output.splitlines():
        log.write(line)
    if process.returncode != 0:
        reason = output.splitlines()[-1] if output else f"exit {process.returncode}"
        raise UserError(f"writing {image.path.name} to {target.path} failed: "
                        f"{reason.removeprefix('bmaptool: ERROR: ')}",
                        _state_after_failed_write(target))
    seconds = time.monotonic() - started
    log.info(f"wrote {total / MIB:.0f} MiB (of {image.block_map.image_size / MIB:.0f} MiB) "
             f"in {seconds:.1f} s, {total / MIB / max(seconds, 0.001):.1f} MiB/s")
    return seconds


def _forget_cached_blocks(descriptor: int, is_block_device: bool) -> None:
    """Make the next read come from the card, not from this machine's page cache."""
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    if is_block_device:
        try:
            fcntl.ioctl(descriptor, BLKFLSBUF)
        except OSError:
            pass
    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)


class VerificationFailed(UserError):
    """What was read back from the target differs from the image."""


def verify_target(target: Target, block_map: BlockMap, log: BuildLog) -> float:
    """Read every mapped range back from the target and compare it with the block map."""
    started = time.monotonic()
    bad: list[tuple[int, int]] = []
    descriptor = os.open(target.device, os.O_RDONLY)
    try:
        _forget_cached_blocks(descriptor, target.is_block_device)
        with _byte_progress(log) as progress:
            task = progress.add_task(f"verify {target.path.name}", total=block_map.mapped_bytes)
            for mapped in block_map.ranges:
                start, end = block_map.range_bytes(mapped)
                digest = hashlib.new(block_map.checksum_type)
                offset = start
                while offset < end:
                    chunk = os.pread(descriptor, min(READ_CHUNK, end - offset), offset)
                    if not chunk:
                        break
                    digest.update(chunk)
                    offset += len(chunk)
                    progress.advance(task, len(chunk))
                if digest.hexdigest() != mapped.checksum:
                    bad.append((start, end))
    finally:
        os.close(descriptor)
    seconds = time.monotonic() - started
    if bad:
        first_start, first_end = bad[0]
        raise VerificationFailed(
            f"{target.path}: {len(bad)} of {len(block_map.ranges)} written ranges read back "
            f"different from the image (the first at bytes {first_start}-{first_end})",
            f"{target.path} holds a damaged copy and may not boot; the card or the reader is "
            "failing: flash another card")
    log.info(f"read back {block_map.mapped_bytes / MIB:.0f} MiB in {seconds:.1f} s: "
             f"all {len(block_map.ranges)} ranges match the image")
    return seconds


def _secret_staging_dir() -> Path:
    """Where mtools picks the identity's files up: RAM (/dev/shm) when there is some, so
    secrets never touch this machine's disk; mode 0700 either way."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="okome-identity-", dir=parent))


def write_identity(target: Target, files: dict[str, bytes], log: BuildLog) -> None:
    """Replace the boot partition's okome/ with the node's files, then read them back."""
    staging = _secret_staging_dir()
    try:
        bootpart.write_boot_files(target.device, IDENTITY_FOLDER, files, staging)
    except UserError as err:
        raise UserError(f"writing the identity onto {target.path} failed: {err.message}",
                        f"{target.path} holds the verified image but no complete identity; "
                        "it would boot unconfigured (DHCP, no admin keys): fix the cause and "
                        "rerun with --identity-only") from None
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()

    descriptor = os.open(target.device, os.O_RDONLY)
    try:
        _forget_cached_blocks(descriptor, target.is_block_device)
    finally:
        os.close(descriptor)
    for name, content in files.items():
        if bootpart.read_boot_file(target.device, f"{IDENTITY_FOLDER}/{name}") != content:
            raise VerificationFailed(f"{target.path}: {IDENTITY_FOLDER}/{name} read back "
                                     "different from what was written",
                                     "the card or the reader is failing: flash another card")
    log.info(f"{IDENTITY_FOLDER}/ on the boot partition: {', '.join(sorted(files))}")


def reread_partition_table(target: Target) -> None:
    """Let the kernel see the new partitions, so /dev/sdX1 is the new boot partition when the
    operator opens it; it fails harmlessly where the kernel cannot re-read (a busy disk)."""
    if target.is_block_device:
        subprocess.run(["blockdev", "--rereadpt", str(target.device)], capture_output=True)


# -- the commands ----------------------------------------------------------------------------

@dataclass
class FlashReport:
    node: str
    image: Path
    target: Path
    mapped_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # step → duration


@contextmanager
def timed_step(log: BuildLog, name: str, report: FlashReport) -> Iterator[None]:
    started = time.monotonic()
    with log.step(name):
        yield
    report.seconds[name] = time.monotonic() - started


def flash_node(site_name: str, node_name: str, target_path: Path, out_dir: Path,
               image_path: Path | None = None, force: bool = False,
               confirm: Callable[[str], bool] | None = ask_on_terminal,
               identity_only: bool = False, log: BuildLog | None = None) -> FlashReport:
    """`okome-image flash`: the node's image onto the target, verified, with its identity.

    `confirm` is asked before anything is written; None means the user said yes in advance.
    With `identity_only`, a card that already holds the role's image gets a new identity.
    """
    require_tools(FLASH_TOOLS)
    log = log or BuildLog(None)
    site = load_site(site_name)
    role = find_node(site, node_name).role
    report = FlashReport(node=node_name, image=image_path, target=target_path)

    if identity_only:
        with timed_step(log, f"identity of {node_name} (site {site.name})", report):
            files = node_identity(site, node_name, role)
        with timed_step(log, f"check {target_path}", report):
            target = check_target(target_path, None, force)
            check_card_holds_role(target, role, site.name)
        _confirm_or_stop(confirm, f"Replace the identity on {target.describe()} with "
                                  f"{node_name}'s?", target)
        with timed_step(log, "write the identity", report):
            write_identity(target, files, log)
        log.info(f"[bold green]done[/]: {target.path} is {node_name}")
        return report

    image = find_image(out_dir, role, site.name, image_path)
    report.image = image.path
    check_image_fits_node(image, site, node_name)
    with timed_step(log, f"identity of {node_name} (site {site.name})", report):
        files = node_identity(site, node_name, role)
    with timed_step(log, f"check {target_path}", report):
        target = check_target(target_path, image.block_map.image_size, force, image.path,
                              image.block_map.mapped_bytes)
    _confirm_or_stop(confirm, f"Write {image.describe()} as {node_name} to "
                              f"{target.describe()}? Everything on it is lost.", target)
    write_verified(image, target, files, log, report)
    return report


def write_verified(image: ImageToFlash, target: Target, files: dict[str, bytes],
                   log: BuildLog, report: FlashReport) -> None:
    """The writing half of a flash, once the target is checked and confirmed."""
    report.mapped_bytes = image.block_map.mapped_bytes
    with timed_step(log, f"write {image.path.name} to {target.path}", report):
        write_image(image, target, log)
    with timed_step(log, f"verify {target.path}", report):
        verify_target(target, image.block_map, log)
    with timed_step(log, "write the identity", report):
        write_identity(target, files, log)
    reread_partition_table(target)
    total = sum(report.seconds.values())
    log.info(f"[bold green]done[/]: {target.path} is {report.node}, in {total:.0f} s")


def _confirm_or_stop(confirm: Callable[[str], bool] | None, question: str,
                     target: Target) -> None:
    if confirm is not None and not confirm(question):
        raise UserError(f"not confirmed: {target.path} was not changed")


def rebuild_node(site_name: str, node_name: str, target_path: Path, out_dir: Path,
                 cache_dir: Path, mirror: str | None = None, force: bool = False,
                 confirm: Callable[[str], bool] | None = ask_on_terminal,
                 log: BuildLog | None = None) -> FlashReport:
    """`okome-image rebuild-node`: the role's image, built only if its inputs changed, then
    flashed for the node. Secrets and the target are checked, and the operator asked, before
    a build that may take minutes, so nobody has to wait at the terminal."""
    from builder.pipeline import artifact_paths, build_image, image_is_current

    require_tools(FLASH_TOOLS)
    log = log or BuildLog(None)
    site = load_site(site_name)
    role = find_node(site, node_name).role
    report = FlashReport(node=node_name, image=artifact_paths(out_dir, role).image,
                         target=target_path)

    with timed_step(log, f"identity of {node_name} (site {site.name})", report):
        files = node_identity(site, node_name, role)
    with timed_step(log, f"check {target_path}", report):
        target = check_target(target_path, None, force)
    _confirm_or_stop(confirm, f"Write the latest {role} image as {node_name} to "
                              f"{target.describe()}? Everything on it is lost.", target)

    with timed_step(log, f"is the {role} image current?", report):
        current = image_is_current(role, site_name, out_dir, mirror)
        log.info(f"{report.image}: " + ("built from these inputs, no build needed" if current
                                        else "inputs changed since it was built, or none yet"))
    if not current:
        if os.geteuid() != 0:
            raise UserError("building an image needs root (mmdebstrap, chroot, file ownership)",
                            "run it with sudo, or as root")
        with timed_step(log, f"build {role}", report):
            build_image(role, site_name, out_dir, cache_dir, mirror=mirror)

    image = find_image(out_dir, role, site.name)
    check_image_fits_node(image, site, node_name)
    with timed_step(log, f"check {target_path} again", report):
        target = check_target(target_path, image.block_map.image_size, force, image.path,
                              image.block_map.mapped_bytes)
    write_verified(image, target, files, log, report)
    return report
