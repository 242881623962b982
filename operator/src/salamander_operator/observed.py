"""What the operator sees of a worker, reduced from a pod (or a local process) to the facts
that decisions need. Backends convert their native objects with functions here."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from salamander import wire


class WorkerPhase(StrEnum):
    PENDING = "Pending"      # not started: unscheduled, pulling, or starting
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"  # every process exited 0
    FAILED = "Failed"        # exited non-zero, was killed, evicted or lost


@dataclass(frozen=True)
class ObservedWorker:
    """One worker node (pod) as observed. ``ready`` implies ``phase is RUNNING``; a worker being
    deleted still holds its index (its name) until it is gone."""

    index: int
    phase: WorkerPhase
    ready: bool = False
    deleting: bool = False
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    node: str = ""
    failed_at: datetime.datetime | None = None  # when its container ended, if it says

    def describe_failure(self) -> str:
        parts = []
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if self.reason:
            parts.append(self.reason)
        if self.message:
            parts.append(self.message[:200])
        return ", ".join(parts) or "failed"


WORKER_CONTAINER = "worker"


def observe_pod(pod: dict[str, Any]) -> ObservedWorker | None:
    """Reduce a pod to an :class:`ObservedWorker`; None if it is not a Salamander worker pod."""
    meta = pod.get("metadata") or {}
    try:
        index = int((meta.get("labels") or {}).get(wire.LABEL_INDEX, ""))
    except ValueError:
        return None
    status = pod.get("status") or {}
    phase_name = status.get("phase") or "Pending"
    phase = {"Running": WorkerPhase.RUNNING, "Succeeded": WorkerPhase.SUCCEEDED,
             "Failed": WorkerPhase.FAILED}.get(phase_name, WorkerPhase.PENDING)
    ready = phase is WorkerPhase.RUNNING and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    exit_code, reason, message = None, status.get("reason") or "", status.get("message") or ""
    failed_at = None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") != WORKER_CONTAINER:
            continue
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated:
            exit_code = terminated.get("exitCode")
            reason = reason or terminated.get("reason") or ""
            message = message or terminated.get("message") or ""
            failed_at = _timestamp(terminated.get("finishedAt"))
    return ObservedWorker(index=index, phase=phase, ready=ready,
                          deleting=bool(meta.get("deletionTimestamp")),
                          exit_code=exit_code, reason=reason, message=message,
                          node=(pod.get("spec") or {}).get("nodeName") or "",
                          failed_at=failed_at if phase is WorkerPhase.FAILED else None)


def _timestamp(value: object) -> datetime.datetime | None:
    """An RFC 3339 time as the API server writes it; None when absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)
