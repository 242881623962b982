"""Run one TrainingJob on this machine with the operator's own reconcile logic.

:class:`LocalRun` hosts the rendezvous store, plays the pods with :class:`LocalWorkers`,
and loops: observe, :func:`reconcile`, apply, show. It ends when the job is terminal
and no worker process is left.
"""

from __future__ import annotations

import datetime
import logging
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


@dataclass(frozen=True)
class RunOutcome:
    status: TrainingJobStatus
    wall_s: float
    first_loss: float | None
    log_dir: Path

    @property
    def exit_code(self) -> int:
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
        observed = self.workers.observe()
        progress = self.host.read_progress(self.ref.uid)
        now = datetime.datetime.now(datetime.UTC)
        plan = reconcile(self.ref, self.job.spec, observed, self.status, progress, now)
        for index in plan.delete:
            self.workers.delete(index)
        for index in plan.create:
            self.workers.create(index)
        for event in plan.events:
            self.view.event(event)
        self.status = plan.status
        self.view.update(self.status, progress)
        return plan

    def finished(self) -> bool:
        """The job is terminal and no worker process is left running (finished ones may stay,
        as finished pods do)."""
        return self.status.phase.terminal and all(
            w.phase in (WorkerPhase.SUCCEEDED, WorkerPhase.FAILED) and not w.deleting
            for w in self.workers.observe())

    def request_stop(self) -> None:
        """Ask the training to stop at its next ``should_stop`` check (a graceful Ctrl-C)."""
        self.stop_requested.set()
        self.host.request_stop(self.ref.uid)

    def run(self, timeout_s: float | None = None) -> RunOutcome:
        started = time.monotonic()
        try:
            with self.view:
                while not self.finished():
                    self.step()
                    if timeout_s is not None and time.monotonic() - started > timeout_s:
                        self.view.note(f"timed out after {timeout_s:.0f} s; stopping the workers")
                        break
                    time.sleep(self.poll_s)
        finally:
            self.workers.shutdown()
        wall = time.monotonic() - started
        self.view.summary(self.status, wall, str(self.log_dir))
        return RunOutcome(self.status, wall, self.view.first_loss, self.log_dir)


def run_manifest(job: TrainingJob, runs_dir: Path = Path("runs"), timeout_s: float | None = None) -> RunOutcome:
    """``salamander run``: run ``job`` here, showing progress; Ctrl-C stops it gracefully,
    a second Ctrl-C at once."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    local = LocalRun(job, runs_dir / f"{job.metadata.name}-{stamp}")
    local.view.note(f"running {job.metadata.name}: {job.spec.replicas.min}..{job.spec.replicas.max} workers x "
                    f"{job.spec.procs_per_node} processes, rendezvous at {local.host.endpoint}, "
                    f"logs in {local.log_dir}")
    try:
        return local.run(timeout_s)
    except KeyboardInterrupt:
        local.view.note("stopping (Ctrl-C again to kill)...")
        local.request_stop()
        try:
            deadline = time.monotonic() + 30
            while not local.finished() and time.monotonic() < deadline:
                local.step()
                time.sleep(local.poll_s)
        except KeyboardInterrupt:
            pass
        local.workers.shutdown(grace_s=2.0)
        return RunOutcome(local.status, 0.0, local.view.first_loss, local.log_dir)
