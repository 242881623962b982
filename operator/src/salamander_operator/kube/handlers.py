"""kopf handlers: one supervising daemon per TrainingJob, woken by its pods' events and by
the failure of a node one of its workers runs on.

Each job's daemon loops ``observe -> reconcile -> apply`` (see :mod:`..reconcile`). It is the
only writer of the job's status, so it trusts the status it last wrote over the possibly
older one in its view of the object; after an operator restart it starts from the stored
status, which is all the state there is. Deleting a job runs :func:`cleanup` behind a
finalizer, which removes its pods and service even where no garbage collector runs.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import kopf

from salamander import wire
from salamander.api import (GROUP, PLURAL, VERSION, InvalidSpec, Reason, TrainingJobSpec, TrainingJobStatus, check_name,
                            parse_spec)
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander_operator.allocations import ClusterAllocations, ThroughputMeter, transition_seconds
from salamander_operator.controlplane import ControlPlaneServer, JobCredentials
from salamander_operator.controlplane.server import AgentSession
from salamander_operator import trace
from salamander_operator.desired import (JobRef, build_credential_secret, build_trace_config_map, build_worker_pod,
                                         build_worker_service, credential_secret_name, service_name,
                                         trace_config_map_name, worker_name)
from salamander_operator.kube.cluster import ClusterError, KubeCluster
from salamander_operator.health import SETTLE_S, JobHealth, StepBeat, verdict
from salamander_operator.liveness import DEFAULT_AGENT_TIMEOUT_S, AgentBeat, is_silent, mark_lost_agents, regrouping
from salamander_operator.nodes import (LABEL_QUARANTINED_BY, NodeState, mark_failed_nodes, node_state,
                                       quarantine_labels, quarantined_by, stranded)
from salamander_operator.observed import WorkerPhase, observe_pod
from salamander_operator.planner import JobDemand
from salamander_operator.reconcile import Plan, reconcile
from salamander_operator.rendezvous import RendezvousStore
from salamander_operator.straggler_watch import StragglerWatch, placement
from salamander_operator.telemetry import OperatorTelemetry
from salamander_operator import worker_faults

#: Set (to a fresh value) to ask for a trace of every rank; the trace ConfigMap carries the same value.
TRACE_REQUEST_ANNOTATION = "trace.salamander.dev/request"
#: On a trace ConfigMap written on a hang: the step the job was hung at.
TRACE_HANG_ANNOTATION = "trace.salamander.dev/hang-step"
RESYNC_S = 10.0        # a pass at least this often, even without events
ERROR_BACKOFF_S = 5.0  # after an unexpected error in a pass
NODE_TOMBSTONE_S = 3600.0  # how long a deleted node is remembered as deleted
LIVENESS_SCAN_S = 0.2  # how often agents' silence and hangs are checked (in memory)
PLAN_DEBOUNCE_S = 0.5  # capacity changes this close together are planned once (a rack going down)
PLAN_STARTUP_S = 3.0   # no plan in the operator's first seconds, while it lists the nodes and jobs


@dataclass
class OperatorContext:
    """What every handler shares; kopf passes it around as ``memo``. ``credentials`` holds each
    job's control-plane token, as read back from (or first written to) the job's Secret."""

    cluster: KubeCluster
    rendezvous: RendezvousStore | None  # hosted here, or a client of `salamander rendezvous`
    control_plane: ControlPlaneServer | None = None
    control_host: str = ""
    control_endpoint: str = ""  # control_host:<bound port>, once the control plane listens
    credentials: JobCredentials = field(default_factory=JobCredentials)
    agent_timeout_s: float = DEFAULT_AGENT_TIMEOUT_S
    triggers: dict[str, asyncio.Event] = field(default_factory=dict)
    health: dict[tuple[str, str], JobHealth] = field(default_factory=dict)  # by (namespace, name)
    nodes: dict[str, NodeState] = field(default_factory=dict)  # every node seen; deleted ones as tombstones
    node_quarantined_by: dict[str, str] = field(default_factory=dict)  # node -> its quarantined-by label
    job_nodes: dict[str, frozenset[str]] = field(default_factory=dict)  # job uid -> the nodes of its workers
    telemetry: OperatorTelemetry = field(default_factory=OperatorTelemetry)
    allocations: ClusterAllocations | None = None  # cross-job planning, when on
    started: float = field(default_factory=time.monotonic)
    _plan_causes: list[str] = field(default_factory=list)
    _plan_handle: asyncio.TimerHandle | None = None

    def request_plan(self, cause: str) -> None:
        """Plan the cluster soon (debounced; not before the startup grace), then wake the jobs
        whose worker count changed. Call on the operator's event loop."""
        if self.allocations is None:
            return
        if cause not in self._plan_causes:
            self._plan_causes.append(cause)
        if self._plan_handle is None:
            delay = max(PLAN_DEBOUNCE_S, self.started + PLAN_STARTUP_S - time.monotonic())
            self._plan_handle = asyncio.get_running_loop().call_later(delay, self._plan_now)

    def _plan_now(self) -> None:
        self._plan_handle = None
        causes, self._plan_causes = self._plan_causes, []
        if self.allocations is None or not causes:
            return
        cause = "; ".join(causes[:3]) + (f" (and {len(causes) - 3} more)" if len(causes) > 3 else "")
        try:
            changed = self.allocations.replan(cause)
        except Exception:  # noqa: BLE001 - a bad plan must never stop the operator; jobs keep their counts
            logging.getLogger(__name__).exception("cluster plan failed (%s)", cause)
            return
        self.telemetry.observe_plan(self.allocations)
        logging.getLogger(__name__).info("cluster plan (%s): %d jobs changed in %.1f ms", cause, len(changed),
                                         self.allocations.last_plan_s * 1000)
        for uid in changed.values():
            self.wake(uid)

    def on_agent_failure(self, session: AgentSession, report: pb.FailureReport) -> pb.Verdict | None:
        """A failure report from an agent (on the control plane's loop): decide now, so the agent
        acts at once, and wake the job's reconcile to record it. None for a job not supervised
        (yet): the agent then falls back to its own restart budget."""
        health = self.health.get((session.identity.namespace, session.identity.job))
        if health is None:
            return None
        decision = health.on_report(session.identity, report)
        self.wake(health.job.uid)
        # and again once the incident has settled (root cause vs symptoms), to record it
        asyncio.get_running_loop().call_later(SETTLE_S + 0.05, self.wake, health.job.uid)
        return verdict(decision)

    def trace_job(self, job: JobRef, sessions: list[AgentSession], spans: int, *,
                  annotations: dict[str, str], then: Callable[[], None] | None = None) -> None:
        """Collect every rank's timeline of ``job`` on a thread (up to 3 s), call ``then``, and
        leave the merged trace in the job's trace ConfigMap with ``annotations``. Call on the
        operator's event loop."""
        loop = asyncio.get_running_loop()
        assert self.rendezvous is not None
        world = sum(s.identity.rank_count for s in sessions if s.connected) or 1

        def write(merged: Any) -> str:
            manifest = build_trace_config_map(job, trace.pack(merged), annotations)
            asyncio.run_coroutine_threadsafe(self.cluster.put_config_map(manifest), loop).result(30)
            return f"ConfigMap {job.namespace}/{trace_config_map_name(job)}"

        trace.trace_in_background(self.rendezvous, job.uid, world_size=world, limit=spans, then=then, write=write)

    @property
    def rdzv_endpoint(self) -> str:
        return self.rendezvous.endpoint if self.rendezvous is not None else ""

    def wake(self, uid: str) -> None:
        event = self.triggers.get(uid)
        if event is not None:
            event.set()

    def observe_node(self, name: str, state: NodeState, quarantined_by: str = "") -> None:
        """Record a node's state from its watch (a tombstone for a deleted one), and wake the
        jobs with workers on it when it turns NotReady, Unknown or deleted. Most node events
        are heartbeat churn that changes neither, and wake nobody."""
        old = self.nodes.get(name)
        self.nodes[name] = state
        self.node_quarantined_by[name] = quarantined_by
        if state.deleted:
            self.node_quarantined_by.pop(name, None)
            horizon = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=NODE_TOMBSTONE_S)
            for gone in [n for n, s in self.nodes.items() if s.deleted and s.since is not None and s.since < horizon]:
                del self.nodes[gone]
        if state.failed and (old is None or (old.ready, old.deleted) != (state.ready, state.deleted)):
            for uid in self.jobs_on(name):
                self.wake(uid)

    def jobs_on(self, node: str) -> list[str]:
        """The jobs (uids) last seen with a worker on ``node``: a scan of one small set per job,
        and it runs only when a node fails."""
        return [uid for uid, nodes in self.job_nodes.items() if node in nodes]


def _status_of(raw: Any, logger: logging.Logger | logging.LoggerAdapter) -> TrainingJobStatus:
    try:
        return TrainingJobStatus.model_validate(dict(raw or {}))
    except ValueError as exc:  # a status someone else mangled: start from scratch, do not crash
        logger.warning("ignoring an unreadable status: %s", exc)
        return TrainingJobStatus()


#: Changes the operator makes itself: the survivors' broken processes are part of them, not failures.
_PLANNED_DISRUPTIONS = {Reason.STRAGGLER_EVICTED, Reason.RESCALED, Reason.SUSPENDED}


@dataclass
class JobSupervisor:
    """The per-job loop state. ``status`` is the last status written (or read at start)."""

    ctx: OperatorContext
    status: TrainingJobStatus
    service_ready: bool = False
    credential_ready: bool = False
    # The quarantine labels this supervisor has put on nodes: node -> the `until` it wrote, None
    # where it does not know (quarantined before an operator restart), so it writes them again.
    node_labels: dict[str, datetime.datetime | None] = field(default_factory=dict)
    on_failed_nodes: frozenset[int] = frozenset()  # workers on a NotReady/deleted node, this pass
    stranded: tuple[int, ...] = ()  # workers being deleted on a failed node, stuck Terminating
    stragglers: StragglerWatch = field(default_factory=StragglerWatch)
    meter: ThroughputMeter = field(default_factory=ThroughputMeter)
    faults_claimed: set[int] = field(default_factory=set)   # KillWorker faults this supervisor has claimed

    def __post_init__(self) -> None:
        self.node_labels = {q.node: None for q in self.status.quarantined_nodes}

    def next_pass_in(self, resync_s: float) -> float:
        """Seconds until the next pass that no event asks for: the resync period, or sooner when
        a quarantine or a replacement backoff ends then, so that it is released on time."""
        ends = [q.until for q in self.status.quarantined_nodes]
        if self.status.replacements_after is not None:
            ends.append(self.status.replacements_after)
        if self.status.phase.terminal or not ends:
            return resync_s
        soonest = min(ends)
        left = (soonest - datetime.datetime.now(datetime.UTC)).total_seconds()
        return min(resync_s, max(0.05, left + 0.05))

    def agent_beats(self, ref: JobRef) -> list[AgentBeat]:
        """The newest heartbeat of each of this job's registered agents, by worker index."""
        plane = self.ctx.control_plane
        if plane is None:
            return []
        beats = []
        for session in plane.job_sessions(ref.namespace, ref.name):
            prefix, _, index = session.identity.pod.rpartition("-")
            if prefix == f"{ref.name}-worker" and index.isdigit():
                beats.append(AgentBeat(int(index), session.last_heartbeat, session.connected, session.regrouping))
        return beats

    async def inject_worker_faults(self, ref: JobRef, spec: TrainingJobSpec, progress: wire.Progress | None,
                                   body: kopf.Body) -> None:
        """KillWorker faults are the operator's to fire here (the other kinds fire inside the
        training processes). Once the job has reached a fault's step and the worker's agent is
        connected, the fault is claimed in the rendezvous store (so it fires once per run, an
        operator restart included when the store outlives it) and the agent is told to kill its
        worker: processes and agent at once, as a lost node would be."""
        plane, store = self.ctx.control_plane, self.ctx.rendezvous
        if plane is None or store is None or progress is None:
            return
        for n, fault in worker_faults.due(spec.faults, progress.step, self.faults_claimed):
            pod = worker_name(ref, fault.worker)
            if not any(s.connected and s.identity.pod == pod for s in plane.job_sessions(ref.namespace, ref.name)):
                continue   # its agent is not up (yet): a later pass fires it
            self.faults_claimed.add(n)
            if not await asyncio.to_thread(store.claim_fault, ref.uid, n):
                continue   # fired before (by an earlier operator), or the store cannot say
            message = worker_faults.message(n, fault, progress.step)
            plane.kill_worker(ref.namespace, ref.name, pod, message)
            kopf.event(body, type="Warning", reason=Reason.FAULT_INJECTED, message=message)

    async def ensure_credential(self, ref: JobRef) -> None:
        """Adopt the token in the job's Secret (after an operator restart), or create one."""
        cluster, name = self.ctx.cluster, credential_secret_name(ref)
        for _ in range(2):  # a second read covers a Secret created between our read and create
            secret = await cluster.read_secret(ref.namespace, name)
            token = ((secret or {}).get("data") or {}).get(wire.CREDENTIAL_KEY)
            if token:
                try:
                    value = base64.b64decode(token, validate=True).decode()
                except (ValueError, UnicodeDecodeError):
                    raise ClusterError(f"secret {ref.namespace}/{name} holds a malformed token") from None
                self.ctx.credentials.set(ref.namespace, ref.name, value)
                self.credential_ready = True
                return
            if secret is None and await cluster.create(
                    build_credential_secret(ref, self.ctx.credentials.issue(ref.namespace, ref.name))):
                self.credential_ready = True
                return
        raise ClusterError(f"secret {ref.namespace}/{name} exists but holds no {wire.CREDENTIAL_KEY!r}")

    async def reconcile_once(self, ref: JobRef, raw_spec: Any, body: kopf.Body,
                             logger: logging.Logger | logging.LoggerAdapter) -> Plan:
        started = time.perf_counter()
        spec: TrainingJobSpec | InvalidSpec
        try:
            check_name(ref.name)
            spec = parse_spec(dict(raw_spec) if raw_spec is not None else None)
        except InvalidSpec as exc:
            spec = exc
        pods = await self.ctx.cluster.list_worker_pods(ref.namespace, ref.name, ref.uid)
        observed = [w for w in (observe_pod(p) for p in pods) if w is not None]
        beats = self.agent_beats(ref)
        observed = mark_lost_agents(observed, beats, time.monotonic(), self.ctx.agent_timeout_s)
        nodes = self.ctx.nodes
        self.ctx.job_nodes[ref.uid] = frozenset(w.node for w in observed if w.node)
        self.stranded = tuple(stranded(observed, nodes))
        observed = mark_failed_nodes(observed, nodes)
        self.on_failed_nodes = frozenset(w.index for w in observed
                                         if w.node in nodes and nodes[w.node].failed and not w.deleting)
        progress = None
        if self.ctx.rendezvous is not None:
            progress = await asyncio.to_thread(self.ctx.rendezvous.read_progress, ref.uid)
        if isinstance(spec, TrainingJobSpec) and not self.status.phase.terminal:
            await self.inject_worker_faults(ref, spec, progress, body)
        incidents = []
        if isinstance(spec, TrainingJobSpec):
            health = self.ctx.health.get((ref.namespace, ref.name))
            if health is None or health.job.uid != ref.uid:
                health = self.ctx.health[(ref.namespace, ref.name)] = JobHealth(ref, spec)
            health.sync(spec, self.status)
            incidents = health.drain()
        now = datetime.datetime.now(datetime.UTC)
        allocation = None
        if self.ctx.allocations is not None and isinstance(spec, TrainingJobSpec) and not self.status.phase.terminal:
            key = f"{ref.namespace}/{ref.name}"
            self.meter.procs_per_node = spec.procs_per_node
            self.meter.observe(progress)
            demand = JobDemand(key, spec.replicas.min, spec.replicas.max, weight=spec.scheduling.weight,
                               priority=spec.scheduling.priority,
                               throughput=self.meter.curve(spec.scheduling.scaling_exponent),
                               transition_s=transition_seconds(spec, self.status))
            if self.ctx.allocations.submit(key, ref.uid, demand, self.status.allocation):
                self.ctx.request_plan(f"job {key} {'changed' if self.status.allocation else 'submitted'}")
            allocation = self.ctx.allocations.allocation(key)
            if allocation is None:
                logger.debug("waiting for the cluster planner's first plan")
                return Plan(status=self.status)
        straggling = None
        if isinstance(spec, TrainingJobSpec) and self.ctx.control_plane is not None:
            sessions = self.ctx.control_plane.job_sessions(ref.namespace, ref.name)
            nodes_of, worker_of_node = placement(ref, sessions)
            ready = sum(1 for w in observed if w.phase is WorkerPhase.RUNNING and w.ready and not w.deleting)
            straggling = self.stragglers.verdict(spec, self.ctx.control_plane.job_timings(ref.namespace, ref.name),
                                                 nodes_of, worker_of_node, ready, now)
        plan = reconcile(ref, spec, observed, self.status, progress, now, incidents, straggling, allocation,
                         regrouping(beats))
        if isinstance(spec, TrainingJobSpec):
            health.sync(spec, plan.status)  # restarts this pass charged start their recovery
            if any(e.reason in _PLANNED_DISRUPTIONS for e in plan.events):
                health.planned_disruption()
        if plan.status.phase.terminal and self.ctx.allocations is not None:
            if self.ctx.allocations.finish(f"{ref.namespace}/{ref.name}"):
                self.ctx.request_plan(f"job {ref.namespace}/{ref.name} finished")
        previous = self.status
        await self.apply(ref, spec, plan, body, logger)
        if straggling is not None:
            self.stragglers.applied(straggling, now)
        self.ctx.telemetry.observe_pass(ref, previous, plan, time.perf_counter() - started)
        return plan

    async def apply(self, ref: JobRef, spec: TrainingJobSpec | InvalidSpec, plan: Plan, body: kopf.Body,
                    logger: logging.Logger | logging.LoggerAdapter) -> None:
        cluster = self.ctx.cluster
        live = isinstance(spec, TrainingJobSpec) and not plan.status.phase.terminal
        if live and not self.credential_ready:  # also after an operator restart, with no pod to create
            await self.ensure_credential(ref)
        for index in plan.delete:
            # On a failed node no kubelet will confirm a graceful deletion: remove the pod at once,
            # or it stays Terminating and holds the name its replacement needs.
            force = index in self.on_failed_nodes
            if await cluster.delete("Pod", ref.namespace, worker_name(ref, index), grace_period_s=0 if force else None):
                logger.info("deleted worker %d%s", index, " (on a failed node, without grace)" if force else "")
            if self.ctx.control_plane is not None:  # its replacement's agent registers anew
                self.ctx.control_plane.forget(ref.namespace, ref.name, worker_name(ref, index))
        for index in self.stranded:
            if await cluster.delete("Pod", ref.namespace, worker_name(ref, index), grace_period_s=0):
                logger.info("removed worker %d, stuck terminating on a failed node", index)
        if plan.create and isinstance(spec, TrainingJobSpec):
            if not self.service_ready:
                await cluster.create(build_worker_service(ref))
                self.service_ready = True
            avoid = {q.node for q in plan.status.quarantined_nodes}
            for index in plan.create:
                if await cluster.create(build_worker_pod(ref, spec, index, self.ctx.rdzv_endpoint,
                                                         self.ctx.control_endpoint, avoid_nodes=avoid)):
                    logger.info("created worker %d", index)
        for event in plan.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        if plan.status != self.status:
            await cluster.patch_status(ref.namespace, ref.name, plan.status.model_dump(mode="json", by_alias=True))
            if plan.status.phase.terminal and not self.status.phase.terminal and self.ctx.rendezvous is not None:
                await asyncio.to_thread(self.ctx.rendezvous.forget, ref.uid)
            self.status = plan.status
        await self.label_nodes(ref, plan.status, logger)

    async def label_nodes(self, ref: JobRef, status: TrainingJobStatus,
                          logger: logging.Logger | logging.LoggerAdapter) -> None:
        """Mark the job's quarantined nodes with labels, and unmark the released ones: the
        difference between ``status.quarantinedNodes`` and what this supervisor has labelled.
        A failed patch is logged and tried again on a later pass; it never fails the pass. A
        node another job has labelled since keeps that job's labels."""
        wanted = {q.node: q.until for q in status.quarantined_nodes}
        mine = quarantined_by(ref.namespace, ref.name)
        changes: list[tuple[str, datetime.datetime | None]] = [
            (node, until) for node, until in wanted.items() if self.node_labels.get(node, ...) != until]
        changes += [(node, None) for node in self.node_labels if node not in wanted]
        for node, until in changes:
            if until is None and self.ctx.node_quarantined_by.get(node, mine) not in (mine, ""):
                self.node_labels.pop(node, None)  # re-quarantined by another job: its labels now
                continue
            try:
                present = await self.ctx.cluster.label_node(node, quarantine_labels(ref.namespace, ref.name, until))
            except Exception as exc:  # noqa: BLE001 - labels inform; the affinity is what keeps the job off
                logger.warning("could not %s node %s: %s; trying again on a later pass",
                               "label" if until is not None else "unlabel", node, exc)
                continue
            if until is None:
                self.node_labels.pop(node, None)
            else:
                self.node_labels[node] = until
            if present:
                logger.info("%s node %s", f"labelled quarantined until {until:%Y-%m-%dT%H:%M:%SZ}"
                            if until is not None else "removed the quarantine labels of", node)


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach Salamander's handlers to ``registry`` (the operator's or a test's own)."""

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Keep kopf's bookkeeping in annotations: the status schema is structural and owned by us.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration")
        settings.persistence.finalizer = f"{GROUP}/cleanup"
        settings.posting.level = logging.WARNING  # our own Events, not every log line
        settings.watching.server_timeout = 300

    @kopf.on.startup(registry=registry)
    async def start_control_plane(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        ctx: OperatorContext = memo.context
        if ctx.control_plane is not None:
            ctx.control_plane.servicer.on_failure = ctx.on_agent_failure
            port = await ctx.control_plane.start()
            ctx.control_endpoint = f"{ctx.control_host}:{port}" if ctx.control_host else ""
            logger.info("control plane listening on port %d", port)

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=5.0,
                 when=lambda memo, **_: memo.context.control_plane is not None)
    async def watch_liveness(uid: str, namespace: str, name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                             **_: Any) -> None:
        """Wake the job's reconcile as soon as one of its agents falls silent or starts
        regrouping, and restart its processes as soon as it hangs: an in-memory scan of the
        control plane's sessions every LIVENESS_SCAN_S, with no API calls."""
        ctx: OperatorContext = memo.context
        plane = ctx.control_plane
        assert plane is not None
        reported: set[str] = set()
        regrouped: set[str] = set()
        while not stopped:
            now = time.monotonic()
            sessions = plane.job_sessions(namespace, name)
            silent = {s.session_id for s in sessions
                      if is_silent(s.last_heartbeat, s.connected, now, ctx.agent_timeout_s)}
            regrouping_now = {s.session_id for s in sessions if s.regrouping and s.connected}
            if silent - reported or regrouping_now - regrouped:   # (a completing job removes regrouping workers)
                ctx.wake(uid)
            reported, regrouped = silent, regrouping_now
            health = ctx.health.get((namespace, name))
            if health is not None:
                steps = [StepBeat(s.step, s.step_time_s, s.step_at, s.regrouping) for s in sessions if s.connected]
                hang = health.check_hang(steps, now)
                if hang is not None:
                    if hang.decision.restarts_processes and hang.decision.charged:
                        evidence = hang.classification.evidence

                        def restart(evidence: str = evidence) -> None:
                            plane.restart_processes(namespace, name, evidence)

                        observability = health.spec.observability
                        if observability.trace_on_hang and ctx.rendezvous is not None:
                            # the restart waits (<= 3 s) for every rank's timeline of the hang
                            step = max((s.step for s in sessions), default=0)
                            ctx.trace_job(health.job, sessions, observability.trace_spans, then=restart,
                                          annotations={TRACE_HANG_ANNOTATION: str(step)})
                        else:
                            restart()
                    ctx.wake(uid)
            due = health.seconds_to_hang(time.monotonic()) if health is not None else None
            await stopped.wait(LIVENESS_SCAN_S if due is None else min(LIVENESS_SCAN_S, due + 0.001))

    @kopf.on.field(GROUP, VERSION, PLURAL, field=("metadata", "annotations", TRACE_REQUEST_ANNOTATION),
                   registry=registry)
    async def trace_requested(name: str, namespace: str, uid: str, new: Any, spec: kopf.Spec, memo: kopf.Memo,
                              logger: logging.Logger, **_: Any) -> None:
        """``salamander trace NAMESPACE/JOB`` (or anyone) set the job's trace-request annotation:
        collect every rank's timeline into the job's trace ConfigMap, annotated with the request."""
        ctx: OperatorContext = memo.context
        if not new or ctx.rendezvous is None or ctx.control_plane is None:
            return
        try:
            spans = parse_spec(dict(spec)).observability.trace_spans
        except InvalidSpec:
            spans = 2000
        sessions = ctx.control_plane.job_sessions(namespace, name)
        ctx.trace_job(JobRef(name=name, namespace=namespace, uid=uid), sessions, spans,
                      annotations={TRACE_REQUEST_ANNOTATION: str(new)})
        logger.info("collecting a trace of %d agents' ranks (request %s)", len(sessions), new)

    @kopf.on.cleanup(registry=registry)
    async def stop_control_plane(memo: kopf.Memo, **_: Any) -> None:
        ctx: OperatorContext = memo.context
        if ctx.control_plane is not None:
            await ctx.control_plane.stop()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A fresh registry has none of kopf's default login handlers: use the same source as
        # our own API client (in-cluster service account, else $KUBECONFIG).
        return kopf.login_via_client(**kwargs)

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=10.0)
    async def supervise(name: str, namespace: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
                        status: kopf.Status, body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                        logger: logging.Logger, **_: Any) -> None:
        ctx: OperatorContext = memo.context
        trigger = ctx.triggers.setdefault(uid, asyncio.Event())
        supervisor = JobSupervisor(ctx, _status_of(status, logger))
        try:
            while not stopped:
                trigger.clear()
                ref = JobRef(name=name, namespace=namespace, uid=uid, generation=int(meta.get("generation") or 0))
                try:
                    await supervisor.reconcile_once(ref, spec, body, logger)
                    delay = supervisor.next_pass_in(RESYNC_S)
                except Exception as exc:  # noqa: BLE001 - a bad pass must never kill the job's loop
                    logger.exception("reconcile pass failed: %s", exc)
                    delay = ERROR_BACKOFF_S
                try:
                    await asyncio.wait_for(trigger.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            ctx.triggers.pop(uid, None)
            ctx.job_nodes.pop(uid, None)

    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def spec_changed(uid: str, memo: kopf.Memo, **_: Any) -> None:
        memo.context.wake(uid)

    @kopf.on.event("", "v1", "pods", labels={wire.LABEL_MANAGED_BY: wire.MANAGED_BY}, registry=registry)
    async def pod_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            memo.context.wake(ref.get("uid", ""))

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_changed(name: str, type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        """The node channel: keep every node's readiness (a tombstone once deleted) and wake the
        jobs with a worker on a node that just failed. Their reconcile fails those workers."""
        ctx: OperatorContext = memo.context
        if type == "DELETED":
            ctx.observe_node(name, NodeState(ready=None, deleted=True, reason="Deleted",
                                             since=datetime.datetime.now(datetime.UTC)))
        else:
            labels = body.get("metadata", {}).get("labels") or {}
            ctx.observe_node(name, node_state(body), labels.get(LABEL_QUARANTINED_BY) or "")
        if ctx.allocations is not None:
            was = ctx.allocations.nodes.get(name)
            if ctx.allocations.observe_node(name, None if type == "DELETED" else body):
                now = ctx.allocations.nodes.get(name)
                what = "deleted" if now is None else "schedulable" if now else \
                    "not schedulable" if was is not None else "seen, not schedulable"
                ctx.request_plan(f"node {name} {what}")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    async def cleanup(name: str, namespace: str, uid: str, status: kopf.Status, memo: kopf.Memo,
                      logger: logging.Logger, **_: Any) -> None:
        ctx: OperatorContext = memo.context
        ref = JobRef(name=name, namespace=namespace, uid=uid)
        mine = quarantined_by(namespace, name)
        for q in _status_of(status, logger).quarantined_nodes:  # nodes it still kept out: unmark them
            if ctx.node_quarantined_by.get(q.node, mine) not in (mine, ""):
                continue  # another job's labels now
            try:
                await ctx.cluster.label_node(q.node, quarantine_labels(namespace, name, None))
            except Exception as exc:  # noqa: BLE001 - labels inform; never block the job's deletion
                logger.warning("could not remove the quarantine labels of node %s: %s", q.node, exc)
        ctx.job_nodes.pop(uid, None)
        if ctx.allocations is not None and ctx.allocations.finish(f"{namespace}/{name}"):
            ctx.request_plan(f"job {namespace}/{name} deleted")
        for pod in await ctx.cluster.list_worker_pods(namespace, name, uid):
            await ctx.cluster.delete("Pod", namespace, pod["metadata"]["name"])
        await ctx.cluster.delete("Service", namespace, service_name(ref))
        await ctx.cluster.delete("Secret", namespace, credential_secret_name(ref))
        await ctx.cluster.delete("ConfigMap", namespace, trace_config_map_name(ref))
        ctx.credentials.forget(namespace, name)
        ctx.health.pop((namespace, name), None)
        ctx.telemetry.forget(namespace, name)
        if ctx.rendezvous is not None:
            await asyncio.to_thread(ctx.rendezvous.forget, uid)
        logger.info("removed the pods and service of %s/%s", namespace, name)
