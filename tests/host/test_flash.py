"""`okome-image flash` on this machine: small images made like the real ones, flashed to files
and loop devices; the read-back catches a corrupted block; the identity is on the card, and the
secrets are on the card only. Also the node's side: the apply script, run on a copy of it."""

import hashlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from builder import bootpart
from builder.buildlog import BuildLog
from builder.cli import default_cache_dir
from builder.errors import UserError
from builder.flash import (
    VerificationFailed,
    check_target,
    find_image,
    flash_node,
    rebuild_node,
    verify_target,
    write_image,
)
from builder.identity import node_identity
from builder.overlay import render_template
from builder.paths import OVERLAYS_DIR
from builder.site import load_site
from tests.flash_fixtures import loop_device, make_role_image, needs_root

PROJECT_DIR = Path(__file__).resolve().parent.parent.parent
MIB = 2**20
# Throwaway secrets of this test run: found anywhere but on a flashed card, they leaked.
GATEWAY_PASSWORD = "gw-" + secrets.token_hex(20)
METRICS_PASSWORD = "mx-" + secrets.token_hex(20)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    make_role_image(out, "frontend")
    make_role_image(out, "backend")
    return out


@pytest.fixture(scope="module")
def admin_key(tmp_path_factory):
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key.with_suffix(".pub").read_text()


@pytest.fixture(autouse=True)
def lab_sources(monkeypatch, admin_key):
    monkeypatch.setenv("OKOME_LAB_ADMIN_KEYS", admin_key)
    monkeypatch.setenv("OKOME_LAB_REDIS_GATEWAY_PASSWORD", GATEWAY_PASSWORD)
    monkeypatch.setenv("OKOME_LAB_REDIS_METRICS_PASSWORD", METRICS_PASSWORD)


def quiet_log() -> BuildLog:
    return BuildLog(None)


def card_file(tmp_path: Path) -> Path:
    card = tmp_path / "card.img"
    card.touch()
    return card


def root_partition_digest(path: Path) -> str:
    root = bootpart.partitions(path)[1]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(root.start)
        remaining = root.size
        while remaining:
            chunk = f.read(min(4 * MIB, remaining))
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def assert_flashed_as(target: Path, image: Path, node: str):
    expected = node_identity(load_site("lab"), node)
    for name, content in expected.items():
        assert bootpart.read_boot_file(target, f"okome/{name}") == content, name
    assert bootpart.read_boot_file(target, "config.txt").startswith(b"kernel=")
    assert root_partition_digest(target) == root_partition_digest(image)


def test_flash_to_a_file_writes_the_image_and_the_nodes_identity(out_dir, tmp_path):
    card = card_file(tmp_path)
    report = flash_node("lab", "frontend-b", card, out_dir, confirm=None, log=quiet_log())
    image = out_dir / "frontend/okome-frontend.img"
    assert_flashed_as(card, image, "frontend-b")
    assert card.stat().st_size == image.stat().st_size
    assert {"write okome-frontend.img to " + str(card), f"verify {card}",
            "write the identity"} <= set(report.seconds)


@needs_root
def test_flash_to_a_loop_device(out_dir, tmp_path):
    image = out_dir / "frontend/okome-frontend.img"
    with loop_device(tmp_path / "card", image.stat().st_size + 8 * MIB) as device:
        flash_node("lab", "frontend-a", device, out_dir, force=True, confirm=None,
                   log=quiet_log())
        assert_flashed_as(device, image, "frontend-a")


def corrupt_one_block(path: Path, offset: int):
    """Flip one byte, as a card's failing cell would."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(descriptor, 1, offset)
        os.pwrite(descriptor, bytes([byte[0] ^ 0xFF]), offset)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def largest_range_middle(image) -> int:
    block_map = image.block_map
    largest = max(block_map.ranges, key=lambda r: r.last - r.first)
    start, end = block_map.range_bytes(largest)
    return (start + end) // 2


def test_a_corrupted_block_in_a_file_is_caught_by_the_read_back(out_dir, tmp_path):
    image = find_image(out_dir, "frontend", "lab")
    target = check_target(card_file(tmp_path), image.block_map.image_size)
    write_image(image, target, quiet_log())
    verify_target(target, image.block_map, quiet_log())

    offset = largest_range_middle(image)
    corrupt_one_block(target.device, offset)
    with pytest.raises(VerificationFailed) as raised:
        verify_target(target, image.block_map, quiet_log())
    assert "1 of" in raised.value.message and "flash another card" in raised.value.hint
    start, end = (int(n) for n in raised.value.message.rsplit("bytes ", 1)[1]
                  .rstrip(")").split("-"))
    assert start <= offset < end


@needs_root
def test_a_corrupted_block_on_a_device_is_caught_not_served_from_the_cache(out_dir, tmp_path):
    """The block is corrupted behind the device's back, in its backing file: only a read that
    bypasses what this machine cached of the device sees it."""
    image = find_image(out_dir, "frontend", "lab")
    backing = tmp_path / "card"
    with loop_device(backing, image.block_map.image_size) as device:
        target = check_target(device, image.block_map.image_size, force=True)
        write_image(image, target, quiet_log())
        verify_target(target, image.block_map, quiet_log())
        corrupt_one_block(backing, largest_range_middle(image))
        with pytest.raises(VerificationFailed):
            verify_target(target, image.block_map, quiet_log())


def test_a_damaged_image_fails_the_write_and_says_what_the_card_holds(out_dir, tmp_path):
    """bmaptool checks the image against the block map while it writes; the failure names the
    state the target is left in."""
    source = find_image(out_dir, "frontend", "lab")
    damaged = tmp_path / "okome-frontend.img"
    subprocess.run(["cp", "--sparse=always", str(source.path), str(damaged)], check=True)
    (tmp_path / "okome-frontend.img.bmap").write_bytes(source.block_map_path.read_bytes())
    corrupt_one_block(damaged, largest_range_middle(source))

    image = find_image(out_dir, "frontend", "lab", damaged)
    target = check_target(card_file(tmp_path), image.block_map.image_size)
    with pytest.raises(UserError) as raised:
        write_image(image, target, quiet_log())
    assert "checksum mismatch" in raised.value.message
    assert "may be partly written: it will not boot" in raised.value.hint


def test_a_missing_secret_stops_the_flash_before_the_card_is_touched(out_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.delenv("OKOME_LAB_REDIS_GATEWAY_PASSWORD")
    card = tmp_path / "card.img"
    card.write_bytes(b"what the card held")
    with pytest.raises(UserError, match="OKOME_LAB_REDIS_GATEWAY_PASSWORD"):
        flash_node("lab", "backend", card, out_dir, confirm=None, log=quiet_log())
    assert card.read_bytes() == b"what the card held"


def test_no_answer_means_nothing_is_written(out_dir, tmp_path):
    card = tmp_path / "card.img"
    card.write_bytes(b"what the card held")
    with pytest.raises(UserError, match="not confirmed"):
        flash_node("lab", "frontend-a", card, out_dir, confirm=lambda question: False,
                   log=quiet_log())
    assert card.read_bytes() == b"what the card held"


def test_an_image_of_another_role_or_site_is_refused(out_dir, tmp_path):
    backend_image = out_dir / "backend/okome-backend.img"
    with pytest.raises(UserError, match="is the backend image; frontend-a runs frontend"):
        flash_node("lab", "frontend-a", card_file(tmp_path), out_dir, image_path=backend_image,
                   confirm=None, log=quiet_log())
    with pytest.raises(UserError, match="was built for site lab, not production"):
        flash_node("production", "frontend-a", card_file(tmp_path), out_dir, confirm=None,
                   log=quiet_log())


def test_identity_only_turns_a_flashed_card_into_another_node(out_dir, tmp_path):
    card = card_file(tmp_path)
    flash_node("lab", "frontend-a", card, out_dir, confirm=None, log=quiet_log())
    before = root_partition_digest(card)
    flash_node("lab", "frontend-b", card, out_dir, confirm=None, identity_only=True,
               log=quiet_log())
    assert bootpart.read_boot_file(card, "okome/hostname") == b"frontend-b\n"
    assert root_partition_digest(card) == before


def test_identity_only_refuses_a_card_of_another_role_or_site_or_none(out_dir, tmp_path):
    card = card_file(tmp_path)
    flash_node("lab", "frontend-a", card, out_dir, confirm=None, log=quiet_log())
    before = hashlib.sha256(card.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="holds the frontend image of site lab; this node runs "
                                        "the backend image of site lab"):
        flash_node("lab", "backend", card, out_dir, confirm=None, identity_only=True,
                   log=quiet_log())
    assert hashlib.sha256(card.read_bytes()).hexdigest() == before

    (tmp_path / "blank").mkdir()
    blank = card_file(tmp_path / "blank")
    blank.write_bytes(bytes(4 * MIB))
    with pytest.raises(UserError, match="holds no okome-image card"):
        flash_node("lab", "frontend-b", blank, out_dir, confirm=None, identity_only=True,
                   log=quiet_log())


@pytest.mark.parametrize("artifact", ["okome-frontend.img", "okome-frontend.img.bmap",
                                      "manifest.json"])
def test_the_builds_own_files_are_never_a_target(out_dir, artifact):
    target = out_dir / "frontend" / artifact
    before = target.read_bytes()
    with pytest.raises(UserError, match="is the image itself|in a build's output folder"):
        flash_node("lab", "frontend-a", target, out_dir, confirm=None, log=quiet_log())
    assert target.read_bytes() == before


@needs_root
def test_a_file_target_without_room_for_the_image_is_refused_before_writing(out_dir,
                                                                            tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        card = small / "card.img"
        card.touch()
        with pytest.raises(UserError, match="MiB free; the image writes"):
            flash_node("lab", "frontend-a", card, out_dir, confirm=None, log=quiet_log())
        assert card.stat().st_size == 0
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_rebuild_node_flashes_a_current_image_without_building(out_dir, tmp_path,
                                                              monkeypatch):
    import builder.pipeline

    def no_build(*args, **kwargs):
        raise AssertionError("the image is current: nothing should be built")

    monkeypatch.setattr(builder.pipeline, "image_is_current", lambda *args, **kwargs: True)
    monkeypatch.setattr(builder.pipeline, "build_image", no_build)
    card = card_file(tmp_path)
    report = rebuild_node("lab", "frontend-b", card, out_dir, tmp_path / "cache", confirm=None,
                          log=quiet_log())
    assert_flashed_as(card, out_dir / "frontend/okome-frontend.img", "frontend-b")
    assert not [step for step in report.seconds if step.startswith("build")]


def test_rebuild_node_builds_first_when_the_inputs_changed(tmp_path, monkeypatch):
    import builder.pipeline

    built = []

    def build_image(role, site, out, cache_dir, mirror=None):
        built.append((role, site))
        make_role_image(out, role, site)

    monkeypatch.setattr(builder.pipeline, "image_is_current", lambda *args, **kwargs: False)
    monkeypatch.setattr(builder.pipeline, "build_image", build_image)
    card = card_file(tmp_path)
    report = rebuild_node("lab", "backend", card, tmp_path / "out", tmp_path / "cache",
                          confirm=None, log=quiet_log())
    assert built == [("backend", "lab")]
    assert "build backend" in report.seconds
    assert bootpart.read_boot_file(card, "okome/hostname") == b"backend\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True,
                          text=True, cwd=PROJECT_DIR, stdin=subprocess.DEVNULL)


def test_the_command_flashes_and_refuses_in_one_line(out_dir, tmp_path):
    card = card_file(tmp_path)
    done = run_cli("flash", "--site", "lab", "--out", str(out_dir), "--node", "frontend-a",
                   "--yes", str(card))
    assert done.returncode == 0, done.stderr
    assert bootpart.read_boot_file(card, "okome/hostname") == b"frontend-a\n"

    refused = run_cli("flash", "--site", "lab", "--out", str(out_dir), "--node", "frontend-a",
                      "--yes", str(tmp_path / "sdx"))
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert f"error: {tmp_path / 'sdx'} does not exist" in refused.stderr

    unconfirmed = run_cli("flash", "--site", "lab", "--out", str(out_dir), "--node",
                          "frontend-a", str(card))
    assert unconfirmed.returncode == 1 and "add --yes" in unconfirmed.stderr


def files_containing(strings: list[str], paths: list[Path]) -> list[str]:
    """Every file under `paths` that holds any of `strings` (grep, as fast as it gets)."""
    existing = [str(path) for path in paths if path.exists()]
    if not existing:
        return []
    argv = ["grep", "-r", "-l", "-a", "-F", "-s"] + [f"-e{s}" for s in strings] + existing
    return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()


def test_secrets_are_on_the_flashed_card_only(out_dir, tmp_path):
    card = card_file(tmp_path)
    done = run_cli("flash", "--site", "lab", "--out", str(out_dir), "--node", "backend",
                   "--yes", str(card))
    assert done.returncode == 0, done.stderr

    # The exporter's password must be on the card (its login); the gateway's only as a digest.
    on_card = files_containing([METRICS_PASSWORD, GATEWAY_PASSWORD], [card])
    assert on_card == [str(card)]
    assert files_containing([GATEWAY_PASSWORD], [card]) == []

    both = [METRICS_PASSWORD, GATEWAY_PASSWORD]
    assert not any(s in done.stdout + done.stderr for s in both)
    images = [out_dir / role for role in ("frontend", "backend")]
    assert files_containing(both, images) == []
    build_records = [*PROJECT_DIR.glob("out/**/manifest.json"),
                     *PROJECT_DIR.glob("out/**/build.log")]
    assert files_containing(both, build_records) == []
    assert files_containing(both, [default_cache_dir()]) == []
    leftovers = [*Path("/dev/shm").glob("okome-identity-*"),
                 *Path(os.environ.get("TMPDIR", "/tmp")).glob("okome-identity-*")]
    assert leftovers == []


# -- the node's side: okome-apply-identity, run on this machine against a tmp tree ----------

@pytest.fixture
def apply_script(tmp_path, lab_site):
    """The rendered script with its two fixed folders moved into tmp_path, and an admin
    without a .ssh folder (nobody), so it touches nothing of this machine."""
    site = lab_site.model_copy(update={"admin": lab_site.admin.model_copy(
        update={"user": "nobody"})})
    template = OVERLAYS_DIR / "common/usr/local/sbin/okome-apply-identity.j2"
    text = render_template(template, {"site": site})
    lists, record = tmp_path / "identity.d", tmp_path / "var/okome-identity-installed"
    text = text.replace("/etc/okome/identity.d/", f"{lists}/")
    text = text.replace("/var/lib/okome/identity-installed", str(record))
    script = tmp_path / "okome-apply-identity"
    script.write_text(text)
    lists.mkdir()
    node = tmp_path / "node"
    (lists / "test.list").write_text(
        "# FILE TARGET MODE OWNER:GROUP\n"
        f"network  {node}/etc/systemd/network/10-okome-node.network  0644  root:root\n"
        f"secret.env  {node}/etc/okome/secret.env  0600  root:root\n"
        f"shipped  {node}/etc/shipped  0644  root:root\n")
    return script, node


@needs_root
def test_the_apply_script_installs_files_and_forgets_those_removed_from_the_card(
        apply_script, tmp_path):
    script, node = apply_script
    card = tmp_path / "card"
    card.mkdir()
    (card / "network").write_bytes(b"[Match]\r\nName=en*\r\n")
    (card / "secret.env").write_text("PASSWORD=x\n")
    (node / "etc").mkdir(parents=True)
    (node / "etc/shipped").write_text("the image's own\n")  # not on the card: left alone

    subprocess.run(["bash", str(script), str(card)], check=True)
    network = node / "etc/systemd/network/10-okome-node.network"
    assert network.read_bytes() == b"[Match]\nName=en*\n"  # CR LF from Windows made LF
    assert network.stat().st_mode & 0o777 == 0o644
    assert (node / "etc/okome/secret.env").stat().st_mode & 0o777 == 0o600

    (card / "network").unlink()
    subprocess.run(["bash", str(script), str(card)], check=True)
    assert not network.exists()
    assert (node / "etc/okome/secret.env").exists()
    assert (node / "etc/shipped").read_text() == "the image's own\n"
