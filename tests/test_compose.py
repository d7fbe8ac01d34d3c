"""deployments/compose.yaml cannot run here (no container engine), so check what can be: every rsir
service in it runs `rsir serve --only SERVICE` with options `rsir serve` accepts, the same
services, drivers and flags that tests/test_services.py starts natively against PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.config import parse_config
from deployments.serve import ServeConfig

COMPOSE = Path(__file__).resolve().parent.parent / "deployments" / "compose.yaml"


def _options(command: list[str]) -> dict:
    """`rsir serve --only X --key value ...` -> ServeConfig's fields."""
    assert command[:3] == ["rsir", "serve", "--only"], command
    pairs = dict(zip(command[2::2], command[3::2]))
    assert len(command[2:]) == 2 * len(pairs), f"every option takes a value here: {command}"
    fields = {key.removeprefix("--").replace("-", "_"): value for key, value in pairs.items()}
    fields["services"] = [fields.pop("only")]
    return fields


def test_every_rsir_service_is_a_valid_rsir_serve_command(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the worker must name its server itself
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    rsir = {name: _options(s["command"]) for name, s in services.items() if s.get("command", [""])[0] == "rsir"}
    assert {cfg["services"][0] for cfg in rsir.values()} == {"prefect", "mlflow", "worker"}
    configs = {cfg["services"][0]: parse_config(ServeConfig, cfg) for cfg in rsir.values()}
    assert configs["prefect"].database.startswith("postgresql+asyncpg://")
    assert configs["mlflow"].tracking_uri.startswith("postgresql://")
    assert configs["worker"].prefect_api == "http://prefect:4200/api" and configs["worker"].workers == 2
    assert configs["worker"].tracking_of_workers() == "http://mlflow:5000"
    for name in rsir:
        assert services[name]["environment"]["RSIR_HOME"].startswith("s3://")
        assert services[name]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
