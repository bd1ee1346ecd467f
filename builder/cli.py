"""The `okome-image` command: parses arguments and calls the pipeline; nothing else."""

import os
import signal
import sys
from pathlib import Path

import click
from rich.console import Console

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
        try:
            return super().invoke(ctx)
        except UserError as err:
            console.print(f"[red]error:[/] {err.message}")
            if err.hint:
                console.print(f"[dim]hint:[/] {err.hint}")
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
def build(role, site, out_dir, mirror, cache_dir):
    """Build a role's image: .img, .bmap, .img.zst, manifest.json, SHA256SUMS, build.log."""
    from builder.pipeline import build_image

    if os.geteuid() != 0:
        raise UserError("building an image needs root (mmdebstrap, chroot, file ownership)",
                        "run it with sudo, or as root")
    build_image(role, site, out_dir, cache_dir, mirror=mirror)
