"""The alert rules and the Grafana dashboard in ops/: valid for Prometheus (`promtool check`),
each alert unit-tested firing and staying quiet (`promtool test rules`), and every metric they
use one this service exports.

Needs Debian's `prometheus` package for promtool (or `PROMTOOL=/path`); `./scripts/test`
installs it when it can.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import app.kernel.metrics  # noqa: F401  (registers the metrics)

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "ops" / "prometheus"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "smsgate.json"
RULES: dict[str, Any] = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
RULE_TESTS: dict[str, Any] = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
ALERTS = [rule for group in RULES["groups"] for rule in group["rules"]]
# Series Prometheus makes itself, not the service.
PROMETHEUS_OWN = {"up"}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    """Run promtool (Debian's `prometheus` package) in `cwd`."""
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.fail("no promtool: `apt-get install prometheus` (./scripts/test does it as root)")
    return subprocess.run(
        [found, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def exported_names() -> set[str]:
    """Every sample name this service's registry exposes, in Prometheus's spelling."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, [""])
    }


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (ours are all `smsgate_*`; plus `up`)."""
    names = set(re.findall(r"\bsmsgate_[a-z_]+", expr))
    return names | ({"up"} if re.search(r"\bup\{", expr) else set())


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_rules_and_the_compose_config_are_valid() -> None:
    rules = promtool("check", "rules", "alerts.yml")
    # --syntax-only: the API job's token file is written by the container's entrypoint at start
    # (docker-compose.yml), so it does not exist here; the rule files are checked just above.
    config = promtool("check", "config", "--syntax-only", "prometheus.yml")

    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in rules.stdout
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_fires_and_stays_quiet_in_its_unit_tests() -> None:
    result = promtool("test", "rules", "alerts.test.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    checks = [check for test in RULE_TESTS["tests"] for check in test.get("alert_rule_test", [])]
    fires = {check["alertname"] for check in checks if check["exp_alerts"]}
    quiet = {check["alertname"] for check in checks if not check["exp_alerts"]}
    names = {alert["alert"] for alert in ALERTS}
    assert fires == names and quiet == names


def test_the_conditions_operators_page_on_are_covered() -> None:
    exprs = {alert["alert"]: alert["expr"] for alert in ALERTS}

    for metric in (
        "smsgate_oldest_queued_message_age_seconds",
        "smsgate_oldest_sending_message_age_seconds",
        "smsgate_oldest_sent_message_age_seconds",
        "smsgate_messages_total",
        "smsgate_circuit_open",
        "smsgate_provider_paused_seconds",
        "smsgate_queue_depth",
        "smsgate_event_delivery_attempts_total",
    ):
        assert any(metric in expr for expr in exprs.values()), metric
    assert "by (provider, sender)" in exprs["SmsgateDeliveryRateLow"]
    assert "smsgate-worker" in exprs["SmsgateWorkersNotReady"]
    assert all(alert["labels"]["severity"] in ("page", "warning") for alert in ALERTS)


def test_rules_and_dashboard_read_only_metrics_the_service_exports() -> None:
    exported = exported_names()
    used = set().union(*(metric_names(a["expr"]) for a in ALERTS))
    used |= set().union(*(metric_names(expr) for expr in dashboard_exprs()))

    assert "smsgate_messages_total" in exported  # the registry is what /metrics serves
    assert sorted(used - exported - PROMETHEUS_OWN) == []


def test_the_dashboards_queries_are_valid_promql(tmp_path: Path) -> None:
    # Each query as a recording rule: promtool parses it as Prometheus would.
    exprs = [expr.replace("$__rate_interval", "5m") for expr in dashboard_exprs()]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))

    result = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)

    assert len(exprs) >= 15
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(
        (ROOT / "ops/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    provider = yaml.safe_load(
        (ROOT / "ops/grafana/provisioning/dashboards/smsgate.yml").read_text()
    )["providers"][0]

    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert dashboard["uid"] == "smsgate"
    assert {panel["datasource"]["uid"] for panel in panels} == {datasource["uid"]}
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert datasource["url"] == "http://prometheus:9090"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
