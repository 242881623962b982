"""The Salamander worker: an elastic agent entry point and a small API for training scripts.

A training script needs only::

    import salamander_worker as sw

    ctx = sw.init_distributed()          # rank, world size, restart count; gloo or nccl
    for step in range(start, steps):
        ...
        with sw.section("forward"):      # per-rank section times: metrics and traces
            loss = model(batch)
        ...
        sw.report(step, loss=loss.item(), samples=step * batch_size * ctx.world_size)
        if sw.should_stop(step):
            break

With ``spec.checkpoint`` set, ``sw.Checkpointer.from_environment()`` gives a checkpointer whose
``load(state)`` returns the step to resume from and whose ``save(step, state)`` persists it
(:mod:`salamander_worker.checkpoint`).

The names are loaded on first use, so ``salamander-worker --help`` and its usage errors
answer without waiting for torch to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from salamander_worker.checkpoint import CheckpointError, Checkpointer, ModelState
    from salamander_worker.topology import WorkerContext, context, init_distributed
    from salamander_worker.progress import flush, report, should_stop
    from salamander_worker.sections import section
    from salamander_worker.ddp import watch_ddp
    from salamander_worker.snapshot.snapshotter import SnapshotError, Snapshotter

_EXPORTS = {
    "WorkerContext": "salamander_worker.topology", "context": "salamander_worker.topology",
    "init_distributed": "salamander_worker.topology",
    "report": "salamander_worker.progress", "should_stop": "salamander_worker.progress",
    "flush": "salamander_worker.progress",
    "section": "salamander_worker.sections", "watch_ddp": "salamander_worker.ddp",
    "Checkpointer": "salamander_worker.checkpoint", "CheckpointError": "salamander_worker.checkpoint",
    "ModelState": "salamander_worker.checkpoint",
    "Snapshotter": "salamander_worker.snapshot.snapshotter",
    "SnapshotError": "salamander_worker.snapshot.snapshotter",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'salamander_worker' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
