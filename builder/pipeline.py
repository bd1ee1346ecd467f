"""The build, in the order it runs: each step a function named for what it produces.

    load inputs → bootstrap the root filesystem → run the stages → apply the overlays →
    enable units → validate → clean → assemble the image → export the artifacts
"""

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from builder import assemble, bootstrap
from builder.buildlog import BuildLog
from builder.chroot import mounts_under, run_in_chroot, run_script_in_chroot, services_held_back
from builder.errors import UserError
from builder.hosttools import BUILD_TOOLS, ensure_arm64_binfmt, require_tools
from builder.imagespec import ImageSpec, image_spec_path, load_image_spec
from builder.mirror import host_mirror
from builder.overlay import render_overlay
from builder.paths import BUILDER_DIR, OVERLAYS_DIR, PROJECT_DIR, STAGES_DIR
from builder.site import Site, load_site, resolve_site_path
from builder.stages import Substage, load_stages

# Modules that act on finished images (boot, flash, the node identity) or only parse the
# command line: a change to them does not change what a build makes.
NOT_BUILD_INPUTS = {"__main__.py", "cli.py", "machine.py", "flash.py", "identity.py",
                    "bootpart.py", "redis_acl.py"}


@dataclass(frozen=True)
class BuildInputs:
    role: str
    spec: ImageSpec
    site: Site
    site_path: Path
    substages: list[Substage]
    mirror: str
    source_date_epoch: int

    @property
    def packages(self) -> list[str]:
        stage_packages = [name for sub in self.substages for name in sub.packages]
        return sorted(set(stage_packages + list(self.spec.packages)))

    def files(self) -> list[Path]:
        """Every file whose content decides the image."""
        paths = [image_spec_path(self.role), self.site_path]
        for stage in self.spec.stages:
            paths += [p for p in sorted((STAGES_DIR / stage).rglob("*")) if p.is_file()]
        for overlay in self.spec.overlays:
            paths += [p for p in sorted((OVERLAYS_DIR / overlay).rglob("*")) if p.is_file()]
        paths += [p for p in sorted(BUILDER_DIR.rglob("*")) if p.is_file()
                  and "__pycache__" not in p.parts and p.name not in NOT_BUILD_INPUTS]
        return paths

    def digest(self) -> tuple[str, dict[str, str]]:
        """One hash over all inputs, and each file's own hash for the manifest."""
        hashes = {}
        for path in self.files():
            name = str(path.resolve().relative_to(PROJECT_DIR)) \
                if path.resolve().is_relative_to(PROJECT_DIR) else str(path)
            hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        everything = json.dumps({"files": hashes, "mirror": self.mirror,
                                 "packages": self.packages}, sort_keys=True)
        return hashlib.sha256(everything.encode()).hexdigest(), hashes


@dataclass(frozen=True)
class Artifacts:
    image: Path
    bmap: Path
    compressed: Path
    manifest: Path
    checksums: Path
    log: Path


def artifact_paths(out_dir: Path, role: str) -> Artifacts:
    base = out_dir / role
    image = base / f"okome-{role}.img"
    return Artifacts(image=image, bmap=base / f"okome-{role}.img.bmap",
                     compressed=base / f"okome-{role}.img.zst",
                     manifest=base / "manifest.json", checksums=base / "SHA256SUMS",
                     log=base / "build.log")


def default_source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, or the last commit's time, so file times don't depend on the clock."""
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    result = subprocess.run(["git", "-C", str(PROJECT_DIR), "log", "-1", "--format=%ct"],
                            capture_output=True, text=True)
    return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() \
        else int(time.time())


def load_inputs(role: str, site_name: str, mirror: str | None) -> BuildInputs:
    """Step 1: the image spec, the site and the stages, validated."""
    spec = load_image_spec(role)
    site_path = resolve_site_path(site_name)
    site = load_site(site_name)
    substages = load_stages(spec.stages)
    return BuildInputs(role=role, spec=spec, site=site, site_path=site_path,
                       substages=substages, mirror=mirror or host_mirror(spec.base.suite),
                       source_date_epoch=default_source_date_epoch())


def template_context(inputs: BuildInputs) -> dict:
    """What templates may use: the site, the role and its image spec, the fixed partition ids."""
    return {
        "site": inputs.site,
        "role": inputs.role,
        "image": inputs.spec,
        "partitions": {"boot": assemble.BOOT_PARTUUID, "root": assemble.ROOT_PARTUUID},
    }


def stage_environment(inputs: BuildInputs, rootfs: Path, substage: Substage) -> dict[str, str]:
    """What stage scripts get, in pi-gen's names where pi-gen has one."""
    return {
        "ROOTFS_DIR": str(rootfs),
        "STAGE_DIR": str(substage.path),
        "OKOME_ROLE": inputs.role,
        "OKOME_SITE": inputs.site.name,
        "OKOME_ADMIN_USER": inputs.site.admin.user,
        "OKOME_ROOT_PARTUUID": assemble.ROOT_PARTUUID,
        "OKOME_BOOT_PARTUUID": assemble.BOOT_PARTUUID,
        "OKOME_READ_ONLY_ROOT": "yes" if inputs.spec.read_only_root else "no",
    }


def run_stages(log: BuildLog, inputs: BuildInputs, rootfs: Path) -> None:
    """Step 3: each substage's scripts, in order, with services held back."""
    with services_held_back(rootfs):
        for substage in inputs.substages:
            for script in substage.scripts:
                what = f"substage {substage.label}: {script.path.name}"
                env = stage_environment(inputs, rootfs, substage)
                log.info(what)
                if script.in_chroot:
                    run_script_in_chroot(log, rootfs, script.path, what, env)
                else:
                    host_env = {**os.environ, **env}
                    log.run(["/bin/bash", script.path, rootfs], what, env=host_env,
                            cwd=substage.path)


def apply_overlays(log: BuildLog, inputs: BuildInputs, rootfs: Path) -> None:
    """Step 4: the role's overlays, templates rendered from the site."""
    context = template_context(inputs)
    for name in inputs.spec.overlays:
        written = render_overlay(name, rootfs, context)
        log.info(f"overlay {name}: {len(written)} files")
        for path in written:
            log.write(f"  /{path}")


def enable_units(log: BuildLog, inputs: BuildInputs, rootfs: Path) -> None:
    """Symlinks only, so the host's systemctl does it without emulation."""
    if inputs.spec.enable:
        log.run(["systemctl", f"--root={rootfs}", "enable", *inputs.spec.enable],
                "enabling units")
    if inputs.spec.disable:
        log.run(["systemctl", f"--root={rootfs}", "disable", *inputs.spec.disable],
                "disabling units")


def validate_rootfs(log: BuildLog, inputs: BuildInputs, rootfs: Path) -> None:
    """Step 5: the image's own binaries check the configuration the image ships."""
    for command in inputs.spec.checks:
        log.info(f"check: {command}")
        run_in_chroot(log, rootfs, ["/bin/sh", "-c", command], f"check `{command}`")


CLEAN_GLOBS = [
    "etc/ssh/ssh_host_*",
    "var/lib/apt/lists/*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/**/*",
    "var/tmp/*",
    "tmp/*",
    "root/.bash_history",
    "etc/resolv.conf",
]


def clean_rootfs(log: BuildLog, rootfs: Path, source_date_epoch: int) -> None:
    """Step 6: no host keys, an empty machine-id, no lists or logs; file times clamped."""
    removed = 0
    for pattern in CLEAN_GLOBS:
        for path in sorted(rootfs.glob(pattern), reverse=True):
            if path.is_dir() and not path.is_symlink():
                if pattern.startswith("var/log"):
                    continue
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    (rootfs / "etc/machine-id").write_text("")
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")

    clamped = 0
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames + [""]:
            path = os.path.join(dirpath, name) if name else dirpath
            if os.lstat(path).st_mtime > source_date_epoch:
                os.utime(path, (source_date_epoch, source_date_epoch), follow_symlinks=False)
                clamped += 1
    log.info(f"removed {removed} paths; clamped {clamped} file times to {source_date_epoch}")


def split_boot_partition(rootfs: Path, bootfs: Path) -> None:
    """Move /boot/firmware's contents out; it stays as the empty mount point of partition 1."""
    firmware = rootfs / "boot/firmware"
    if not firmware.is_dir() or not any(firmware.iterdir()):
        raise UserError("the root filesystem has no /boot/firmware contents",
                        "the image needs raspi-firmware and linux-image-arm64")
    bootfs.mkdir()
    for entry in sorted(firmware.iterdir()):
        shutil.move(entry, bootfs / entry.name)


def package_list(rootfs: Path) -> list[dict[str, str]]:
    """Every installed package with its version, read by the host's dpkg-query."""
    output = subprocess.run(
        ["dpkg-query", f"--admindir={rootfs / 'var/lib/dpkg'}", "-W",
         "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"],
        capture_output=True, text=True, check=True).stdout
    packages = []
    for line in output.splitlines():
        status, name, version, arch = line.split("\t")
        if status.startswith("ii"):
            packages.append({"name": name, "version": version, "architecture": arch})
    return packages


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def export_artifacts(log: BuildLog, inputs: BuildInputs, digest: tuple[str, dict[str, str]],
                     image: Path, staging: Path, layout: assemble.DiskLayout,
                     packages: list[dict], started: float, final: Artifacts) -> None:
    """Step 8: bmap, compressed image, manifest and checksums, then moved into place."""
    bmap = staging / final.bmap.name
    compressed = staging / final.compressed.name
    log.run(["bmaptool", "create", "-o", bmap, image], "bmaptool create")
    log.run(["zstd", "-T0", "-q", "-o", compressed, image], "zstd")

    inputs_digest, file_hashes = digest
    used = image.stat().st_blocks * 512
    manifest = {
        "role": inputs.role,
        "site": inputs.site.name,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "step_seconds": dict(log.durations),
        "source_date_epoch": inputs.source_date_epoch,
        "mirror": inputs.mirror,
        "inputs_digest": inputs_digest,
        "inputs": file_hashes,
        "image": {"file": final.image.name, "size": layout.size, "allocated": used,
                  "compressed": compressed.stat().st_size},
        "partitions": {
            "boot": {"partuuid": assemble.BOOT_PARTUUID, "start": layout.boot.start,
                     "size": layout.boot.size},
            "root": {"partuuid": assemble.ROOT_PARTUUID, "start": layout.root.start,
                     "size": layout.root.size},
        },
        "packages": packages,
    }
    (staging / final.manifest.name).write_text(json.dumps(manifest, indent=2) + "\n")

    sums = [f"{sha256_file(staging / name)}  {name}\n"
            for name in (final.image.name, bmap.name, compressed.name, final.manifest.name)]
    (staging / final.checksums.name).write_text("".join(sums))

    for name in (final.image.name, bmap.name, compressed.name, final.manifest.name,
                 final.checksums.name):
        os.replace(staging / name, final.image.parent / name)
    log.info(f"image {layout.size // 2**20} MiB, {used // 2**20} MiB allocated, "
             f"{manifest['image']['compressed'] // 2**20} MiB compressed")


def build_image(role: str, site_name: str, out_dir: Path, cache_dir: Path,
                mirror: str | None = None, log: BuildLog | None = None) -> Artifacts:
    """Build the role's image into out_dir/ROLE/; nothing is left half-written on failure."""
    started = time.monotonic()
    final = artifact_paths(out_dir, role)
    inputs = load_inputs(role, site_name, mirror)
    digest = inputs.digest()  # before anything runs: what this build is made of
    final.image.parent.mkdir(parents=True, exist_ok=True)
    log = log or BuildLog(final.log)
    log.info(f"build {role} for site {inputs.site.name}: {len(inputs.substages)} substages, "
             f"{len(inputs.packages)} packages, mirror {inputs.mirror}")

    require_tools(BUILD_TOOLS)
    ensure_arm64_binfmt()
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"build-{role}-", dir=cache_dir))
    rootfs, bootfs, staging = work / "rootfs", work / "bootfs", work / "out"
    try:
        with log.step("bootstrap"):
            bootstrap.bootstrap_rootfs(log, inputs.spec.base, inputs.packages, inputs.mirror,
                                       rootfs, cache_dir)
        with log.step(f"stages: {len(inputs.substages)} substages"):
            run_stages(log, inputs, rootfs)
        with log.step(f"overlays: {', '.join(inputs.spec.overlays)}"):
            apply_overlays(log, inputs, rootfs)
            enable_units(log, inputs, rootfs)
        with log.step("checks"):
            validate_rootfs(log, inputs, rootfs)
        with log.step("clean"):
            packages = package_list(rootfs)
            clean_rootfs(log, rootfs, inputs.source_date_epoch)
            split_boot_partition(rootfs, bootfs)
        with log.step("assemble"):
            staging.mkdir()
            image = staging / final.image.name
            layout = assemble.plan_layout(rootfs, inputs.spec.layout.boot_mib,
                                          inputs.spec.layout.root_headroom_mib)
            assemble.assemble_image(log, image, layout, bootfs, rootfs)
            log.info(f"boot {layout.boot.size // 2**20} MiB, root {layout.root.size // 2**20} MiB")
        with log.step("export"):
            export_artifacts(log, inputs, digest, image, staging, layout, packages, started,
                             final)
    finally:
        remove_work_dir(work)
    log.info(f"[bold green]done[/] in {time.monotonic() - started:.0f} s: {final.image}")
    return final


def image_is_current(role: str, site_name: str, out_dir: Path, mirror: str | None = None) -> bool:
    """Whether out_dir holds a complete build of exactly these inputs."""
    final = artifact_paths(out_dir, role)
    if not (final.image.exists() and final.manifest.exists()):
        return False
    built = json.loads(final.manifest.read_text()).get("inputs_digest")
    return built == load_inputs(role, site_name, mirror).digest()[0]


def remove_work_dir(work: Path) -> None:
    """Remove the work tree, refusing if anything is mounted in it (it would be deleted too)."""
    leftover = mounts_under(work)
    if leftover:
        raise UserError(f"refusing to remove {work}: still mounted: {', '.join(leftover)}",
                        "unmount them, then delete the directory")
    shutil.rmtree(work, ignore_errors=True)
