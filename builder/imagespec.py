"""Role images: one YAML file per role in images/, declaring what goes into the image."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from builder.errors import UserError
from builder.paths import IMAGES_DIR, OVERLAYS_DIR, STAGES_DIR
from builder.yamlfile import load_model


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Base(Strict):
    suite: str = Field("bookworm", description="Debian release to bootstrap")
    architecture: Literal["arm64"] = Field("arm64", description="Debian architecture")
    components: list[str] = Field(["main", "non-free-firmware"],
                                  description="archive components (raspi-firmware is non-free)")


class Layout(Strict):
    boot_mib: int = Field(256, ge=128, le=1024, description="size of the FAT32 boot partition")
    root_headroom_mib: int = Field(
        256, ge=0, description="free space left in the root filesystem beyond its contents")


class ImageSpec(Strict):
    description: str = Field(description="one line: what nodes of this role do")
    base: Base = Field(Base(), description="the Debian base")
    stages: list[str] = Field(description="stage folders in stages/, in the order they run")
    packages: list[str] = Field([], description="role packages, installed with the stages' own")
    overlays: list[str] = Field(description="overlay trees in overlays/, applied in this order")
    enable: list[str] = Field([], description="systemd units to enable (overlays may ship them)")
    disable: list[str] = Field([], description="systemd units that packages enable and we don't")
    read_only_root: bool = Field(
        False, description="mount the card's root read-only under a RAM overlay: the node "
                           "runs as usual and nothing on the card changes while it runs")
    checks: list[str] = Field(
        [], description="shell commands run inside the finished root filesystem; any failure "
                        "fails the build with the command's output (nginx -t, sshd -t, ...)")
    layout: Layout = Field(Layout(), description="partition sizes")


    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        return _known_folders(stages, STAGES_DIR, "stage")

    @field_validator("overlays")
    @classmethod
    def _known_overlays(cls, overlays: list[str]) -> list[str]:
        return _known_folders(overlays, OVERLAYS_DIR, "overlay")


def _known_folders(names: list[str], parent: Path, what: str) -> list[str]:
    """Each name a folder of `parent`, listed once."""
    if not names:
        raise ValueError(f"list at least one {what}")
    known = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} '{name}' (known: {', '.join(known)})")
        if names.count(name) > 1:
            raise ValueError(f"{what} '{name}' is listed twice")
    return names


def known_roles() -> list[str]:
    return sorted(p.stem for p in IMAGES_DIR.glob("*.yaml"))


def image_spec_path(role: str) -> Path:
    if not IMAGES_DIR.is_dir():
        raise UserError(f"{IMAGES_DIR.parent} holds no images/ folder",
                        "OKOME_IMAGE_PROJECT must name a folder with images/, stages/, "
                        "overlays/ and sites/ (or be unset: this checkout's)")
    path = IMAGES_DIR / f"{role}.yaml"
    if not path.exists():
        raise UserError(f"unknown role '{role}'", f"known roles: {', '.join(known_roles())}")
    return path


def load_image_spec(role: str) -> ImageSpec:
    return load_model(image_spec_path(role), ImageSpec)
