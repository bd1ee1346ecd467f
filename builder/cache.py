"""The build cache: each step's result stored under the hash of everything that decides it.

Layout of the cache folder ($OKOME_IMAGE_CACHE or ~/.cache/okome-image):

    debs/               downloaded .deb files (kept across entries; never pruned here)
    bootstrap/KEY.tar   the bootstrapped base; KEY.json beside it holds its resolved packages
    steps/KEY/          any later step's result: meta.json and the step's files
    build-*/            a running build's work folder

A key is a SHA-256 over the step's name, its own inputs and the previous step's key, so a
change anywhere invalidates that step and every step after it, and nothing before it. Entries
are made complete in the build's work folder (same filesystem) and renamed into place, so a
build that dies leaves either a whole entry or none. A hit touches the entry's meta file: its
modification time is the entry's last use, which `prune` evicts by.
"""

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from builder.errors import UserError

# Bumped when what an entry holds changes shape, so old entries are never misread.
CACHE_FORMAT = 1


def step_key(step: str, previous: str | None, **inputs) -> str:
    """The key of `step`: its name, its inputs (JSON-able values) and the previous key."""
    payload = {"format": CACHE_FORMAT, "step": step, "previous": previous, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """Each file's content hash, with its execute bit and symlink target: what a step reads."""
    digest = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            digest[name] = "symlink:" + os.readlink(path)
        elif path.is_file():
            executable = "x" if os.access(path, os.X_OK) else "-"
            digest[name] = executable + hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir() and not any(path.iterdir()):
            digest[name] = "empty-dir"
    return digest


@dataclass(frozen=True)
class Entry:
    """One cached result, as `cache list` shows it."""
    key: str
    step: str
    paths: tuple[Path, ...]  # everything the entry occupies; the first is what makes it a hit
    created: float
    last_used: float
    size: int  # bytes allocated on disk, when listed


def _size_of(paths: tuple[Path, ...]) -> int:
    return sum(_disk_usage(path) for path in paths if path.exists())


def _disk_usage(path: Path) -> int:
    """Allocated bytes, so a sparse image counts for what it really takes."""
    if path.is_dir() and not path.is_symlink():
        return sum(_disk_usage(child) for child in path.iterdir())
    return path.lstat().st_blocks * 512


def write_json_atomically(path: Path, value) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


class BuildCache:
    """Lookup, storage, listing and pruning of the entries under one cache folder."""

    def __init__(self, root: Path):
        self.root = root
        self.bootstrap_dir = root / "bootstrap"
        self.steps_dir = root / "steps"

    # Step entries: steps/KEY/

    def step_entry(self, key: str) -> Path | None:
        """The entry folder for `key` if a complete one exists; marks it used."""
        folder = self.steps_dir / key
        meta = folder / "meta.json"
        if not meta.exists():
            return None
        os.utime(meta)
        return folder

    def store_step(self, key: str, step: str, staged: Path) -> Path:
        """Move `staged` (a folder on the cache's filesystem) into place as the entry `key`."""
        write_json_atomically(staged / "meta.json", {"step": step, "key": key,
                                                     "created": time.time()})
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        folder = self.steps_dir / key
        try:
            os.rename(staged, folder)
        except OSError:
            # Another build stored the same key first: same inputs, so the same result.
            if not (folder / "meta.json").exists():
                raise
            shutil.rmtree(staged, ignore_errors=True)
        return folder

    # Bootstrap entries: bootstrap/KEY.tar and bootstrap/KEY.json

    def bootstrap_tarball(self, key: str) -> Path:
        return self.bootstrap_dir / f"{key}.tar"

    def bootstrap_meta(self, key: str) -> Path:
        return self.bootstrap_dir / f"{key}.json"

    # Listing and pruning

    def entries(self) -> list[Entry]:
        """Every complete entry, least recently used first."""
        found = [self._bootstrap_entry(tar) for tar in sorted(self.bootstrap_dir.glob("*.tar"))]
        if self.steps_dir.is_dir():
            found += [self._step_entry(folder) for folder in sorted(self.steps_dir.iterdir())
                      if not folder.name.startswith(".") and (folder / "meta.json").exists()]
        return sorted(found, key=lambda entry: entry.last_used)

    def _bootstrap_entry(self, tarball: Path) -> Entry:
        key = tarball.stem
        meta = self.bootstrap_meta(key)
        # A base cached before meta files existed: its tarball's time stands for both.
        info = json.loads(meta.read_text()) if meta.exists() else {}
        stamp = meta if meta.exists() else tarball
        return Entry(key=key, step="bootstrap", paths=(tarball, meta),
                     created=info.get("created", tarball.stat().st_mtime),
                     last_used=stamp.stat().st_mtime, size=_size_of((tarball, meta)))

    def _step_entry(self, folder: Path) -> Entry:
        meta = folder / "meta.json"
        info = json.loads(meta.read_text())
        return Entry(key=folder.name, step=info["step"], paths=(folder,),
                     created=info["created"], last_used=meta.stat().st_mtime,
                     size=_size_of((folder,)))

    def remove(self, entry: Entry) -> None:
        """The file that makes the entry a hit goes first, so a half-removed entry is a miss."""
        for path in entry.paths:
            if path.is_dir() and not path.is_symlink():
                doomed = path.with_name(f".removing-{path.name}")
                os.rename(path, doomed)
                shutil.rmtree(doomed)
            else:
                path.unlink(missing_ok=True)

    def prune(self, older_than_days: float | None = None,
              max_size: int | None = None) -> list[Entry]:
        """Remove entries unused for more than `older_than_days`, then the least recently used
        until the rest fits in `max_size` bytes; returns what was removed."""
        if self.steps_dir.is_dir():  # what an interrupted prune left half removed
            for leftover in self.steps_dir.glob(".removing-*"):
                shutil.rmtree(leftover)
        entries = self.entries()
        doomed = []
        if older_than_days is not None:
            cutoff = time.time() - older_than_days * 86400
            doomed = [entry for entry in entries if entry.last_used < cutoff]
        kept = [entry for entry in entries if entry not in doomed]
        if max_size is not None:
            total = sum(entry.size for entry in kept)
            for entry in list(kept):  # least recently used first
                if total <= max_size:
                    break
                doomed.append(entry)
                kept.remove(entry)
                total -= entry.size
        for entry in doomed:
            self.remove(entry)
        return doomed


SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5GiB', '1048576' → bytes (units are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"'{text}' is not a size", "give bytes or a number with K, M, G or T, "
                                                   "e.g. 20G")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def parse_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not days >= 0:  # also refuses nan
        raise UserError(f"'{text}' is not a number of days", "give a number ≥ 0, e.g. 14")
    return days


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def human_age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"
