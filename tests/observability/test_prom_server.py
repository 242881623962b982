"""Self-test of the real-Prometheus helper, and every dashboard expression evaluated by a real
server against a synthetic job that exports every catalog metric.

One server for the module: Prometheus applies target changes at most every 5 seconds, so each
start (and each target change) costs up to 5 s.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.observability.prom import (
    HAVE_PROMETHEUS, Prometheus, PromQLError, SyntheticJob, alert_expressions, all_expressions, free_port,
)

pytestmark = pytest.mark.skipif(not HAVE_PROMETHEUS, reason="prometheus is not installed "
                                "(scripts/setup.sh installs Debian's prometheus package)")


def _serve(stack: ExitStack, registry: CollectorRegistry) -> str:
    """Serve ``registry`` on 127.0.0.1 until ``stack`` closes; the target ``host:port``."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    stack.callback(thread.join, 5)
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    return f"127.0.0.1:{port}"


class Setup:
    def __init__(self, stack: ExitStack, workdir: Any) -> None:
        # a salamander_job_phase-like gauge, as the operator exports it
        self.registry = CollectorRegistry()
        self.phase = Gauge("salamander_job_phase", "test", ("namespace", "trainingjob", "phase"),
                           registry=self.registry)
        self.phase.labels("ml", "gpt", "Running").set(1)
        self.phase.labels("ml", "gpt", "Pending").set(0)
        self.target = _serve(stack, self.registry)
        # a job exporting every catalog metric, one step every 0.25 s
        self.synthetic = SyntheticJob("ml", "synthetic")
        self.synthetic_target = _serve(stack, self.synthetic.registry)
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(0.25):
                self.synthetic.tick()

        ticker = threading.Thread(target=run, daemon=True)
        ticker.start()
        stack.callback(ticker.join, 5)
        stack.callback(stop.set)
        self.prom = stack.enter_context(Prometheus(workdir, [self.target, self.synthetic_target]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with ExitStack() as stack:
        yield Setup(stack, tmp_path_factory.mktemp("prometheus"))


def test_scrapes_and_queries(setup: Setup) -> None:
    prom = setup.prom
    assert prom.wait_targets_up(count=2) == {setup.target: True, setup.synthetic_target: True}

    results = prom.wait_for('salamander_job_phase{namespace="ml", trainingjob=~"gpt"} == 1')
    assert len(results) == 1
    labels = results[0]["metric"]
    # honor_labels: the exporter's labels win; the scrape adds job and instance
    assert (labels["phase"], labels["namespace"], labels["trainingjob"]) == ("Running", "ml", "gpt")
    assert labels["job"] == "salamander" and labels["instance"] == setup.target
    assert prom.value('sum(salamander_job_phase{trainingjob="gpt"})') == 1.0
    assert prom.query("time()")[0]["metric"] == {}  # scalars come back as one unlabelled result
    with pytest.raises(PromQLError, match="parse error"):
        prom.query("sum by (")

    setup.phase.labels("ml", "gpt", "Running").set(0)
    setup.phase.labels("ml", "gpt", "Succeeded").set(1)
    prom.wait_for('salamander_job_phase{trainingjob="gpt", phase="Succeeded"} == 1', timeout=5)


def test_every_expression_returns_a_number(setup: Setup) -> None:
    """With every catalog series present and moving, every dashboard expression and alert signal
    returns at least one finite value (no label join that matches nothing, no 0/0)."""
    prom = setup.prom
    prom.wait_targets_up(count=2)
    prom.wait_for('count_over_time(salamander_worker_steps_total{trainingjob="synthetic"}[1m]) >= 5',
                  timeout=15)
    empty, not_finite = [], []
    for where, expr in all_expressions("ml", "synthetic", rate_interval="4s", interval="2s",
                                       range_="1m").items():
        results = prom.query(expr)
        if not results:
            empty.append(where)
        elif not all(math.isfinite(float(r["value"][1])) for r in results):
            not_finite.append((where, results))
    assert not empty and not not_finite, f"no data: {empty}\nnot finite: {not_finite}"
    for where, expr in alert_expressions().items():
        prom.query(expr)  # evaluates (a healthy job: no data expected)
    assert prom.value('max(salamander_job_phase{trainingjob="synthetic", phase="Running"})') == 1


def test_target_added_while_running(setup: Setup) -> None:
    prom = setup.prom
    with ExitStack() as stack:
        registry = CollectorRegistry()
        Gauge("salamander_job_phase", "test", ("namespace", "trainingjob", "phase"),
              registry=registry).labels("ml", "late", "Running").set(1)
        late = _serve(stack, registry)
        prom.set_targets([setup.target, setup.synthetic_target, late])
        assert prom.wait_targets_up(count=3, timeout=12)[late]
        prom.wait_for('salamander_job_phase{trainingjob="late"} == 1', timeout=5)
        prom.set_targets([setup.target, setup.synthetic_target])
