"""The build, in the order it runs: each step a function named for what it produces.

    load inputs → bootstrap the root filesystem → run the stages → apply the overlays →
    enable units → validate → clean → assemble the image → export the artifacts

Each step's result is cached under a key over its inputs and the previous step's key
(builder/cache.py): the bootstrapped base, each stage that runs scripts, and the finished image
(which covers overlays, units, checks, clean and assembly: redoing those takes less time than
storing and unpacking a tree between them). A build starts from the newest entry whose key
matches and runs only what follows it.
"""

import concurrent.futures
import datetime
import errno
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
from builder.cache import BuildCache, step_key, tree_digest
from builder.chroot import mounts_under, run_in_chroot, run_script_in_chroot, services_held_back
from builder.errors import UserError
from builder.hosttools import BUILD_TOOLS, ensure_arm64_binfmt, require_tools
from builder.imagelabel import LABEL_FILE, image_label
from builder.imagespec import ImageSpec, image_spec_path, load_image_spec
from builder.mirror import checked_mirror, host_mirror, mirror_release
from builder.overlay import overlay_digest, render_overlay
from builder.paths import BUILDER_DIR, IMAGES_DIR, OVERLAYS_DIR, PROJECT_DIR, SITES_DIR, STAGES_DIR
from builder.site import Site, load_site, resolve_site_path
from builder.stages import Substage, load_stages

# Modules that act on finished images (boot, flash, the node identity, the lab), only parse the
# command line, or run this same build elsewhere (docker): a change to them does not change what
# a build makes, so it invalidates neither the step cache nor a built image.
NOT_BUILD_INPUTS = {"__main__.py", "cli.py", "machine.py", "flash.py", "identity.py",
                    "bootpart.py", "redis_acl.py", "lab.py", "lab_chaos.py", "docker_build.py"}


def builder_files() -> list[Path]:
    """The builder's own code that a build runs: a change to it may change what is built."""
    return [p for p in sorted(BUILDER_DIR.rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts and p.name not in NOT_BUILD_INPUTS]


def builder_code_digest() -> str:
    digest = hashlib.sha256()
    for path in builder_files():
        digest.update(f"{path.relative_to(BUILDER_DIR)}\0".encode() + path.read_bytes())
    return digest.hexdigest()


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
        return paths + builder_files()

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
    """SOURCE_DATE_EPOCH, or the last commit's time, so file times don't depend on the clock.

    A definitions folder outside git (a copy, an unpacked tarball) counts from its newest
    file instead: the same tree gives the same epoch, and so the same cache keys.
    """
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        result = subprocess.run(["git", "-C", str(PROJECT_DIR), "log", "-1", "--format=%ct"],
                                capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            return int(result.stdout.strip())
    except FileNotFoundError:  # no git on this host
        pass
    folders = (IMAGES_DIR, STAGES_DIR, OVERLAYS_DIR, SITES_DIR)
    times = [path.lstat().st_mtime for folder in folders for path in folder.rglob("*")]
    return int(max(times))


def load_inputs(role: str, site_name: str, mirror: str | None) -> BuildInputs:
    """Step 1: the image spec, the site and the stages, validated, and the templates rendered
    once: a mistake in any of them stops the build before minutes are spent on it."""
    spec = load_image_spec(role)
    site_path = resolve_site_path(site_name)
    site = load_site(site_name)
    substages = load_stages(spec.stages)
    inputs = BuildInputs(role=role, spec=spec, site=site, site_path=site_path,
                         substages=substages,
                         mirror=host_mirror(spec.base.suite) if mirror is None
                         else checked_mirror(mirror),
                         source_date_epoch=default_source_date_epoch())
    overlay_digest(spec.overlays, template_context(inputs))
    return inputs


def template_context(inputs: BuildInputs) -> dict:
    """What templates may use: the site, the role and its image spec, the fixed partition ids."""
    return {
        "site": inputs.site,
        "role": inputs.role,
        "image": inputs.spec,
        "partitions": {"boot": assemble.BOOT_PARTUUID, "root": assemble.ROOT_PARTUUID},
    }


def stage_settings(inputs: BuildInputs) -> dict[str, str]:
    """The values stage scripts get besides paths: part of each stage's cache key."""
    return {
        "SOURCE_DATE_EPOCH": str(inputs.source_date_epoch),
        "OKOME_ROLE": inputs.role,
        "OKOME_SITE": inputs.site.name,
        "OKOME_ADMIN_USER": inputs.site.admin.user,
        "OKOME_ROOT_PARTUUID": assemble.ROOT_PARTUUID,
        "OKOME_BOOT_PARTUUID": assemble.BOOT_PARTUUID,
        "OKOME_READ_ONLY_ROOT": "yes" if inputs.spec.read_only_root else "no",
    }


def stage_environment(inputs: BuildInputs, rootfs: Path, substage: Substage) -> dict[str, str]:
    """What stage scripts get, in pi-gen's names where pi-gen has one."""
    return {"ROOTFS_DIR": str(rootfs), "STAGE_DIR": str(substage.path),
            **stage_settings(inputs)}


def run_stage(log: BuildLog, inputs: BuildInputs, rootfs: Path,
              substages: list[Substage]) -> None:
    """Step 3, one stage: each substage's scripts, in order, with services held back."""
    with services_held_back(rootfs):
        for substage in substages:
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
        run_in_chroot(log, rootfs, ["/bin/sh", "-c", command], f"check `{command}`",
                      env={"SOURCE_DATE_EPOCH": str(inputs.source_date_epoch)})


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
# Log folders stay (packages expect them; /var/log is a tmpfs at boot anyway), except the
# journal's: journald keeps the journal in memory, and this folder would invite it onto the card.
# apt's download folder belongs to root or to _apt depending on whether the bootstrap downloaded
# anything, which would make the image depend on the state of the package cache; apt makes it
# again when it needs it.
CLEAN_DIRS = ["var/log/journal", "var/cache/apt/archives/partial"]


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
    for name in CLEAN_DIRS:
        if (rootfs / name).is_dir():
            shutil.rmtree(rootfs / name)
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
    times = firmware.stat()
    for entry in sorted(firmware.iterdir()):
        shutil.move(entry, bootfs / entry.name)
    # Emptying it would stamp the mount point with the clock; it keeps its clamped times.
    os.utime(firmware, ns=(times.st_atime_ns, times.st_mtime_ns))


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
    """The file's SHA-256; a sparse image's holes are hashed as zeros without being read,
    which halves the time for an image that is half holes."""
    digest = hashlib.sha256()
    zeros = bytes(4 * 2**20)
    with path.open("rb") as f:
        size, offset = os.fstat(f.fileno()).st_size, 0
        while offset < size:
            try:
                data = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:  # no data after offset: the rest is a hole
                data = size
            for start in range(offset, data, len(zeros)):
                digest.update(zeros[:min(len(zeros), data - start)])
            if data >= size:
                break
            hole = os.lseek(f.fileno(), data, os.SEEK_HOLE)
            f.seek(data)
            remaining = hole - data
            while remaining > 0:
                chunk = f.read(min(remaining, len(zeros)))
                digest.update(chunk)
                remaining -= len(chunk)
            offset = hole
    return digest.hexdigest()


@dataclass(frozen=True)
class Step:
    """One cached step of the build: its name, its key, and what it does when it runs."""
    name: str  # "stage 10-boot", "overlays", "image"
    key: str
    stored: bool  # whether its result is kept as a cache entry
    substages: tuple[Substage, ...] = ()


def plan_steps(inputs: BuildInputs, base_key: str, installed: list[str]) -> list[Step]:
    """Every step after the bootstrap with its cache key, each key chained to the one before.

    The chain starts from the base's key and the package versions the base resolved, so a
    re-bootstrap that picked up a new version rebuilds everything after it.
    """
    code = builder_code_digest()
    settings = stage_settings(inputs)
    previous = step_key("base", base_key, packages=installed)
    steps = []
    for stage in inputs.spec.stages:
        substages = tuple(sub for sub in inputs.substages if sub.stage == stage)
        previous = step_key(f"stage {stage}", previous, files=tree_digest(STAGES_DIR / stage),
                            settings=settings, code=code)
        # A stage without scripts (only package lists) has nothing to run or store.
        runs = any(sub.scripts for sub in substages)
        steps.append(Step(f"stage {stage}", previous, stored=runs, substages=substages))

    previous = step_key("overlays", previous,
                        files=overlay_digest(inputs.spec.overlays, template_context(inputs)),
                        enable=inputs.spec.enable, disable=inputs.spec.disable, code=code)
    steps.append(Step("overlays", previous, stored=False))
    previous = step_key("image", previous, checks=inputs.spec.checks,
                        source_date_epoch=inputs.source_date_epoch,
                        layout=inputs.spec.layout.model_dump(), code=code)
    steps.append(Step("image", previous, stored=True))
    return steps


def newest_entry(cache: BuildCache, steps: list[Step]) -> tuple[int, Path | None]:
    """The index of the last step whose stored result is cached, and its entry (-1, None if
    none is)."""
    for index in reversed(range(len(steps))):
        if steps[index].stored:
            entry = cache.step_entry(steps[index].key)
            if entry:
                return index, entry
    return -1, None


def store_rootfs(log: BuildLog, cache: BuildCache, step: Step, rootfs: Path, work: Path) -> None:
    staged = work / f"entry-{step.key}"
    staged.mkdir()
    bootstrap.pack_tarball(log, rootfs, staged / "rootfs.tar", f"caching {step.name}")
    cache.store_step(step.key, step.name, staged)


@dataclass(frozen=True)
class Assembled:
    """The image in the staging folder, with what the manifest says about it."""
    image: Path
    bmap: Path
    compressed: Path
    layout: assemble.DiskLayout
    packages: list[dict]


def finish_rootfs(log: BuildLog, inputs: BuildInputs, rootfs: Path, bootfs: Path,
                  staging: Path, final: Artifacts) -> Assembled:
    """Steps 4 to 7: overlays, units, checks, clean, assemble; and the image's bmap and
    compressed copy."""
    with log.step(f"overlays: {', '.join(inputs.spec.overlays)}"):
        apply_overlays(log, inputs, rootfs)
        enable_units(log, inputs, rootfs)
    with log.step("checks"):
        validate_rootfs(log, inputs, rootfs)
    with log.step("clean"):
        packages = package_list(rootfs)
        clean_rootfs(log, rootfs, inputs.source_date_epoch)
        split_boot_partition(rootfs, bootfs)
        label = bootfs / LABEL_FILE
        label.write_text(image_label(inputs.role, inputs.site.name))
        os.utime(label, (inputs.source_date_epoch, inputs.source_date_epoch))
    with log.step("assemble"):
        image = staging / final.image.name
        layout = assemble.plan_layout(rootfs, inputs.spec.layout.boot_mib,
                                      inputs.spec.layout.root_headroom_mib)
        assemble.assemble_image(log, image, layout, bootfs, rootfs, inputs.source_date_epoch)
        log.info(f"boot {layout.boot.size // 2**20} MiB, root {layout.root.size // 2**20} MiB")
    with log.step("compress"):
        bmap, compressed = staging / final.bmap.name, staging / final.compressed.name
        # Side by side: bmaptool mostly reads, zstd mostly computes. Level 1: a tenth larger
        # than zstd's default level 3, in half the time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            mapped = pool.submit(log.run, ["bmaptool", "create", "-o", bmap, image],
                                 "bmaptool create")
            log.run(["zstd", "-T0", "-1", "-q", "-o", compressed, image], "zstd")
            mapped.result()
    return Assembled(image, bmap, compressed, layout, packages)


def store_image(cache: BuildCache, step: Step, assembled: Assembled, work: Path) -> None:
    """The compressed image stands for the image in the cache: a fifth of the space, and
    decompressing it takes about as long as copying the raw image would."""
    staged = work / f"entry-{step.key}"
    staged.mkdir()
    shutil.copyfile(assembled.compressed, staged / "image.zst")
    shutil.copyfile(assembled.bmap, staged / "image.bmap")
    layout = assembled.layout
    (staged / "image.json").write_text(json.dumps({
        "packages": assembled.packages,
        "layout": {"boot": [layout.boot.start, layout.boot.size],
                   "root": [layout.root.start, layout.root.size]},
    }, indent=1) + "\n")
    cache.store_step(step.key, step.name, staged)


def restore_image(log: BuildLog, entry: Path, staging: Path, final: Artifacts) -> Assembled:
    info = json.loads((entry / "image.json").read_text())
    layout = assemble.DiskLayout(boot=assemble.Partition(*info["layout"]["boot"]),
                                 root=assemble.Partition(*info["layout"]["root"]))
    image, bmap = staging / final.image.name, staging / final.bmap.name
    compressed = staging / final.compressed.name
    log.run(["zstd", "-d", "-q", "--sparse", "-o", image, entry / "image.zst"],
            "unpacking the cached image")
    shutil.copyfile(entry / "image.zst", compressed)
    shutil.copyfile(entry / "image.bmap", bmap)
    return Assembled(image, bmap, compressed, layout, info["packages"])


def move_into_place(source: Path, target: Path) -> None:
    """Replace `target` with `source` at once, also when they are on different filesystems
    (an --out on another disk than the cache, or two bind mounts in the --in-docker container):
    then a sparse copy is made beside the target first."""
    try:
        os.replace(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.partial")
        try:
            subprocess.run(["cp", "--sparse=always", "--preserve=mode,timestamps", source,
                            partial], check=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        source.unlink()


def export_artifacts(log: BuildLog, inputs: BuildInputs, digest: tuple[str, dict[str, str]],
                     assembled: Assembled, cache_report: list[dict], started: float,
                     final: Artifacts) -> None:
    """Step 8: manifest and checksums, then everything moved into place."""
    staging = assembled.image.parent
    inputs_digest, file_hashes = digest
    layout = assembled.layout
    used = assembled.image.stat().st_blocks * 512
    manifest = {
        "role": inputs.role,
        "site": inputs.site.name,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "step_seconds": dict(log.durations),
        "cache": cache_report,
        "source_date_epoch": inputs.source_date_epoch,
        "mirror": inputs.mirror,
        "inputs_digest": inputs_digest,
        "inputs": file_hashes,
        "image": {"file": final.image.name, "size": layout.size, "allocated": used,
                  "compressed": assembled.compressed.stat().st_size},
        "partitions": {
            "boot": {"partuuid": assemble.BOOT_PARTUUID, "start": layout.boot.start,
                     "size": layout.boot.size},
            "root": {"partuuid": assemble.ROOT_PARTUUID, "start": layout.root.start,
                     "size": layout.root.size},
        },
        "packages": assembled.packages,
    }
    (staging / final.manifest.name).write_text(json.dumps(manifest, indent=2) + "\n")

    names = (final.image.name, final.bmap.name, final.compressed.name, final.manifest.name)
    sums = [f"{sha256_file(staging / name)}  {name}\n" for name in names]
    (staging / final.checksums.name).write_text("".join(sums))

    for name in (*names, final.checksums.name):
        move_into_place(staging / name, final.image.parent / name)
    log.info(f"image {layout.size // 2**20} MiB, {used // 2**20} MiB allocated, "
             f"{manifest['image']['compressed'] // 2**20} MiB compressed")


def bootstrap_base(log: BuildLog, inputs: BuildInputs, cache: BuildCache,
                   rootfs: Path) -> tuple[str, list[str], bool]:
    """Step 2: the base's key, its installed package versions, and whether it was cached.

    The key covers the mirror's current Release file, so a base is remade once the mirror
    has new versions. When the mirror does not answer, the newest base of the same recipe is
    used, and the build says so. A cached base is not unpacked here: a later step's entry may
    make it unnecessary.
    """
    suite = inputs.spec.base.suite
    recipe = bootstrap.bootstrap_recipe(inputs.spec.base, inputs.packages, inputs.mirror)
    release = None
    try:
        release = mirror_release(inputs.mirror, suite)
        key = bootstrap.bootstrap_key(recipe, release.digest)
    except OSError as err:
        key = bootstrap.newest_base(cache, recipe)
        if key is None:
            raise UserError(f"the mirror {inputs.mirror} does not answer for {suite}: {err}",
                            "check the network or the host's apt sources, or pass "
                            "--mirror URL") from None
        created = json.loads(cache.bootstrap_meta(key).read_text())["created"]
        log.info(f"[yellow]the mirror does not answer ({err}): using the cached base "
                 f"{key[:12]} of {time.strftime('%Y-%m-%d', time.gmtime(created))}, "
                 "which may lack the mirror's newest versions[/]")
    if cache.bootstrap_tarball(key).exists():
        installed = bootstrap.resolved_packages(cache, key)
        log.info(f"cached base {key[:12]}: {len(installed)} packages")
        return key, installed, True
    installed = bootstrap.build_base(log, inputs.spec.base, inputs.packages, inputs.mirror,
                                     rootfs, cache, recipe, key, release.epoch)
    return key, installed, False


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

    try:
        build_into(log, inputs, digest, cache_dir, final, started)
    except UserError as err:
        log.write(f"error: {err.message}")  # the log says why the build stopped, too
        raise
    log.info(f"[bold green]done[/] in {time.monotonic() - started:.0f} s: {final.image}")
    return final


def build_into(log: BuildLog, inputs: BuildInputs, digest: tuple[str, dict[str, str]],
               cache_dir: Path, final: Artifacts, started: float) -> None:
    """Steps 2 to 8 in a work folder of the cache's, removed however they end."""
    require_tools(BUILD_TOOLS)
    ensure_arm64_binfmt()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = BuildCache(cache_dir)
    work = Path(tempfile.mkdtemp(prefix=f"build-{inputs.role}-", dir=cache_dir))
    rootfs = work / "rootfs"
    (work / "out").mkdir()  # the artifacts' staging folder
    try:
        with log.step("bootstrap"):
            base_key, installed, base_cached = bootstrap_base(log, inputs, cache, rootfs)
        steps = plan_steps(inputs, base_key, installed)
        assembled, report = run_steps(log, inputs, cache, steps, base_key, base_cached,
                                      work, final)
        with log.step("export"):
            export_artifacts(log, inputs, digest, assembled, report, started, final)
    finally:
        remove_work_dir(work)


def run_steps(log: BuildLog, inputs: BuildInputs, cache: BuildCache, steps: list[Step],
              base_key: str, base_cached: bool, work: Path,
              final: Artifacts) -> tuple[Assembled, list[dict]]:
    """Steps 3 to 7 from the newest cached entry on, in the work folder's rootfs/, bootfs/ and
    out/; returns the image and, per step, its key and whether its result came from the cache."""
    rootfs, bootfs, staging = work / "rootfs", work / "bootfs", work / "out"
    newest, entry = newest_entry(cache, steps)
    report = [{"step": "bootstrap", "key": base_key, "hit": base_cached}]
    report += [{"step": step.name, "key": step.key, "hit": index <= newest}
               for index, step in enumerate(steps)]

    if newest == len(steps) - 1:
        with log.step(f"cached image {steps[-1].key[:12]}"):
            return restore_image(log, entry, staging, final), report

    with log.step("rootfs"):
        if entry:
            shutil.rmtree(rootfs, ignore_errors=True)  # a fresh base, made before the lookup
            bootstrap.unpack_tarball(log, entry / "rootfs.tar", rootfs,
                                     f"unpacking cached {steps[newest].name} "
                                     f"{steps[newest].key[:12]}")
        elif base_cached:
            bootstrap.unpack_tarball(log, cache.bootstrap_tarball(base_key), rootfs,
                                     f"unpacking the cached base {base_key[:12]}")

    for step in steps[newest + 1:]:
        if step.substages and step.stored:
            with log.step(f"{step.name}: {len(step.substages)} substages"):
                run_stage(log, inputs, rootfs, list(step.substages))
                store_rootfs(log, cache, step, rootfs, work)

    assembled = finish_rootfs(log, inputs, rootfs, bootfs, staging, final)
    store_image(cache, steps[-1], assembled, work)
    return assembled, report


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
