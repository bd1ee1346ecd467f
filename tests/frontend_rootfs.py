"""The frontend overlay rendered into a directory, with its absolute paths moved under it.

The templates name the real paths of the image (/etc/nginx, /run/okome, ...), so that what a
reader sees is what the node runs. The tests render them into a temporary root and then prefix
every path below one of RELOCATED_ROOTS with that root; `stray_image_paths` proves that no path
was missed, so the host's nginx runs the image's configuration without touching the host's files.
"""

import os
import re
import shutil
from pathlib import Path

from builder.overlay import render_overlay
from builder.site import Site

# Everything nginx and the helper scripts read or write at run time lives below one of these.
RELOCATED_ROOTS = (
    "/etc/nginx", "/etc/okome", "/run", "/var/cache/nginx", "/var/log/nginx", "/var/lib/nginx",
    "/var/lib/prometheus",
)
# Files rewritten: the nginx configuration and the scripts' settings.
RELOCATED_FILES = ("etc/nginx/nginx.conf", "etc/nginx/conf.d/okome-frontend.conf",
                   "etc/okome/frontend.env")
# Directories the packages (nginx-common, prometheus-node-exporter) or tmpfiles.d create.
RUNTIME_DIRS = ("run/okome", "var/cache/nginx/okome", "var/log/nginx", "var/lib/nginx",
                "var/lib/prometheus/node-exporter", "etc/nginx/modules-enabled")

_PATH_PATTERN = re.compile(r"(?<![\w/.-])(?:" + "|".join(map(re.escape, RELOCATED_ROOTS))
                           + r")(?=[/\s;'\"]|$)")


def _relocate(text: str, root: Path) -> str:
    text = _PATH_PATTERN.sub(lambda match: f"{root}{match.group(0)}", text)
    if os.geteuid() == 0:
        # nginx's workers would run as www-data, which cannot enter a root-only temporary dir.
        text = text.replace("user www-data;", "user root;")
    return text


def stray_image_paths(root: Path) -> list[str]:
    """Absolute file paths left in the relocated files that point outside `root`."""
    stray = []
    for relative in RELOCATED_FILES:
        text = (root / relative).read_text()
        for path in re.findall(r"(?<![\w.:/-])/(?:etc|run|var|usr|srv|tmp)/[\w./-]*", text):
            if not path.startswith(str(root)):
                stray.append(f"{relative}: {path}")
    return stray


def render_frontend_rootfs(site: Site, root: Path) -> Path:
    """Render the frontend overlay into `root` and relocate it there; returns nginx.conf."""
    render_overlay("frontend", root, {"site": site, "role": "frontend"})
    for relative in RELOCATED_FILES:
        target = root / relative
        target.write_text(_relocate(target.read_text(), root))
    for relative in RUNTIME_DIRS:
        (root / relative).mkdir(parents=True, exist_ok=True)
    # The image gets mime.types from nginx-common; so does this host.
    shutil.copyfile("/etc/nginx/mime.types", root / "etc/nginx/mime.types")
    return root / "etc/nginx/nginx.conf"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (no quoting is used)."""
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env
