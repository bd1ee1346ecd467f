"""`okome-image cache list` and `cache prune`, and how entries are stored, on a throwaway cache."""

import json
import os
import subprocess
import sys
import time

import pytest

from builder.cache import BuildCache, parse_size

DAY = 86400


def okome_image(*args, env=None):
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def add_step(cache: BuildCache, key: str, step: str, size: int, used_days_ago: float):
    staged = cache.root / f"build-x/entry-{key}"
    staged.mkdir(parents=True)
    (staged / "rootfs.tar").write_bytes(os.urandom(size))
    folder = cache.store_step(key, step, staged)
    stamp = time.time() - used_days_ago * DAY
    os.utime(folder / "meta.json", (stamp, stamp))


def add_bootstrap(cache: BuildCache, key: str, size: int, used_days_ago: float):
    cache.bootstrap_dir.mkdir(parents=True, exist_ok=True)
    cache.bootstrap_tarball(key).write_bytes(os.urandom(size))
    meta = cache.bootstrap_meta(key)
    meta.write_text(json.dumps({"step": "bootstrap", "created": time.time() - 30 * DAY,
                                "packages": []}))
    stamp = time.time() - used_days_ago * DAY
    os.utime(meta, (stamp, stamp))


@pytest.fixture
def cache(tmp_path):
    cache = BuildCache(tmp_path / "cache")
    add_bootstrap(cache, "b" * 64, 3 * 2**20, used_days_ago=1)
    add_step(cache, "1" * 64, "stage 10-boot", 2 * 2**20, used_days_ago=20)
    add_step(cache, "2" * 64, "stage 20-system", 2 * 2**20, used_days_ago=5)
    add_step(cache, "3" * 64, "image", 1 * 2**20, used_days_ago=0.1)
    (cache.root / "debs").mkdir()
    (cache.root / "debs/nginx.deb").write_bytes(b"x" * 4096)
    return cache


def keys_left(cache: BuildCache) -> set[str]:
    return {entry.key[0] for entry in cache.entries()}


def test_list_shows_every_entry_least_recently_used_first(cache):
    result = okome_image("cache", "list", "--cache-dir", str(cache.root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["key", "step", "size", "age", "last", "use"]
    rows = lines[1:-1]
    assert [row.split()[0] for row in rows] == ["1" * 12, "2" * 12, "b" * 12, "3" * 12]
    assert "stage 10-boot" in rows[0] and "2.0 MiB" in rows[0] and "20 d ago" in rows[0]
    assert "bootstrap" in rows[2] and "3.0 MiB" in rows[2] and "30 d" in rows[2]
    assert lines[-1].startswith("4 entries, 8.0 MiB")


def test_list_reads_the_cache_folder_from_the_environment(cache):
    result = okome_image("cache", "list", env={"OKOME_IMAGE_CACHE": str(cache.root)})
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("4 entries")


def test_prune_by_age_removes_entries_unused_for_longer(cache):
    result = okome_image("cache", "prune", "--older-than", "7", "--cache-dir", str(cache.root))
    assert result.returncode == 0, result.stderr
    assert "removed 111111111111  stage 10-boot" in result.stdout
    assert "1 entries removed, 2.0 MiB freed" in result.stdout
    assert keys_left(cache) == {"2", "3", "b"}
    assert (cache.root / "debs/nginx.deb").exists()  # downloads are not entries


def test_prune_by_size_evicts_the_least_recently_used(cache):
    result = okome_image("cache", "prune", "--max-size", "4.5M", "--cache-dir", str(cache.root))
    assert result.returncode == 0, result.stderr
    # 8 MiB: the 10-boot (2, oldest use) and 20-system (2) entries go, the rest fits in 4.5.
    assert keys_left(cache) == {"b", "3"}
    assert not cache.bootstrap_dir.joinpath("1" * 64).exists()


def test_prune_removes_a_bootstrap_entry_whole(cache):
    okome_image("cache", "prune", "--older-than", "0.5", "--cache-dir", str(cache.root))
    assert keys_left(cache) == {"3"}
    assert list(cache.bootstrap_dir.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--older-than", "ten"], "error: 'ten' is not a number of days"),
    (["--older-than", "-1"], "error: '-1' is not a number of days"),
    (["--max-size", "lots"], "error: 'lots' is not a size"),
    (["--max-size", "5X"], "error: '5X' is not a size"),
    ([], "error: nothing to prune by"),
])
def test_bad_prune_values_are_one_line_and_remove_nothing(cache, args, message):
    result = okome_image("cache", "prune", *args, "--cache-dir", str(cache.root))
    assert result.returncode == 1
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert keys_left(cache) == {"1", "2", "3", "b"}


@pytest.mark.parametrize("text, size", [("1048576", 2**20), ("500M", 500 * 2**20),
                                        ("20G", 20 * 2**30), ("1.5GiB", 3 * 2**29),
                                        ("2kb", 2048)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_a_half_stored_entry_is_a_miss(tmp_path):
    cache = BuildCache(tmp_path)
    # What an interrupted build leaves: files in its work folder, never renamed into place.
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps/.partial-entry").mkdir()
    (tmp_path / "steps" / ("4" * 64)).mkdir()  # a folder without meta.json
    assert cache.step_entry("4" * 64) is None
    assert cache.entries() == []


def test_a_hit_marks_the_entry_used(cache):
    before = {entry.key: entry.last_used for entry in cache.entries()}
    assert cache.step_entry("1" * 64) is not None
    after = {entry.key: entry.last_used for entry in cache.entries()}
    assert after["1" * 64] > before["1" * 64] + 19 * DAY
    assert cache.entries()[-1].key == "1" * 64


def test_storing_a_key_twice_keeps_the_first_entry(cache):
    staged = cache.root / "build-y/entry"
    staged.mkdir(parents=True)
    (staged / "rootfs.tar").write_bytes(b"second")
    folder = cache.store_step("1" * 64, "stage 10-boot", staged)
    assert (folder / "rootfs.tar").stat().st_size == 2 * 2**20
    assert not staged.exists()


def test_an_interrupted_prune_is_finished_by_the_next(cache):
    # A prune killed while deleting leaves the renamed folder, which is no entry.
    os.rename(cache.steps_dir / ("1" * 64), cache.steps_dir / (".removing-" + "1" * 64))
    assert keys_left(cache) == {"2", "3", "b"}
    cache.prune(older_than_days=365)
    assert not list(cache.steps_dir.glob(".removing-*"))
