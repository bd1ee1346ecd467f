"""The backend image boots with redis as a pure cache: authenticated, no persistence, the
kernel settings redis asks for, metrics exported, and no failed unit."""

import pytest

pytestmark = pytest.mark.boot


def redis(backend, passwords, user, *command):
    args = " ".join(command)
    return backend.execute(
        f"REDISCLI_AUTH={passwords[user]} redis-cli --no-auth-warning --user {user} {args}")[1]


def test_boots_to_running_with_no_failed_unit(backend):
    state = backend.wait_for_running(timeout=240)
    failed = backend.execute("systemctl --failed --no-legend --plain")[1]
    assert state == "running", f"system is {state}; failed units:\n{failed}"


def test_redis_is_active_and_listens_on_loopback_only_without_a_static_address(backend):
    """This card has no network identity (the node runs on DHCP), so redis has no address of
    its own to listen on; the lab test checks a node with one."""
    backend.wait_for_unit("redis-server.service")
    listening = backend.succeed("ss -Htln 'sport = :6379'")
    assert {line.split()[3] for line in listening.splitlines()} == {"127.0.0.1:6379",
                                                                    "[::1]:6379"}


def test_unauthenticated_commands_are_refused(backend):
    assert "NOAUTH" in backend.execute("redis-cli ping")[1]


def test_gateway_user_reads_and_writes_its_keys_only(backend, redis_passwords):
    assert redis(backend, redis_passwords, "gateway", "set okome:v1:boot-test 1 EX 60") \
        .strip() == "OK"
    assert redis(backend, redis_passwords, "gateway", "get okome:v1:boot-test").strip() == "1"
    assert "NOPERM" in redis(backend, redis_passwords, "gateway", "set other-key 1")


def test_metrics_user_cannot_write(backend, redis_passwords):
    assert "NOPERM" in redis(backend, redis_passwords, "metrics", "set okome:v1:x 1")


def test_no_persistence_of_any_kind(backend, redis_passwords):
    assert redis(backend, redis_passwords, "metrics", "config get save").split() == ["save"]
    assert redis(backend, redis_passwords, "metrics", "config get appendonly").split() == \
        ["appendonly", "no"]
    backend.succeed("test -z \"$(find /var/lib/redis -name '*.rdb' -o -name '*.aof')\"")


def test_memory_limit_sized_from_the_boards_ram(backend, redis_passwords):
    limit = int(redis(backend, redis_passwords, "metrics", "config get maxmemory").split()[1])
    total_kib = int(backend.succeed("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert 0 < limit < total_kib * 1024
    policy = redis(backend, redis_passwords, "metrics", "config get maxmemory-policy").split()[1]
    assert policy.startswith("allkeys-")


def test_kernel_settings_redis_asks_for(backend):
    assert backend.succeed("sysctl -n vm.overcommit_memory").strip() == "1"
    assert int(backend.succeed("sysctl -n net.core.somaxconn")) >= 511


def test_redis_metrics_are_exported(backend):
    backend.wait_for_unit("prometheus-redis-exporter.service")
    metrics = backend.wait_until_succeeds(
        "curl -sf http://127.0.0.1:9121/metrics | grep '^redis_up'")
    assert "redis_up 1" in metrics
