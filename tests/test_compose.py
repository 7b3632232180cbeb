"""docker-compose.yml and the Dockerfile hold together (no Docker engine is needed to check)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from app.cli.main import main
from app.kernel.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = ("migrate", "api", "worker", "events-worker")


def test_the_services_are_postgres_redis_a_migration_the_api_and_workers() -> None:
    assert set(SERVICES) == {
        "postgres",
        "redis",
        "migrate",
        "api",
        "worker",
        "events-worker",
        "prometheus",
        "grafana",
    }
    # Monitoring only when asked for: `docker compose --profile monitoring up`.
    assert [name for name, service in SERVICES.items() if "profiles" in service] == [
        "prometheus",
        "grafana",
    ]
    for name in ("postgres", "redis"):
        assert SERVICES[name]["image"].split(":")[0] == name
        assert SERVICES[name]["healthcheck"]["test"][0] == "CMD"
        assert SERVICES[name]["volumes"]  # the data outlives the container
    assert "--appendonly" in SERVICES["redis"]["command"]
    # The pools of an API process and a few workers fit (README, "Configuration": DB_POOL_SIZE).
    assert "max_connections=300" in SERVICES["postgres"]["command"]


@pytest.mark.parametrize("name", OURS)
def test_ours_run_the_one_image_pointed_at_postgres_and_redis(name: str) -> None:
    service = SERVICES[name]

    assert service["build"] == "."
    assert service["image"] == SERVICES["api"]["image"]  # built once, run four ways
    database = make_url(service["environment"]["DATABASE_URL"])
    assert (database.drivername, database.host, database.database) == (
        "postgresql+asyncpg",
        "postgres",
        "smsgate",
    )
    assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_commands_and_the_order_they_start_in(capsys: pytest.CaptureFixture[str]) -> None:
    assert SERVICES["migrate"]["command"] == ["migrate", "--create-database"]
    assert SERVICES["migrate"]["restart"] == "no"  # one-shot
    assert SERVICES["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert SERVICES["api"]["command"][:3] == ["serve", "--host", "0.0.0.0"]
    assert SERVICES["worker"]["command"] == ["worker"]
    assert SERVICES["events-worker"]["command"] == ["worker", "--queue", "events"]
    for name in ("api", "worker", "events-worker"):
        assert SERVICES[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
        }
    assert SERVICES["worker"]["healthcheck"]["test"] == ["CMD", "smsgate", "worker", "--check"]
    assert SERVICES["events-worker"]["healthcheck"]["test"] == [
        "CMD",
        "smsgate",
        "worker",
        "--queue",
        "events",
        "--check",
    ]
    assert "/readyz" in " ".join(SERVICES["api"]["healthcheck"]["test"])

    # Each command is one the image's entry point (`smsgate`) knows.
    with pytest.raises(SystemExit):
        main(["--help"])
    known = set(re.findall(r"^    (\S+)", capsys.readouterr().out, re.MULTILINE))
    assert {SERVICES[name]["command"][0] for name in OURS} <= known


def test_workers_can_be_scaled() -> None:
    worker = SERVICES["worker"]

    # A fixed container name or a published port would stop `--scale worker=3`.
    assert "container_name" not in worker and "ports" not in worker


def test_the_image_runs_smsgate_as_a_user_other_than_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()

    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["smsgate"\]', dockerfile, re.MULTILINE)
    assert "COPY alembic.ini" in dockerfile  # `migrate` finds it in the working directory


def test_prometheus_and_grafana_start_with_the_rules_and_dashboard_provisioned() -> None:
    prometheus, grafana = SERVICES["prometheus"], SERVICES["grafana"]

    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    assert "./ops/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]  # beside the config, in the same mount
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["smsgate-api"]["static_configs"][0]["targets"] == ["api:8000"]
    # The API's metrics need METRICS_TOKEN, which the entrypoint writes where the job reads it.
    token_file = jobs["smsgate-api"]["authorization"]["credentials_file"]
    assert token_file in " ".join(prometheus["entrypoint"])
    assert "METRICS_TOKEN" in prometheus["environment"]
    # Every replica of a scaled worker, on the ports the workers serve metrics on.
    settings = Settings()
    assert jobs["smsgate-worker"]["dns_sd_configs"][0] == {
        "names": ["worker"],
        "type": "A",
        "port": settings.worker_metrics_port,
    }
    assert jobs["smsgate-events-worker"]["dns_sd_configs"][0]["names"] == ["events-worker"]
    assert (
        jobs["smsgate-events-worker"]["dns_sd_configs"][0]["port"]
        == settings.events_worker_metrics_port
    )
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./ops/grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "ops/grafana/dashboards" / Path(home).name).is_file()
