"""Failures are visible in status: the newest one in full, and counts by kind."""

from __future__ import annotations

import datetime

from salamander.api import Phase, TrainingJobStatus, parse_spec
from salamander_operator.desired import JobRef
from salamander_operator.observed import ObservedWorker, WorkerPhase
from salamander_operator.reconcile import reconcile
from tests.unit._support import timeless

JOB = JobRef(name="llm", namespace="ns", uid="u", generation=1)
SPEC = parse_spec({"replicas": {"min": 2, "max": 2}, "restartBudget": 1,
                   "worker": {"image": "i", "command": ["python", "train.py"]}})
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1, T2 = T0 + datetime.timedelta(seconds=3), T0 + datetime.timedelta(seconds=30)
READY = ObservedWorker(0, WorkerPhase.RUNNING, ready=True)


def test_a_failure_is_recorded_counted_and_then_marked_recovered() -> None:
    oom = ObservedWorker(1, WorkerPhase.FAILED, exit_code=137, reason="OOMKilled", node="gpu-7")
    plan = reconcile(JOB, SPEC, [READY, oom], TrainingJobStatus(phase=Phase.RUNNING), None, T1)
    record = plan.status.last_failure
    assert record is not None
    assert (record.kind, record.severity, record.source, record.worker, record.pod, record.node) == (
        "ContainerOOMKilled", "SEV2", "Pod", 1, "llm-worker-1", "gpu-7")
    assert record.action == "ReplacePod" and record.detected_at == T1 and record.recovered_at is None
    assert plan.status.failure_counts == {"ContainerOOMKilled": 1}

    replacement = ObservedWorker(1, WorkerPhase.RUNNING, ready=True)
    healed = reconcile(JOB, SPEC, [READY, replacement], plan.status, None, T2)
    assert healed.status.phase is Phase.RUNNING and healed.status.last_failure.recovered_at == T2
    again = reconcile(JOB, SPEC, [READY, replacement], healed.status, None, T2 + datetime.timedelta(seconds=5))
    assert timeless(again.status) == timeless(healed.status)  # recovered once; nothing flaps


def test_a_lost_agent_is_a_sev1_and_the_budget_end_is_recorded_as_such() -> None:
    lost = ObservedWorker(1, WorkerPhase.FAILED, reason="AgentLost", message="no heartbeat for 3.4 s")
    status = TrainingJobStatus(phase=Phase.RUNNING, restarts=1, failure_counts={"ContainerOOMKilled": 1})
    plan = reconcile(JOB, SPEC, [READY, lost], status, None, T1)
    assert plan.status.phase is Phase.FAILED
    record = plan.status.last_failure
    assert (record.kind, record.severity, record.source, record.action) == ("AgentLost", "SEV1", "AgentLost",
                                                                           "FailJob")
    assert plan.status.failure_counts == {"ContainerOOMKilled": 1, "AgentLost": 1}
