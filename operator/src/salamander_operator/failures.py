"""Failure taxonomy and classification: evidence in, a kind and a severity out (Unicron style).

Severity decides the cheapest action that heals a failure:

=====  ===========================================================  ==================
level  typical evidence                                             action
=====  ===========================================================  ==================
SEV1   lost agent or node, node NotReady/deleted, ECC/Xid/NVLink,   replace the node
       GPU driver errors, eviction or preemption
SEV2   abnormal exit, CUDA error, illegal memory access, OOM, hang  restart processes
SEV3   connection refused/reset, timeouts of a single connection    retry in place
=====  ===========================================================  ==================

Every function here is pure; the operator feeds them what its channels observed.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from salamander.api import FailureAction


class Severity(IntEnum):
    SEV1 = 1
    SEV2 = 2
    SEV3 = 3


#: The cheapest action that heals each severity (rules in the job's failurePolicy may override).
DEFAULT_ACTION = {Severity.SEV1: FailureAction.REPLACE_NODE, Severity.SEV2: FailureAction.RESTART_PROCESSES,
                  Severity.SEV3: FailureAction.RETRY_IN_PLACE}


class Source(StrEnum):
    """The channel that noticed the failure."""

    PROCESS_EXIT = "ProcessExit"
    EXCEPTION = "Exception"
    HANG = "Hang"
    AGENT_LOST = "AgentLost"
    POD = "Pod"
    NODE = "Node"


@dataclass(frozen=True)
class Classification:
    """``kind`` is a CamelCase name for the failure, stable enough to match rules on."""

    source: Source
    kind: str
    severity: Severity
    evidence: str

    @property
    def action(self) -> FailureAction:
        return DEFAULT_ACTION[self.severity]


#: Exception text patterns, most specific first: (pattern, kind, severity).
_EXCEPTION_PATTERNS: tuple[tuple[re.Pattern[str], str, Severity], ...] = tuple(
    (re.compile(p, re.IGNORECASE), kind, sev) for p, kind, sev in (
        (r"uncorrectable ECC|ECC error|Xid \d+|NVLink|GPU is lost|fallen off the bus|driver/library version",
         "GpuHardwareError", Severity.SEV1),
        (r"illegal memory access|CUDA error|CUBLAS_STATUS|cuDNN error", "CudaError", Severity.SEV2),
        (r"out of memory|OutOfMemoryError", "OutOfMemory", Severity.SEV2),
        (r"NCCL (error|WARN)|ncclInternalError|ncclSystemError", "NcclError", Severity.SEV2),
        (r"Connection (refused|reset|closed by peer)|Broken pipe|link (is )?(down|flap)", "ConnectionError", Severity.SEV3),
    ))


def classify_exception(type_name: str, message: str) -> Classification:
    """An exception raised inside a training process (from torch elastic's error file)."""
    text = f"{type_name}: {message}"
    for pattern, kind, severity in _EXCEPTION_PATTERNS:
        if pattern.search(text):
            return Classification(Source.EXCEPTION, kind, severity, text[:500])
    return Classification(Source.EXCEPTION, "TrainingException", Severity.SEV2, text[:500])


def classify_exit(exit_code: int, signal_number: int = 0) -> Classification:
    """A training process that ended without an exception report."""
    if signal_number:
        try:
            name = signal.Signals(signal_number).name
        except ValueError:
            name = f"signal {signal_number}"
        kind = "Killed" if signal_number == signal.SIGKILL else "Signaled"
        return Classification(Source.PROCESS_EXIT, kind, Severity.SEV2, f"killed by {name}")
    return Classification(Source.PROCESS_EXIT, "AbnormalExit", Severity.SEV2, f"exit code {exit_code}")


#: Pod and container reasons Kubernetes reports: reason -> (kind, severity).
_POD_REASONS = {
    "OOMKilled": ("ContainerOOMKilled", Severity.SEV2),
    "Evicted": ("Evicted", Severity.SEV1),
    "Preempting": ("Preempted", Severity.SEV1),
    "Preempted": ("Preempted", Severity.SEV1),
    "DeletionByTaintManager": ("NodeTaintEviction", Severity.SEV1),
    "NodeLost": ("NodeLost", Severity.SEV1),
    "Shutdown": ("NodeShutdown", Severity.SEV1),
    "Terminated": ("NodeShutdown", Severity.SEV1),
}


def classify_pod(reason: str, exit_code: int | None, message: str = "") -> Classification:
    """A worker pod that Kubernetes reports as failed."""
    if reason in _POD_REASONS:
        kind, severity = _POD_REASONS[reason]
        return Classification(Source.POD, kind, severity, f"{reason}: {message}"[:500])
    if exit_code is not None and exit_code > 128:
        return Classification(Source.POD, "Signaled", Severity.SEV2, f"exit code {exit_code} ({reason or 'Error'})")
    return Classification(Source.POD, "PodFailed", Severity.SEV2, f"exit code {exit_code} ({reason or 'Error'})")


def classify_worker(reason: str, exit_code: int | None, message: str) -> Classification:
    """A failed worker as the operator observed it: a lost agent, a failed node (see
    :mod:`.nodes`), or a failed pod."""
    if reason == "AgentLost":
        return Classification(Source.AGENT_LOST, "AgentLost", Severity.SEV1, message)
    if reason in _NODE_KINDS:
        return Classification(Source.NODE, reason, Severity.SEV1, message)
    return classify_pod(reason, exit_code, message)


_NODE_KINDS = frozenset({"NodeNotReady", "NodeDeleted"})  # the kinds classify_node gives


def classify_node(ready: bool | None, deleted: bool) -> Classification | None:
    """A node whose worker pods can no longer be trusted; None while it is healthy."""
    if deleted:
        return Classification(Source.NODE, "NodeDeleted", Severity.SEV1, "the node was deleted")
    if ready is False or ready is None:
        return Classification(Source.NODE, "NodeNotReady", Severity.SEV1, "the node is NotReady or Unknown")
    return None


def classify_agent_loss(silent_for_s: float) -> Classification:
    """An agent whose heartbeats stopped: its node is presumed lost."""
    return Classification(Source.AGENT_LOST, "AgentLost", Severity.SEV1,
                          f"no heartbeat for {silent_for_s:.1f} s")


MAX_HANG_THRESHOLD_S = 86_400.0


def hang_threshold(step_times_s: list[float], factor: float = 3.0, floor_s: float = 10.0) -> float:
    """How long without progress means a hang: ``factor`` x the median of the job's own step
    times, never below ``floor_s`` and never above a day. With no step yet, the floor (startup
    is judged elsewhere). Ignores non-finite and negative samples."""
    samples = sorted(t for t in step_times_s if t >= 0 and t == t and t != float("inf"))
    if not samples:
        return floor_s
    mid = len(samples) // 2
    median = samples[mid] if len(samples) % 2 else (samples[mid - 1] + samples[mid]) / 2
    return min(MAX_HANG_THRESHOLD_S, max(floor_s, factor * median))


def classify_startup_hang(since_start_s: float, startup_s: float) -> Classification | None:
    """A hang before the first step: the round's processes have run ``startup_s`` (or longer)
    without one. ``startup_s`` 0 never judges start-up."""
    if startup_s <= 0 or since_start_s < startup_s:
        return None
    return Classification(Source.HANG, "Hang", Severity.SEV2,
                          f"no first step {since_start_s:.1f} s after the processes started "
                          f"(startupSeconds {startup_s:.1f} s)")


def classify_hang(since_progress_s: float, threshold_s: float) -> Classification | None:
    """A hang once the job has made no progress for ``threshold_s`` (or longer)."""
    if since_progress_s < threshold_s:
        return None
    return Classification(Source.HANG, "Hang", Severity.SEV2,
                          f"no progress for {since_progress_s:.1f} s (threshold {threshold_s:.1f} s)")
