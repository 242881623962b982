"""A real Prometheus server for tests, and every PromQL expression Salamander ships.

Usage (the ``prometheus`` fixture starts servers and stops them after the test)::

    from tests.observability.prom import prometheus  # noqa: F401  (the fixture)

    def test_metrics(prometheus):
        prom = prometheus(["127.0.0.1:9401"])          # scrapes every second, honor_labels
        prom.wait_targets_up()
        prom.wait_for('salamander_job_phase{phase="Running"} == 1', timeout=10)
        for where, expr in all_expressions("default", "my-job").items():
            assert prom.query(expr), where

or, outside pytest, ``with start_prometheus(targets, workdir) as prom: ...``.

Invariants: the server listens on 127.0.0.1 only, on a free port; its TSDB lives in the given
directory; it is stopped (SIGTERM, then SIGKILL) when the fixture or context ends, also when
starting it failed. Targets can be changed while it runs (:meth:`Prometheus.set_targets`,
through file-based discovery; Prometheus applies target changes at most every 5 seconds).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
GENERATOR = ROOT / "scripts" / "gen_dashboards.py"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
HAVE_PROMETHEUS = os.access(PROMETHEUS, os.X_OK)
HAVE_PROMTOOL = os.access(PROMTOOL, os.X_OK)

requires_prometheus = pytest.mark.skipif(not HAVE_PROMETHEUS, reason="prometheus is not installed "
                                         "(scripts/setup.sh installs Debian's prometheus package)")
requires_promtool = pytest.mark.skipif(not HAVE_PROMTOOL, reason="promtool is not installed "
                                       "(scripts/setup.sh installs Debian's prometheus package)")

Result = dict[str, Any]  # {"metric": {label: value}, "value": [timestamp, "value"]}


class PromQLError(RuntimeError):
    """The server refused a query (syntax, or a runtime error such as many-to-many matching)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A running ``prometheus`` process scraping ``targets`` every ``scrape_interval``."""

    def __init__(self, workdir: Path, targets: Sequence[str] = (), *, scrape_interval: str = "1s",
                 lookback_delta: str = "30s", rule_files: Sequence[Path] = (), ready_timeout: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._targets_file = self.workdir / "targets.json"
        self.set_targets(targets)
        config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": scrape_interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [{"job_name": "salamander", "honor_labels": True,
                                "file_sd_configs": [{"files": [str(self._targets_file)], "refresh_interval": "1s"}]}],
        }
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log = self.workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", f"--query.lookback-delta={lookback_delta}",
                 "--storage.tsdb.retention.time=1d", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ lifecycle

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 10 s); idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ targets

    def set_targets(self, targets: Sequence[str]) -> None:
        """Scrape exactly these ``host:port`` targets from now on (atomic file replace)."""
        tmp = self._targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": list(targets), "labels": {}}] if targets else []))
        os.replace(tmp, self._targets_file)

    def targets(self) -> list[dict[str, Any]]:
        """The active targets as the API reports them (``scrapeUrl``, ``health``, ``lastError``...)."""
        return list(self._get("/api/v1/targets", {"state": "active"})["activeTargets"])

    def targets_up(self) -> dict[str, bool]:
        """``host:port`` -> whether its last scrape succeeded."""
        return {t["labels"]["instance"]: t["health"] == "up" for t in self.targets()}

    def wait_targets_up(self, count: int | None = None, timeout: float = 15.0) -> dict[str, bool]:
        """Wait until ``count`` targets (default: at least one) are known and all of them are up."""
        def ok() -> dict[str, bool] | None:
            up = self.targets_up()
            enough = len(up) >= count if count is not None else bool(up)
            return up if enough and all(up.values()) else None
        return _poll(ok, timeout, lambda: f"targets not up: {self.targets()}")

    # ------------------------------------------------------------------ queries

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: the error is in the JSON body
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(f"{params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Result]:
        """Evaluate ``expr`` now (or ``at``); a scalar comes back as one result without labels."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float:
        """The value of an expression that returns exactly one series."""
        results = self.query(expr)
        if len(results) != 1:
            raise AssertionError(f"{expr}: expected one result, got {results}")
        return float(results[0]["value"][1])

    def wait_for(self, expr: str, timeout: float = 10.0,
                 predicate: Callable[[list[Result]], bool] = bool) -> list[Result]:
        """Poll ``expr`` until ``predicate(results)`` (default: any result); the results."""
        return _poll(lambda: r if predicate(r := self.query(expr)) else None, timeout,
                     lambda: f"{expr}: still {self.query(expr)} after {timeout}s")

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts of the loaded ``rule_files``."""
        return list(self._get("/api/v1/alerts", {})["alerts"])


def _poll(check: Callable[[], Any], timeout: float, message: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if (result := check()) is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(message())
        time.sleep(0.2)


@contextlib.contextmanager
def start_prometheus(targets: Sequence[str], workdir: Path, **kwargs: Any) -> Iterator[Prometheus]:
    with Prometheus(workdir, targets, **kwargs) as prom:
        yield prom


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """A factory ``prometheus(targets, **kwargs) -> Prometheus``; every server it started is
    stopped at teardown. Skips the test when the ``prometheus`` binary is missing."""
    if not HAVE_PROMETHEUS:
        pytest.skip("prometheus is not installed (scripts/setup.sh installs Debian's prometheus package)")
    started: list[Prometheus] = []

    def start(targets: Sequence[str] = (), **kwargs: Any) -> Prometheus:
        prom = Prometheus(tmp_path / f"prometheus-{len(started)}", targets, **kwargs)
        started.append(prom)
        return prom

    try:
        yield start
    finally:
        for prom in started:
            prom.stop()


# --------------------------------------------------------------------------- expressions

@functools.cache
def generator() -> ModuleType:
    """``scripts/gen_dashboards.py`` as a module (its dashboards, alerts and ``render()``)."""
    name = "salamander_gen_dashboards"
    spec = importlib.util.spec_from_file_location(name, GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON, for every ``dashboards/*.json``."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included, rows excluded."""
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def dashboard_expressions() -> dict[str, str]:
    """``"<file>: <panel title> [<refId>]"`` -> the raw expression (Grafana variables unsubstituted)."""
    out: dict[str, str] = {}
    for name, dash in dashboards().items():
        for p in panels(dash):
            for t in p.get("targets", []):
                out[f"{name}: {p['title']} [{t['refId']}]"] = t["expr"]
    return out


def rule_groups() -> list[dict[str, Any]]:
    """The groups of ``dashboards/rules.yaml`` (the PrometheusRule's ``spec.groups``)."""
    import yaml

    return list(yaml.safe_load((DASHBOARDS / "rules.yaml").read_text())["spec"]["groups"])


def alert_expressions() -> dict[str, str]:
    """``"rules.yaml: <alert>"`` -> the alert's full expression (returns data only while it fires)."""
    return {f"rules.yaml: {r['alert']}": r["expr"] for g in rule_groups() for r in g["rules"] if "alert" in r}


def alert_signals() -> dict[str, str]:
    """``"rules.yaml: <alert> (signal)"`` -> the alert's expression without its threshold and Running
    guard: one value per job (or rank) whenever the underlying series exist."""
    return {f"rules.yaml: {a.name} (signal)": a.signal for a in generator().ALERTS}


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana's ``$name``/``${name}`` with ``values[name]``; unknown names raise KeyError."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]
    return _VARIABLE.sub(one, expr)


def all_expressions(namespace: str, trainingjob: str, *, rate_interval: str = "30s", interval: str = "15s",
                    range_: str = "5m", signals: bool = True) -> dict[str, str]:
    """Every PromQL expression of every dashboard, ready to evaluate: where -> expression.

    ``$namespace`` and ``$trainingjob`` become the given values (``trainingjob`` is used in a
    regex matcher: a plain job name matches itself), ``$__rate_interval``, ``$__interval`` and
    ``$__range`` the given durations; choose ``range_`` to cover the part of the run that should
    have produced data (quantiles and totals "in range" look back that far). With ``signals``,
    each alert rule contributes its signal (see :func:`alert_signals`), not its full expression,
    which returns data only while the alert fires (:func:`alert_expressions` has those).
    """
    values = {"namespace": namespace, "trainingjob": trainingjob, "__rate_interval": rate_interval,
              "__interval": interval, "__range": range_}
    out = {where: substitute(e, values) for where, e in dashboard_expressions().items()}
    if signals:
        out.update(alert_signals())
    return out


# --------------------------------------------------------------------------- synthetic metrics

# Label values for the synthetic exporter (the catalog's help texts name these).
SYNTHETIC_VALUES: dict[str, tuple[str, ...]] = {
    "phase": ("Pending", "Running", "Restarting", "Succeeded", "Failed"),
    "source": ("ProcessExit", "Exception", "Hang", "AgentLost", "Pod", "Node"),
    "severity": ("SEV1", "SEV2", "SEV3"),
    "action": ("RetryInPlace", "RestartProcesses", "ReplacePod", "ReplaceNode", "FailJob"),
    "reason": ("ProcessCrash", "NodeLost"),
    "stage": ("blocking", "copy", "encode", "persist"),
    "operation": ("save", "load"),
    "tier": ("memory", "peers", "persistent", "none"),
}


class SyntheticJob:
    """A ``prometheus_client`` registry holding every catalog metric of one job, with a series for
    every label value (``SYNTHETIC_VALUES``, ``SECTIONS``, ``LOST_CAUSES``, ranks ``0..world_size-1``),
    plausible values (the job Running, timestamps now, rank 0 slightly slow) and one observation
    per histogram: what a scrape looks like once every kind of event has happened. Each
    :meth:`tick` is one more step: every counter grows, every histogram observes, the timestamps
    move to now."""

    def __init__(self, namespace: str, trainingjob: str, world_size: int = 4,
                 flops_per_step: float = 2e11) -> None:
        import itertools

        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from salamander.metrics import CATALOG, JOB, LOST_CAUSES, SECTIONS

        self.flops_per_step = flops_per_step
        values = {**SYNTHETIC_VALUES, "section": SECTIONS, "cause": LOST_CAUSES,
                  "rank": tuple(str(r) for r in range(world_size))}
        gauges: dict[str, Callable[[dict[str, str]], float]] = {
            "salamander_job_phase": lambda lv: float(lv.get("phase") == "Running"),
            "salamander_job_workers_desired": lambda lv: world_size,
            "salamander_job_workers_ready": lambda lv: world_size,
            "salamander_job_world_size": lambda lv: world_size,
            "salamander_job_goodput_ratio": lambda lv: 0.9,
            "salamander_worker_peak_flops": lambda lv: 1e12,
            "salamander_worker_rank_busy_seconds": lambda lv: 0.12 if lv["rank"] == "0" else 0.1,
            "salamander_worker_section_seconds": lambda lv: 0.02,
            "salamander_agent_workers": lambda lv: world_size}
        self.registry = CollectorRegistry()
        self._counters: list[tuple[str, Any]] = []
        self._timestamps: list[Any] = []
        self._histograms: list[tuple[Any, float]] = []
        for m in CATALOG:
            extra = [label for label in m.labels if label not in JOB]
            cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[m.kind]
            kwargs = {"buckets": m.buckets} if m.buckets else {}
            metric = cls(m.name, m.help, m.labels, registry=self.registry, **kwargs)
            for combo in itertools.product(*(values[label] for label in extra)):
                lv = dict(zip(extra, combo))
                job = {"namespace": namespace, "trainingjob": trainingjob} if "namespace" in m.labels else {}
                child = metric.labels(**job, **lv) if m.labels else metric  # operator-wide: no labels
                if m.kind == "counter":
                    self._counters.append((m.name, child))
                elif m.kind == "histogram":
                    self._histograms.append((child, m.buckets[1] if m.buckets else 0.5))
                elif m.name.endswith("_timestamp_seconds"):
                    self._timestamps.append(child)
                else:
                    child.set(gauges.get(m.name, lambda lv: 1.0)(lv))
        self.tick()

    def tick(self) -> None:
        for name, child in self._counters:
            child.inc(self.flops_per_step if name == "salamander_worker_model_flops" else 1)
        for child, value in self._histograms:
            child.observe(value)
        now = time.time()
        for child in self._timestamps:
            child.set(now)
