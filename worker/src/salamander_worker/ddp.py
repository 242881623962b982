"""Tell the section recorder when DDP's backward stops computing and starts waiting on peers.

Under ``DistributedDataParallel`` the gradient all-reduce overlaps with ``backward``: the
reducer launches each bucket's all-reduce when the bucket is ready and, at the end of the
backward pass, waits for all of them. On a fast rank that wait is time spent on the slowest
peer; counted as ``backward`` it would hide the straggler. :func:`watch_ddp` registers a
communication hook that marks each ready bucket (:meth:`salamander_worker.sections.Recorder.mark_ready`)
and then runs DDP's default all-reduce, unchanged; the last bucket's mark wins, so the rest of
the ``backward`` section counts as ``communication``::

    model = DistributedDataParallel(model)
    sw.watch_ddp(model)

A DDP model takes one communication hook, registered before its first backward: a script
with its own hook calls ``salamander_worker.sections.mark_ready()`` from it instead.
"""

from __future__ import annotations

from typing import Any

from salamander_worker import sections


def watch_ddp(model: Any, rec: sections.Recorder | None = None) -> Any:
    """Register the marking all-reduce hook on a ``DistributedDataParallel`` ``model`` (any
    other module is left alone, so a world of one needs no special case). Returns ``model``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return model
    recorder = sections.recorder if rec is None else rec

    def hook(process_group, bucket):  # no annotations: DDP checks them against its own types
        recorder.mark_ready()
        return allreduce_hook(process_group, bucket)

    # The state is the process group DDP reduces over (None: the default group), as allreduce_hook expects.
    model.register_comm_hook(getattr(model, "process_group", None), hook)
    return model
