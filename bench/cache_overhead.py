"""Benchmark, not a test: what okome_cache adds to a GET and a SET over plain redis-py.

Starts a throwaway redis-server on 127.0.0.1, then times the library's calls and the raw
redis-py calls they stand for, on one client over one loopback connection, and prints the time
per call and the library/raw ratio. Run from the repository root:

    .venv/bin/python bench/cache_overhead.py [--calls 500] [--rounds 60] [--value-bytes 1024]
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from okome_cache import Cache, content_hash, planner_key
from okome_cache.testing import LocalRedisServer, free_port


def per_call_microseconds(calls: int, rounds: int,
                          *candidates: Callable[[], object]) -> list[float]:
    """For each candidate, the median over `rounds` of its mean time per call, in µs.

    Rounds of the candidates alternate, so a slow moment of the machine hits them alike.
    """
    results: list[list[float]] = [[] for _ in candidates]
    for _ in range(rounds):
        for call, timings in zip(candidates, results, strict=True):
            started = time.perf_counter()
            for _ in range(calls):
                call()
            timings.append((time.perf_counter() - started) / calls * 1e6)
    return [statistics.median(timings) for timings in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds per operation")
    parser.add_argument("--value-bytes", type=int, default=1024, help="size of the JSON value")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        arguments = ["--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", workdir, "--logfile", ""]
        with LocalRedisServer(Path(workdir), port, arguments):
            client = redis.Redis(port=port)
            cache = Cache(client)
            value = {"plan": ["x" * (options.value_bytes - 16)]}
            data = json.dumps(value, separators=(",", ":")).encode()
            key = planner_key("qwen2.5", "benchmark prompt", "default", content_hash("repo"))
            name = cache.redis_key(key)
            cache.set(key, value)
            client.ping()

            def compare(raw: Callable[[], object], library: Callable[[], object]) -> list[float]:
                return per_call_microseconds(options.calls, options.rounds, raw, library)

            rows = [
                ("get", *compare(lambda: client.get(name), lambda: cache.get(key))),
                ("set", *compare(lambda: client.set(name, data, ex=600),
                                 lambda: cache.set(key, value))),
                # A hit also reads the key's TTL (one pipelined round trip) to refresh early.
                ("get_or_compute, hit", *compare(
                    lambda: client.get(name), lambda: cache.get_or_compute(key, lambda: value))),
            ]

    print(f"{options.calls} calls x {options.rounds} rounds, {len(data)}-byte value, "
          "one loopback connection")
    print(f"{'operation':<22}{'raw redis-py µs':>17}{'okome_cache µs':>16}{'added µs':>10}"
          f"{'ratio':>8}")
    for operation, raw, library in rows:
        print(f"{operation:<22}{raw:>17.1f}{library:>16.1f}{library - raw:>10.1f}"
              f"{library / raw:>8.2f}")


if __name__ == "__main__":
    main()
