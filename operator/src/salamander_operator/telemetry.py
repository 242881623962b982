"""The operator's Prometheus metrics (names from :mod:`salamander.metrics`).

:class:`OperatorTelemetry` turns each reconcile pass (the previous status and the plan) into
metric updates; the control plane's connections and rejections are read at scrape time from
its own counters (:class:`ControlPlaneCollector`). The kopf operator and ``salamander run``
both use it, so a local run exports exactly what a cluster does.

Invariants: a job's series are labelled with its namespace and name, and removed when the
job is forgotten (deleted); every incident of a pass is counted exactly once, because
``Plan.incidents`` holds each incident in the one pass that folded it into status.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from salamander.api import FailureAction, Phase, Reason, TrainingJobStatus
from salamander.metrics import BY_NAME, LOST_CAUSES, instruments
from salamander_operator.controlplane.server import ControlPlaneServer
from salamander_operator.desired import JobRef
from salamander_operator.failures import Severity, Source
from salamander_operator.reconcile import Plan

if TYPE_CHECKING:
    from salamander_operator.allocations import ClusterAllocations

_RESTARTING = {FailureAction.RESTART_PROCESSES, FailureAction.REPLACE_POD, FailureAction.REPLACE_NODE,
               FailureAction.RETRY_IN_PLACE}
RECONFIGURATIONS = ("shrink", "grow")
STRAGGLER_ACTIONS = {Reason.STRAGGLER_DETECTED: "Detected", Reason.STRAGGLER_EVICTED: "Evicted",
                     Reason.STRAGGLER_EVICTION_UNDONE: "Undone"}
#: Why the control plane refuses a message (ControlPlaneServicer's counters); exported from 0.
REJECT_REASONS = ("unauthenticated", "invalid_hello", "invalid_heartbeat", "invalid_failure", "no_hello",
                  "unexpected_message")
_SCRAPED = {"salamander_controlplane_connections", "salamander_controlplane_rejected_requests"}


class OperatorTelemetry:
    """One per operator process; thread-safe (prometheus_client's objects are)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.m = {name: metric for name, metric in instruments("operator", self.registry).items()
                  if name not in _SCRAPED}
        self._jobs: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def observe_pass(self, job: JobRef, previous: TrainingJobStatus, plan: Plan, seconds: float) -> None:
        """Record one reconcile pass of ``job`` that took ``seconds``."""
        labels = (job.namespace, job.name)
        with self._lock:
            new = labels not in self._jobs
            self._jobs.add(labels)
        status = plan.status
        m = self.m
        if new:  # counters of known label values exist from the start, at 0 (no "no data" gaps)
            for action in FailureAction:
                m["salamander_recovery_actions"].labels(*labels, action.value)
                m["salamander_recovery_duration_seconds"].labels(*labels, action.value)
            for source in Source:  # so rate() sees a histogram's first observation as an increase
                m["salamander_failure_detection_latency_seconds"].labels(*labels, source.value)
                for severity in Severity:
                    m["salamander_failures_detected"].labels(*labels, source.value, severity.name)
            for reason in RECONFIGURATIONS:
                m["salamander_job_reconfigurations"].labels(*labels, reason)
            for action in STRAGGLER_ACTIONS.values():
                m["salamander_straggler_actions"].labels(*labels, action)
        m["salamander_reconcile_duration_seconds"].labels(*labels).observe(seconds)
        for phase in Phase:
            m["salamander_job_phase"].labels(*labels, phase.value).set(1 if status.phase is phase else 0)
        m["salamander_job_workers_desired"].labels(*labels).set(status.desired_workers)
        m["salamander_job_workers_ready"].labels(*labels).set(status.ready_workers)
        m["salamander_job_world_size"].labels(*labels).set(status.world_size)
        m["salamander_quarantined_nodes"].labels(*labels).set(len(status.quarantined_nodes))
        if status.allocation is not None:
            m["salamander_job_workers_planned"].labels(*labels).set(status.allocation.workers)
        for incident in plan.incidents:
            c, d = incident.classification, incident.decision
            m["salamander_failures_detected"].labels(*labels, c.source.value, c.severity.name).inc()
            m["salamander_recovery_actions"].labels(*labels, d.action.value).inc()
            if incident.detection_s is not None:
                m["salamander_failure_detection_latency_seconds"].labels(*labels, c.source.value).observe(
                    incident.detection_s)
            if d.charged and d.action in _RESTARTING:
                m["salamander_job_restarts"].labels(*labels, c.kind).inc()
        healed, before = status.last_failure, previous.last_failure
        if healed is not None and healed.recovered_at is not None and (
                before is None or before.recovered_at is None or before.detected_at != healed.detected_at):
            m["salamander_recovery_duration_seconds"].labels(*labels, healed.action).observe(
                max(0.0, (healed.recovered_at - healed.detected_at).total_seconds()))
        if previous.world_size > 0 and status.world_size > 0 and status.world_size != previous.world_size:
            reason = RECONFIGURATIONS[0] if status.world_size < previous.world_size else RECONFIGURATIONS[1]
            m["salamander_job_reconfigurations"].labels(*labels, reason).inc()
        m["salamander_job_stragglers"].labels(*labels).set(len(status.stragglers))
        for event in plan.events:
            action = STRAGGLER_ACTIONS.get(event.reason)
            if action is not None:
                m["salamander_straggler_actions"].labels(*labels, action).inc()
        ledger = status.goodput
        if ledger is not None:
            m["salamander_job_goodput_ratio"].labels(*labels).set(ledger.ratio)
            m["salamander_job_productive_seconds"].labels(*labels).set(ledger.productive_seconds)
            for cause in LOST_CAUSES:
                m["salamander_job_lost_seconds"].labels(*labels, cause).set(ledger.lost_seconds.get(cause, 0.0))

    def observe_plan(self, allocations: ClusterAllocations) -> None:
        """Record the newest cluster plan of ``allocations``."""
        m, result = self.m, allocations.last_plan
        if result is None:
            return
        m["salamander_cluster_plans"].inc()
        m["salamander_cluster_plan_duration_seconds"].observe(allocations.last_plan_s)
        m["salamander_cluster_capacity_nodes"].set(result.capacity)
        m["salamander_cluster_planned_workers"].set(result.used)
        m["salamander_cluster_planned_waf"].set(result.waf)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted job."""
        with self._lock:
            self._jobs.discard((namespace, name))
        for metric in self.m.values():
            if not metric._labelnames:  # noqa: SLF001 - operator-wide, not any job's
                continue
            # prometheus_client keeps label values as a tuple in declaration order
            for values in list(metric._metrics):  # noqa: SLF001 - no public listing of children
                if values[:2] == (namespace, name):
                    metric.remove(*values)

    def watch_control_plane(self, server: Callable[[], ControlPlaneServer | None]) -> None:
        """Export the control plane's connections and rejections, read at scrape time."""
        self.registry.register(ControlPlaneCollector(server))

    def serve(self, port: int, addr: str = "0.0.0.0", extra: Iterable[Any] = ()) -> int:
        """Serve this registry (plus ``extra`` collectors) over HTTP from a daemon thread;
        returns the bound port (0 picks one)."""
        for collector in extra:
            self.registry.register(collector)
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)


class ControlPlaneCollector:
    """``salamander_controlplane_connections`` by job and ``..._rejected_requests_total`` by
    reason, from the server's own session table and counters."""

    def __init__(self, server: Callable[[], ControlPlaneServer | None]) -> None:
        self._server = server

    def collect(self) -> Iterable[Metric]:
        server = self._server()
        connections = BY_NAME["salamander_controlplane_connections"]
        rejected = BY_NAME["salamander_controlplane_rejected_requests"]
        gauge = GaugeMetricFamily(connections.name, connections.help, labels=list(connections.labels))
        counter = CounterMetricFamily(rejected.name, rejected.help, labels=list(rejected.labels))
        if server is not None:
            per_job: dict[tuple[str, str], int] = {}
            for session in list(server.sessions.values()):
                if session.connected:
                    key = (session.identity.namespace, session.identity.job)
                    per_job[key] = per_job.get(key, 0) + 1
            for key, count in sorted(per_job.items()):
                gauge.add_metric(list(key), count)
            counts = {reason: 0 for reason in REJECT_REASONS}
            counts.update(server.stats.rejected)
            for reason, count in sorted(counts.items()):
                counter.add_metric([reason], count)
        yield gauge
        yield counter
