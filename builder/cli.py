"""The `okome-image` command: parses arguments and calls the pipeline; nothing else."""

import os
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from builder.errors import UserError

console = Console(stderr=True, highlight=False, soft_wrap=True)


def default_cache_dir() -> Path:
    if "OKOME_IMAGE_CACHE" in os.environ:
        return Path(os.environ["OKOME_IMAGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "okome-image"


def _terminate(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so every cleanup on the way out runs.
    raise KeyboardInterrupt


class Command(click.Group):
    """Turns user mistakes into one line and an exit code; anything else is a bug."""

    def invoke(self, ctx):
        signal.signal(signal.SIGTERM, _terminate)
        # Also when started with SIGINT ignored (a background job of a script): Ctrl-C, or a
        # SIGINT sent on purpose, must stop and clean up.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return super().invoke(ctx)
        except UserError as err:
            console.print(f"[red]error:[/] {escape(err.message)}")
            if err.hint:
                console.print(f"[dim]hint:[/] {escape(err.hint)}")
            sys.exit(1)
        except OSError as err:
            # A path the user gave that is not what it must be (a file for a folder, no
            # permission, a full disk): the system's own words, with the path.
            where = f"{err.filename}: " if err.filename else ""
            console.print(f"[red]error:[/] {escape(where + (err.strerror or str(err)))}")
            console.print("[dim]hint:[/] check that path: whether it exists, is a file or a "
                          "folder as the option asks, and can be written")
            sys.exit(1)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/]: everything this run started was stopped "
                          "and removed")
            sys.exit(130)


@click.group(cls=Command)
def main():
    """Build, boot and flash the OKOME cluster's SD-card images."""


@main.command()
@click.option("--role", required=True, help="the role image to build (a file in images/)")
@click.option("--site", default="production", show_default=True,
              help="site name (a file in sites/) or path")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out"),
              show_default=True, help="where artifacts go (in ROLE/)")
@click.option("--mirror", help="Debian mirror URL [default: the host's apt source]")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=default_cache_dir,
              show_default="$OKOME_IMAGE_CACHE or ~/.cache/okome-image",
              help="downloaded packages and finished steps")
@click.option("--in-docker", is_flag=True,
              help="build inside a container of a locally made builder image (no root needed; "
                   "for hosts that are not Debian)")
def build(role, site, out_dir, mirror, cache_dir, in_docker):
    """Build a role's image: .img, .bmap, .img.zst, manifest.json, SHA256SUMS, build.log."""
    from builder.pipeline import build_image

    if in_docker:
        from builder.docker_build import build_in_docker

        sys.exit(build_in_docker(role, site, out_dir, cache_dir, mirror=mirror))
    if os.geteuid() != 0:
        raise UserError("building an image needs root (mmdebstrap, chroot, file ownership)",
                        "run it with sudo, or as root")
    build_image(role, site, out_dir, cache_dir, mirror=mirror)


@main.command()
@click.option("--role", help="boot OUT/ROLE/okome-ROLE.img")
@click.option("--image", type=click.Path(path_type=Path), help="boot this image file instead")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out"),
              show_default=True, help="where `build` put the role's image")
@click.option("--site", default="production", show_default=True,
              help="the site the image was built for (names the admin user)")
@click.option("--name", help="hostname given to the guest [default: ROLE-qemu]")
@click.option("--memory", default=1024, show_default=True, type=click.IntRange(256, 16384),
              help="guest memory in MiB")
@click.option("--console", is_flag=True, help="attach the serial console to this terminal")
def boot(role, image, out_dir, site, name, memory, console):
    """Boot an image under qemu-system-aarch64 (on a copy) with SSH on 127.0.0.1."""
    from builder.identity import HOSTNAME_PATTERN
    from builder.imagespec import image_spec_path
    from builder.machine import Machine
    from builder.pipeline import artifact_paths
    from builder.site import load_site

    if bool(role) == bool(image):
        raise UserError("give either --role or --image", "e.g. okome-image boot --role frontend")
    if role:
        image_spec_path(role)  # an unknown role is named as such
    image = image or artifact_paths(out_dir, role).image
    if role and not image.exists():
        raise UserError(f"no {role} image at {image}",
                        f"build it first: okome-image build --role {role} --site {site} "
                        f"--out {out_dir}")
    if image.suffix in (".zst", ".gz", ".xz"):
        raise UserError(f"{image} is compressed", "boot the raw .img beside it")
    admin = load_site(site).admin.user
    name = name or f"{role or image.stem.removeprefix('okome-')}-qemu"
    if not HOSTNAME_PATTERN.fullmatch(name):
        raise UserError(f"--name '{name}' is not a usable hostname",
                        "use 1 to 63 of a-z 0-9 and '-', not starting or ending with '-'")

    with Machine(image, name=name, user=admin, memory_mib=memory,
                 serial_to_terminal=console) as machine:
        ssh = (f"ssh -i {machine.key_path} -p {machine.ssh_port} -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null {admin}@127.0.0.1")
        console_hint = "" if console else f"; serial console log: {machine.console_log}"
        click.echo(f"booting {image} as {name}{console_hint}", err=True)
        click.echo(f"connect with: {ssh}", err=True)
        if not console:
            seconds = machine.wait_for_ssh()
            click.echo(f"SSH is up after {seconds:.0f} s; Ctrl-C stops the guest", err=True)
        machine.process.wait()


@main.command()
@click.option("--node", required=True, help="the node this card becomes (a name in the site)")
@click.option("--site", default="production", show_default=True,
              help="site name (a file in sites/) or path")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out"),
              show_default=True, help="where `build` put the image (when IMAGE is not given)")
@click.option("--force", is_flag=True, help="allow a disk that does not call itself removable")
@click.option("--yes", is_flag=True, help="do not ask before overwriting TARGET")
@click.option("--identity-only", is_flag=True,
              help="only replace the identity on a card that already holds the role's image")
@click.argument("image_or_target", type=click.Path(path_type=Path), metavar="[IMAGE]")
@click.argument("target", type=click.Path(path_type=Path), required=False, metavar="TARGET")
def flash(node, site, out_dir, force, yes, identity_only, image_or_target, target):
    """Write a role image to TARGET (a card's block device or a file) as one node: only the
    mapped blocks, read back and verified, then the node's identity on the boot partition."""
    from builder.flash import ask_on_terminal, flash_node

    image, target = (image_or_target, target) if target else (None, image_or_target)
    if identity_only and image:
        raise UserError("--identity-only writes no image", "give only TARGET")
    flash_node(site, node, target, out_dir, image_path=image, force=force,
               confirm=None if yes else ask_on_terminal, identity_only=identity_only)


@main.command("rebuild-node")
@click.argument("node")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--site", default="production", show_default=True,
              help="site name (a file in sites/) or path")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out"),
              show_default=True, help="where the role's image is built (in ROLE/)")
@click.option("--mirror", help="Debian mirror URL [default: the host's apt source]")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=default_cache_dir,
              show_default="$OKOME_IMAGE_CACHE or ~/.cache/okome-image",
              help="downloaded packages and finished steps")
@click.option("--force", is_flag=True, help="allow a disk that does not call itself removable")
@click.option("--yes", is_flag=True, help="do not ask before overwriting TARGET")
def rebuild_node(node, target, site, out_dir, mirror, cache_dir, force, yes):
    """Bring a dead node back: build its role's image if its inputs changed, then flash it
    to TARGET for NODE, printing each step's time."""
    from builder.flash import ask_on_terminal
    from builder.flash import rebuild_node as rebuild

    rebuild(site, node, target, out_dir, cache_dir, mirror=mirror, force=force,
            confirm=None if yes else ask_on_terminal)


CACHE_DIR_OPTION = click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=default_cache_dir,
    show_default="$OKOME_IMAGE_CACHE or ~/.cache/okome-image", help="the cache folder")


def existing_cache(cache_dir: Path) -> Path:
    """A cache folder to look at must be one: a mistyped path is not an empty cache."""
    if not cache_dir.is_dir():
        raise UserError(f"no cache folder at {cache_dir}",
                        "builds keep it in $OKOME_IMAGE_CACHE or ~/.cache/okome-image; check "
                        "--cache-dir")
    return cache_dir


@main.group()
def cache():
    """The build cache: each step's result under the hash of its inputs."""


@cache.command("list")
@CACHE_DIR_OPTION
def cache_list(cache_dir):
    """Entries, least recently used first: key, step, size, age, last use."""
    import time

    from builder.cache import BuildCache, human_age, human_size

    entries = BuildCache(existing_cache(cache_dir)).entries()
    now = time.time()
    click.echo(f"{'key':<12}  {'step':<20}  {'size':>10}  {'age':>7}  {'last use':>8}")
    for entry in entries:
        click.echo(f"{entry.key[:12]}  {entry.step:<20}  {human_size(entry.size):>10}  "
                   f"{human_age(now - entry.created):>7}  "
                   f"{human_age(now - entry.last_used) + ' ago':>8}")
    total = sum(entry.size for entry in entries)
    click.echo(f"{len(entries)} entries, {human_size(total)} in {cache_dir}")


@cache.command("prune")
@CACHE_DIR_OPTION
@click.option("--older-than", "older_than", metavar="DAYS",
              help="remove entries not used for more than DAYS days")
@click.option("--max-size", "max_size", metavar="SIZE",
              help="then remove the least recently used until the rest fits in SIZE (20G, 500M)")
def cache_prune(cache_dir, older_than, max_size):
    """Remove cache entries by last use, by total size, or both. Downloaded .deb files and
    running builds' folders are left alone."""
    from builder.cache import BuildCache, human_size, parse_days, parse_size

    if older_than is None and max_size is None:
        raise UserError("nothing to prune by", "give --older-than DAYS, --max-size SIZE or both")
    days = parse_days(older_than) if older_than is not None else None
    size = parse_size(max_size) if max_size is not None else None
    removed = BuildCache(existing_cache(cache_dir)).prune(older_than_days=days, max_size=size)
    for entry in removed:
        click.echo(f"removed {entry.key[:12]}  {entry.step}")
    click.echo(f"{len(removed)} entries removed, "
               f"{human_size(sum(entry.size for entry in removed))} freed")


# -- the lab: several nodes on one private virtual network (builder/lab.py) ----------------------

LAB_DIR_OPTION = click.option(
    "--lab-dir", type=click.Path(path_type=Path), default=Path("out/lab/run"),
    show_default=True, help="where a running lab keeps its disks, keys and state")


@main.group()
def lab():
    """Boot the lab site's nodes together on a private network, and break them."""


@lab.command("up")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/lab"),
              show_default=True, help="where `build --site lab` put the role images")
@click.option("--node", "nodes", multiple=True,
              help="a node of the lab site to boot (repeatable) [default: all of them]")
@LAB_DIR_OPTION
def lab_up(out_dir, nodes, lab_dir):
    """Boot the nodes in the background and wait until keepalived runs on each."""
    from builder.lab import Lab

    if (lab_dir / "lab.json").exists():
        raise UserError(f"a lab is already up in {lab_dir}", "okome-image lab down first")
    if lab_dir.exists() and any(lab_dir.iterdir()):
        # `lab down` removes the whole folder: it must be the lab's own.
        raise UserError(f"{lab_dir} is not empty", "give --lab-dir a new or empty folder")
    the_lab = Lab(out_dir, list(nodes) or None, work_dir=lab_dir, netns="okome-lab")
    try:
        the_lab.start(detach=True)
        the_lab.save()
        for name, seconds in the_lab.wait_until_up().items():
            click.echo(f"{name}: up after {seconds:.0f} s, ssh -i {the_lab.admin_key} -p "
                       f"{the_lab[name].ssh_port} {the_lab.site.admin.user}@127.0.0.1")
    except BaseException:
        the_lab.remove()
        raise
    click.echo(f"VIP {the_lab.vip} on {the_lab.wait_for_one_holder()}; "
               "`okome-image lab down` stops it all")


@lab.command("status")
@LAB_DIR_OPTION
def lab_status(lab_dir):
    """Each node's state and who holds the VIP."""
    from builder.lab import Lab

    the_lab = Lab.attach(lab_dir)
    for name, guest in the_lab.guests.items():
        if guest.machine.process.poll() is not None:
            click.echo(f"{name}: not running")
            continue
        status, state = guest.machine.execute("systemctl is-system-running")
        click.echo(f"{name}: {guest.address}, ssh port {guest.machine.ssh_port}, "
                   f"system {state.strip()}")
    code, body = the_lab.http_via_vip()
    click.echo(f"VIP {the_lab.vip}: held by {', '.join(the_lab.vip_holders()) or 'nobody'}; "
               f"HTTP {code or 'no answer'} {body.strip()}")


@lab.command("down")
@LAB_DIR_OPTION
def lab_down(lab_dir):
    """Stop every guest and remove the lab's network and files."""
    from builder.lab import Lab

    Lab.attach(lab_dir).remove()
    click.echo("lab stopped and removed")


@lab.command("chaos")
@click.argument("scenario", type=click.Choice(["nginx-killed", "link-cut", "gateway-down",
                                               "backend-rebooted", "log-full"]))
@LAB_DIR_OPTION
def lab_chaos(scenario, lab_dir):
    """Break the cluster (SCENARIO) and check that it copes; print what was measured (the
    VIP scenarios: what a client polling the VIP every 100 ms saw)."""
    from builder.lab import Lab
    from builder.lab_chaos import SCENARIOS

    report = SCENARIOS[scenario](Lab.attach(lab_dir))
    for key, value in report.items():
        click.echo(f"{key}: {value}")
