"""Every Prometheus metric Salamander exports, named once.

This catalog is the single source of truth: the operator and the workers build their
``prometheus_client`` objects from it (:func:`salamander_operator.metrics` and
:mod:`salamander_worker.telemetry`), the metric reference table in ``docs/metrics.md`` is
generated from it (``python -m salamander.metrics``), and the tests fail when a dashboard or an
alert rule names a metric that is not here.

Conventions (https://prometheus.io/docs/practices/naming/):

* one ``salamander_`` prefix; base units (seconds, bytes) in the name; ``_total`` on counters;
  histograms for latencies;
* every series carries ``namespace`` and ``trainingjob``, the TrainingJob's namespace and
  name. The label is ``trainingjob`` and not ``job`` because Prometheus gives every scraped
  series a ``job`` label of its own (the scrape job); a metric label of that name would be
  renamed ``exported_job``. Scrape Salamander's endpoints with ``honor_labels: true`` so the
  ``namespace`` label is the job's and not the pod's;
* the cluster planner's ``salamander_cluster_*`` series and the control plane's rejected
  requests are operator-wide, with no job labels;
* ``rank`` appears only where the per-rank value is the point (section and step times, the
  straggler view), so a series count grows with the world size only there.

This module imports nothing heavy: it is data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]
Component = Literal["operator", "worker", "agent"]
# prometheus_client's multiprocess modes for gauges written by several processes of one pod
GaugeMode = Literal["mostrecent", "max", "livesum"]

JOB = ("namespace", "trainingjob")

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SNAPSHOT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

SECTIONS = ("data", "forward", "backward", "optimizer", "communication")
LOST_CAUSES = ("startup", "detection", "recovery", "recompute", "straggling", "checkpointing", "other")


@dataclass(frozen=True)
class Metric:
    """One metric. ``name`` is the exported name without the ``_total``/``_bucket`` suffixes
    prometheus_client adds (counters are declared without ``_total`` and exported with it)."""

    name: str
    kind: Kind
    component: Component
    help: str
    labels: tuple[str, ...] = JOB
    buckets: tuple[float, ...] | None = None
    mode: GaugeMode | None = None  # gauges written by worker processes only

    @property
    def exported(self) -> str:
        """The name a scrape shows (histograms also add ``_bucket``, ``_sum``, ``_count``)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name

    def series_names(self) -> tuple[str, ...]:
        """Every series name a scrape of this metric can contain."""
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        return (self.exported,)


def _m(name: str, kind: Kind, component: Component, help: str, labels: tuple[str, ...] = JOB,
       **kw: object) -> Metric:
    return Metric(f"salamander_{name}", kind, component, help, labels, **kw)  # type: ignore[arg-type]


CATALOG: tuple[Metric, ...] = (
    # --- operator: one series set per job, from every reconcile pass
    _m("job_phase", "gauge", "operator", "1 for the phase the job is in (Pending, Running, Restarting, "
       "Succeeded, Failed), 0 for the others.", (*JOB, "phase")),
    _m("job_workers_desired", "gauge", "operator", "Worker pods the job wants (replicas.max)."),
    _m("job_workers_ready", "gauge", "operator", "Worker pods running and registered."),
    _m("job_world_size", "gauge", "operator", "Training processes in the job's current group."),
    _m("failures_detected", "counter", "operator", "Failures detected, by channel (ProcessExit, Exception, "
       "Hang, AgentLost, Pod, Node) and severity (SEV1, SEV2, SEV3).", (*JOB, "source", "severity")),
    _m("failure_detection_latency_seconds", "histogram", "operator", "From when a failure happened (its "
       "evidence's own time) to the operator's decision.", (*JOB, "source"), buckets=LATENCY_BUCKETS),
    _m("recovery_actions", "counter", "operator", "Recovery actions decided (RetryInPlace, RestartProcesses, "
       "ReplacePod, ReplaceNode, FailJob).", (*JOB, "action")),
    _m("recovery_duration_seconds", "histogram", "operator", "From a failure's detection to the first new "
       "training step after the recovery.", (*JOB, "action"), buckets=LATENCY_BUCKETS),
    _m("job_restarts", "counter", "operator", "Restarts charged to the job's budget, by failure kind.",
       (*JOB, "reason")),
    _m("job_reconfigurations", "counter", "operator", "Changes of the training world size (shrink when "
       "workers were lost, grow when they joined).", (*JOB, "reason")),
    _m("quarantined_nodes", "gauge", "operator", "Nodes this job keeps out of its placement after a SEV1 "
       "failure on them."),
    _m("job_goodput_ratio", "gauge", "operator", "Productive training time over wall time since the job was "
       "submitted (0-1)."),
    _m("job_productive_seconds", "gauge", "operator", "Wall time spent on training steps that moved the job "
       "forward."),
    _m("job_lost_seconds", "gauge", "operator", "Wall time not productive, by cause: " + ", ".join(LOST_CAUSES)
       + ". With job_productive_seconds it adds up to the wall time.", (*JOB, "cause")),
    _m("job_stragglers", "gauge", "operator", "Ranks the operator's straggler detector holds as stragglers now "
       "(see status.stragglers for which, how slow and why)."),
    _m("straggler_actions", "counter", "operator", "Straggler detections and mitigations, by action (Detected, "
       "Evicted, Undone).", (*JOB, "action")),
    _m("controlplane_connections", "gauge", "operator", "Agents connected to the operator's control plane."),
    _m("controlplane_rejected_requests", "counter", "operator", "Control-plane messages refused, by reason "
       "(unauthenticated, malformed, out of order...).", ("reason",)),
    _m("reconcile_duration_seconds", "histogram", "operator", "Time of one reconcile pass (observe, decide, "
       "apply).", buckets=RECONCILE_BUCKETS),
    # --- operator: the cluster planner (only when the operator plans capacity across jobs)
    _m("job_workers_planned", "gauge", "operator", "Workers the cluster planner gives the job (0: suspended)."),
    _m("cluster_capacity_nodes", "gauge", "operator", "Schedulable nodes the cluster planner divides among the "
       "jobs.", ()),
    _m("cluster_planned_workers", "gauge", "operator", "Workers the newest cluster plan gives all jobs together.",
       ()),
    _m("cluster_planned_waf", "gauge", "operator", "Weighted achieved throughput of the newest cluster plan: the "
       "sum over jobs of weight times throughput, in worker-equivalents.", ()),
    _m("cluster_plans", "counter", "operator", "Cluster plans computed (on capacity changes, jobs submitted or "
       "finished).", ()),
    _m("cluster_plan_duration_seconds", "histogram", "operator", "Time to compute one cluster plan.", (),
       buckets=RECONCILE_BUCKETS),
    # --- worker: written by the training processes (rank 0 for job-wide figures)
    _m("worker_steps", "counter", "worker", "Training steps completed (counted by rank 0)."),
    _m("worker_samples", "counter", "worker", "Samples (sequences, images) trained on, all ranks together "
       "(counted by rank 0)."),
    _m("worker_tokens", "counter", "worker", "Tokens trained on, all ranks together (counted by rank 0, when "
       "the script reports them)."),
    _m("worker_model_flops", "counter", "worker", "Model FLOPs performed, all ranks together (when the script "
       "reports FLOPs per step); rate() over worker_peak_flops is the MFU."),
    _m("worker_peak_flops", "gauge", "worker", "Peak FLOP/s of all the job's devices together (per-device "
       "peak times world size).", mode="mostrecent"),
    _m("worker_step_duration_seconds", "histogram", "worker", "Wall time of one training step (rank 0).",
       buckets=STEP_BUCKETS),
    _m("worker_loss", "gauge", "worker", "The newest training loss (rank 0, as the script reports it).",
       mode="mostrecent"),
    _m("worker_last_progress_timestamp_seconds", "gauge", "worker", "When the newest step completed "
       "(seconds since the epoch).", mode="max"),
    _m("worker_rank_busy_seconds", "gauge", "worker", "Mean time per step each rank is busy: its step time minus "
       "the time it waits on peers (the communication section), over its last window of steps. In a synchronous "
       "job every rank's step time is the same; the straggler is the rank busy the longest.", (*JOB, "rank"),
       mode="mostrecent"),
    _m("worker_section_seconds", "gauge", "worker", "Mean time per step each rank spends in each section "
       "(data, forward, backward, optimizer, communication), over its last window of steps.",
       (*JOB, "rank", "section"), mode="mostrecent"),
    _m("snapshots", "counter", "worker", "In-memory snapshots committed, counted per rank."),
    _m("snapshot_duration_seconds", "histogram", "worker", "Time of a snapshot's stages per rank: blocking "
       "(training waits), copy, encode (parity), persist.", (*JOB, "stage"), buckets=SNAPSHOT_BUCKETS),
    _m("snapshot_bytes", "counter", "worker", "Bytes copied into snapshot memory, all ranks."),
    _m("snapshot_last_timestamp_seconds", "gauge", "worker", "When the newest snapshot was committed "
       "(seconds since the epoch).", mode="max"),
    _m("checkpoint_duration_seconds", "histogram", "worker", "Time to save or load a persistent checkpoint, "
       "per rank.", (*JOB, "operation"), buckets=SNAPSHOT_BUCKETS),
    _m("checkpoint_bytes", "counter", "worker", "Bytes written to persistent checkpoints, all ranks."),
    _m("checkpoint_last_timestamp_seconds", "gauge", "worker", "When the newest persistent checkpoint was "
       "saved (seconds since the epoch).", mode="max"),
    _m("restores", "counter", "worker", "Training-state restores by tier (memory, peers, persistent, none), "
       "per rank.", (*JOB, "tier")),
    # --- agent: one per pod
    _m("agent_worker_restarts", "counter", "agent", "Times this pod's agent restarted its training processes."),
    _m("agent_workers", "gauge", "agent", "Training processes this pod's agent runs now.", mode="livesum"),
)

BY_NAME = {m.name: m for m in CATALOG}


def instruments(component: Component, registry: Any = None) -> dict[str, Any]:
    """prometheus_client objects for the catalog's metrics of ``component``, by catalog name,
    registered in ``registry`` (prometheus_client's default registry when None)."""
    from prometheus_client import Counter, Gauge, Histogram

    made: dict[str, Any] = {}
    for m in CATALOG:
        if m.component != component:
            continue
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        if m.kind == "counter":
            made[m.name] = Counter(m.name, m.help, m.labels, **kw)
        elif m.kind == "gauge":
            made[m.name] = Gauge(m.name, m.help, m.labels, multiprocess_mode=m.mode or "all", **kw)
        else:
            made[m.name] = Histogram(m.name, m.help, m.labels, buckets=m.buckets or Histogram.DEFAULT_BUCKETS, **kw)
    return made


def series_names() -> frozenset[str]:
    """Every series name Salamander can export."""
    return frozenset(s for m in CATALOG for s in m.series_names())


def markdown_table() -> str:
    """The metric reference table (``docs/metrics.md``)."""
    rows = ["| metric | type | labels | from | meaning |", "|---|---|---|---|---|"]
    for m in CATALOG:
        rows.append(f"| `{m.exported}` | {m.kind} | {', '.join(f'`{x}`' for x in m.labels)} | "
                    f"{m.component} | {m.help} |")
    return "\n".join(rows)


DOC_HEADER = """# Metrics

Generated from `src/salamander/metrics.py` by `python -m salamander.metrics > docs/metrics.md`;
a test fails when this file is out of date.

The operator serves its metrics on `--metrics-port` (default 9400); every worker pod's agent serves
its own and its training processes' on port 9401 (`SALAMANDER_METRICS_PORT`), all processes of a pod
through one endpoint (prometheus-client's multiprocess mode). `salamander run` serves both on one
port it prints. Scrape with `honor_labels: true`.

Labels: `namespace` and `trainingjob` name the TrainingJob (not `job`, which Prometheus reserves for
the scrape job). `rank` is the global rank, `section` one of """ + ", ".join(f"`{s}`" for s in SECTIONS) + """,
`cause` one of """ + ", ".join(f"`{c}`" for c in LOST_CAUSES) + """.

Useful expressions: step rate `rate(salamander_worker_steps_total[1m])`; MFU
`rate(salamander_worker_model_flops_total[1m]) / salamander_worker_peak_flops`; the slowest rank
`topk(1, salamander_worker_rank_busy_seconds)`.

"""


if __name__ == "__main__":
    print(DOC_HEADER + markdown_table())
