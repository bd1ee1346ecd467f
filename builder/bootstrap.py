"""The base root filesystem: one mmdebstrap run installs Debian and every package of the image.

All stages' package lists go into this single run: one dpkg run under emulation is several times
faster than one per substage, and the substages' scripts then find every package in place. The
result is cached as a tarball under the hash of everything that went into it, with the versions
it resolved beside it: those versions are an input of every later step's cache key.
"""

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from builder.buildlog import BuildLog
from builder.cache import BuildCache, write_json_atomically
from builder.chroot import namespaced
from builder.imagespec import Base

HOOKS_DIR = Path(__file__).resolve().parent / "hooks"

# Nobody reads documentation, manual pages or translations on a cache node; leaving them out
# saves space and the man-db and locale work under emulation.
DPKG_OPTIONS = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
]
APT_OPTIONS = [
    'APT::Install-Recommends "false"',
    'Acquire::Languages "none"',
]
TAR_OPTIONS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]


def mmdebstrap_version() -> str:
    result = subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True)
    return result.stdout.strip()


def bootstrap_recipe(base: Base, packages: list[str], mirror: str) -> str:
    """Hash of everything of ours that decides the bootstrapped tree: all but the mirror's
    state."""
    inputs = {
        "base": base.model_dump(),
        "packages": sorted(set(packages)),
        "mirror": mirror,
        "dpkg": DPKG_OPTIONS,
        "apt": APT_OPTIONS,
        "hooks": {p.name: p.read_text() for p in sorted(HOOKS_DIR.iterdir())},
        "mmdebstrap": mmdebstrap_version(),
        "source_date_epoch": "the mirror's Release date",  # see run_mmdebstrap
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def bootstrap_key(recipe: str, release: str) -> str:
    """The base's key: our recipe and the mirror's Release file (builder/mirror.py), which
    changes whenever a package of the suite does; so a base is never reused once the mirror
    would resolve a package to another version."""
    return hashlib.sha256(json.dumps({"recipe": recipe, "release": release},
                                     sort_keys=True).encode()).hexdigest()


def newest_base(cache: BuildCache, recipe: str) -> str | None:
    """The key of the newest cached base made from `recipe`, whatever the mirror's state was
    then: what a build uses when the mirror cannot be asked."""
    found = []
    for meta in cache.bootstrap_dir.glob("*.json"):
        info = json.loads(meta.read_text())
        if info.get("recipe") == recipe and cache.bootstrap_tarball(info["key"]).exists():
            found.append((info.get("created", 0), info["key"]))
    return max(found)[1] if found else None


def run_mmdebstrap(log: BuildLog, base: Base, packages: list[str], mirror: str, rootfs: Path,
                   deb_cache: Path, epoch: int) -> None:
    """Bootstrap into `rootfs`, reusing and refilling a host-side cache of downloaded .debs.

    `epoch` is the mirror's Release date, given as SOURCE_DATE_EPOCH: what packages stamp
    with the date (the accounts' password-change day in /etc/shadow, file times) then depends
    on the mirror's state, which the base's key covers, and not on the day of the build."""
    deb_cache.mkdir(parents=True, exist_ok=True)
    argv = [
        "mmdebstrap", "--mode=root", "--variant=apt",
        f"--architectures={base.architecture}",
        f"--components={','.join(base.components)}",
        f"--include={','.join(sorted(set(packages)))}",
        *[f"--dpkgopt={option}" for option in DPKG_OPTIONS],
        *[f"--aptopt={option}" for option in APT_OPTIONS],
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {deb_cache} /var/cache/apt/archives/",
        f"--essential-hook={HOOKS_DIR / 'essential.sh'}",
        f"--customize-hook={HOOKS_DIR / 'customize.sh'}",
        f"--customize-hook=sync-out /var/cache/apt/archives {deb_cache}",
        base.suite, str(rootfs), mirror,
    ]
    log.run(namespaced(argv), "mmdebstrap", env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)})


def unpack_tarball(log: BuildLog, tarball: Path, rootfs: Path, what: str) -> None:
    rootfs.mkdir(parents=True, exist_ok=True)
    log.run(["tar", "-C", rootfs, *TAR_OPTIONS, "-xpf", tarball], what)


def pack_tarball(log: BuildLog, rootfs: Path, tarball: Path, what: str) -> None:
    """The tree as a tarball, written under a temporary name and renamed when complete."""
    partial = tarball.with_name(f".{tarball.name}.partial")
    try:
        log.run(["tar", "-C", rootfs, *TAR_OPTIONS, "-cf", partial, "."], what)
        partial.rename(tarball)
    finally:
        partial.unlink(missing_ok=True)


def installed_packages(dpkg_status: str) -> list[str]:
    """'name=version:arch' of every installed package in a dpkg status file, sorted."""
    packages = []
    for stanza in dpkg_status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status", "").endswith(" installed"):
            packages.append(f"{fields['Package']}={fields['Version']}:{fields['Architecture']}")
    return sorted(packages)


def resolved_packages(cache: BuildCache, key: str) -> list[str]:
    """The package versions the cached base holds (its meta file): they decide every later
    step."""
    meta = cache.bootstrap_meta(key)
    os.utime(meta)  # the base's last use
    return json.loads(meta.read_text())["packages"]


def build_base(log: BuildLog, base: Base, packages: list[str], mirror: str, rootfs: Path,
               cache: BuildCache, recipe: str, key: str, epoch: int) -> list[str]:
    """mmdebstrap into `rootfs`, then cache it; returns the installed package versions."""
    log.info(f"mmdebstrap {base.suite} {base.architecture}: {len(set(packages))} packages")
    run_mmdebstrap(log, base, packages, mirror, rootfs, cache.root / "debs", epoch)
    installed = installed_packages((rootfs / "var/lib/dpkg/status").read_text())
    cache.bootstrap_dir.mkdir(parents=True, exist_ok=True)
    # The meta file first: a tarball without one is still usable, the reverse is not.
    write_json_atomically(cache.bootstrap_meta(key), {"step": "bootstrap", "key": key,
                                                      "recipe": recipe,
                                                      "created": time.time(),
                                                      "packages": installed})
    pack_tarball(log, rootfs, cache.bootstrap_tarball(key), "caching the base")
    return installed
