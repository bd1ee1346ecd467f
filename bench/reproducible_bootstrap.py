"""Check (not a test: two cold mmdebstrap runs take minutes each under emulation) that the
bootstrapped base is reproducible: bootstrap the role's base twice with the same package
versions (the .deb cache is shared and kept), apply the build's clean step to both, and name
every path that still differs.

    sudo .venv/bin/python -m bench.reproducible_bootstrap [--role frontend] [--json F]

mmdebstrap runs as the build runs it, with the mirror's Release date as SOURCE_DATE_EPOCH; the
build's own epoch is applied by the clean step.

The step tests (tests/boot/test_reproducible_build.py) start from one shared base; this is
the other half of "the same inputs give the same image".
"""

import argparse
import json
import os
import stat
import tempfile
import time
from pathlib import Path

from builder.bootstrap import installed_packages, run_mmdebstrap
from builder.buildlog import BuildLog
from builder.cli import default_cache_dir
from builder.mirror import mirror_release
from builder.pipeline import clean_rootfs, default_source_date_epoch, load_inputs


def describe(path: Path) -> tuple:
    """What the image keeps of a path: type, mode, owner, size, time, and content or target."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        body = os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        body = path.read_bytes()
    else:
        body = None
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            st.st_size if body is not None else 0, int(st.st_mtime), body)


def differing_paths(a: Path, b: Path) -> list[str]:
    def listing(root: Path) -> set[str]:
        return {os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files}

    in_a, in_b = listing(a), listing(b)
    return [path for path in sorted(in_a | in_b)
            if path not in in_a or path not in in_b or describe(a / path) != describe(b / path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="frontend")
    parser.add_argument("--json", type=Path, default=Path("bench-bootstrap-reproducible.json"))
    args = parser.parse_args()

    inputs = load_inputs(args.role, "lab", None)
    release = mirror_release(inputs.mirror, inputs.spec.base.suite)
    epoch = default_source_date_epoch()
    debs = default_cache_dir() / "debs"
    results: dict = {"role": args.role, "source_date_epoch": epoch, "runs": []}
    with tempfile.TemporaryDirectory(prefix="okome-bootstrap-", dir=default_cache_dir()) as tmp:
        trees = []
        for run in ("a", "b"):
            rootfs = Path(tmp) / run
            log = BuildLog(Path(tmp) / f"{run}.log")
            started = time.monotonic()
            run_mmdebstrap(log, inputs.spec.base, inputs.packages, inputs.mirror, rootfs, debs,
                           release.epoch)
            packages = installed_packages((rootfs / "var/lib/dpkg/status").read_text())
            clean_rootfs(log, rootfs, epoch)
            results["runs"].append({"seconds": round(time.monotonic() - started, 1),
                                    "packages": len(packages)})
            trees.append((rootfs, packages))
        (a, packages_a), (b, packages_b) = trees
        results["same_versions"] = packages_a == packages_b
        results["differing"] = differing_paths(a, b)

    args.json.write_text(json.dumps(results, indent=2) + "\n")
    verdict = "reproducible" if not results["differing"] else \
        f"{len(results['differing'])} paths differ, first /{results['differing'][0]}"
    print(f"base of {args.role}: {verdict} (same package versions: {results['same_versions']})")
    for path in results["differing"][:40]:
        print(f"  /{path}")


if __name__ == "__main__":
    main()
