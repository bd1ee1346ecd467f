"""Overlays: file trees copied into the root filesystem; `*.j2` files are rendered from the site."""

import os
import shutil
from pathlib import Path

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


def render_overlay(name: str, rootfs: Path, context: dict) -> list[Path]:
    """Copy overlay `name` into `rootfs`, rendering templates; returns the paths written."""
    root = OVERLAYS_DIR / name
    written = []
    for relative in overlay_files(name):
        source = root / relative
        target_relative = relative.with_suffix("") if relative.suffix == ".j2" else relative
        target = rootfs / target_relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()

        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif relative.suffix == ".j2":
            target.write_text(render_template(source, context))
        else:
            shutil.copyfile(source, target)
        if not source.is_symlink():
            os.chmod(target, _mode_for(target_relative, source))
            os.chown(target, 0, 0)
        written.append(target_relative)
    return written


