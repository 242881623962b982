"""Report progress and learn when to stop, through the job's rendezvous store.

Only global rank 0 talks to the store: it publishes a :class:`salamander.wire.Progress` record
(throttled) and looks for the job's stop key. ``should_stop`` turns the leader's answer and
every rank's own SIGTERM into one decision shared by all ranks, so no rank leaves a
collective the others are still in. Failing to reach the store never fails training.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from salamander import wire
from salamander_worker.topology import context

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.5


@dataclass
class _Channel:
    """The leader's connection to the rendezvous store, opened on first use."""

    store: dist.TCPStore | None = None
    broken: bool = False
    last_publish: float = 0.0
    pending: wire.Progress | None = None
    terminated: threading.Event = field(default_factory=threading.Event)
    sigterm_installed: bool = False

    def connect(self) -> dist.TCPStore | None:
        if self.store is not None or self.broken:
            return self.store
        endpoint = os.environ.get(wire.ENV_RDZV_ENDPOINT, "")
        if not endpoint:
            self.broken = True  # standalone: nobody to report to
            return None
        host, _, port = endpoint.rpartition(":")
        try:
            self.store = dist.TCPStore(host, int(port), is_master=False,
                                       timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
        except (RuntimeError, ValueError) as exc:
            log.warning("cannot reach the rendezvous store at %s (%s); progress is not reported",
                        endpoint, exc)
            self.broken = True
        return self.store


_channel = _Channel()


def report(step: int, loss: float | None = None, samples: int = 0, *, total_steps: int | None = None,
           force: bool = False) -> None:
    """Record that the job reached ``step`` (with its ``loss``, the ``samples`` seen in all, and
    the ``total_steps`` it will run, if known, for progress bars).

    Cheap to call every step: the leader publishes at most every 0.5 s unless ``force``;
    other ranks return at once.
    """
    ctx = context()
    if not ctx.is_leader:
        return
    if loss is not None and not math.isfinite(loss):
        loss = None
    _channel.pending = wire.Progress(step=int(step), samples=int(samples), world_size=ctx.world_size,
                                     time=time.time(), loss=None if loss is None else float(loss),
                                     restart_count=ctx.restart_count, total_steps=total_steps)
    now = time.monotonic()
    if force or now - _channel.last_publish >= PUBLISH_INTERVAL_S:
        _publish(now)


def _publish(now: float) -> None:
    store = _channel.connect()
    if store is None or _channel.pending is None:
        return
    try:
        store.set(wire.progress_key(context().run_id), _channel.pending.encode())
        _channel.last_publish = now
    except RuntimeError as exc:  # the store went away; keep training, try again later
        log.warning("publishing progress failed: %s", exc)
        _channel.last_publish = now


def flush() -> None:
    """Publish the latest report now (call once at the end of training)."""
    if _channel.pending is not None:
        _publish(time.monotonic())


def _install_sigterm() -> None:
    if _channel.sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
        _channel.terminated.set()
        if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    _channel.sigterm_installed = True


def _stop_requested_locally() -> bool:
    if _channel.terminated.is_set():
        return True
    if not context().is_leader:
        return False
    store = _channel.connect()
    if store is None:
        return False
    try:
        return bool(store.check([wire.stop_key(context().run_id)]))
    except RuntimeError:
        return False


def should_stop(step: int | None = None, every: int = 10) -> bool:
    """True when the job asked to stop or this process got SIGTERM, agreed across all ranks.

    Every rank must call it at the same steps. With ``step`` given it decides only when
    ``step % every == 0`` (one tiny all-reduce then) and returns False in between.
    """
    _install_sigterm()
    if step is not None and step % every != 0:
        return False
    local = _stop_requested_locally()
    if not (dist.is_available() and dist.is_initialized()):
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=context().device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
