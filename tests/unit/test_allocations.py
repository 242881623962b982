"""Cluster planning in the operator: the reconcile of an allocation (grow, shrink, suspend,
resume), the throughput meter, node capacity, and the cross-job bookkeeping."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander.api import AllocationRecord, Phase, Reason, TrainingJobStatus
from salamander.wire import Progress
from salamander_operator.allocations import (ClusterAllocations, ThroughputMeter, parse_selector, schedulable,
                                             transition_seconds)
from salamander_operator.nodes import LABEL_QUARANTINED_UNTIL
from salamander_operator.observed import ObservedWorker, WorkerPhase
from salamander_operator.planner import JobDemand
from salamander_operator.reconcile import reconcile
from tests.unit._support import QUICK
from tests.unit.test_reconcile import FRESH, JOB, T0, T1, pending, ready, spec


def alloc(workers: int, reason: str = "test") -> AllocationRecord:
    return AllocationRecord(workers=workers, capacity=8, reason=reason, planned_at=T0)


# --- reconcile with an allocation

def test_without_an_allocation_the_job_wants_max() -> None:
    plan = reconcile(JOB, spec(1, 4), [], FRESH, None, T0)
    assert plan.create == (0, 1, 2, 3) and plan.status.allocation is None


def test_an_allocation_below_max_creates_that_many() -> None:
    plan = reconcile(JOB, spec(1, 4), [], FRESH, None, T0, allocation=alloc(2))
    assert plan.create == (0, 1) and plan.delete == ()
    assert plan.status.desired_workers == 2 and plan.status.allocation == alloc(2)
    assert plan.events == ()  # the first allocation is not news


def test_a_smaller_allocation_removes_waiting_workers_first_then_the_highest() -> None:
    status = reconcile(JOB, spec(1, 4), [ready(0), ready(1), ready(2), ready(3)], FRESH, None, T0,
                       allocation=alloc(4)).status
    observed = [ready(0), pending(1), ready(2), ready(3)]
    plan = reconcile(JOB, spec(1, 4), observed, status, None, T1, allocation=alloc(2, "node n9 failed"))
    assert plan.delete == (1, 3) and plan.create == ()
    assert plan.status.ready_workers == 2 and plan.status.phase is Phase.RUNNING and plan.status.restarts == 0
    [event] = [e for e in plan.events if e.reason == Reason.RESCALED]
    assert "from 4 to 2 workers: node n9 failed" in event.message


def test_a_larger_allocation_fills_the_lowest_free_indices() -> None:
    status = reconcile(JOB, spec(1, 4), [ready(0), ready(2)], FRESH, None, T0, allocation=alloc(2)).status
    plan = reconcile(JOB, spec(1, 4), [ready(0), ready(2)], status, None, T1, allocation=alloc(4))
    assert plan.create == (1, 3) and plan.delete == ()
    assert [e.reason for e in plan.events] == [Reason.RESCALED]


def test_without_planning_a_stale_allocation_is_cleared() -> None:
    status = reconcile(JOB, spec(1, 4), [], FRESH, None, T0, allocation=alloc(2)).status
    plan = reconcile(JOB, spec(1, 4), [], status, None, T1)
    assert plan.status.allocation is None and plan.create == (0, 1, 2, 3) and plan.events == ()


def test_an_allocation_above_max_is_clamped() -> None:
    plan = reconcile(JOB, spec(1, 2), [], FRESH, None, T0, allocation=alloc(5))
    assert plan.create == (0, 1) and plan.status.desired_workers == 2


def test_a_zero_allocation_suspends_and_a_later_one_resumes() -> None:
    running = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], FRESH, None, T0, allocation=alloc(2)).status
    plan = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running, None, T1, allocation=alloc(0, "capacity"))
    assert plan.delete == (0, 1) and plan.create == ()
    suspended = plan.status
    assert suspended.phase is Phase.SUSPENDED and not suspended.phase.terminal
    assert suspended.desired_workers == 0 and suspended.ready_workers == 0 and suspended.restarts == 0
    assert suspended.condition("Ready").reason == Reason.SUSPENDED
    assert [e.reason for e in plan.events] == [Reason.SUSPENDED]
    # the pods are gone; the job stays suspended
    again = reconcile(JOB, spec(2, 2), [], suspended, None, T1, allocation=alloc(0, "capacity"))
    assert again.create == () and again.status.phase is Phase.SUSPENDED and again.events == ()
    resumed = reconcile(JOB, spec(2, 2), [], suspended, None, T1, allocation=alloc(2, "node back"))
    assert resumed.create == (0, 1) and resumed.status.phase is Phase.PENDING
    assert [e.reason for e in resumed.events] == [Reason.RESUMED]


@QUICK
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(list(WorkerPhase)), st.booleans()),
                max_size=8, unique_by=lambda t: t[0]),
       st.integers(0, 6), st.integers(1, 6))
def test_membership_invariants(workers, wanted, maximum) -> None:
    """Never more than ``wanted`` kept; the kept plus created reach ``min(wanted, maximum)`` when
    indices are free; nothing both created and deleted; nothing created at or above max."""
    observed = [ObservedWorker(index=i, phase=p, ready=r and p is WorkerPhase.RUNNING) for i, p, r in workers]
    job_spec = spec(1, maximum)
    plan = reconcile(JOB, job_spec, observed, FRESH, None, T0, allocation=alloc(wanted))
    if any(w.phase is WorkerPhase.SUCCEEDED for w in observed) or plan.status.phase.terminal:
        return  # completing or failed: not the membership rule
    assert not set(plan.create) & set(plan.delete)
    assert all(i < maximum for i in plan.create)
    staying = [w for w in observed if w.index < maximum and w.index not in plan.delete]
    assert len(staying) + len(plan.create) <= min(wanted, maximum) + sum(
        1 for w in staying if w.phase is WorkerPhase.FAILED)


# --- the throughput meter

def _progress(t: float, samples: int, world: int = 4, restart: int = 0) -> Progress:
    return Progress(step=samples // 10, samples=samples, world_size=world, time=t, restart_count=restart)


def test_the_meter_measures_rates_by_worker_count_and_skips_restarts_and_resizes() -> None:
    meter = ThroughputMeter(procs_per_node=2)
    for p in (_progress(0, 0), _progress(10, 1000), _progress(20, 2000)):
        meter.observe(p)
    assert meter.rates == {2: pytest.approx(100.0)}
    meter.observe(_progress(30, 2000, world=2))  # resized: a new interval starts
    meter.observe(_progress(40, 2600, world=2))
    assert meter.rates[1] == pytest.approx(60.0)
    meter.observe(_progress(41, 100, world=2, restart=1))  # restarted: no rate across it
    meter.observe(_progress(41.5, 150, world=2, restart=1))  # too short: waits for a longer interval
    meter.observe(_progress(51, 700, world=2, restart=1))
    assert meter.rates[1] == pytest.approx(0.7 * 60 + 0.3 * 60.0)


def test_the_curve_is_in_worker_equivalents() -> None:
    meter = ThroughputMeter(rates={2: 100.0, 4: 150.0})
    curve = meter.curve(exponent=1.0)
    assert curve.at(2) == pytest.approx(2.0) and curve.at(4) == pytest.approx(3.0)
    assert ThroughputMeter().curve(0.5).at(4) == pytest.approx(2.0)


def test_transition_seconds_from_spec_then_measured_recovery_then_default() -> None:
    from salamander.api.models import FailureRecord
    s = spec()
    assert transition_seconds(s, FRESH) == 60.0
    failure = FailureRecord(kind="Killed", severity="SEV2", source="ProcessExit", worker=0, pod="p",
                            action="RestartProcesses", detected_at=T0, recovered_at=T0 + datetime.timedelta(seconds=42))
    assert transition_seconds(s, TrainingJobStatus(last_failure=failure)) == 42.0
    s2 = s.model_copy(update={"scheduling": s.scheduling.model_copy(update={"transition_seconds": 7.0})})
    assert transition_seconds(s2, TrainingJobStatus(last_failure=failure)) == 7.0


# --- nodes as capacity

def node(ready: str = "True", labels: dict[str, str] | None = None, **extra: object) -> dict[str, object]:
    return {"metadata": {"name": "n", "labels": labels or {}}, "spec": extra.get("spec", {}),
            "status": {"conditions": [{"type": "Ready", "status": ready}]}}


def test_schedulable_nodes() -> None:
    assert schedulable(node(), {}, 0)
    assert not schedulable(node("False"), {}, 0) and not schedulable(node("Unknown"), {}, 0)
    assert not schedulable({"metadata": {}}, {}, 0), "no Ready condition yet"
    assert not schedulable(node(spec={"unschedulable": True}), {}, 0), "cordoned"
    assert schedulable(node(labels={"pool": "gpu"}), {"pool": "gpu"}, 0)
    assert not schedulable(node(labels={"pool": "cpu"}), {"pool": "gpu"}, 0)
    quarantined = node(labels={LABEL_QUARANTINED_UNTIL: "1000"})
    assert not schedulable(quarantined, {}, 999) and schedulable(quarantined, {}, 1001)


@pytest.mark.parametrize("text, selector", [
    ("", {}), ("pool=gpu", {"pool": "gpu"}), (" a=1 , b=2 ", {"a": "1", "b": "2"}), ("a=", {"a": ""})])
def test_parse_selector(text, selector) -> None:
    assert parse_selector(text) == selector


@pytest.mark.parametrize("text", ["pool", "=gpu", "a!=b", "a==b"])
def test_parse_selector_names_the_bad_term(text) -> None:
    with pytest.raises(ValueError, match="is not key=value"):
        parse_selector(text)


# --- the cross-job bookkeeping

def demand(key: str, lo: int, hi: int, weight: float = 1.0, priority: int = 0) -> JobDemand:
    return JobDemand(key, lo, hi, weight=weight, priority=priority)


def allocations_with(nodes: int) -> ClusterAllocations:
    a = ClusterAllocations()
    for i in range(nodes):
        assert a.observe_node(f"n{i}", node())
    return a


def test_submit_plan_finish() -> None:
    a = allocations_with(4)
    assert a.submit("ns/a", "uid-a", demand("ns/a", 1, 4), None) is True
    assert a.replan("job ns/a submitted", T0) == {"ns/a": "uid-a"}
    assert a.allocation("ns/a").workers == 4 and a.allocation("ns/a").capacity == 4
    assert a.submit("ns/a", "uid-a", demand("ns/a", 1, 4), None) is False, "same demand: no plan due"
    assert a.submit("ns/a", "uid-a", demand("ns/a", 1, 3), None) is True, "max changed"
    assert a.replan("changed", T0) == {"ns/a": "uid-a"} and a.allocation("ns/a").workers == 3
    assert a.replan("nothing new", T0) == {}, "a plan that changes nothing wakes nobody"
    assert a.finish("ns/a") is True and a.allocation("ns/a") is None and a.finish("ns/a") is False


def test_a_job_adopts_its_allocation_after_an_operator_restart() -> None:
    a = allocations_with(4)
    assert a.submit("ns/a", "uid-a", demand("ns/a", 2, 4), alloc(3)) is False
    assert a.allocation("ns/a") == alloc(3)
    # out of range for the (edited) spec: not adopted, planned afresh
    assert a.submit("ns/b", "uid-b", demand("ns/b", 2, 2), alloc(3)) is True


def test_capacity_changes_are_reported_once() -> None:
    a = allocations_with(2)
    assert a.capacity == 2
    assert a.observe_node("n0", node()) is False, "heartbeat churn: no change"
    assert a.observe_node("n0", node("False")) is True and a.capacity == 1
    assert a.observe_node("n1", None) is True and a.capacity == 0
