"""Report progress and learn when to stop, through the job's rendezvous store.

Only global rank 0 talks to the store: it publishes a :class:`salamander.wire.Progress` record
(throttled) and looks for the job's stop key. ``should_stop`` shares the leader's answer with
all ranks, so no rank leaves a collective the others are still in. A SIGTERM to one pod
(eviction, scale-down) is deliberately *not* a job-wide stop: that pod leaves, and the elastic
agents re-form the group without it. Failing to reach the store never fails training.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from salamander import wire
from salamander_worker import faults, telemetry
from salamander_worker.sections import TimingWriter, configure, recorder
from salamander_worker.store import connect_store
from salamander_worker.topology import WorkerContext, context

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.5


@dataclass
class _Channel:
    """The leader's connection to the rendezvous store, opened on first use."""

    store: dist.TCPStore | None = None
    broken: bool = False
    last_publish: float = 0.0
    pending: wire.Progress | None = None
    ctx: WorkerContext | None = None
    restore: tuple[str, int | None] | None = None   # (tier, step) this process restored from
    blocked_s: float = 0.0  # training blocked on checkpoints and snapshots, this process life
    started: bool = False   # the trace responder was started
    timings: TimingWriter | None = None  # this rank's section timing for its agent's heartbeat
    step: int = 0           # the newest step reported

    def context(self) -> WorkerContext:
        """This process's context, read once: a restarted worker is a new process."""
        if self.ctx is None:
            self.ctx = context()
        return self.ctx

    def connect(self) -> dist.TCPStore | None:
        if self.store is not None or self.broken:
            return self.store
        endpoint = os.environ.get(wire.ENV_RDZV_ENDPOINT, "")
        if not endpoint:
            self.broken = True  # standalone: nobody to report to
            return None
        try:
            self.store = connect_store(endpoint)
        except (RuntimeError, ValueError) as exc:
            log.warning("cannot reach the rendezvous store at %s (%s); progress is not reported",
                        endpoint, exc)
            self.broken = True
        return self.store


_channel = _Channel()


def report(step: int, loss: float | None = None, samples: int = 0, *, total_steps: int | None = None,
           tokens: int | None = None, flops_per_step: float | None = None, force: bool = False) -> None:
    """Record that the job reached ``step`` (with its ``loss``, the ``samples`` and ``tokens``
    seen in all, all ranks together, and the ``total_steps`` it will run, if known, for progress
    bars). ``flops_per_step``: the model FLOPs of one step of the whole job (e.g. 6 x parameters
    x tokens per step for a transformer), for MFU. Call it once per step on every rank: it also
    closes the step's sections (:mod:`salamander_worker.sections`), updates the metrics and,
    under a Salamander agent, writes this rank's section timing for its heartbeat (at most once
    a second, in ``$SALAMANDER_TIMINGS_DIR``).

    Cheap to call every step: the leader publishes at most every 0.5 s unless ``force``.
    """
    ctx = _channel.context()
    if not _channel.started:
        _channel.started = True
        try:
            from salamander_worker import timeline

            timeline.ensure_started(ctx)
        except Exception as exc:  # noqa: BLE001 - traces are a convenience; training goes on
            log.warning("per-rank traces are off: %s", exc)
        configure(ctx.device)  # CUDA events for the section times on a GPU
        _channel.timings = TimingWriter.from_environment(ctx.rank)
    faults.on_step(step, ctx, _channel.connect)  # every rank: inject the faults due (rehearsal, tests)
    if loss is not None and not math.isfinite(loss):
        loss = None
    step_s = recorder.end_step(step)
    _channel.step = step
    if _channel.timings is not None:
        _channel.timings.maybe_write(step)  # at most once a second; never raises
    metrics = telemetry.worker()
    telemetry.guarded(lambda: metrics.on_step(step, step_s, loss, samples, tokens, flops_per_step,
                                              recorder.window_means))
    if not ctx.is_leader:
        return
    _channel.pending = wire.Progress(step=int(step), samples=int(samples), world_size=ctx.world_size,
                                     time=time.time(), loss=None if loss is None else float(loss),
                                     restart_count=ctx.restart_count,
                                     total_steps=None if total_steps is None else int(total_steps),
                                     restore_tier=_channel.restore[0] if _channel.restore else None,
                                     restore_step=_channel.restore[1] if _channel.restore else None,
                                     blocked_s=_channel.blocked_s)
    now = time.monotonic()
    if force or now - _channel.last_publish >= PUBLISH_INTERVAL_S:
        _publish(now)


def note_restore(tier: str, step: int | None) -> None:
    """Record where this process restored its state from (a tier of
    :data:`salamander.wire.RESTORE_TIERS` and the step); every progress report carries it, so
    the operator puts it in the job's status."""
    _channel.restore = (tier, None if tier == "none" else step)
    metrics = telemetry.worker()
    telemetry.guarded(lambda: metrics.restored(tier))


def note_blocked(seconds: float) -> None:
    """Add ``seconds`` during which training waited on a checkpoint or snapshot: the
    operator counts them as checkpointing in the job's goodput."""
    if seconds > 0:
        _channel.blocked_s += seconds


def _publish(now: float) -> None:
    store = _channel.connect()
    if store is None or _channel.pending is None:
        return
    try:
        store.set(wire.progress_key(_channel.context().run_id), _channel.pending.encode())
        _channel.last_publish = now
    except Exception as exc:  # noqa: BLE001 - reporting must never fail training; try again later
        log.warning("publishing progress failed: %s", exc)
        _channel.last_publish = now


def flush() -> None:
    """Publish the latest report and metrics now (call once at the end of training)."""
    metrics = telemetry.worker()
    telemetry.guarded(metrics.flush)
    if _channel.timings is not None:
        _channel.timings.maybe_write(_channel.step, force=True)
    if _channel.pending is not None:
        _publish(time.monotonic())


def _stop_requested() -> bool:
    if not _channel.context().is_leader:
        return False
    store = _channel.connect()
    if store is None:
        return False
    try:
        return bool(store.check([wire.stop_key(_channel.context().run_id)]))
    except RuntimeError:
        return False


def should_stop(step: int | None = None, every: int = 10) -> bool:
    """True when the job was asked to stop (``salamander run``'s Ctrl-C, for one), agreed by
    all ranks. Every rank must call it at the same steps. With ``step`` given it decides only
    when ``step % every == 0`` (one tiny broadcast then) and returns False in between.
    """
    if step is not None and step % every != 0:
        return False
    local = _stop_requested()
    if not (dist.is_available() and dist.is_initialized()):
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=_channel.context().device)
    dist.broadcast(flag, src=0)  # the leader's answer is the job's answer
    return bool(flag.item())
