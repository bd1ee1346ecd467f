"""The ACL file and exporter credentials that a card gets when it is flashed."""

import hashlib
import secrets

import pytest

from builder.errors import UserError
from builder.redis_acl import render_exporter_credentials, render_redis_acl

GATEWAY = secrets.token_urlsafe(24)
METRICS = secrets.token_hex(24)


def users(acl: str) -> dict[str, list[str]]:
    lines = [line.split() for line in acl.splitlines()]
    assert all(words[0] == "user" for words in lines)
    return {words[1]: words[2:] for words in lines}


def test_the_acl_holds_digests_never_passwords():
    acl = render_redis_acl(GATEWAY, METRICS)
    assert GATEWAY not in acl and METRICS not in acl
    assert "#" + hashlib.sha256(GATEWAY.encode()).hexdigest() in users(acl)["gateway"]
    assert "#" + hashlib.sha256(METRICS.encode()).hexdigest() in users(acl)["metrics"]


def test_the_default_user_is_off_with_no_password_at_all():
    rules = users(render_redis_acl(GATEWAY, METRICS))["default"]
    assert "off" in rules and "resetpass" in rules
    # `nopass` would let protected mode refuse the gateway and, once on, let anyone in.
    assert "nopass" not in rules and "on" not in rules


def test_the_gateway_reaches_only_the_cache_keys_and_no_server_command():
    rules = users(render_redis_acl(GATEWAY, METRICS))["gateway"]
    assert "on" in rules
    assert [rule for rule in rules if rule.startswith("~")] == ["~okome:*"]
    assert rules[-2:] == ["-@admin", "-@dangerous"]


def test_the_metrics_user_reads_no_key_and_writes_nothing():
    rules = users(render_redis_acl(GATEWAY, METRICS))["metrics"]
    assert not [rule for rule in rules if rule.startswith(("~", "%"))]
    granted = [rule for rule in rules if rule.startswith("+")]
    assert "+info" in granted
    assert not [rule for rule in granted if rule.startswith("+@")]


@pytest.mark.parametrize("bad", ["", "short", "has space inside it!", "quote'inside-a-password",
                                 "x" * 257, GATEWAY + "\n"])
def test_unusable_passwords_are_refused_in_one_line(bad):
    with pytest.raises(UserError) as raised:
        render_redis_acl(bad, METRICS)
    assert "\n" not in str(raised.value)
    assert "gateway password" in str(raised.value)


def test_a_trailing_newline_is_named_as_the_likely_cause():
    with pytest.raises(UserError, match="trailing newline"):
        render_redis_acl(GATEWAY, METRICS + "\n")


def test_the_two_users_need_different_passwords():
    with pytest.raises(UserError, match="same"):
        render_redis_acl(GATEWAY, GATEWAY)


def test_the_exporter_credentials_are_one_environment_line():
    assert render_exporter_credentials(METRICS) == f"REDIS_PASSWORD={METRICS}\n"
    with pytest.raises(UserError):
        render_exporter_credentials("x y")
