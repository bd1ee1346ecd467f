"""`okome-image build --in-docker`: the same build, run inside a container, for hosts that are
not Debian bookworm.

The container's image (the builder image) is made here, never pulled: mmdebstrap makes a Debian
bookworm root filesystem for the host's own architecture with the tools the build runs and a
Python environment with the project's dependencies, and the docker engine imports it as
`okome-image-builder:KEY`, KEY being the hash of everything that went into it. An image with
that tag is reused; a change to the recipe, the mirror or the dependencies makes a new one.

The container runs this checkout's own `builder` package (mounted read-only) on the output and
cache folders (mounted read-write at their host paths, so the bootstrap cache is shared with
builds on the host and every path in a message is valid on the host). Inside it, `run_inside`
runs the build and then hands what it wrote back to the invoking user.
"""

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from builder.buildlog import BuildLog
from builder.chroot import namespaced
from builder.errors import UserError
from builder.hosttools import BUILD_TOOLS
from builder.paths import BUILDER_DIR, PROJECT_DIR

BUILDER_REPOSITORY = "okome-image-builder"
SUITE = "bookworm"
PYTHON_VERSION = "3.11"  # bookworm's python3; the wheels are chosen for it
GLIBC_MINOR = 36  # bookworm's glibc 2.36: the newest manylinux wheel that runs there
VENV = "/opt/okome-image"

# What runs in the container besides the build tools: emulation for the arm64 root filesystem
# (registered from inside when the host has not registered it), what mmdebstrap needs to verify
# and fetch from the mirror, systemctl for `--root` unit links, and Python for the builder.
BUILDER_PACKAGES = sorted(set(BUILD_TOOLS.values()) | {
    "qemu-user-static", "binfmt-support", "arch-test", "mount", "systemd",
    "ca-certificates", "debian-archive-keyring", "python3", "python3-venv",
})

# How long a stopped build may take to clean up (remove its work tree) before it is killed.
STOP_SECONDS = 60

DEBIAN_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64",
                        "arm64": "arm64"}


def host_architecture() -> tuple[str, str]:
    """(Debian architecture, machine name for wheel tags) of this host."""
    machine = platform.machine()
    if machine not in DEBIAN_ARCHITECTURES:
        raise UserError(f"--in-docker does not support this host's architecture ({machine})",
                        "build on an x86_64 or aarch64 host")
    arch = DEBIAN_ARCHITECTURES[machine]
    return arch, {"amd64": "x86_64", "arm64": "aarch64"}[arch]


def python_requirements() -> list[str]:
    """The project's own dependencies, from the pyproject.toml beside the builder package."""
    pyproject = BUILDER_DIR.parent / "pyproject.toml"
    return sorted(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


@dataclass(frozen=True)
class BuilderRecipe:
    """Everything that decides the builder image; its hash names the image."""

    mirror: str
    architecture: str
    packages: tuple[str, ...]
    requirements: tuple[str, ...]
    suite: str = SUITE
    python: str = PYTHON_VERSION

    def key(self) -> str:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields["recipe"] = 1  # raise when the way the image is made changes
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    @property
    def tag(self) -> str:
        return f"{BUILDER_REPOSITORY}:{self.key()[:16]}"


def builder_recipe(mirror: str) -> BuilderRecipe:
    architecture, _ = host_architecture()
    return BuilderRecipe(mirror=mirror, architecture=architecture,
                         packages=tuple(BUILDER_PACKAGES),
                         requirements=tuple(python_requirements()))


def engine_address() -> str:
    """Where the SDK looks for the engine: DOCKER_HOST, else the docker CLI's current context
    (Docker Desktop and rootless engines set one), else the default socket."""
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    try:
        from docker.context import ContextAPI

        host = ContextAPI.get_current_context().Host
    except Exception:  # a broken context file: the connection attempt will say more
        host = None
    return host or "unix:///var/run/docker.sock"


def connect_to_engine():
    """A docker client that has answered, or a UserError saying why there is none."""
    try:
        import docker
        from docker.errors import DockerException
        from requests.exceptions import RequestException
    except ImportError:
        raise UserError("--in-docker needs the docker SDK for Python, which is not installed",
                        "pip install -e '.[docker]' in the checkout (or `pip install docker`)"
                        ) from None

    where = engine_address()
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except (DockerException, OSError, RequestException) as err:
        reason = str(err)
        if "PermissionError" in reason or "Permission denied" in reason:
            raise UserError(f"no permission to use the docker engine at {where}",
                            "add yourself to the `docker` group (sudo usermod -aG docker "
                            "$USER, then log in again), or run as root") from None
        raise UserError(f"no docker engine answers at {where}",
                        "start one (`sudo systemctl start docker`, or `sudo dockerd &`), "
                        "or point DOCKER_HOST at a running engine") from None
    # Builds print little to the terminal for minutes at a time; a read timeout would cut the
    # log stream, so streamed reads wait as long as the build runs.
    client.api.timeout = None
    return client


def local_image(client, tag: str):
    """The image with this tag if the engine has it; never pulled from anywhere."""
    from docker.errors import ImageNotFound

    try:
        return client.images.get(tag)
    except ImageNotFound:
        return None


def wheel_platforms(machine: str) -> list[str]:
    """Wheel platform tags bookworm's glibc runs, newest first (pip does not widen them)."""
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 16, -1)]
    return tags + [f"manylinux2014_{machine}"]


def download_wheels(log: BuildLog, recipe: BuilderRecipe, into: Path) -> None:
    """The dependencies as wheels for the container's Python, fetched by this host's pip with
    this host's pip configuration (index, proxies), so the container needs no index of its own."""
    _, machine = host_architecture()
    platforms = [arg for tag in wheel_platforms(machine) for arg in ("--platform", tag)]
    log.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", into,
             "--only-binary=:all:", "--python-version", recipe.python,
             "--implementation", "cp", "--abi", f"cp{recipe.python.replace('.', '')}",
             *platforms, *recipe.requirements], "downloading the Python dependencies")


def mmdebstrap_command(recipe: BuilderRecipe, wheels: Path, tarball: Path) -> list[str]:
    """mmdebstrap making the builder image's root filesystem as a tarball."""
    from builder.bootstrap import DPKG_OPTIONS

    pip_install = (f'chroot "$1" /usr/bin/env -i PATH=/usr/bin:/bin {VENV}/bin/pip install '
                   '--quiet --no-index --find-links /tmp/okome-wheels '
                   + " ".join(f"'{requirement}'" for requirement in recipe.requirements))
    argv = [
        "mmdebstrap", "--variant=apt", f"--architectures={recipe.architecture}",
        f"--include={','.join(recipe.packages)}",
        *[f"--dpkgopt={option}" for option in DPKG_OPTIONS],
        '--aptopt=APT::Install-Recommends "false"',
        '--customize-hook=mkdir -p "$1/tmp/okome-wheels"',
        f"--customize-hook=sync-in {wheels} /tmp/okome-wheels",
        f'--customize-hook=chroot "$1" /usr/bin/python3 -m venv {VENV}',
        f"--customize-hook={pip_install}",
        '--customize-hook=rm -rf "$1/tmp/okome-wheels"',
        recipe.suite, str(tarball), recipe.mirror,
    ]
    # As root, the mounts mmdebstrap makes live in a private mount namespace; as another user
    # mmdebstrap picks its unshare mode by itself.
    return namespaced(argv) if os.geteuid() == 0 else argv


def image_changes(recipe: BuilderRecipe) -> list[str]:
    """Dockerfile-style settings given to the imported root filesystem."""
    return [
        f"ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        f"LABEL org.okome-image.builder-key={recipe.key()}",
        f"LABEL org.okome-image.mirror={recipe.mirror}",
    ]


def make_builder_image(client, log: BuildLog, recipe: BuilderRecipe, cache_dir: Path) -> None:
    """mmdebstrap the builder's root filesystem on this host and import it into the engine."""
    if not shutil.which("mmdebstrap"):
        # On the hosts this mode is for, apt-get (require_tools' hint) is not the way to get it.
        raise UserError("making the builder image needs mmdebstrap on this host",
                        "install your distribution's mmdebstrap package (with the Debian "
                        "archive keyring), or `apt-get install mmdebstrap` on Debian")
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="builder-image-", dir=cache_dir))
    try:
        wheels, tarball = work / "wheels", work / "rootfs.tar"
        wheels.mkdir()
        with log.step("python dependencies"):
            download_wheels(log, recipe, wheels)
        with log.step(f"mmdebstrap {recipe.suite} {recipe.architecture}: "
                      f"{len(recipe.packages)} packages"):
            log.run(mmdebstrap_command(recipe, wheels, tarball), "mmdebstrap (builder image)")
        with log.step(f"import as {recipe.tag}"):
            repository, tag = recipe.tag.split(":")
            with tarball.open("rb") as rootfs:
                result = client.api.import_image(src=rootfs, repository=repository, tag=tag,
                                                 changes=image_changes(recipe))
            # The engine reports a failed import in the response body, not as an HTTP error.
            if local_image(client, recipe.tag) is None:
                raise UserError(f"the docker engine did not import the builder image: "
                                f"{str(result).strip()[-300:]}", f"full log: {log.path}")
            log.info(f"{tarball.stat().st_size // 2**20} MiB root filesystem")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_builder_image(client, recipe: BuilderRecipe, cache_dir: Path) -> str:
    """The builder image's tag, making the image first if the engine does not have it."""
    if local_image(client, recipe.tag) is None:
        log = BuildLog(cache_dir / "builder-image.log")
        try:
            with log.step(f"builder image {recipe.tag}"):
                make_builder_image(client, log, recipe, cache_dir)
        finally:
            log.close()
    return recipe.tag


@dataclass(frozen=True)
class ContainerPlan:
    """What the build container is made of: where each host folder appears, what runs."""

    image: str
    command: list[str]
    binds: dict[str, dict[str, str]]
    environment: dict[str, str]


def plan_container(image: str, role: str, site: str, out_dir: Path, cache_dir: Path,
                   mirror: str, source_date_epoch: int,
                   uid: int | None = None, gid: int | None = None) -> ContainerPlan:
    """Mounts, environment and command for building `role` in the container.

    Every host folder appears at its own path: the checkout and the definitions read-only,
    the output and cache folders writable.
    """
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    out_dir, cache_dir = out_dir.resolve(), cache_dir.resolve()
    source = BUILDER_DIR.parent
    binds = {str(source): {"bind": str(source), "mode": "ro"}}
    if PROJECT_DIR != source:
        binds[str(PROJECT_DIR)] = {"bind": str(PROJECT_DIR), "mode": "ro"}
    site_path = Path(site)
    if site_path.is_file():
        site = str(site_path.resolve())
        binds.setdefault(str(site_path.resolve().parent),
                         {"bind": str(site_path.resolve().parent), "mode": "ro"})
    binds[str(out_dir)] = {"bind": str(out_dir), "mode": "rw"}
    binds[str(cache_dir)] = {"bind": str(cache_dir), "mode": "rw"}

    environment = {
        "PYTHONPATH": str(source),
        "PYTHONDONTWRITEBYTECODE": "1",  # nothing written into the read-only checkout
        "SOURCE_DATE_EPOCH": str(source_date_epoch),  # git is not in the container
    }
    if PROJECT_DIR != source:
        environment["OKOME_IMAGE_PROJECT"] = str(PROJECT_DIR)
    build = ["build", "--role", role, "--site", site, "--out", str(out_dir),
             "--cache-dir", str(cache_dir), "--mirror", mirror]
    command = ["python3", "-m", "builder.docker_build", "--owner", f"{uid}:{gid}",
               "--give-back", str(out_dir / role), "--give-back-shallow", str(cache_dir),
               "--", *build]
    return ContainerPlan(image=image, command=command, binds=binds, environment=environment)


def container_options(plan: ContainerPlan) -> dict:
    """Keyword arguments for `containers.create`, which never pulls: the image is the local one.

    Not `privileged`, but what the build needs beyond Docker's defaults: CAP_SYS_ADMIN to
    mount /proc, /sys, /dev and tmpfs in the namespaces it creates, to bind-mount inside the
    root filesystem and to mount binfmt_misc (the container's /proc has none; the handler for
    arm64 is the host kernel's); CAP_NET_ADMIN for the keepalived check's own network
    namespace. Docker's default seccomp profile allows those calls once the capability is
    there; AppArmor's docker-default profile and SELinux's container label still forbid the
    mounts and the writes to the host folders, so the container runs unconfined by either.
    userns_mode host: files written to the host folders belong to real root (handed back
    after the build), also on engines with user-namespace remapping.
    network_mode host: the container reaches the mirror exactly as the host does; the engine
    builds no bridge or NAT rules for it.
    """
    return {
        "image": plan.image,
        "command": plan.command,
        "environment": plan.environment,
        "volumes": plan.binds,
        "working_dir": "/",
        "cap_add": ["SYS_ADMIN", "NET_ADMIN"],
        "security_opt": ["apparmor=unconfined", "label=disable"],
        "userns_mode": "host",
        "network_mode": "host",
        "init": True,  # forwards `docker stop`'s SIGTERM to run_inside
        "labels": {"org.okome-image.build": "1"},
    }


def build_in_docker(role: str, site: str, out_dir: Path, cache_dir: Path,
                    mirror: str | None = None) -> int:
    """Build the role's image in a container; returns the build's exit status.

    Ctrl-C (or SIGTERM) stops the container, which lets the build clean up its work tree,
    and removes it.
    """
    from builder.pipeline import load_inputs

    inputs = load_inputs(role, site, mirror)  # user mistakes are reported before docker is
    client = connect_to_engine()
    image = ensure_builder_image(client, builder_recipe(inputs.mirror), cache_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_container(image, role, site, out_dir, cache_dir, inputs.mirror,
                          inputs.source_date_epoch)
    from docker.errors import APIError

    try:
        container = client.containers.create(**container_options(plan))
    except APIError as err:
        raise UserError(f"the docker engine refused the build container: {engine_reason(err)}",
                        "--in-docker needs a rootful engine that allows added capabilities "
                        "and bind mounts of host folders") from None
    try:
        container.start()
        for chunk in container.logs(stream=True, follow=True):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        return container.wait()["StatusCode"]
    except APIError as err:
        raise UserError(f"the build container failed to start: {engine_reason(err)}",
                        "--in-docker needs a rootful engine that allows added capabilities "
                        "and bind mounts of host folders") from None
    except BaseException:
        # The build removes its work tree first, which can take a while; say why nothing ends.
        print(f"stopping the build container (up to {STOP_SECONDS} s)", file=sys.stderr)
        container.stop(timeout=STOP_SECONDS)
        raise
    finally:
        container.remove(force=True)


def engine_reason(err) -> str:
    """The engine's own words from an APIError, without the SDK's URL and status line."""
    return str(getattr(err, "explanation", None) or err).strip()


# Inside the container.

def give_back(path: Path, uid: int, gid: int, depth: int | None) -> None:
    """Hand `path` and what is below it (down to `depth` levels) to uid:gid.

    The cache is handed back only three levels deep (cache/steps/KEY/rootfs.tar,
    cache/bootstrap/KEY.tar, cache/debs/*.deb) and build-* work trees are skipped: a root
    filesystem tree inside the cache must keep its root ownership.
    """
    if not path.exists():
        return
    os.chown(path, uid, gid, follow_symlinks=False)
    if depth == 0 or not path.is_dir() or path.is_symlink():
        return
    for entry in path.iterdir():
        if depth is not None and entry.name.startswith(("build-", "builder-image-")):
            continue
        give_back(entry, uid, gid, None if depth is None else depth - 1)


def run_inside(argv: list[str]) -> int:
    """The container's command: run the build, then give its files to the invoking user."""
    import argparse

    parser = argparse.ArgumentParser(prog="builder.docker_build")
    parser.add_argument("--owner", required=True, help="UID:GID of the user who asked")
    parser.add_argument("--give-back", type=Path, action="append", default=[])
    parser.add_argument("--give-back-shallow", type=Path, action="append", default=[])
    parser.add_argument("build", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    uid, gid = (int(n) for n in args.owner.split(":"))
    build = args.build[1:] if args.build[:1] == ["--"] else args.build

    child = subprocess.Popen([sys.executable, "-m", "builder", *build])
    # Stopping the container sends SIGTERM here; the build gets it and cleans up its work tree.
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda signum, frame: child.send_signal(signal.SIGINT))
    status = child.wait()

    if uid != 0:
        for path in args.give_back:
            give_back(path, uid, gid, None)
        for path in args.give_back_shallow:
            give_back(path, uid, gid, 3)
    return status


if __name__ == "__main__":
    sys.exit(run_inside(sys.argv[1:]))
