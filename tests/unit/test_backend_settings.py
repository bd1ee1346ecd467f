"""The backend section of the site: defaults, limits, and the mistakes it refuses."""

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from builder.backend_settings import BackendSettings
from builder.site import load_site


def test_defaults_make_a_bounded_evicting_cache():
    settings = BackendSettings()
    assert settings.port == 6379
    assert 0 < settings.memory_fraction <= 0.8
    assert settings.maxmemory_policy.startswith("allkeys-")
    assert settings.extra_clients == []


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru", "volatile-ttl"])
def test_policies_that_can_refuse_writes_are_rejected(policy):
    with pytest.raises(ValidationError):
        BackendSettings(maxmemory_policy=policy)


@pytest.mark.parametrize("fraction", [0, 0.05, 0.95, 1.5])
def test_a_memory_fraction_that_starves_redis_or_the_system_is_rejected(fraction):
    with pytest.raises(ValidationError):
        BackendSettings(memory_fraction=fraction)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError):
        BackendSettings(maxmemory="1gb")


def test_every_field_says_what_it_means():
    assert all(field.description for field in BackendSettings.model_fields.values())


@pytest.mark.parametrize("site_name", ["lab", "production"])
def test_the_named_password_secrets_exist_in_the_sites(site_name):
    site = load_site(site_name)
    assert site.backend.gateway_password_secret in site.secrets
    assert site.backend.metrics_password_secret in site.secrets


def test_the_operator_docs_list_every_key_with_its_default():
    docs = (Path(__file__).resolve().parents[2] / "docs/backend.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", docs, flags=re.MULTILINE))
    defaults = BackendSettings().model_dump(mode="json")
    assert set(rows) == set(defaults)
    for key, default in defaults.items():
        assert rows[key] == (str(default) if not isinstance(default, list) else "[]"), key
