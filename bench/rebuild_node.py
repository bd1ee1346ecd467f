"""Benchmark, not a test: how long `okome-image rebuild-node` takes with a warm cache, to a file.

Runs the command as an operator would (a new process, `--yes`) for a lab node into a file,
a few times, and prints the wall time of each run and its parts: the steps the command itself
times, and what is left (interpreter start, imports, site loading). The role's image must be
built and current, so the run measures the promise "a dead node is back in minutes" without a
build; --allow-build lets a run build when the inputs changed; --boot then boots the last card
as the node, to `running`, for the whole "dead node to running". Run from the repository root:

    .venv/bin/python bench/rebuild_node.py [--node frontend-b] [--runs 3] [--work DIR]
                                           [--out out/lab] [--allow-build] [--boot]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from builder.machine import Machine
from builder.pipeline import artifact_paths, image_is_current
from builder.site import load_site

PROJECT_DIR = Path(__file__).resolve().parent.parent
SITE = "lab"
STEP_LINE = re.compile(r"^\s*✓ (?P<step>.+) \((?P<seconds>[\d.]+) s\)$")


def throwaway_admin_key(work: Path) -> str:
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key.with_suffix(".pub").read_text()


def timed_run(node: str, target: Path, out_dir: Path,
              env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """One `rebuild-node` run: its wall time and the steps it reported."""
    argv = [sys.executable, "-m", "builder", "rebuild-node", node, str(target), "--site", SITE,
            "--out", str(out_dir), "--yes"]
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=PROJECT_DIR)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"rebuild-node failed:\n{result.stderr}")
    steps = {}
    for line in result.stderr.splitlines():
        match = STEP_LINE.match(line)
        if match:
            steps[match["step"].replace(str(target), "TARGET")] = float(match["seconds"])
    return wall, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default="frontend-b", help="a node of the lab site")
    parser.add_argument("--runs", type=int, default=3, help="how many times to run it")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"),
                        help="folder for the target file (on a disk, not tmpfs)")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "out" / "lab",
                        help="where the lab images are built (in ROLE/)")
    parser.add_argument("--allow-build", action="store_true",
                        help="let a run build the image when its inputs changed")
    parser.add_argument("--boot", action="store_true",
                        help="then boot the last card under QEMU, as the node, to `running`")
    options = parser.parse_args()

    role = load_site(SITE).nodes[options.node].role
    image = artifact_paths(options.out, role).image
    if not options.allow_build and not image_is_current(role, SITE, options.out):
        sys.exit(f"{image} is missing or not built from the current inputs; build it "
                 f"(okome-image build --role {role} --site lab --out {options.out}) or pass "
                 "--allow-build")

    walls: list[float] = []
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="okome-bench-", dir=options.work) as work:
        work = Path(work)
        env = {**os.environ, "OKOME_LAB_ADMIN_KEYS": throwaway_admin_key(work)}
        for number in range(1, options.runs + 1):
            target = work / f"card-{number}.img"
            target.touch()
            wall, steps = timed_run(options.node, target, options.out, env)
            if number < options.runs or not options.boot:
                target.unlink()
            walls.append(wall)
            runs.append(steps)
            print(f"run {number}: {wall:.1f} s wall", flush=True)
        boot = boot_card(options.node, target, work) if options.boot else None

    print(f"\nrebuild-node {options.node} (site {SITE}) to a file, {options.runs} runs, "
          f"image {image.name} ({image.stat().st_blocks * 512 / 2**20:.0f} MiB allocated)")
    print(f"{'part':<52} {'median s':>9} {'min s':>7} {'max s':>7}")
    for step in runs[0]:
        values = [run.get(step, 0.0) for run in runs]
        print(f"{step:<52} {statistics.median(values):9.2f} {min(values):7.2f} "
              f"{max(values):7.2f}")
    rest = [wall - sum(run.values()) for wall, run in zip(walls, runs, strict=True)]
    print(f"{'start-up, imports, site (not a step)':<52} {statistics.median(rest):9.2f} "
          f"{min(rest):7.2f} {max(rest):7.2f}")
    print(f"{'wall time':<52} {statistics.median(walls):9.2f} {min(walls):7.2f} "
          f"{max(walls):7.2f}")
    if boot:
        print(f"\nthe last card booted as {options.node} under QEMU (TCG, 2 vCPU): SSH after "
              f"{boot['ssh']:.0f} s, `{boot['state']}` after {boot['running']:.0f} s; "
              f"dead node to running: {statistics.median(walls) + boot['running']:.0f} s "
              "(rebuild-node's median plus this boot)")


def boot_card(node: str, card: Path, work: Path) -> dict:
    """Boot a flashed card (a copy of it) with only the identity `flash` wrote, as the node
    would start: seconds to SSH and to systemd's `running`."""
    site = load_site(SITE)
    (work / "boot").mkdir()
    started = time.perf_counter()
    with Machine(card, name=node, user=site.admin.user, network=str(site.network.prefix),
                 keep_identity=True, ssh_key=work / "id_ed25519",
                 guest_address=str(site.nodes[node].address), work_dir=work / "boot") as guest:
        ssh = guest.wait_for_ssh()
        state = guest.wait_for_running()
        return {"ssh": ssh, "running": time.perf_counter() - started, "state": state}


if __name__ == "__main__":
    main()
