"""kopf handlers: one supervising daemon per TrainingJob, woken by its pods' events.

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
from typing import Any

import kopf

from salamander import wire
from salamander.api import (GROUP, PLURAL, VERSION, InvalidSpec, TrainingJobSpec, TrainingJobStatus, check_name,
                            parse_spec)
from salamander_operator.controlplane import ControlPlaneServer, JobCredentials
from salamander_operator.desired import (JobRef, build_credential_secret, build_worker_pod, build_worker_service,
                                         credential_secret_name, service_name, worker_name)
from salamander_operator.kube.cluster import ClusterError, KubeCluster
from salamander_operator.liveness import DEFAULT_AGENT_TIMEOUT_S, AgentBeat, is_silent, mark_lost_agents
from salamander_operator.observed import observe_pod
from salamander_operator.reconcile import Plan, reconcile
from salamander_operator.rendezvous import RendezvousHost

RESYNC_S = 10.0        # a pass at least this often, even without events
ERROR_BACKOFF_S = 5.0  # after an unexpected error in a pass
LIVENESS_SCAN_S = 0.5  # how often agents' silence is checked (in memory)


@dataclass
class OperatorContext:
    """What every handler shares; kopf passes it around as ``memo``. ``credentials`` holds each
    job's control-plane token, as read back from (or first written to) the job's Secret."""

    cluster: KubeCluster
    rendezvous: RendezvousHost | None
    control_plane: ControlPlaneServer | None = None
    control_host: str = ""
    control_endpoint: str = ""  # control_host:<bound port>, once the control plane listens
    credentials: JobCredentials = field(default_factory=JobCredentials)
    agent_timeout_s: float = DEFAULT_AGENT_TIMEOUT_S
    triggers: dict[str, asyncio.Event] = field(default_factory=dict)

    @property
    def rdzv_endpoint(self) -> str:
        return self.rendezvous.endpoint if self.rendezvous is not None else ""

    def wake(self, uid: str) -> None:
        event = self.triggers.get(uid)
        if event is not None:
            event.set()


def _status_of(raw: Any, logger: logging.Logger | logging.LoggerAdapter) -> TrainingJobStatus:
    try:
        return TrainingJobStatus.model_validate(dict(raw or {}))
    except ValueError as exc:  # a status someone else mangled: start from scratch, do not crash
        logger.warning("ignoring an unreadable status: %s", exc)
        return TrainingJobStatus()


@dataclass
class JobSupervisor:
    """The per-job loop state. ``status`` is the last status written (or read at start)."""

    ctx: OperatorContext
    status: TrainingJobStatus
    service_ready: bool = False
    credential_ready: bool = False
    def agent_beats(self, ref: JobRef) -> list[AgentBeat]:
        """The newest heartbeat of each of this job's registered agents, by worker index."""
        plane = self.ctx.control_plane
        if plane is None:
            return []
        beats = []
        for session in plane.job_sessions(ref.namespace, ref.name):
            prefix, _, index = session.identity.pod.rpartition("-")
            if prefix == f"{ref.name}-worker" and index.isdigit():
                beats.append(AgentBeat(int(index), session.last_heartbeat, session.connected))
        return beats

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
        spec: TrainingJobSpec | InvalidSpec
        try:
            check_name(ref.name)
            spec = parse_spec(dict(raw_spec) if raw_spec is not None else None)
        except InvalidSpec as exc:
            spec = exc
        pods = await self.ctx.cluster.list_worker_pods(ref.namespace, ref.name, ref.uid)
        observed = [w for w in (observe_pod(p) for p in pods) if w is not None]
        observed = mark_lost_agents(observed, self.agent_beats(ref), time.monotonic(), self.ctx.agent_timeout_s)
        progress = None
        if self.ctx.rendezvous is not None:
            progress = await asyncio.to_thread(self.ctx.rendezvous.read_progress, ref.uid)
        plan = reconcile(ref, spec, observed, self.status, progress, datetime.datetime.now(datetime.UTC))
        await self.apply(ref, spec, plan, body, logger)
        return plan

    async def apply(self, ref: JobRef, spec: TrainingJobSpec | InvalidSpec, plan: Plan, body: kopf.Body,
                    logger: logging.Logger | logging.LoggerAdapter) -> None:
        cluster = self.ctx.cluster
        live = isinstance(spec, TrainingJobSpec) and not plan.status.phase.terminal
        if live and not self.credential_ready:  # also after an operator restart, with no pod to create
            await self.ensure_credential(ref)
        for index in plan.delete:
            if await cluster.delete("Pod", ref.namespace, worker_name(ref, index)):
                logger.info("deleted worker %d", index)
            if self.ctx.control_plane is not None:  # its replacement's agent registers anew
                self.ctx.control_plane.forget(ref.namespace, ref.name, worker_name(ref, index))
        if plan.create and isinstance(spec, TrainingJobSpec):
            if not self.service_ready:
                await cluster.create(build_worker_service(ref))
                self.service_ready = True
            for index in plan.create:
                if await cluster.create(build_worker_pod(ref, spec, index, self.ctx.rdzv_endpoint,
                                                         self.ctx.control_endpoint)):
                    logger.info("created worker %d", index)
        for event in plan.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        if plan.status != self.status:
            await cluster.patch_status(ref.namespace, ref.name, plan.status.model_dump(mode="json", by_alias=True))
            if plan.status.phase.terminal and not self.status.phase.terminal and self.ctx.rendezvous is not None:
                await asyncio.to_thread(self.ctx.rendezvous.forget, ref.uid)
            self.status = plan.status


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
            port = await ctx.control_plane.start()
            ctx.control_endpoint = f"{ctx.control_host}:{port}" if ctx.control_host else ""
            logger.info("control plane listening on port %d", port)

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=5.0,
                 when=lambda memo, **_: memo.context.control_plane is not None)
    async def watch_liveness(uid: str, namespace: str, name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                             **_: Any) -> None:
        """Wake the job's reconcile as soon as one of its agents falls silent: an in-memory scan
        of the control plane's sessions twice a second, with no API calls."""
        ctx: OperatorContext = memo.context
        assert ctx.control_plane is not None
        reported: set[str] = set()
        while not stopped:
            now = time.monotonic()
            silent = {s.session_id for s in ctx.control_plane.job_sessions(namespace, name)
                      if is_silent(s.last_heartbeat, s.connected, now, ctx.agent_timeout_s)}
            if silent - reported:
                ctx.wake(uid)
            reported = silent
            await stopped.wait(LIVENESS_SCAN_S)

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
                    delay = RESYNC_S
                except Exception as exc:  # noqa: BLE001 - a bad pass must never kill the job's loop
                    logger.exception("reconcile pass failed: %s", exc)
                    delay = ERROR_BACKOFF_S
                try:
                    await asyncio.wait_for(trigger.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            ctx.triggers.pop(uid, None)

    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def spec_changed(uid: str, memo: kopf.Memo, **_: Any) -> None:
        memo.context.wake(uid)

    @kopf.on.event("", "v1", "pods", labels={wire.LABEL_MANAGED_BY: wire.MANAGED_BY}, registry=registry)
    async def pod_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            memo.context.wake(ref.get("uid", ""))

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    async def cleanup(name: str, namespace: str, uid: str, memo: kopf.Memo, logger: logging.Logger,
                      **_: Any) -> None:
        ctx: OperatorContext = memo.context
        ref = JobRef(name=name, namespace=namespace, uid=uid)
        for pod in await ctx.cluster.list_worker_pods(namespace, name, uid):
            await ctx.cluster.delete("Pod", namespace, pod["metadata"]["name"])
        await ctx.cluster.delete("Service", namespace, service_name(ref))
        await ctx.cluster.delete("Secret", namespace, credential_secret_name(ref))
        ctx.credentials.forget(namespace, name)
        if ctx.rendezvous is not None:
            await asyncio.to_thread(ctx.rendezvous.forget, uid)
        logger.info("removed the pods and service of %s/%s", namespace, name)
