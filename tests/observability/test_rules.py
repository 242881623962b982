"""The alert rules: PrometheusRule structure, ``promtool check rules``, and ``promtool test rules``
proving that each alert fires on a synthetic failing job and not on healthy ones."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability import promql
from tests.observability.prom import DASHBOARDS, PROMTOOL, generator, requires_promtool, rule_groups

RULES = DASHBOARDS / "rules.yaml"
PROMTOOL_RULES = DASHBOARDS / "rules.promtool.yaml"
UNIT_TESTS = Path(__file__).with_name("rules_test.yaml")
ALERTS = ("SalamanderJobHung", "SalamanderRestartStorm", "SalamanderGoodputLow", "SalamanderSnapshotTooOld",
          "SalamanderStragglerDetected")


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_prometheus_rule_resource() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] == "salamander"
    assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "salamander"
    # one source: the plain rule file holds exactly the resource's groups
    assert yaml.safe_load(PROMTOOL_RULES.read_text()) == {"groups": doc["spec"]["groups"]}
    # the stdlib YAML writer round-trips the generator's data
    assert doc == generator().prometheus_rule()


def test_alerts_are_labelled_and_annotated() -> None:
    alerts = _alerts()
    assert set(alerts) == set(ALERTS)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        for key in ("summary", "description"):
            text = rule["annotations"][key]
            assert "$labels.namespace" in text and "$labels.trainingjob" in text, (name, key)
            if "rank" in (promql.result_labels(rule["expr"]) or ()):
                assert "$labels.rank" in text, (name, key)


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]}
    assert fired == set(ALERTS) and quiet == set(ALERTS)


@requires_promtool
def test_promtool_check_rules() -> None:
    r = _promtool("check", "rules", str(PROMTOOL_RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout


@requires_promtool
def test_promtool_unit_tests() -> None:
    r = _promtool("test", "rules", str(UNIT_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


@requires_promtool
@pytest.mark.parametrize("alert,old,new", [
    ("SalamanderJobHung", "> 600", "> 6000"),
    ("SalamanderJobHung", "and on", "or on"),  # no Running guard: the Succeeded job alerts
    ("SalamanderRestartStorm", "> 5", "> 50"),
    ("SalamanderGoodputLow", "< 0.8", "< 0.99"),  # the healthy job alerts
    ("SalamanderSnapshotTooOld", "> 0)", ">= 0)"),  # the job without snapshots alerts
    ("SalamanderStragglerDetected", "> 1.2", "> 1.05"),  # the job within 1.1x alerts
])
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, old: str, new: str) -> None:
    """The unit tests are not vacuous: each of these changes to a rule makes them fail."""
    doc = yaml.safe_load(PROMTOOL_RULES.read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert)
    assert old in rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = ["rules.yaml"]
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(tests))
    r = _promtool("test", "rules", str(tmp_path / "rules_test.yaml"))
    assert r.returncode != 0 and alert in r.stdout + r.stderr, r.stdout + r.stderr
