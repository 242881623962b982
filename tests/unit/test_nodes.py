"""The node channel: failed nodes make their running workers failed; nothing else changes."""

from __future__ import annotations

import datetime

from salamander_operator.failures import Severity, Source, classify_worker
from salamander_operator.nodes import (LABEL_QUARANTINED_BY, LABEL_QUARANTINED_UNTIL, MAX_LABEL_VALUE, NodeState,
                                       mark_failed_nodes, node_state, quarantine_labels, quarantined_by, stranded)
from salamander_operator.observed import ObservedWorker, WorkerPhase

T0 = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.UTC)
RUNNING = [ObservedWorker(index=i, phase=WorkerPhase.RUNNING, ready=True, node=f"n{i}") for i in range(3)]


def _node(*conditions: dict) -> dict:
    return {"metadata": {"name": "n"}, "status": {"conditions": list(conditions)}}


def test_node_state_reads_the_ready_condition() -> None:
    memory = {"type": "MemoryPressure", "status": "True"}
    ready = node_state(_node(memory, {"type": "Ready", "status": "True", "reason": "KubeletReady"}))
    assert ready.ready is True and not ready.failed and ready.reason == "KubeletReady"
    down = node_state(_node({"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "PLEG",
                             "lastTransitionTime": "2025-03-01T12:00:00Z"}))
    assert down.ready is False and down.failed and down.since == T0 and down.message == "PLEG"
    unknown = node_state(_node({"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}))
    assert unknown.ready is None and unknown.failed and unknown.since is None


def test_a_node_that_never_posted_a_ready_condition_is_not_failed() -> None:
    assert not node_state({"metadata": {"name": "new"}}).failed
    assert not node_state(_node({"type": "DiskPressure", "status": "False"})).failed


def test_workers_on_failed_nodes_fail_with_the_nodes_kind_and_evidence() -> None:
    nodes = {"n0": NodeState(ready=True),
             "n1": NodeState(ready=False, reason="KubeletNotReady", message="container runtime is down", since=T0),
             "n2": NodeState(ready=None, deleted=True, since=T0)}
    out = mark_failed_nodes(RUNNING, nodes)
    assert out[0] == RUNNING[0]
    assert [w.phase for w in out[1:]] == [WorkerPhase.FAILED, WorkerPhase.FAILED]
    assert not out[1].ready and out[1].reason == "NodeNotReady" and out[1].failed_at == T0
    assert "node n1" in out[1].message and "KubeletNotReady" in out[1].message
    assert "container runtime is down" in out[1].message
    assert out[2].reason == "NodeDeleted" and "deleted" in out[2].message
    assert (out[1].index, out[1].node) == (1, "n1")  # who it was and where are kept


def test_unknown_nodes_and_unscheduled_workers_are_never_judged() -> None:
    assert mark_failed_nodes(RUNNING, {}) == RUNNING
    unscheduled = [ObservedWorker(0, WorkerPhase.RUNNING, ready=True)]
    assert mark_failed_nodes(unscheduled, {"": NodeState(ready=False)}) == unscheduled


def test_only_running_workers_not_being_deleted_fail() -> None:
    workers = [ObservedWorker(0, WorkerPhase.PENDING, node="bad"),
               ObservedWorker(1, WorkerPhase.SUCCEEDED, exit_code=0, node="bad"),
               ObservedWorker(2, WorkerPhase.FAILED, exit_code=1, reason="Error", node="bad"),
               ObservedWorker(3, WorkerPhase.RUNNING, deleting=True, node="bad"),
               ObservedWorker(4, WorkerPhase.RUNNING, node="good")]
    nodes = {"bad": NodeState(ready=False), "good": NodeState()}
    assert mark_failed_nodes(workers, nodes) == workers
    assert stranded(workers, nodes) == [3]  # stuck Terminating where no kubelet will confirm it


def test_node_failures_are_sev1_node_failures_that_replace_the_node() -> None:
    for kind in ("NodeNotReady", "NodeDeleted"):
        c = classify_worker(kind, None, "node n1: ...")
        assert (c.source, c.kind, c.severity, c.action.value) == (Source.NODE, kind, Severity.SEV1, "ReplaceNode")


def test_quarantine_labels_mark_and_unmark() -> None:
    assert quarantine_labels("team-a", "llm", T0) == {LABEL_QUARANTINED_UNTIL: str(int(T0.timestamp())),
                                                      LABEL_QUARANTINED_BY: "team-a.llm"}
    assert quarantine_labels("team-a", "llm", None) == {LABEL_QUARANTINED_UNTIL: None, LABEL_QUARANTINED_BY: None}


def test_the_quarantined_by_label_value_fits_a_label() -> None:
    long_a, long_b = quarantined_by("n" * 63, "job-a"), quarantined_by("n" * 63, "job-b")
    assert len(long_a) <= MAX_LABEL_VALUE and long_a != long_b
    assert long_a[0].isalnum() and long_a[-1].isalnum()
