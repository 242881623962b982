"""KillWorker faults: the one kind whoever runs the workers fires (the local runtime kills the
worker's process tree; on Kubernetes the operator tells the worker's agent). The other kinds
fire inside the training processes (:mod:`salamander_worker.faults`). Pure."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from salamander.api import Fault, FaultKind


def due(faults: Sequence[Fault], step: int, fired: Collection[int]) -> list[tuple[int, Fault]]:
    """The KillWorker faults of ``faults`` (with their index in it) that the job has reached at
    ``step`` and that are not in ``fired``, in order."""
    return [(n, fault) for n, fault in enumerate(faults)
            if fault.kind is FaultKind.KILL_WORKER and n not in fired and step >= fault.at_step]


def message(index: int, fault: Fault, step: int) -> str:
    """What the FaultInjected event says when fault ``index`` fires at ``step``."""
    return f"killed worker {fault.worker} at step {step} (fault {index + 1})"
