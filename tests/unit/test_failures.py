"""The failure taxonomy: evidence -> kind, severity and the cheapest healing action."""

from __future__ import annotations

import math
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander.api import FailureAction as Action
from salamander_operator.failures import (Severity, Source, classify_agent_loss,
                                          classify_exception, classify_exit, classify_hang, classify_node,
                                          classify_pod, hang_threshold)
from tests.unit._support import FAST


@pytest.mark.parametrize("type_name, message, kind, severity", [
    ("RuntimeError", "CUDA error: an illegal memory access was encountered", "CudaError", Severity.SEV2),
    ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB", "OutOfMemory", Severity.SEV2),
    ("RuntimeError", "NCCL error in: ProcessGroupNCCL.cpp:1269, unhandled system error", "NcclError", Severity.SEV2),
    ("RuntimeError", "CUDA error: uncorrectable ECC error encountered", "GpuHardwareError", Severity.SEV1),
    ("RuntimeError", "NVRM: Xid 79, GPU has fallen off the bus", "GpuHardwareError", Severity.SEV1),
    ("RuntimeError", "[gloo] Read error: Connection reset by peer", "ConnectionError", Severity.SEV3),
    ("ValueError", "shapes do not match", "TrainingException", Severity.SEV2),
])
def test_exceptions_are_classified(type_name: str, message: str, kind: str, severity: Severity) -> None:
    c = classify_exception(type_name, message)
    assert (c.source, c.kind, c.severity) == (Source.EXCEPTION, kind, severity)
    assert message[:50] in c.evidence


def test_severity_picks_the_cheapest_healing_action() -> None:
    assert classify_exception("E", "uncorrectable ECC error").action is Action.REPLACE_NODE
    assert classify_exit(1).action is Action.RESTART_PROCESSES
    assert classify_exception("E", "Connection refused").action is Action.RETRY_IN_PLACE


def test_exits_and_signals() -> None:
    assert classify_exit(1).kind == "AbnormalExit" and "exit code 1" in classify_exit(1).evidence
    killed = classify_exit(0, signal.SIGKILL)
    assert killed.kind == "Killed" and "SIGKILL" in killed.evidence
    assert classify_exit(0, signal.SIGSEGV).kind == "Signaled"
    assert "signal 99" in classify_exit(0, 99).evidence


@pytest.mark.parametrize("reason, exit_code, kind, severity", [
    ("OOMKilled", 137, "ContainerOOMKilled", Severity.SEV2),
    ("Evicted", None, "Evicted", Severity.SEV1),
    ("Preempting", None, "Preempted", Severity.SEV1),
    ("DeletionByTaintManager", None, "NodeTaintEviction", Severity.SEV1),
    ("Error", 139, "Signaled", Severity.SEV2),
    ("Error", 1, "PodFailed", Severity.SEV2),
    ("", None, "PodFailed", Severity.SEV2),
])
def test_pod_reasons(reason: str, exit_code: int | None, kind: str, severity: Severity) -> None:
    c = classify_pod(reason, exit_code)
    assert (c.source, c.kind, c.severity) == (Source.POD, kind, severity)


def test_nodes_and_agents() -> None:
    assert classify_node(ready=True, deleted=False) is None
    assert classify_node(ready=False, deleted=False).kind == "NodeNotReady"
    assert classify_node(ready=None, deleted=False).severity is Severity.SEV1
    assert classify_node(ready=True, deleted=True).kind == "NodeDeleted"
    lost = classify_agent_loss(6.5)
    assert lost.severity is Severity.SEV1 and "6.5 s" in lost.evidence


def test_hang_threshold_follows_the_jobs_own_step_times() -> None:
    assert hang_threshold([]) == 10.0
    assert hang_threshold([0.5, 0.6, 0.4]) == 10.0          # fast steps: the floor
    assert hang_threshold([8.0, 9.0, 10.0, 50.0]) == 28.5    # 3 x median, robust to one slow step
    assert hang_threshold([4.0], factor=5, floor_s=1) == 20.0
    assert hang_threshold([math.nan, -1.0, math.inf, 20.0]) == 60.0
    assert classify_hang(29.0, 28.5).kind == "Hang"
    assert classify_hang(28.0, 28.5) is None


@FAST
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True)), st.floats(1, 10), st.floats(0, 100))
def test_hang_threshold_is_never_below_the_floor_and_always_finite(times, factor, floor) -> None:
    threshold = hang_threshold(times, factor, floor)
    assert floor <= threshold <= 86_400 and math.isfinite(threshold)


def test_an_absurd_step_time_cannot_make_the_threshold_infinite() -> None:
    assert hang_threshold([8.98846567431158e307], factor=2.0, floor_s=0.0) == 86_400
