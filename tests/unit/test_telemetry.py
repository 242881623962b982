"""Metrics: the catalog's conventions, the operator's pass-to-metrics mapping, and the workers'
multiprocess endpoint (real processes writing, one collector reading)."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from salamander import metrics as catalog
from salamander.api import FailureAction, FailureRecord, Phase, TrainingJobStatus
from salamander.api.models import GoodputRecord
from salamander_operator.desired import JobRef
from salamander_operator.failures import Classification, Severity, Source
from salamander_operator.incidents import Incident
from salamander_operator.policy import Decision
from salamander_operator.reconcile import Plan
from salamander_operator.telemetry import OperatorTelemetry

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
JOB = JobRef(name="llm", namespace="team-a", uid="u1")


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    want = {"namespace": "team-a", "trainingjob": "llm", **labels}
    return samples(registry).get((name, frozenset(want.items())))


# --- the catalog


@pytest.mark.parametrize("metric", catalog.CATALOG, ids=lambda m: m.name)
def test_names_follow_prometheus_conventions(metric: catalog.Metric) -> None:
    assert metric.name.startswith("salamander_") and metric.name == metric.name.lower()
    assert not metric.name.endswith("_total"), "counters are declared without _total; the client adds it"
    if metric.kind == "histogram":
        assert metric.name.endswith("_seconds") and metric.buckets
    if "duration" in metric.name or "latency" in metric.name:
        assert metric.name.endswith("_seconds")
    operator_wide = metric.name == "salamander_controlplane_rejected_requests" \
        or metric.name.startswith("salamander_cluster_")
    if not operator_wide:  # everything else is about one job
        assert metric.labels[:2] == ("namespace", "trainingjob")
    assert "job" not in metric.labels, "Prometheus owns the job label"
    if "rank" in metric.labels:
        assert metric.component == "worker"
    assert metric.help.strip().endswith(".")


def test_names_are_unique_and_the_doc_table_lists_every_one() -> None:
    names = [m.name for m in catalog.CATALOG]
    assert len(names) == len(set(names))
    table = catalog.markdown_table()
    assert all(f"`{m.exported}`" in table for m in catalog.CATALOG)


# --- the operator


def incident(source: Source, severity: Severity, action: FailureAction, charged: bool = True) -> Incident:
    return Incident(Classification(source, "ProcessCrash", severity, "exit 1"), Decision(action, charged),
                    detected_at=T0 + datetime.timedelta(seconds=2), worker=1, pod="llm-worker-1",
                    occurred_at=T0 + datetime.timedelta(seconds=0.5))


def test_a_pass_sets_the_job_gauges_and_counts_its_incidents_once() -> None:
    telemetry = OperatorTelemetry()
    ledger = GoodputRecord(ratio=0.8, productive_seconds=80, wall_seconds=100, since=T0, updated_at=T0,
                           lost_seconds={"startup": 15.0, "recovery": 5.0})
    status = TrainingJobStatus(phase=Phase.RUNNING, desired_workers=4, ready_workers=3, world_size=24,
                               goodput=ledger)
    plan = Plan(status=status, incidents=(incident(Source.PROCESS_EXIT, Severity.SEV2, FailureAction.RESTART_PROCESSES),))
    telemetry.observe_pass(JOB, TrainingJobStatus(world_size=32), plan, 0.004)
    telemetry.observe_pass(JOB, status, Plan(status=status), 0.002)  # the next pass: nothing new
    r = telemetry.registry
    assert value(r, "salamander_job_phase", phase="Running") == 1
    assert value(r, "salamander_job_phase", phase="Pending") == 0
    assert (value(r, "salamander_job_workers_desired"), value(r, "salamander_job_workers_ready")) == (4, 3)
    assert value(r, "salamander_failures_detected_total", source="ProcessExit", severity="SEV2") == 1
    assert value(r, "salamander_recovery_actions_total", action="RestartProcesses") == 1
    assert value(r, "salamander_job_restarts_total", reason="ProcessCrash") == 1
    assert value(r, "salamander_failure_detection_latency_seconds_sum", source="ProcessExit") == pytest.approx(1.5)
    assert value(r, "salamander_job_reconfigurations_total", reason="shrink") == 1
    assert value(r, "salamander_job_goodput_ratio") == 0.8
    assert value(r, "salamander_job_lost_seconds", cause="recovery") == 5.0
    assert value(r, "salamander_job_lost_seconds", cause="straggling") == 0.0
    assert value(r, "salamander_reconcile_duration_seconds_count") == 2


def test_a_recovery_is_timed_once_and_a_deleted_job_leaves_no_series() -> None:
    telemetry = OperatorTelemetry()
    failure = FailureRecord(kind="ProcessCrash", severity="SEV2", source="ProcessExit", worker=1, pod="p",
                            action="RestartProcesses", detected_at=T0)
    healed = failure.model_copy(update={"recovered_at": T0 + datetime.timedelta(seconds=7)})
    before = TrainingJobStatus(phase=Phase.RUNNING, last_failure=failure)
    after = TrainingJobStatus(phase=Phase.RUNNING, last_failure=healed)
    telemetry.observe_pass(JOB, before, Plan(status=after), 0.001)
    telemetry.observe_pass(JOB, after, Plan(status=after), 0.001)
    r = telemetry.registry
    assert value(r, "salamander_recovery_duration_seconds_count", action="RestartProcesses") == 1
    assert value(r, "salamander_recovery_duration_seconds_sum", action="RestartProcesses") == 7
    telemetry.forget("team-a", "llm")
    assert not [k for k in samples(r) if ("trainingjob", "llm") in k[1]]


def test_the_control_plane_is_read_at_scrape_time() -> None:
    from collections import Counter
    from types import SimpleNamespace

    from salamander.controlplane import AgentIdentity

    identity = AgentIdentity(namespace="team-a", job="llm", pod="llm-worker-0", node="n", first_rank=0, rank_count=8)
    session = SimpleNamespace(identity=identity, connected=True)
    server = SimpleNamespace(sessions={("team-a", "llm", "llm-worker-0"): session},
                             stats=SimpleNamespace(rejected=Counter({"unauthenticated": 3})))
    telemetry = OperatorTelemetry()
    telemetry.watch_control_plane(lambda: server)  # type: ignore[arg-type, return-value]
    r = telemetry.registry
    assert value(r, "salamander_controlplane_connections") == 1
    assert samples(r)[("salamander_controlplane_rejected_requests_total",
                       frozenset({("reason", "unauthenticated")}))] == 3


# --- the workers: several processes, one endpoint

WRITER = textwrap.dedent("""
    import sys
    from salamander_worker.sections import Recorder
    from salamander_worker.telemetry import WorkerTelemetry, AgentTelemetry
    rank = int(sys.argv[1])
    t = WorkerTelemetry(rank, 2, None, {"namespace": "team-a", "trainingjob": "llm"})
    rec = Recorder()
    for step in range(1, 11):
        with rec.section("forward"):
            pass
        rec.end_step(step)
        t.on_step(step, 0.01, 2.5, step * 32, step * 2048, None, rec.window_means)
    t.flush()
    t.restored("memory")
    t.snapshot_committed(1000)
    t.snapshot_stage("blocking", 0.01)
    t.checkpoint("save", 1.5, 4096)
    AgentTelemetry({"namespace": "team-a", "trainingjob": "llm"}).workers(1)
""")


def test_every_process_of_a_pod_is_served_through_one_collector(tmp_path: Path) -> None:
    from salamander_worker.telemetry import PodCollector

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for rank in (0, 1):
        subprocess.run([sys.executable, "-c", WRITER, str(rank)], env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    registry.register(PodCollector(tmp_path))
    assert value(registry, "salamander_worker_steps_total") == 10  # rank 0 only, its first step included
    assert value(registry, "salamander_worker_samples_total") == 320
    assert value(registry, "salamander_worker_tokens_total") == 20480
    assert value(registry, "salamander_worker_loss") == 2.5
    assert value(registry, "salamander_worker_rank_busy_seconds", rank="1") is not None
    assert value(registry, "salamander_worker_section_seconds", rank="0", section="forward") is not None
    assert value(registry, "salamander_restores_total", tier="memory") == 2  # one per rank
    assert value(registry, "salamander_snapshot_bytes_total") == 2000
    assert value(registry, "salamander_checkpoint_bytes_total") == 8192
    # the writers have exited: their live-mode gauges are swept, the rest stays
    assert value(registry, "salamander_agent_workers") is None
    assert not list(tmp_path.glob("gauge_livesum_*.db"))
