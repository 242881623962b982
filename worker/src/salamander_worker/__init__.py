"""The Salamander worker: an elastic agent entry point and a small API for training scripts.

A training script needs only::

    import salamander_worker as sw

    ctx = sw.init_distributed()          # rank, world size, restart count; gloo or nccl
    for step in range(start, steps):
        ...
        sw.report(step, loss=loss.item(), samples=batch_size * ctx.world_size)
        if sw.should_stop():
            break
"""

from salamander_worker.context import WorkerContext, context, init_distributed
from salamander_worker.progress import report, should_stop

__all__ = ["WorkerContext", "context", "init_distributed", "report", "should_stop"]
