"""The Grafana dashboards: structure, and every metric and label they name exists in the catalog."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from salamander.metrics import CATALOG, DOC_HEADER, JOB, markdown_table, series_names
from tests.observability import promql
from tests.observability.prom import (
    GENERATOR, PROMTOOL, ROOT, alert_expressions, alert_signals, all_expressions,
    dashboard_expressions, dashboards, panels, requires_promtool,
)

EXPECTED = {
    "overview.json": ("salamander-overview", "Salamander / Job overview"),
    "failures.json": ("salamander-failures", "Salamander / Failures and recovery"),
    "ranks.json": ("salamander-ranks", "Salamander / Per-rank sections"),
    "snapshots.json": ("salamander-snapshots", "Salamander / Snapshots and checkpoints"),
}
DS = {"type": "prometheus", "uid": "${datasource}"}
JOB_MATCHERS = {promql.Matcher("namespace", "=", "$namespace"), promql.Matcher("trainingjob", "=~", "$trainingjob")}
SERIES = {s: m for m in CATALOG for s in m.series_names()}
UNITS = {"s", "percentunit", "bytes", "Bps", "ops", "reqps", "none", "short"}


def _variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def _variable_query(v: dict[str, Any]) -> str:
    q = v["query"]
    return q["query"] if isinstance(q, dict) else q


def test_generated_files_are_up_to_date() -> None:
    r = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_metrics_doc_is_up_to_date() -> None:
    generated = subprocess.run([sys.executable, "-m", "salamander.metrics"], capture_output=True, text=True,
                               check=True, cwd=ROOT).stdout
    assert generated == DOC_HEADER + markdown_table() + "\n"
    assert (ROOT / "docs" / "metrics.md").read_text() == generated, \
        "docs/metrics.md is out of date: python -m salamander.metrics > docs/metrics.md"


def test_dashboards_have_stable_uids_and_titles() -> None:
    found = {name: (d["uid"], d["title"]) for name, d in dashboards().items()}
    assert found == EXPECTED
    assert len({uid for uid, _ in found.values()}) == len(found)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dashboard_structure(name: str) -> None:
    dash = dashboards()[name]
    assert dash["schemaVersion"] == 39 and dash["id"] is None and "salamander" in dash["tags"]
    variables = _variables(dash)
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ns, tj = variables["namespace"], variables["trainingjob"]
    assert ns["type"] == tj["type"] == "query" and ns["datasource"] == tj["datasource"] == DS
    assert _variable_query(ns) == "label_values(salamander_job_phase, namespace)"
    assert _variable_query(tj) == 'label_values(salamander_job_phase{namespace="$namespace"}, trainingjob)'

    ids, cells = set(), set()
    for p in dash["panels"]:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cell & cells, f"{name}: panel {p['title']!r} overlaps another"
        cells |= cell
    for p in panels(dash):
        assert p["datasource"] == DS, p["title"]
        assert p["title"] and p["description"], p
        assert p["targets"], p["title"]
        assert p["fieldConfig"]["defaults"].get("unit", "s") in UNITS, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, (p["title"], t)
            assert t["expr"].strip() and t["refId"], (p["title"], t)
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_dashboard_and_rule_metric_is_exported() -> None:
    """The point of the catalog: a dashboard or rule naming a metric nobody exports fails here."""
    exported = series_names()
    named: dict[str, set[str]] = {}
    for where, expr in {**dashboard_expressions(), **alert_expressions()}.items():
        for name in promql.metric_names(expr):
            named.setdefault(name, set()).add(where)
    for name, dash in dashboards().items():
        for v in _variables(dash).values():
            if v["type"] == "query":
                m = re.match(r"label_values\((\w+)", _variable_query(v))
                assert m, v
                named.setdefault(m.group(1), set()).add(name)
    unknown = {n: sorted(w) for n, w in named.items() if n not in exported}
    assert not unknown, f"not in salamander.metrics.CATALOG: {unknown}"
    assert all(n.startswith("salamander_") for n in named)


@pytest.mark.parametrize("where,expr", sorted({**dashboard_expressions(), **alert_expressions(),
                                               **alert_signals()}.items()))
def test_expression_labels(where: str, expr: str) -> None:
    """Labels in matchers, ``by``/``on`` clauses and ``histogram_quantile`` exist on the series;
    rate() only over counters; one-to-one operations only between vectors with equal label sets."""
    assert promql.problems(expr) == [], where


@pytest.mark.parametrize("where,expr", sorted(dashboard_expressions().items()))
def test_dashboard_expressions_filter_on_the_selected_job(where: str, expr: str) -> None:
    for s in promql.selectors(expr):
        metric = SERIES[s.name or ""]
        if set(JOB) <= set(metric.labels):
            assert JOB_MATCHERS <= set(s.matchers), f"{where}: {s.name} is not filtered on the selected job"
        else:
            assert not {m.label for m in s.matchers} & set(JOB), where


def test_every_metric_is_on_a_dashboard() -> None:
    """Exporting a metric no dashboard shows is a dead metric (or a missing panel)."""
    shown = set().union(*(promql.metric_names(e) for e in dashboard_expressions().values()))
    missing = [m.exported for m in CATALOG if not set(m.series_names()) & shown]
    assert not missing, f"no dashboard panel reads {missing}"


@pytest.mark.parametrize("bad,problem", [
    ("salamander_worker_steps", "not an exported series"),
    ("rate(salamander_worker_loss[5m])", "not a counter"),
    ("deriv(salamander_worker_steps_total[5m])", "is a counter"),
    ("sum by (rank) (salamander_job_phase)", "no such label"),
    ('salamander_job_phase{pahse="Running"}', "has no label"),
    ('salamander_job_phase{phase="Runing"}', "not a value"),
    ("histogram_quantile(0.9, sum by (source) (rate(salamander_failure_detection_latency_seconds_bucket[5m])))",
     "without 'le'"),
    ("sum by (trainingjob) (salamander_job_world_size) / sum (salamander_job_workers_ready)", "sides differ"),
    ("salamander_worker_rank_busy_seconds / on (namespace, trainingjob) group_left () "
     "quantile by (namespace) (0.5, salamander_worker_rank_busy_seconds)", "not a label of the right side"),
])
def test_label_checker_catches_mistakes(bad: str, problem: str) -> None:
    """The checker above is not vacuous."""
    found = promql.problems(bad)
    assert any(problem in p for p in found), found


def test_all_expressions_substitutes_every_variable() -> None:
    exprs = all_expressions("ml", "gpt", rate_interval="20s", range_="10m")
    assert len(exprs) == len(dashboard_expressions()) + len(alert_signals())
    for where, e in exprs.items():
        assert "$" not in e, where
        promql.parse(e)
    assert any('trainingjob=~"gpt"' in e and "[20s]" in e for e in exprs.values())
    assert any("[10m]" in e for e in exprs.values())


@requires_promtool
def test_prometheus_parses_every_dashboard_expression(tmp_path: Any) -> None:
    """promtool (Prometheus's own parser) accepts every expression, as recording rules."""
    exprs = all_expressions("ml", "gpt")
    rules = [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs.values())]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
