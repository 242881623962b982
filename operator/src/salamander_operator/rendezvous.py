"""The rendezvous store: membership for every job's elastic agents, hosted by the operator.

torch.distributed.elastic's c10d rendezvous keeps its state in a ``TCPStore``. Kubeflow
hosts that store on worker 0, which makes worker 0 a single point of failure; here the
operator (or ``salamander run``) hosts one store for all jobs, each job under its own run id,
so any worker may be lost and the survivors re-form the group. Workers also publish their
progress there (:mod:`salamander.wire`). Every method is blocking; async callers use a thread.
"""

from __future__ import annotations

import datetime
import logging

import torch.distributed as dist

from salamander import wire

log = logging.getLogger(__name__)

DEFAULT_PORT = 29400


class RendezvousError(RuntimeError):
    """The rendezvous store could not be started or reached."""


class RendezvousHost:
    """Owns the store server. ``endpoint`` is the ``host:port`` agents connect to."""

    def __init__(self, advertise_host: str, port: int = DEFAULT_PORT, bind_host: str = "0.0.0.0",
                 advertise_port: int | None = None) -> None:
        """Listen on ``bind_host:port`` (0 picks a free port); agents are told to connect to
        ``advertise_host:advertise_port`` (the listening port unless a Service maps another)."""
        try:
            self._store = dist.TCPStore(bind_host, port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=30))
        except (RuntimeError, ValueError) as exc:
            raise RendezvousError(f"cannot host the rendezvous store on port {port}: {exc}") from None
        self.endpoint = f"{advertise_host}:{advertise_port or self._store.port}"

    def read_progress(self, run_id: str) -> wire.Progress | None:
        """The newest progress a job's leader published, or None if none (or a malformed one)."""
        try:
            return wire.read_progress(self._store, run_id)
        except wire.WireError as exc:
            log.warning("ignoring a malformed progress record of run %s: %s", run_id, exc)
            return None

    def request_stop(self, run_id: str) -> None:
        """Ask a job's workers to stop at their next ``should_stop`` check."""
        self._store.set(wire.stop_key(run_id), b"1")

    def forget(self, run_id: str) -> None:
        """Drop a finished job's progress, stop request and rendezvous state. (torch also leaves
        a few small per-round keys, whose names it does not expose; they stay.)"""
        for key in (wire.progress_key(run_id), wire.stop_key(run_id), f"torch.rendezvous.{run_id}"):
            self._store.delete_key(key)
