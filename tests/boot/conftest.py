"""Booted guests shared by the boot tests: each image boots once per test session, and stops
after the last test that uses it rather than at the end of the session: an idle emulated guest
still takes CPU that later tests (the lab, the builds) need."""

import secrets

import pytest

from builder.machine import Machine
from builder.redis_acl import render_exporter_credentials, render_redis_acl
from tests.host.stub_gateway import StubGateway

SHARED_GUESTS = ("frontend", "backend")
_running: dict[str, Machine] = {}
_last_user: dict[str, str] = {}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    for item in items:
        for name in SHARED_GUESTS:
            if name in item.fixturenames:
                _last_user[name] = item.nodeid


def pytest_runtest_teardown(item, nextitem):
    for name, nodeid in _last_user.items():
        if item.nodeid == nodeid and name in _running:
            _running.pop(name).stop()  # the fixture's own teardown finds it stopped


@pytest.fixture(scope="session")
def stub_gateway(lab_site):
    """The gateway's stand-in on the host's loopback; the guests reach it at the lab site's
    gateway address through a QEMU guest forward."""
    with StubGateway(health_path=lab_site.gateway.health_path, cacheable_max_age=2) as stub:
        yield stub


@pytest.fixture(scope="session")
def frontend_image(built_image):
    return built_image("frontend")


@pytest.fixture(scope="session")
def frontend(frontend_image, lab_site, stub_gateway):
    """frontend-a of the lab site, booted on the lab network with the stub gateway in it."""
    gateway = (str(lab_site.gateway.host), lab_site.gateway.port, stub_gateway.port)
    with Machine(frontend_image, name="frontend-a", user=lab_site.admin.user,
                 network=str(lab_site.network.prefix), guest_forwards=[gateway],
                 forward_ports=[80]) as machine:
        machine.seconds_to_ssh = machine.wait_for_ssh()
        _running["frontend"] = machine
        yield machine


@pytest.fixture(scope="session")
def redis_passwords():
    """Throwaway passwords, made for this test session only."""
    return {"gateway": secrets.token_hex(24), "metrics": secrets.token_hex(24)}


@pytest.fixture(scope="session")
def backend(built_image, lab_site, redis_passwords):
    """The lab site's backend, booted with its secrets on the boot partition as a flashed card
    would have them."""
    identity = {
        "redis-users.acl": render_redis_acl(redis_passwords["gateway"],
                                            redis_passwords["metrics"]).encode(),
        "redis-exporter.env": render_exporter_credentials(redis_passwords["metrics"]).encode(),
    }
    with Machine(built_image("backend"), name="backend", user=lab_site.admin.user,
                 network=str(lab_site.network.prefix), identity=identity) as machine:
        machine.seconds_to_ssh = machine.wait_for_ssh()
        _running["backend"] = machine
        yield machine
