"""Run one TrainingJob on this machine with the operator's own reconcile logic.

:class:`LocalRun` hosts the rendezvous store, plays the pods with :class:`LocalWorkers`,
and loops: observe, :func:`reconcile`, apply, show. It ends when the job is terminal
and no worker process is left.
"""

from __future__ import annotations

import datetime
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salamander import wire
from salamander.api import FailureAction, FaultKind, Phase, Reason, TrainingJob, TrainingJobStatus
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander_operator.controlplane import JobCredentials
from salamander_operator.controlplane.server import AgentSession
from salamander_operator.desired import JobRef, worker_name
from salamander_operator.health import JobHealth, StepBeat, verdict, worker_index
from salamander_operator.incidents import Incident
from salamander_operator.liveness import DEFAULT_AGENT_TIMEOUT_S, AgentBeat, mark_lost_agents
from salamander_operator.local.plane import ControlPlaneThread
from salamander_operator.local.view import RunView
from salamander_operator.local.workers import LocalWorkers
from salamander_operator.observed import WorkerPhase
from salamander_operator.reconcile import Event, Plan, reconcile
from salamander_operator.rendezvous import RendezvousHost

log = logging.getLogger(__name__)


STOP_GRACE_S = 30.0  # after Ctrl-C, how long workers get to reach their next should_stop()
NODE_STARTUP_S = 15.0  # how long a replacement node takes to come up (see LocalRun)


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
                 poll_s: float = 0.2, extra_env: dict[str, str] | None = None,
                 node_startup_s: float = NODE_STARTUP_S) -> None:
        """``node_startup_s``: how long a replacement *node* takes to come up. A worker replaced
        with its node (``ReplaceNode``) is started only after it, as a real new node would be, so
        the survivors first train on without it (shrink) and it joins later (grow)."""
        self.job = job
        self.ref = JobRef(name=job.metadata.name, namespace=job.metadata.namespace,
                          uid=job.metadata.uid or uuid.uuid4().hex, generation=1)
        self.host = RendezvousHost(advertise_host="127.0.0.1", port=0, bind_host="127.0.0.1")
        self.health = JobHealth(self.ref, job.spec)
        credentials = JobCredentials()
        token = credentials.issue(self.ref.namespace, self.ref.name)
        self.plane = ControlPlaneThread(credentials, on_failure=self._on_failure_report)
        port = self.plane.start()
        control_env = {wire.ENV_CONTROL_ENDPOINT: f"127.0.0.1:{port}", wire.ENV_CONTROL_TOKEN: token}
        self.workers = LocalWorkers(self.ref, job.spec, self.host.endpoint, log_dir,
                                    {**control_env, **(extra_env or {})})
        self.view = view or RunView(job.metadata.name)
        self.status = TrainingJobStatus()
        self.log_dir = log_dir
        self.poll_s = poll_s
        self.stop_requested = threading.Event()
        self.agent_timeout_s = DEFAULT_AGENT_TIMEOUT_S
        self._fired: dict[int, float] = {}  # KillWorker fault index -> when it fired (epoch seconds)
        self._journaled: set[int] = set()
        self.node_startup_s = node_startup_s
        self._node_ready_at: dict[int, float] = {}  # worker -> when its replacement node is up
        self._wake = threading.Event()

    def _on_failure_report(self, session: AgentSession, report: pb.FailureReport) -> pb.Verdict | None:
        """Called on the control plane's thread: decide at once, reconcile soon."""
        if (session.identity.namespace, session.identity.job) != (self.ref.namespace, self.ref.name):
            return None
        decision = self.health.on_report(session.identity, report)
        self._wake.set()
        return verdict(decision)

    def _sessions(self) -> list[AgentSession]:
        return self.plane.server.job_sessions(self.ref.namespace, self.ref.name)

    def step(self) -> Plan:
        """One pass: observe, reconcile, apply. Once a stop is requested nothing new is started."""
        mono = time.monotonic()
        sessions = self._sessions()
        beats = [AgentBeat(i, s.last_heartbeat, s.connected) for s in sessions
                 if (i := worker_index(self.ref, s.identity.pod)) is not None]
        observed = mark_lost_agents(self.workers.observe(), beats, mono, self.agent_timeout_s)
        progress = self.host.read_progress(self.ref.uid)
        self._inject_worker_faults(progress)
        self.health.sync(self.job.spec, self.status)
        steps = [StepBeat(s.step, s.step_time_s, s.step_at, s.regrouping) for s in sessions if s.connected]
        hang = self.health.check_hang(steps, mono)
        if hang is not None and hang.decision.restarts_processes and hang.decision.charged:
            self.plane.server.restart_processes(self.ref.namespace, self.ref.name, hang.classification.evidence)
        incidents = self.health.drain()
        now = datetime.datetime.now(datetime.UTC)
        plan = reconcile(self.ref, self.job.spec, observed, self.status, progress, now, incidents)
        self.health.sync(self.job.spec, plan.status)  # restarts this pass charged start their recovery
        for index in plan.delete:
            self.workers.delete(index)
            self.plane.server.forget(self.ref.namespace, self.ref.name, worker_name(self.ref, index))
        for incident in plan.incidents:
            if incident.decision.action is FailureAction.REPLACE_NODE and incident.worker is not None:
                self._node_ready_at[incident.worker] = mono + self.node_startup_s
        if not self.stop_requested.is_set():
            avoid = frozenset(q.node for q in plan.status.quarantined_nodes)
            for index in plan.create:
                if self._node_ready_at.get(index, 0.0) <= mono:
                    self._node_ready_at.pop(index, None)
                    self.workers.create(index, avoid)
        for event in plan.events:
            self.view.event(event)
        self._journal(plan)
        self.status = plan.status
        self.view.update(self.status, progress)
        return plan

    def _inject_worker_faults(self, progress: wire.Progress | None) -> None:
        """KillWorker faults are the runtime's to inject (the others fire inside the processes)."""
        for n, fault in enumerate(self.job.spec.faults):
            if (fault.kind is FaultKind.KILL_WORKER and n not in self._fired and progress is not None
                    and progress.step >= fault.at_step):
                self._fired[n] = time.time()
                self.workers.kill(fault.worker)
                self.view.event(Event("Warning", Reason.FAULT_INJECTED,
                                      f"killed worker {fault.worker} at step {progress.step} (fault {n + 1})"))

    def _journal(self, plan: Plan) -> None:
        """Append this pass's incidents, newly fired faults, recoveries and restores to ``incidents.jsonl``."""
        records: list[dict[str, Any]] = []
        for n, fault in enumerate(self.job.spec.faults):
            if n in self._journaled:
                continue
            at = self._fired.get(n) if fault.kind is FaultKind.KILL_WORKER else self.host.fault_fired_at(self.ref.uid, n)
            if at is not None:
                self._journaled.add(n)
                records.append({"type": "fault", "fault": n, "kind": fault.kind.value, "rank": fault.rank,
                                "worker": fault.worker, "at_step": fault.at_step, "fired_at": at})
        records.extend(incident_record(i) for i in plan.incidents)
        healed = plan.status.last_failure
        if healed is not None and healed.recovered_at is not None and (
                self.status.last_failure is None or self.status.last_failure.recovered_at is None
                or self.status.last_failure.detected_at != healed.detected_at):
            records.append({"type": "recovered", "kind": healed.kind, "action": healed.action,
                            "detected_at": healed.detected_at.timestamp(),
                            "recovered_at": healed.recovered_at.timestamp()})
        restore = plan.status.last_restore
        if restore is not None and restore != self.status.last_restore:
            records.append({"type": "restore", "tier": restore.tier, "step": restore.step,
                            "restart_count": restore.restart_count, "seen_at": restore.at.timestamp()})
        if records:
            with (self.log_dir / "incidents.jsonl").open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

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
        # Ctrl-C and SIGTERM are turned into flags the loop reads between passes, so they are
        # never lost in a library that catches KeyboardInterrupt in the middle of a pass.
        signals: list[float] = []

        def on_signal(_signum: int, _frame: Any) -> None:
            signals.append(time.monotonic())
            self._wake.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} \
            if threading.current_thread() is threading.main_thread() else {}
        with self.view:
            try:
                while not self.finished():
                    try:
                        if len(signals) > 1:
                            break
                        if signals and not interrupted:
                            raise KeyboardInterrupt
                        self.step()
                        now = time.monotonic()
                        if timeout_s is not None and now - started > timeout_s:
                            self.view.note(f"timed out after {timeout_s:.0f} s; stopping the workers")
                            break
                        if stop_by is not None and now > stop_by:
                            self.view.note("the workers did not stop in time; killing them")
                            break
                        due = self.health.seconds_to_hang(time.monotonic())
                        # a failure report wakes the loop at once; a hang is judged on time
                        self._wake.wait(self.poll_s if due is None else min(self.poll_s, due + 0.001))
                        self._wake.clear()
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
                finally:
                    self.plane.stop()
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)
        wall = time.monotonic() - started
        self.view.summary(self.status, wall, str(self.log_dir))
        return RunOutcome(self.status, wall, self.view.first_loss, self.log_dir, interrupted)


def incident_record(incident: Incident) -> dict[str, Any]:
    """One incident as a JSON object (times in epoch seconds)."""
    c, d = incident.classification, incident.decision
    return {"type": "incident", "kind": c.kind, "severity": c.severity.name, "source": c.source.value,
            "worker": incident.worker, "pod": incident.pod, "node": incident.node, "action": d.action.value,
            "charged": d.charged, "why": d.why, "evidence": c.evidence[:300],
            "occurred_at": incident.occurred_at.timestamp() if incident.occurred_at else None,
            "detected_at": incident.detected_at.timestamp()}


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
