"""Audit, not a test: Lynis (Debian's lynis, from this host) run on the booted frontend image.

Boots the lab site's frontend image under QEMU, copies the host's Lynis into the guest's /tmp,
runs `lynis audit system --quick` there, and prints the hardening index and every suggestion;
the report is kept in out/lab/lynis-frontend-report.dat and the summary in
out/lab/lynis-frontend.txt. Exits non-zero when the index falls below FLOOR, the hardened
image's score (60 before the hardening of docs/hardening.md). Under emulation it takes about
ten minutes, which is why it is not part of `make test`. Run from the repository root, as root:

    .venv/bin/python -m bench.lynis_audit [--out out/lab]
"""

import argparse
import io
import re
import shutil
import sys
import tarfile
from pathlib import Path

import paramiko

from builder.machine import Machine
from builder.pipeline import artifact_paths, image_is_current
from builder.site import load_site

FLOOR = 75
LYNIS_TREE = {"lynis": Path("/usr/sbin/lynis"), "include": Path("/usr/share/lynis/include"),
              "db": Path("/usr/share/lynis/db"), "plugins": Path("/etc/lynis/plugins"),
              "default.prf": Path("/etc/lynis/default.prf")}


def lynis_tarball() -> bytes:
    """The host's Lynis laid out to run from one folder, root-owned as Lynis insists."""
    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode &= 0o755
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, path in LYNIS_TREE.items():
            if path.exists():
                tar.add(path, arcname=f"lynis/{name}", filter=as_root)
    return buffer.getvalue()


def audit(guest: Machine) -> str:
    """Lynis's report file, from a run inside the guest."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", port=guest.ssh_port, username=guest.user,
                   key_filename=str(guest.key_path), allow_agent=False, look_for_keys=False)
    with client:
        stdin, stdout, _ = client.exec_command("sudo -n tar -C /tmp -xzf -")
        stdin.write(lynis_tarball())
        stdin.channel.shutdown_write()
        if stdout.channel.recv_exit_status() != 0:
            sys.exit("could not copy Lynis into the guest")
    guest.succeed("cd /tmp/lynis && sh ./lynis audit system --quick --no-colors "
                  "--logfile /tmp/lynis/lynis.log --report-file /tmp/lynis/report.dat "
                  "< /dev/null > /tmp/lynis/output.txt 2>&1", timeout=3600)
    return guest.succeed("cat /tmp/lynis/report.dat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/lab"),
                        help="where the lab site's images are built (in ROLE/)")
    options = parser.parse_args()
    if not shutil.which("lynis"):
        sys.exit("Lynis is not on this host: apt-get install lynis (or `make deps`)")
    image = artifact_paths(options.out, "frontend").image
    if not image_is_current("frontend", "lab", options.out):
        sys.exit(f"{image} is missing or not current: okome-image build --role frontend "
                 f"--site lab --out {options.out}")

    site = load_site("lab")
    with Machine(image, name="frontend-a", user=site.admin.user,
                 network=str(site.network.prefix)) as guest:
        guest.wait_for_ssh()
        guest.wait_for_running()
        report = audit(guest)

    index = int(re.search(r"^hardening_index=(\d+)$", report, re.M).group(1))
    suggestions = [line.split("=", 1)[1].split("|")[:2]
                   for line in report.splitlines() if line.startswith("suggestion[]=")]
    summary = [f"Lynis hardening index of the frontend image: {index} (floor {FLOOR})",
               f"{len(suggestions)} suggestions:",
               *[f"  {test_id}: {text}" for test_id, text in suggestions]]
    (options.out / "lynis-frontend-report.dat").write_text(report)
    (options.out / "lynis-frontend.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    if index < FLOOR:
        sys.exit(f"the hardening index fell below {FLOOR}")


if __name__ == "__main__":
    main()
