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
from salamander_operator.liveness import DEFAULT_AGENT_TIMEOUT_S, AgentBeat, mark_lost_agents, regrouping
from salamander_operator.local.plane import ControlPlaneThread
from salamander_operator.local.view import RunView
from salamander_operator.local.workers import LocalWorkers
from salamander_operator.observed import WorkerPhase
from salamander_operator.reconcile import Event, Plan, reconcile
from salamander_operator.rendezvous import RendezvousHost
from salamander_operator.straggler_watch import StragglerWatch, placement
from salamander_operator.telemetry import OperatorTelemetry
from salamander_operator import worker_faults
from salamander_worker.telemetry import ENV_MULTIPROC_DIR, PodCollector

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
                 node_startup_s: float = NODE_STARTUP_S, metrics_port: int | None = None) -> None:
        """``node_startup_s``: how long a replacement *node* takes to come up. A worker replaced
        with its node (``ReplaceNode``) is started only after it, as a real new node would be, so
        the survivors first train on without it (shrink) and it joins later (grow).

        ``metrics_port``: serve the operator's and every worker's metrics on this port of
        127.0.0.1 (0 picks one; :attr:`metrics_endpoint` says which), as a cluster's operator
        and worker pods would; None serves nothing (they are still recorded)."""
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
        # Every local agent and training process writes its metrics here; this process serves them.
        self.metrics_dir = log_dir / "metrics"
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        metrics_env = {ENV_MULTIPROC_DIR: str(self.metrics_dir)}
        self.workers = LocalWorkers(self.ref, job.spec, self.host.endpoint, log_dir,
                                    {**control_env, **metrics_env, **(extra_env or {})})
        self.telemetry = OperatorTelemetry()
        self.telemetry.watch_control_plane(lambda: self.plane.server)
        self.metrics_endpoint = ""
        if metrics_port is not None:
            bound = self.telemetry.serve(metrics_port, addr="127.0.0.1", extra=[PodCollector(self.metrics_dir)])
            self.metrics_endpoint = f"127.0.0.1:{bound}"
        self.view = view or RunView(job.metadata.name)
        self.view.metrics_endpoint = self.metrics_endpoint
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
        self._previous = self.status
        self.stragglers = StragglerWatch()
        # `salamander trace <log_dir>` finds the run's store here (the store lives as long as the run)
        (log_dir / "run.json").write_text(json.dumps({
            "endpoint": self.host.endpoint, "run_id": self.ref.uid, "namespace": self.ref.namespace,
            "name": self.ref.name, "world_size": job.spec.replicas.max * job.spec.procs_per_node}) + "\n")

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
        started = time.perf_counter()
        plan = self._pass()
        self.telemetry.observe_pass(self.ref, self._previous, plan, time.perf_counter() - started)
        return plan

    def _pass(self) -> Plan:
        mono = time.monotonic()
        self._previous = self.status
        sessions = self._sessions()
        beats = [AgentBeat(i, s.last_heartbeat, s.connected, s.regrouping) for s in sessions
                 if (i := worker_index(self.ref, s.identity.pod)) is not None]
        observed = mark_lost_agents(self.workers.observe(), beats, mono, self.agent_timeout_s)
        progress = self.host.read_progress(self.ref.uid)
        self._inject_worker_faults(progress)
        self.health.sync(self.job.spec, self.status)
        steps = [StepBeat(s.step, s.step_time_s, s.step_at, s.regrouping) for s in sessions if s.connected]
        hang = self.health.check_hang(steps, mono)
        if hang is not None and hang.decision.restarts_processes and hang.decision.charged:
            evidence = hang.classification.evidence

            def restart() -> None:
                self.plane.server.restart_processes(self.ref.namespace, self.ref.name, evidence)

            observability = self.job.spec.observability
            if observability.trace_on_hang:  # the restart waits (<= 3 s) for the ranks' answers
                from salamander_operator import trace

                world = progress.world_size if progress else self.job.spec.replicas.max * self.job.spec.procs_per_node
                trace.trace_in_background(self.host, self.ref.uid, world_size=world, limit=observability.trace_spans,
                                          path=self.log_dir / f"trace-hang-{progress.step if progress else 0}.json",
                                          then=restart, note=self.view.note)
            else:
                restart()
        incidents = self.health.drain()
        now = datetime.datetime.now(datetime.UTC)
        nodes, worker_of_node = placement(self.ref, sessions)
        ready = sum(1 for w in observed if w.phase is WorkerPhase.RUNNING and w.ready and not w.deleting)
        straggling = self.stragglers.verdict(self.job.spec, self.plane.server.job_timings(self.ref.namespace,
                                                                                          self.ref.name),
                                             nodes, worker_of_node, ready, now)
        plan = reconcile(self.ref, self.job.spec, observed, self.status, progress, now, incidents, straggling,
                         regrouping=regrouping(beats))
        self.stragglers.applied(straggling, now)
        if any(e.reason == Reason.STRAGGLER_EVICTED for e in plan.events):
            self.health.planned_disruption()
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
        if progress is None:
            return
        for n, fault in worker_faults.due(self.job.spec.faults, progress.step, self._fired):
            self._fired[n] = time.time()
            self.workers.kill(fault.worker)
            self.view.event(Event("Warning", Reason.FAULT_INJECTED, worker_faults.message(n, fault, progress.step)))

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


def run_manifest(job: TrainingJob, runs_dir: Path = Path("runs"), timeout_s: float | None = None,
                 metrics_port: int | None = 0) -> RunOutcome:
    """``salamander run``: run ``job`` here, showing progress. Ctrl-C or SIGTERM stops it
    gracefully; a second one stops it at once. Metrics are served on ``metrics_port`` (0: a
    free port, printed; None: not served)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = runs_dir / f"{job.metadata.name}-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    local = LocalRun(job, log_dir, metrics_port=metrics_port)
    local.view.note(f"running {job.metadata.name}: {job.spec.replicas.min}..{job.spec.replicas.max} workers x "
                    f"{job.spec.procs_per_node} processes, rendezvous at {local.host.endpoint}, "
                    f"logs in {local.log_dir}")
    if local.metrics_endpoint:
        local.view.note(f"metrics at http://{local.metrics_endpoint}/metrics")
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return local.run(timeout_s)
    finally:
        signal.signal(signal.SIGTERM, previous)
