"""deploy/compose.tls.yml names real settings: each ABLITERATE_<SERVICE>_<FIELD> is a field of that service."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from tests.deploy.test_compose import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
HEALTHCHECK_VARS = {"ABLITERATE_HEALTH_TLS_CA", "ABLITERATE_HEALTH_TLS_CERT", "ABLITERATE_HEALTH_TLS_KEY"}


def test_tls_override_sets_only_known_settings_and_covers_every_service():
    override = yaml.safe_load((ROOT / "deploy" / "compose.tls.yml").read_text())["services"]
    by_service = {service: (module, cls) for service, module, cls in CONFIGS.values()}
    assert set(override) == set(by_service)
    for service, spec in override.items():
        module, cls = by_service[service]
        fields = set(getattr(importlib.import_module(module), cls).model_fields)
        prefix = f"ABLITERATE_{service.upper()}_"
        env = spec["environment"]
        assert f"{prefix}TLS_CERT_FILE" in env and f"{prefix}TLS_KEY_FILE" in env
        for name in env:
            if name in HEALTHCHECK_VARS:
                continue
            assert name.startswith(prefix), name
            assert name[len(prefix) :].lower() in fields, name
        assert any(v.endswith(":/certs:ro") for v in spec["volumes"])
