"""Booted guests shared by the boot tests: each image boots once per test session."""

import pytest

from builder.machine import Machine
from tests.host.stub_gateway import StubGateway


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
        yield machine
