"""Stages in pi-gen's form: stages/NN-name/ holding numbered substages.

A substage may hold `packages` (one per line, # comments), `NN-run.sh` (runs on the host with
the root filesystem's path as $1 and $ROOTFS_DIR), `NN-run-chroot.sh` (runs inside the root
filesystem), `files/` (read by its scripts through $STAGE_DIR/files) and `SKIP`. A stage folder
with a `SKIP` file is skipped whole.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import UserError
from builder.paths import STAGES_DIR

NUMBERED = re.compile(r"^\d\d-[a-z0-9][a-z0-9-]*$")
SCRIPT = re.compile(r"^(\d\d)-run(-chroot)?\.sh$")
KNOWN_ENTRIES = {"packages", "files", "SKIP", "README.md"}


@dataclass(frozen=True)
class Script:
    path: Path
    in_chroot: bool


@dataclass(frozen=True)
class Substage:
    stage: str
    name: str
    path: Path
    packages: tuple[str, ...]
    scripts: tuple[Script, ...]

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.name}"


def read_packages(path: Path) -> tuple[str, ...]:
    """Package names from a `packages` file: whitespace-separated, # starts a comment."""
    names = []
    for line in path.read_text().splitlines():
        names += line.split("#", 1)[0].split()
    return tuple(names)


def load_substage(stage: str, path: Path) -> Substage:
    scripts = []
    for entry in sorted(path.iterdir()):
        match = SCRIPT.match(entry.name)
        if match:
            scripts.append(Script(entry, in_chroot=bool(match.group(2))))
        elif entry.name not in KNOWN_ENTRIES:
            raise UserError(f"{entry}: unexpected entry in a substage",
                            "use packages, NN-run.sh, NN-run-chroot.sh, files/ or SKIP")
    packages = read_packages(path / "packages") if (path / "packages").exists() else ()
    return Substage(stage, path.name, path, packages, tuple(scripts))


def load_stage(stage: str, stages_dir: Path = STAGES_DIR) -> list[Substage]:
    """The substages of one stage, in order, without the skipped ones."""
    path = stages_dir / stage
    if not path.is_dir():
        known = ", ".join(sorted(p.name for p in stages_dir.iterdir() if p.is_dir()))
        raise UserError(f"unknown stage '{stage}'", f"known stages: {known}")
    if (path / "SKIP").exists():
        return []
    substages = []
    for entry in sorted(path.iterdir()):
        if entry.name == "README.md":
            continue
        if not entry.is_dir() or not NUMBERED.match(entry.name):
            raise UserError(f"{entry}: a stage holds only numbered substage folders (NN-name)")
        if not (entry / "SKIP").exists():
            substages.append(load_substage(stage, entry))
    return substages


def load_stages(names: list[str], stages_dir: Path = STAGES_DIR) -> list[Substage]:
    """All substages of the named stages, stage by stage in the given order."""
    for name in names:
        if not NUMBERED.match(name):
            raise UserError(f"stage '{name}' is not named NN-name")
    return [sub for name in names for sub in load_stage(name, stages_dir)]
