"""The agent's heartbeat: a background thread that keeps the agent's control-plane session open
and sends the training's latest step and step time about once a second. The same session
carries the agent's failure reports (:meth:`Heartbeat.report_failure`, callable from the
agent's own thread) and the operator's commands (:attr:`Heartbeat.restart_requested`).

The step comes from the progress record rank 0 publishes in the rendezvous store
(:mod:`salamander.wire`), so the training processes pay nothing extra. Each heartbeat also
carries the section timing of every training process of the agent (:class:`salamander.wire.RankTiming`),
read from the files they write about once a second in the agent's ``$SALAMANDER_TIMINGS_DIR``
(:func:`timings_reader`). A broken or refused stream is retried with backoff (1 s doubling to
10 s); training never waits on this thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from salamander.controlplane.v1 import controlplane_pb2 as pb

from salamander import wire
from salamander.controlplane import AgentIdentity
from salamander_worker.controlplane import AgentClient, ControlPlaneError
from salamander_worker.faults import lose_this_worker

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
TIMING_STALE_S = 30.0  # a timing file not rewritten for this long is of a process that is gone or stuck
_TIMING_FILE = re.compile(r"rank-(\d{1,9})\.json")


class StepClock:
    """Turns successive progress records into (step, seconds per step)."""

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None
        self.step = 0
        self.step_time_s = 0.0
        self.step_at = 0.0  # the wall-clock time of the newest record (seconds since the epoch)

    def update(self, progress: wire.Progress | None) -> None:
        if progress is None:
            return
        if self._last is not None and progress.step > self._last[0] and progress.time > self._last[1]:
            self.step_time_s = (progress.time - self._last[1]) / (progress.step - self._last[0])
        if self._last is None or progress.step != self._last[0]:
            self._last = (progress.step, progress.time)
        self.step = progress.step
        self.step_at = progress.time


def store_progress_reader(rdzv_endpoint: str, run_id: str) -> Callable[[], wire.Progress | None]:
    """Read the job's progress record from the rendezvous store (None when absent or bad)."""
    from salamander_worker.store import connect_store

    store: list[Any] = []  # opened on first use, reopened after a failure

    def read() -> wire.Progress | None:
        try:
            if not store:
                store.append(connect_store(rdzv_endpoint, timeout_s=5))
            return wire.read_progress(store[0], run_id)
        except (RuntimeError, ValueError):  # store unreachable, or a malformed record (WireError)
            store.clear()
            return None
    return read


def timings_reader(directory: str | Path, stale_s: float = TIMING_STALE_S,
                   clock: Callable[[], float] = time.time) -> Callable[[], list[wire.RankTiming]]:
    """Read the timing files of the agent's training processes in ``directory``
    (``rank-<rank>.json``, :class:`salamander_worker.sections.TimingWriter`): those present and
    rewritten within ``stale_s``, by rank, at most :data:`salamander.wire.MAX_TIMINGS_PER_HEARTBEAT`.
    A malformed or oversized file is skipped with one log line (again only once it was good
    in between). Never raises."""
    root = Path(directory)
    warned: set[str] = set()

    def read() -> list[wire.RankTiming]:
        found: list[wire.RankTiming] = []
        try:
            names = sorted((int(m.group(1)), entry.name) for entry in os.scandir(root)
                           if (m := _TIMING_FILE.fullmatch(entry.name)))
        except OSError:
            return found
        now = clock()
        for _, name in names[:wire.MAX_TIMINGS_PER_HEARTBEAT]:
            path = root / name
            try:
                if now - path.stat().st_mtime > stale_s:
                    continue
                with path.open("rb") as f:
                    raw = f.read(wire.MAX_TIMING_BYTES + 1)
                timing = wire.decode_rank_timing(raw)
            except FileNotFoundError:
                continue
            except (OSError, wire.WireError) as exc:
                if name not in warned:
                    warned.add(name)
                    log.warning("skipping the timing file %s: %s", path, exc)
                continue
            warned.discard(name)
            found.append(timing)
        return found
    return read


def identity_from_environment(nproc_per_node: int) -> AgentIdentity | None:
    """Who this agent speaks for, from the pod's environment; None outside a Salamander pod."""
    job = os.environ.get(wire.ENV_JOB, "")
    namespace, _, name = job.partition("/")
    if not namespace or not name:
        return None
    index = int(os.environ.get(wire.ENV_NODE_INDEX, "0") or 0)
    host = socket.gethostname()
    return AgentIdentity(namespace=namespace, job=name, pod=os.environ.get(wire.ENV_POD_NAME) or host,
                         node=os.environ.get(wire.ENV_NODE_NAME) or host,
                         first_rank=index * nproc_per_node, rank_count=nproc_per_node)


class Heartbeat(threading.Thread):
    """Runs until :meth:`stop`. Daemonic: it never keeps a finished agent alive."""

    def __init__(self, endpoint: str, token: str, identity: AgentIdentity,
                 read_progress: Callable[[], wire.Progress | None],
                 read_timings: Callable[[], list[wire.RankTiming]] | None = None) -> None:
        super().__init__(name="salamander-heartbeat", daemon=True)
        self._endpoint, self._token, self._identity = endpoint, token, identity
        self._read_progress = read_progress
        self._read_timings = read_timings
        self._stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AgentClient | None = None
        self.clock = StepClock()
        self.sent = 0
        self.restart_requested = threading.Event()
        self.regrouping = threading.Event()  # set by the agent while it restarts its processes
        self.restart_reason = ""
        self.on_kill: Callable[[str], object] = lose_this_worker   # a KillWorker fault: never returns

    def report_failure(self, rank: int, *, exit_code: int = 0, signal: int = 0,
                       exception: tuple[str, str, str] | None = None, log_tail: list[str] | None = None,
                       round_started: float = 0.0, timeout_s: float = 10.0) -> pb.Verdict | None:
        """Report a failure and wait for the operator's verdict; None when the operator cannot
        be reached in time (the agent then falls back to its own restart budget)."""
        loop, client = self._loop, self._client
        if loop is None or client is None:
            return None
        future = asyncio.run_coroutine_threadsafe(client.report_failure(
            rank, exit_code=exit_code, signal=signal, exception=exception, log_tail=log_tail,
            round_started=round_started, timeout_s=timeout_s), loop)
        try:
            return future.result(timeout_s + 1.0)
        except (ControlPlaneError, TimeoutError, concurrent.futures.TimeoutError, asyncio.TimeoutError) as exc:
            log.warning("the operator did not answer the failure report: %s", exc)
            future.cancel()
            return None

    def _on_command(self, command: pb.Command) -> None:
        body = command.WhichOneof("body")
        if body == "restart":
            self.restart_reason = command.restart.reason
            self.restart_requested.set()
        elif body == "kill":
            self.on_kill(command.kill.reason or "the operator injected a KillWorker fault")

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        self.join(timeout_s)

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        backoff = 1.0
        while not self._stopped.is_set():
            client = AgentClient(self._endpoint, self._token, self._identity, on_command=self._on_command)
            try:
                await client.connect()
                self._client = client
                backoff = 1.0
                while not self._stopped.is_set():
                    self.clock.update(await asyncio.to_thread(self._read_progress))
                    ranks = await asyncio.to_thread(self._read_timings) if self._read_timings else []
                    await client.heartbeat(self.clock.step, self.clock.step_time_s, self.clock.step_at,
                                           regrouping=self.regrouping.is_set(), ranks=ranks)
                    self.sent += 1
                    await asyncio.to_thread(self._stopped.wait, client.heartbeat_interval_s)
            except (ControlPlaneError, asyncio.TimeoutError) as exc:
                log.warning("control plane at %s: %s; retrying in %.0f s", self._endpoint, exc, backoff)
                await asyncio.to_thread(self._stopped.wait, backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            finally:
                self._client = None
                await client.close()
