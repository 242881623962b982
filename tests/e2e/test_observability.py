"""Issue 5 end to end: the local demo (``scripts/demo.sh``: examples/gpt.yaml with a training
process killed half-way) scraped by a real Prometheus server. Every PromQL expression of every
dashboard and alert rule must return data, and the figures must make sense."""

from __future__ import annotations

import io
import math
import os
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

from salamander.api import Phase, parse_manifest
from salamander.api.faults import parse_fault
from salamander_operator.local.runner import LocalRun
from salamander_operator.local.view import RunView
from tests.observability.prom import HAVE_PROMETHEUS, Prometheus, all_expressions
from tests.unit._support import EXAMPLE

pytestmark = pytest.mark.e2e

DEMO_FAULT = "kill-process:step=150,rank=1"  # what scripts/demo.sh injects
PLANNER_ONLY = re.compile(r"salamander_cluster_|salamander_job_workers_planned")


def demo_job(tmp_path: Path):
    job = parse_manifest(EXAMPLE.read_text())
    assert job.spec.checkpoint is not None and job.spec.snapshot is not None
    checkpoint = job.spec.checkpoint.model_copy(update={"directory": str(tmp_path / "checkpoints")})
    worker = job.spec.worker.model_copy(update={"working_dir": str(EXAMPLE.parents[1])})
    spec = job.spec.model_copy(update={"checkpoint": checkpoint, "worker": worker,
                                       "faults": [parse_fault(DEMO_FAULT)]})
    return job.model_copy(update={"spec": spec})


def test_the_demo_under_prometheus_yields_every_dashboard_and_alert_expression(tmp_path: Path) -> None:
    if not HAVE_PROMETHEUS:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed, and CI must run this test (scripts/setup.sh installs it)")
        pytest.skip("prometheus is not installed (scripts/setup.sh installs Debian's prometheus package)")
    job = demo_job(tmp_path)
    out = io.StringIO()
    view = RunView("gpt", console=Console(file=out, width=200), line_every_s=1.0)
    run = LocalRun(job, tmp_path / "logs", view=view, poll_s=0.2, metrics_port=0)
    with Prometheus(tmp_path / "prometheus", [run.metrics_endpoint]) as prom:
        prom.wait_targets_up(1, timeout=30)
        started = time.time()
        outcome = run.run(timeout_s=400)
        ended = time.time()
        assert outcome.status.phase is Phase.SUCCEEDED, out.getvalue()[-5000:]
        assert outcome.status.restarts == 1 and outcome.status.last_restore is not None
        time.sleep(2.5)  # the last scrapes of the finished job
        at = ended - 3.0  # the last seconds of training, while every process still exports
        window = f"{int(at - started) + 10}s"  # covers the whole run
        expressions = all_expressions("default", "gpt", rate_interval=window, interval="15s", range_=window)
        # the cluster planner's series exist only when the operator plans across jobs (--plan);
        # tests/operator/test_planning.py checks that the operator exports them then
        expressions = {w: e for w, e in expressions.items() if not PLANNER_ONLY.search(e)}
        empty = {}
        for where, expr in expressions.items():
            results = prom.query(expr, at=at)
            values = [float(r["value"][1]) for r in results]
            if not any(math.isfinite(v) for v in values):
                empty[where] = (expr, results)
        assert not empty, f"{len(empty)} of {len(expressions)} expressions returned no data: {empty}"

        def one(expr: str, when: float = at) -> float:
            results = prom.query(expr, at=when)
            assert len(results) == 1, (expr, results)
            return float(results[0]["value"][1])

        job_ = 'namespace="default", trainingjob="gpt"'
        # At the end: 300 steps, plus the few redone after the restore (at most one interval of 10)
        final = time.time()
        assert 300 <= one(f"salamander_worker_steps_total{{{job_}}}", final) <= 300 + 10 + 1
        assert one(f'salamander_job_phase{{{job_}, phase="Succeeded"}}', final) == 1
        assert one(f"salamander_worker_samples_total{{{job_}}}", final) >= 300 * 16 * 2
        assert one(f'salamander_job_phase{{{job_}, phase="Running"}}') == 1
        assert one(f"salamander_job_workers_ready{{{job_}}}") == 2
        assert one(f"sum(salamander_failures_detected_total{{{job_}}})") >= 1
        assert one(f'salamander_restores_total{{{job_}, tier="memory"}}') >= 1
        assert one(f"sum(salamander_job_restarts_total{{{job_}}})") == 1
        assert 0.0 < one(f"salamander_job_goodput_ratio{{{job_}}}") < 1.0
        assert one(f'salamander_job_lost_seconds{{{job_}, cause="recovery"}}') > 0
        assert one(f"salamander_worker_loss{{{job_}}}") < 2.0  # from ~3.5 at the start
        assert one(f"count(salamander_worker_rank_busy_seconds{{{job_}}})") == 2  # one per rank
        assert one(f"count(salamander_worker_section_seconds{{{job_}}})") == 2 * 6  # five sections and other
        assert one(f"salamander_checkpoint_bytes_total{{{job_}}}") > 0
        assert one(f"salamander_snapshots_total{{{job_}}}", final) >= 2 * 29  # every 10 steps, both ranks
        mfu = one(f"rate(salamander_worker_model_flops_total{{{job_}}}[20s]) / salamander_worker_peak_flops{{{job_}}}")
        assert 0.0 < mfu < 5.0, mfu  # the CPU peak is a probe's measure, not a datasheet's
        assert one(f"salamander_controlplane_connections{{{job_}}}") == 2
