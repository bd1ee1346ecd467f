"""`okome-image build --in-docker`: the same build inside a container of a locally made builder
image, driven through the docker SDK, on an engine this module starts and removes itself.

The engine is Debian's dockerd with its own socket, data and state folders, and no networking
of its own (no bridge, no NAT rules): the build container uses the host's network, and the
engine never pulls. The build is the lab frontend with one overlay file changed, on the shared
cache: the bootstrapped base and the stages come from the cache, so what runs in the container
is the overlays, the checks with the image's own binaries (arm64, through the host's binfmt
handler), the clean step and the assembly.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from builder.paths import PROJECT_DIR
from builder.pipeline import artifact_paths, default_source_date_epoch

pytestmark = pytest.mark.boot  # minutes: it makes the builder image and builds in it

ROLE = "frontend"


def network_links() -> set[str]:
    output = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                            check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in output.splitlines()}


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory):
    """A private dockerd; yields (DOCKER_HOST, the links the host had before it started)."""
    if not shutil.which("dockerd"):
        pytest.fail("dockerd is missing: apt-get install docker.io (or `make deps`)",
                    pytrace=False)
    root = tmp_path_factory.mktemp("dockerd")
    (root / "daemon.json").write_text("{}\n")
    socket = root / "docker.sock"
    links_before = network_links()
    log = (root / "dockerd.log").open("w")
    engine = subprocess.Popen(
        ["dockerd", f"--host=unix://{socket}", f"--data-root={root / 'data'}",
         f"--exec-root={root / 'exec'}", f"--pidfile={root / 'dockerd.pid'}",
         f"--config-file={root / 'daemon.json'}", "--bridge=none", "--iptables=false",
         "--ip6tables=false", "--ip-masq=false"],
        stdout=log, stderr=subprocess.STDOUT)
    host = f"unix://{socket}"
    try:
        import docker

        deadline = time.monotonic() + 60
        while True:
            try:
                docker.DockerClient(base_url=host, timeout=5).ping()
                break
            except Exception:
                if engine.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"dockerd did not come up:\n{(root / 'dockerd.log').read_text()}",
                                pytrace=False)
                time.sleep(0.5)
        yield host, links_before
    finally:
        engine.terminate()
        try:
            engine.wait(timeout=60)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
        log.close()
        # The engine unmounts its layers when it stops; anything left would be deleted through.
        mounted = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                                 text=True).stdout.split()
        for target in sorted((m for m in mounted if m.startswith(str(root))), reverse=True):
            subprocess.run(["umount", "-l", target])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def docker_build(built_image, docker_engine, tmp_path_factory):
    """The lab frontend with /etc/hosts changed, built with --in-docker."""
    built_image(ROLE)  # the shared cache's base and stages, made on the host
    host, _ = docker_engine
    work = tmp_path_factory.mktemp("in-docker")
    project = work / "project"
    for folder in ("images", "stages", "overlays", "sites"):
        shutil.copytree(PROJECT_DIR / folder, project / folder, symlinks=True)
    hosts = project / "overlays/common/etc/hosts.j2"
    hosts.write_text(hosts.read_text() + "# built in a container\n")

    started = time.time()
    # The checkout's epoch, as the host's build had it (the copy is not in git).
    env = {**os.environ, "DOCKER_HOST": host, "OKOME_IMAGE_PROJECT": str(project),
           "SOURCE_DATE_EPOCH": str(default_source_date_epoch())}
    result = subprocess.run([sys.executable, "-m", "builder", "build", "--role", ROLE,
                             "--site", "lab", "--out", str(work / "out"), "--in-docker"],
                            env=env, capture_output=True, text=True)
    yield result, work / "out", started
    shutil.rmtree(work)


def test_the_build_in_a_container_makes_the_image(docker_build):
    result, out, _ = docker_build
    assert result.returncode == 0, result.stderr[-3000:]
    artifacts = artifact_paths(out, ROLE)
    for path in (artifacts.image, artifacts.bmap, artifacts.compressed, artifacts.manifest,
                 artifacts.checksums, artifacts.log):
        assert path.is_file(), f"{path} is missing"
    manifest = json.loads(artifacts.manifest.read_text())
    hits = {entry["step"]: entry["hit"] for entry in manifest["cache"]}
    # What the host's build of the same inputs cached is used, not made again.
    assert all(hit for step, hit in hits.items() if step.startswith(("bootstrap", "stage "))), \
        f"{hits}\n{result.stderr[-3000:]}"
    assert not hits["image"]
    root = manifest["partitions"]["root"]["start"]
    hosts = subprocess.run(["debugfs", "-R", "cat /etc/hosts", f"{artifacts.image}?offset={root}"],
                           capture_output=True, text=True).stdout
    assert "# built in a container" in hosts
    subprocess.run(["sha256sum", "--quiet", "-c", artifacts.checksums.name], cwd=out / ROLE,
                   check=True)


def test_the_engine_only_ran_what_was_made_here(docker_build, docker_engine):
    import docker

    result, _, started = docker_build
    host, links_before = docker_engine
    client = docker.DockerClient(base_url=host)
    tags = [tag for image in client.images.list() for tag in image.tags]
    assert tags and all(tag.startswith("okome-image-builder:") for tag in tags), tags
    events = client.events(since=int(started), until=int(time.time()) + 1, decode=True)
    assert [e for e in events if e.get("Action") == "pull"] == []
    assert client.containers.list(all=True) == []  # the build container is removed
    assert network_links() == links_before  # no bridge, no veth: the engine made no network
