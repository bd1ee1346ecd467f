"""Fixtures of the host-level tests. Each concern keeps its fixtures in its own module and is
imported here; pytest finds fixtures only in conftest files and plugins."""

from tests.host.nginx_fixtures import frontend, start_frontend, stub_gateway  # noqa: F401
