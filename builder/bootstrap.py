"""The base root filesystem: one mmdebstrap run installs Debian and every package of the image.

All stages' package lists go into this single run: one dpkg run under emulation is several times
faster than one per substage, and the substages' scripts then find every package in place. The
result is cached as a tarball under the hash of everything that went into it.
"""

import hashlib
import json
import subprocess
from pathlib import Path

from builder.buildlog import BuildLog
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


def bootstrap_key(base: Base, packages: list[str], mirror: str) -> str:
    """Hash of everything that decides the bootstrapped tree."""
    inputs = {
        "base": base.model_dump(),
        "packages": sorted(set(packages)),
        "mirror": mirror,
        "dpkg": DPKG_OPTIONS,
        "apt": APT_OPTIONS,
        "hooks": {p.name: p.read_text() for p in sorted(HOOKS_DIR.iterdir())},
        "mmdebstrap": mmdebstrap_version(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def run_mmdebstrap(log: BuildLog, base: Base, packages: list[str], mirror: str, rootfs: Path,
                   deb_cache: Path) -> None:
    """Bootstrap into `rootfs`, reusing and refilling a host-side cache of downloaded .debs."""
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
    log.run(namespaced(argv), "mmdebstrap")


def bootstrap_rootfs(log: BuildLog, base: Base, packages: list[str], mirror: str,
                     rootfs: Path, cache_dir: Path) -> str:
    """Fill `rootfs` from the cache or with mmdebstrap; returns the cache key."""
    key = bootstrap_key(base, packages, mirror)
    tarball = cache_dir / "bootstrap" / f"{key}.tar"
    rootfs.mkdir(parents=True, exist_ok=True)

    if tarball.exists():
        log.info(f"cached base {key[:12]} ({tarball.stat().st_size // 2**20} MiB)")
        log.run(["tar", "-C", rootfs, *TAR_OPTIONS, "-xpf", tarball], "unpacking the cached base")
        return key

    log.info(f"mmdebstrap {base.suite} {base.architecture}: {len(set(packages))} packages")
    run_mmdebstrap(log, base, packages, mirror, rootfs, cache_dir / "debs")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    try:
        log.run(["tar", "-C", rootfs, *TAR_OPTIONS, "-cf", partial, "."], "caching the base")
        partial.rename(tarball)
    finally:
        partial.unlink(missing_ok=True)
    return key


