"""Fault injection inside the training processes, for rehearsal and tests.

The operator (or ``salamander run``) passes the job's ``spec.faults`` to every worker as JSON in
``$SALAMANDER_FAULTS``; :func:`salamander_worker.report` calls :func:`on_step` on every rank, every
step. A fault fires on the rank it targets once the job reaches its step (``step >= atStep``):

* ``KillProcess``: SIGKILL this process (a crash with no error file, as the OOM killer does);
* ``RaiseException``: raise :class:`InjectedFault` out of ``report()`` and the training script,
  so torch elastic's error file records it;
* ``HangRank``: sleep ``seconds`` (0: until killed); the other ranks block in their next collective;
* ``SlowRank``: sleep ``seconds`` more on each of ``steps`` steps (0: to the end of the process),
  starting with the step it fires on.

``KillWorker`` is executed by whoever runs the workers; it is skipped here. On Kubernetes the
operator claims it and tells the worker's agent, which calls :func:`lose_this_worker`.

Once per run: before acting, the firing process claims fault ``i`` with
``store.add(wire.fault_key(run_id, i), 1) == 1`` on the job's rendezvous store, then writes the
wall-clock time to ``wire.fault_fired_key(run_id, i)`` (benchmarks measure detection latency from
it). A restarted process that replays the step finds the claim taken and does not fire again. A
SlowRank fault is claimed once as well: its slow period belongs to the process that claimed it and
ends with it, so a restart neither resumes it nor starts a second one. ``i`` is the fault's index
in ``spec.faults``, the same index whoever runs KillWorker faults claims with. Standalone (no
``$SALAMANDER_RDZV_ENDPOINT``) a fault fires once per process; with a store configured but
unreachable it does not fire at all, since it could not fire only once.

Injection never fails training by accident: a malformed ``$SALAMANDER_FAULTS`` logs one warning
and injects nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from pydantic import TypeAdapter, ValidationError

from salamander import wire
from salamander.api.faults import PROCESS_FAULT_KINDS
from salamander.api.manifest import _from_validation
from salamander.api.models import Fault, FaultKind
from salamander_worker.topology import WorkerContext

log = logging.getLogger(__name__)

_FAULT_LIST: TypeAdapter[list[Fault]] = TypeAdapter(list[Fault])


class InjectedFault(RuntimeError):
    """Raised by a ``RaiseException`` fault; its message names the fault, step and rank."""


def parse_faults(raw: str | None) -> list[Fault]:
    """The faults in ``raw`` (a JSON list of Fault objects, camelCase as in a manifest); an empty
    or missing value is no faults. Raises ValueError with one line naming the problem."""
    if raw is None or not raw.strip():
        return []
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, list):
        raise ValueError(f"must be a JSON list of faults, got a JSON {type(data).__name__}")
    try:
        return _FAULT_LIST.validate_python(data)
    except ValidationError as exc:
        raise ValueError(str(_from_validation(exc, "faults"))) from None


def load_faults(environ: Mapping[str, str] | None = None) -> list[Fault]:
    """The faults of ``$SALAMANDER_FAULTS``; a malformed value logs one warning and is no faults."""
    raw = (os.environ if environ is None else environ).get(wire.ENV_FAULTS)
    try:
        return parse_faults(raw)
    except ValueError as exc:
        log.warning("ignoring $%s, no faults will be injected: %s", wire.ENV_FAULTS, exc)
        return []


def _flush_output() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def lose_this_worker(reason: str) -> NoReturn:
    """Kill this agent's training processes and the agent at once, as the loss of its node
    would: SIGKILL to the agent's process group (its training processes are in it), then exit
    137 in case the signal could not end this process (a container's PID 1 ignores it)."""
    log.warning("killing this worker (agent and training processes): %s", reason)
    _flush_output()
    if os.getpid() != 1:
        try:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        except OSError:
            pass
    os._exit(137)


class FaultInjector:
    """Fires the process faults that target one rank. Not thread safe: one training loop calls it.

    ``faults`` is the job's whole list (its indices are the claim keys' indices); ``connect``
    returns the rendezvous store, or None when it cannot be reached, and is None standalone.
    """

    def __init__(self, faults: Sequence[Fault], *, rank: int, run_id: str,
                 connect: Callable[[], Any] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self._rank = rank
        self._run_id = run_id
        self._connect = connect
        self._sleep = sleep
        self._pending = [(i, f) for i, f in enumerate(faults) if f.kind in PROCESS_FAULT_KINDS and f.rank == rank]
        self._slow: list[tuple[float, int | None]] = []  # (extra seconds, first step past the period)

    @classmethod
    def from_env(cls, ctx: WorkerContext, connect: Callable[[], Any]) -> FaultInjector:
        """The injector of this process: faults from ``$SALAMANDER_FAULTS``, ``connect`` used only
        when a rendezvous endpoint is configured."""
        standalone = not os.environ.get(wire.ENV_RDZV_ENDPOINT, "")
        return cls(load_faults(), rank=ctx.rank, run_id=ctx.run_id, connect=None if standalone else connect)

    @property
    def idle(self) -> bool:
        """True when nothing is left to do in this process."""
        return not self._pending and not self._slow

    def on_step(self, step: int) -> None:
        """Fire what is due at ``step`` and apply any slow period. May not return (KillProcess,
        HangRank with no end) or raise :class:`InjectedFault`."""
        if not self._pending and not self._slow:
            return
        step = int(step)
        due = [(i, f) for i, f in self._pending if step >= f.at_step]
        if due:
            self._pending = [(i, f) for i, f in self._pending if step < f.at_step]
            for i, fault in due:
                if self._claim(i, fault):
                    self._fire(i, fault, step)
        if self._slow:
            self._slow = [(s, end) for s, end in self._slow if end is None or step < end]
            extra = sum(s for s, _ in self._slow)
            if extra > 0:
                self._sleep(extra)

    def _claim(self, index: int, fault: Fault) -> bool:
        if self._connect is None:
            return True  # standalone: once per process (it has left the pending list)
        store = self._connect()
        if store is None:
            log.warning("fault %d (%s) not injected: the rendezvous store is unreachable, so it cannot "
                        "be claimed once for the run", index, fault.kind.value)
            return False
        try:
            return wire.claim_fault(store, self._run_id, index)   # False: fired before, by any process
        except Exception as exc:  # noqa: BLE001 - injection must not fail training by accident
            log.warning("fault %d (%s) not injected: claiming it failed: %s", index, fault.kind.value, exc)
            return False

    def _fire(self, index: int, fault: Fault, step: int) -> None:
        kind = fault.kind
        log.warning("injecting fault %s at step %d on rank %d", kind.value, step, self._rank)
        _flush_output()
        if kind is FaultKind.KILL_PROCESS:
            os.kill(os.getpid(), signal.SIGKILL)
            while True:  # pragma: no cover - SIGKILL is not deferred
                time.sleep(1.0)
        elif kind is FaultKind.RAISE_EXCEPTION:
            raise InjectedFault(f"injected fault RaiseException (faults[{index}]) at step {step} on rank {self._rank}")
        elif kind is FaultKind.HANG_RANK:
            if fault.seconds > 0:
                self._sleep(fault.seconds)
            else:
                while True:  # until the process is killed (a hang detector, a restart)
                    self._sleep(3600.0)
        elif kind is FaultKind.SLOW_RANK:
            if fault.seconds > 0:
                self._slow.append((fault.seconds, step + fault.steps if fault.steps else None))


_injector: FaultInjector | None = None


def on_step(step: int, ctx: WorkerContext, connect: Callable[[], Any]) -> None:
    """Called by ``report()`` on every rank. Reads ``$SALAMANDER_FAULTS`` on the first call;
    afterwards, with nothing (left) to inject, it returns at once."""
    global _injector
    if _injector is None:
        _injector = FaultInjector.from_env(ctx, connect)
    _injector.on_step(step)
