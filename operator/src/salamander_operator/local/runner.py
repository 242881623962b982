"""Run one TrainingJob on this machine with the operator's own reconcile logic.

:class:`LocalRun` hosts the rendezvous store, plays the pods with :class:`LocalWorkers`,
and loops: observe, :func:`reconcile`, apply, show. It ends when the job is terminal
and no worker process is left.
"""

from __future__ import annotations

import datetime
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from salamander.api import Phase, TrainingJob, TrainingJobStatus
from salamander_operator.desired import JobRef
from salamander_operator.local.view import RunView
from salamander_operator.local.workers import LocalWorkers
from salamander_operator.observed import WorkerPhase
from salamander_operator.reconcile import Plan, reconcile
from salamander_operator.rendezvous import RendezvousHost

log = logging.getLogger(__name__)


STOP_GRACE_S = 30.0  # after Ctrl-C, how long workers get to reach their next should_stop()


@dataclass(frozen=True)
class RunOutcome:
    status: TrainingJobStatus
    wall_s: float
    first_loss: float | None
    log_dir: Path
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.status.phase is Phase.SUCCEEDED else 1


class LocalRun:
    """One job run locally. ``step()`` is one reconcile pass; ``run()`` loops to the end."""

    def __init__(self, job: TrainingJob, log_dir: Path, view: RunView | None = None,
                 poll_s: float = 0.5, extra_env: dict[str, str] | None = None) -> None:
        self.job = job
        self.ref = JobRef(name=job.metadata.name, namespace=job.metadata.namespace,
                          uid=job.metadata.uid or uuid.uuid4().hex, generation=1)
        self.host = RendezvousHost(advertise_host="127.0.0.1", port=0, bind_host="127.0.0.1")
        self.workers = LocalWorkers(self.ref, job.spec, self.host.endpoint, log_dir, extra_env)
        self.view = view or RunView(job.metadata.name)
        self.status = TrainingJobStatus()
        self.log_dir = log_dir
        self.poll_s = poll_s
        self.stop_requested = threading.Event()

    def step(self) -> Plan:
        """One pass: observe, reconcile, apply. Once a stop is requested nothing new is started."""
        observed = self.workers.observe()
        progress = self.host.read_progress(self.ref.uid)
        now = datetime.datetime.now(datetime.UTC)
        plan = reconcile(self.ref, self.job.spec, observed, self.status, progress, now)
        for index in plan.delete:
            self.workers.delete(index)
        if not self.stop_requested.is_set():
            for index in plan.create:
                self.workers.create(index)
        for event in plan.events:
            self.view.event(event)
        self.status = plan.status
        self.view.update(self.status, progress)
        return plan

    def finished(self) -> bool:
        """The job is terminal (or stopping) and no worker process is left running; finished
        ones may stay, as finished pods do."""
        return (self.status.phase.terminal or self.stop_requested.is_set()) and all(
            w.phase in (WorkerPhase.SUCCEEDED, WorkerPhase.FAILED) and not w.deleting
            for w in self.workers.observe())

    def request_stop(self) -> None:
        """Ask the training to stop at its next ``should_stop`` check (a graceful Ctrl-C)."""
        self.stop_requested.set()
        self.host.request_stop(self.ref.uid)

    def run(self, timeout_s: float | None = None) -> RunOutcome:
        """Loop until the job ends. The first Ctrl-C (KeyboardInterrupt) stops the job gracefully,
        within :data:`STOP_GRACE_S`; a second one, or the timeout, stops the workers at once."""
        started = time.monotonic()
        stop_by: float | None = None
        interrupted = False
        with self.view:
            try:
                while not self.finished():
                    try:
                        self.step()
                        now = time.monotonic()
                        if timeout_s is not None and now - started > timeout_s:
                            self.view.note(f"timed out after {timeout_s:.0f} s; stopping the workers")
                            break
                        if stop_by is not None and now > stop_by:
                            self.view.note("the workers did not stop in time; killing them")
                            break
                        time.sleep(self.poll_s)
                    except KeyboardInterrupt:
                        if interrupted:
                            break
                        interrupted = True
                        self.view.note("stopping at the next step (Ctrl-C again to kill)...")
                        self.request_stop()
                        stop_by = time.monotonic() + STOP_GRACE_S
            finally:
                try:
                    self.workers.shutdown(grace_s=2.0 if interrupted else 10.0)
                except KeyboardInterrupt:
                    self.workers.shutdown(grace_s=0.0)
        wall = time.monotonic() - started
        self.view.summary(self.status, wall, str(self.log_dir))
        return RunOutcome(self.status, wall, self.view.first_loss, self.log_dir, interrupted)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_manifest(job: TrainingJob, runs_dir: Path = Path("runs"), timeout_s: float | None = None) -> RunOutcome:
    """``salamander run``: run ``job`` here, showing progress. Ctrl-C or SIGTERM stops it
    gracefully; a second one stops it at once."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    local = LocalRun(job, runs_dir / f"{job.metadata.name}-{stamp}")
    local.view.note(f"running {job.metadata.name}: {job.spec.replicas.min}..{job.spec.replicas.max} workers x "
                    f"{job.spec.procs_per_node} processes, rendezvous at {local.host.endpoint}, "
                    f"logs in {local.log_dir}")
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return local.run(timeout_s)
    finally:
        signal.signal(signal.SIGTERM, previous)
