"""Overlays: file trees copied into the root filesystem; `*.j2` files are rendered from the site."""

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import jinja2

from builder.errors import UserError
from builder.paths import OVERLAYS_DIR

# Files that must not be world-readable or that sudo insists on; git keeps only the x bit.
MODES = {
    "etc/sudoers.d": 0o440,
}


def template_environment(search_path: Path) -> jinja2.Environment:
    """Templates fail on any missing value instead of rendering a blank."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(search_path)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_template(template: Path, context: dict) -> str:
    """Render one template file; a missing value names the template, its line and the value."""
    env = template_environment(template.parent)
    try:
        return env.get_template(template.name).render(**context)
    except jinja2.UndefinedError as err:
        raise UserError(f"{template}: {err.message}",
                        "add the value to the site or fix the template") from None
    except jinja2.TemplateSyntaxError as err:
        raise UserError(f"{template}:{err.lineno}: template syntax: {err.message}") from None


def overlay_files(name: str) -> list[Path]:
    """Every file of an overlay, relative to the overlay's root, in a stable order."""
    root = OVERLAYS_DIR / name
    if not root.is_dir():
        known = ", ".join(sorted(p.name for p in OVERLAYS_DIR.iterdir() if p.is_dir()))
        raise UserError(f"unknown overlay '{name}'", f"known overlays: {known}")
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _mode_for(relative: Path, source: Path) -> int:
    for prefix, mode in MODES.items():
        if str(relative).startswith(prefix + "/"):
            return mode
    return 0o755 if os.access(source, os.X_OK) else 0o644


@dataclass(frozen=True)
class OverlayFile:
    """One file as an overlay puts it into the image."""
    path: Path  # relative to the root filesystem, without .j2
    source: Path
    mode: int | None  # None for a symlink
    content: bytes | None = None  # None: copied from source as it is
    link: str | None = None  # a symlink's target

    def digest(self) -> str:
        if self.link is not None:
            return f"symlink:{self.link}"
        content = self.content if self.content is not None else self.source.read_bytes()
        return f"{self.mode:o}:{hashlib.sha256(content).hexdigest()}"


def rendered_files(name: str, context: dict) -> Iterator[OverlayFile]:
    """Every file of overlay `name` as it will be written: templates rendered, modes decided."""
    root = OVERLAYS_DIR / name
    for relative in overlay_files(name):
        source = root / relative
        target = relative.with_suffix("") if relative.suffix == ".j2" else relative
        if source.is_symlink():
            yield OverlayFile(target, source, None, link=os.readlink(source))
        elif relative.suffix == ".j2":
            yield OverlayFile(target, source, _mode_for(target, source),
                              content=render_template(source, context).encode())
        else:
            yield OverlayFile(target, source, _mode_for(target, source))


def overlay_digest(names: list[str], context: dict) -> dict[str, str]:
    """What the overlays write, as hashes: the rendered result, so a site value counts only
    where a template uses it."""
    return {f"{name}:{file.path}": file.digest()
            for name in names for file in rendered_files(name, context)}


def render_overlay(name: str, rootfs: Path, context: dict) -> list[Path]:
    """Copy overlay `name` into `rootfs`, rendering templates; returns the paths written."""
    written = []
    for file in rendered_files(name, context):
        target = rootfs / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()

        if file.link is not None:
            target.symlink_to(file.link)
        elif file.content is not None:
            target.write_bytes(file.content)
        else:
            shutil.copyfile(file.source, target)
        if file.mode is not None:
            os.chmod(target, file.mode)
            os.chown(target, 0, 0)
        written.append(file.path)
    return written
