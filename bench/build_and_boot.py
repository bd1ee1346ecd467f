"""Benchmark (not a test): cold build, warm rebuild with nothing changed, rebuild after one
overlay file changed, assembly, boot to SSH and to `running`, image sizes. Prints a table and
writes JSON.

    sudo .venv/bin/python -m bench.build_and_boot --role frontend [--skip-cold] [--json F]

The cold build uses an empty cache folder (packages are downloaded again); with --skip-cold the
operator's cache is used and brought up to date first. The overlay-change rebuild uses a copy
of the project's definitions with one overlay file changed: the stages come from the cache.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from builder.cli import default_cache_dir
from builder.machine import Machine
from builder.paths import PROJECT_DIR
from builder.pipeline import artifact_paths, default_source_date_epoch
from builder.site import load_site

CHECKOUT_EPOCH = default_source_date_epoch()


def timed_build(role: str, site: str, out: Path, cache: Path, project: Path) -> dict:
    # The checkout's epoch for every build: the changed copy is not in git, and would otherwise
    # take its newest file's time, which would rebuild the stages too.
    env = {**os.environ, "OKOME_IMAGE_CACHE": str(cache), "OKOME_IMAGE_PROJECT": str(project),
           "SOURCE_DATE_EPOCH": str(CHECKOUT_EPOCH)}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "builder", "build", "--role", role, "--site", site,
                    "--out", str(out)], env=env, check=True)
    wall = time.monotonic() - started
    manifest = json.loads(artifact_paths(out, role).manifest.read_text())
    return {"wall_s": round(wall, 1), "steps_s": manifest["step_seconds"],
            "cache_hits": [entry["step"] for entry in manifest["cache"] if entry["hit"]],
            "image": manifest["image"]}


def project_copy_with_one_overlay_change(work: Path) -> Path:
    project = work / "project"
    for folder in ("images", "stages", "overlays", "sites"):
        shutil.copytree(PROJECT_DIR / folder, project / folder, symlinks=True)
    hosts = project / "overlays/common/etc/hosts.j2"
    hosts.write_text(hosts.read_text() + f"# benchmark change {time.time()}\n")
    return project


def timed_boot(image: Path, site_name: str) -> dict:
    site = load_site(site_name)
    with Machine(image, name="bench", user=site.admin.user) as machine:
        qemu_started = time.monotonic()  # the image copy is made before QEMU starts
        machine.wait_for_ssh()
        ssh = time.monotonic() - qemu_started
        state = machine.wait_for_running(timeout=300)
        running = time.monotonic() - qemu_started
    return {"ssh_s": round(ssh, 1), "running_s": round(running, 1), "state": state}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="frontend")
    parser.add_argument("--site", default="lab")
    parser.add_argument("--skip-cold", action="store_true", help="only warm rebuild and boot")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    args = parser.parse_args()

    results: dict = {"role": args.role, "nproc": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="okome-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_cold:
            results["cold"] = timed_build(args.role, args.site, work / "out-cold",
                                          work / "cache", PROJECT_DIR)
        project = project_copy_with_one_overlay_change(work)
        cache = work / "cache" if not args.skip_cold else default_cache_dir()
        if args.skip_cold:  # the operator's cache may not hold this build yet
            timed_build(args.role, args.site, work / "out-warm", cache, PROJECT_DIR)
        results["warm"] = timed_build(args.role, args.site, work / "out-warm", cache,
                                      PROJECT_DIR)
        results["overlay_change"] = timed_build(args.role, args.site, work / "out-changed",
                                                cache, project)
        results["boot"] = timed_boot(artifact_paths(work / "out-changed", args.role).image,
                                     args.site)

    args.json.write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"okome-image {args.role} on {results['nproc']} cores")
    table.add_column("scenario")
    table.add_column("seconds / size", justify="right")
    if "cold" in results:
        table.add_row("cold build (empty caches)", f"{results['cold']['wall_s']:.0f} s")
    warm, changed = results["warm"], results["overlay_change"]
    table.add_row("warm rebuild, nothing changed", f"{warm['wall_s']:.1f} s")
    table.add_row("rebuild after one overlay file changed", f"{changed['wall_s']:.1f} s")
    table.add_row("assembly", f"{changed['steps_s'].get('assemble', 0):.1f} s")
    table.add_row("boot to SSH", f"{results['boot']['ssh_s']:.0f} s")
    table.add_row(f"boot to {results['boot']['state']}", f"{results['boot']['running_s']:.0f} s")
    image = changed["image"]
    table.add_row("image raw / allocated / compressed",
                  f"{image['size'] >> 20} / {image['allocated'] >> 20} / "
                  f"{image['compressed'] >> 20} MiB")
    Console().print(table)


if __name__ == "__main__":
    main()
