"""Reducing a pod to an ObservedWorker."""

from __future__ import annotations

from typing import Any

import pytest

from salamander import wire
from salamander_operator.observed import WORKER_CONTAINER, ObservedWorker, WorkerPhase, observe_pod


def pod(index: str | None = "2", phase: str | None = None, *, ready: bool | None = None,
        status: dict[str, Any] | None = None, terminated: dict[str, Any] | None = None,
        deletion: str | None = None, **status_extra: Any) -> dict[str, Any]:
    labels = {wire.LABEL_JOB: "llm", wire.LABEL_ROLE: "worker"}
    if index is not None:
        labels[wire.LABEL_INDEX] = index
    meta: dict[str, Any] = {"name": "llm-worker-2", "labels": labels}
    if deletion:
        meta["deletionTimestamp"] = deletion
    body: dict[str, Any] = {"metadata": meta}
    if status is not None:
        body["status"] = status
        return body
    st: dict[str, Any] = {**status_extra}
    if phase is not None:
        st["phase"] = phase
    if ready is not None:
        st["conditions"] = [{"type": "PodScheduled", "status": "True"},
                            {"type": "Ready", "status": "True" if ready else "False"}]
    if terminated is not None:
        st["containerStatuses"] = [
            {"name": "sidecar", "state": {"terminated": {"exitCode": 99, "reason": "SidecarReason"}}},
            {"name": WORKER_CONTAINER, "state": {"terminated": terminated}},
        ]
    body["status"] = st
    return body


def test_pending_pod() -> None:
    w = observe_pod(pod(phase="Pending"))
    assert w == ObservedWorker(index=2, phase=WorkerPhase.PENDING)


def test_running_not_ready() -> None:
    w = observe_pod(pod(phase="Running", ready=False))
    assert w is not None
    assert (w.phase, w.ready, w.deleting) == (WorkerPhase.RUNNING, False, False)


def test_running_without_conditions_is_not_ready() -> None:
    w = observe_pod(pod(phase="Running"))
    assert w is not None and w.phase is WorkerPhase.RUNNING and not w.ready


def test_running_and_ready() -> None:
    w = observe_pod(pod(phase="Running", ready=True))
    assert w is not None
    assert (w.index, w.phase, w.ready) == (2, WorkerPhase.RUNNING, True)


def test_ready_condition_on_a_pending_pod_does_not_make_it_ready() -> None:
    w = observe_pod(pod(phase="Pending", ready=True))
    assert w is not None and w.phase is WorkerPhase.PENDING and not w.ready


def test_succeeded() -> None:
    w = observe_pod(pod(phase="Succeeded", ready=False, terminated={"exitCode": 0, "reason": "Completed"}))
    assert w is not None
    assert w.phase is WorkerPhase.SUCCEEDED
    assert w.exit_code == 0
    assert not w.ready


def test_failed_with_exit_code() -> None:
    w = observe_pod(pod(phase="Failed", terminated={"exitCode": 1, "reason": "Error", "message": "boom"}))
    assert w is not None
    assert (w.phase, w.exit_code, w.reason, w.message) == (WorkerPhase.FAILED, 1, "Error", "boom")
    assert w.describe_failure() == "exit code 1, Error, boom"


def test_oom_killed_reads_the_worker_container_only() -> None:
    w = observe_pod(pod(phase="Failed", terminated={"exitCode": 137, "reason": "OOMKilled"}))
    assert w is not None
    assert w.phase is WorkerPhase.FAILED
    assert w.exit_code == 137
    assert w.reason == "OOMKilled"
    assert "exit code 137" in w.describe_failure() and "OOMKilled" in w.describe_failure()
    assert "Sidecar" not in w.describe_failure()


def test_evicted_pod_reason_wins() -> None:
    w = observe_pod(pod(phase="Failed", reason="Evicted",
                        message="The node was low on resource: memory."))
    assert w is not None
    assert w.phase is WorkerPhase.FAILED
    assert w.reason == "Evicted"
    assert w.exit_code is None
    assert w.describe_failure() == "Evicted, The node was low on resource: memory."


def test_pod_reason_is_kept_over_the_container_reason() -> None:
    w = observe_pod(pod(phase="Failed", reason="Evicted", terminated={"exitCode": 137, "reason": "Error"}))
    assert w is not None and w.reason == "Evicted" and w.exit_code == 137


def test_failure_without_any_detail_still_describes_itself() -> None:
    w = observe_pod(pod(phase="Failed"))
    assert w is not None and w.describe_failure() == "failed"


def test_long_messages_are_truncated_in_the_description() -> None:
    w = observe_pod(pod(phase="Failed", message="x" * 1000))
    assert w is not None and w.message == "x" * 1000
    assert len(w.describe_failure()) == 200


@pytest.mark.parametrize("phase", ["Running", "Failed", "Pending"])
def test_deletion_timestamp_marks_deleting(phase: str) -> None:
    w = observe_pod(pod(phase=phase, deletion="2025-01-01T00:00:00Z"))
    assert w is not None and w.deleting
    assert w.phase.value == phase


@pytest.mark.parametrize("label", [None, "", "abc", "1.5", "two"])
def test_missing_or_junk_index_label_is_not_a_worker(label: str | None) -> None:
    assert observe_pod(pod(index=label, phase="Running", ready=True)) is None


def test_pod_without_labels_or_metadata_is_not_a_worker() -> None:
    assert observe_pod({"status": {"phase": "Running"}}) is None
    assert observe_pod({"metadata": {"name": "x", "labels": None}}) is None
    assert observe_pod({}) is None


@pytest.mark.parametrize("status", [None, {}, {"phase": None}, {"phase": "Unknown"}])
def test_missing_or_unknown_status_is_pending(status: dict | None) -> None:
    body = pod(phase=None)
    body["status"] = status
    w = observe_pod(body)
    assert w is not None
    assert w.phase is WorkerPhase.PENDING
    assert not w.ready and w.exit_code is None and w.reason == "" and w.message == ""


def test_a_pod_with_no_status_key_at_all() -> None:
    body = pod()
    del body["status"]
    w = observe_pod(body)
    assert w == ObservedWorker(index=2, phase=WorkerPhase.PENDING)


def test_a_running_container_has_no_exit_code() -> None:
    body = pod(phase="Running", ready=True)
    body["status"]["containerStatuses"] = [{"name": WORKER_CONTAINER, "state": {"running": {"startedAt": "t"}}},
                                           {"name": WORKER_CONTAINER, "state": None}]
    w = observe_pod(body)
    assert w is not None and w.exit_code is None and w.ready
