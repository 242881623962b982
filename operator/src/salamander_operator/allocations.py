"""Cluster planning in the operator: what the planner is told, and what it decided, per job.

:class:`ClusterAllocations` is the operator's one view across jobs: each supervised job's
demand (from its spec, its status and its measured throughput) and the healthy capacity
(schedulable nodes). On a capacity change, a job submitted or finished, or a demand that
changed, it runs :func:`salamander_operator.planner.plan` and keeps an
:class:`~salamander.api.AllocationRecord` per job; the caller wakes the jobs whose count
changed, and their reconcile applies it (grow, shrink, suspend, resume).

Invariants:
- the allocations sum to at most the capacity of the latest plan, and each is 0 or within
  the job's ``[min, max]`` (the planner's);
- a job's allocation changes only in a plan, and a plan runs only on a change of its inputs
  (never on a throughput measurement alone), so a job is not resized back and forth by noise;
- a job that comes with an allocation in its status (after an operator restart) adopts it
  as its current count, so a restart does not reshuffle the cluster: the next plan changes
  it only where that is worth a transition (or it no longer fits).

A worker is one node: capacity is counted in schedulable nodes (Ready, not cordoned, not
quarantined, matching the operator's node selector).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from salamander.api import AllocationRecord, TrainingJobSpec, TrainingJobStatus
from salamander.wire import Progress
from salamander_operator.nodes import LABEL_QUARANTINED_UNTIL
from salamander_operator.planner import DEFAULT_HORIZON_S, ClusterPlan, JobDemand, ThroughputCurve, plan

DEFAULT_TRANSITION_S = 60.0
#: Measured rates are smoothed: each new interval counts this much.
RATE_SMOOTHING = 0.3
#: Intervals shorter than this are not measured (too noisy to mean anything).
MIN_INTERVAL_S = 1.0


def schedulable(node: Mapping[str, Any], selector: Mapping[str, str], now: float) -> bool:
    """Whether ``node`` (a Node object) counts towards capacity: Ready, not cordoned, not
    quarantined by a job (its quarantined-until label in the future), and carrying every
    label of ``selector``."""
    metadata = node.get("metadata") or {}
    labels = metadata.get("labels") or {}
    if any(labels.get(k) != v for k, v in selector.items()) or metadata.get("deletionTimestamp"):
        return False
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    until = labels.get(LABEL_QUARANTINED_UNTIL, "")
    if until.isdigit() and int(until) > now:
        return False
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def parse_selector(text: str) -> dict[str, str]:
    """``key=value,key2=value2`` (equality only) as a dict; '' is every node. Raises
    ValueError naming the bad term."""
    selector: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.partition("=")
        if not sep or not key or "!" in key or "=" in value:
            raise ValueError(f"node selector term {term!r} is not key=value")
        selector[key.strip()] = value.strip()
    return selector


@dataclass
class ThroughputMeter:
    """A job's measured training throughput (samples per second) by worker count, from its
    progress records: the rate between two records of the same process life and world size,
    smoothed. Records out of order, or across a restart or a resize, start a new interval."""

    procs_per_node: int = 1
    rates: dict[int, float] = field(default_factory=dict)
    _last: Progress | None = None

    def observe(self, progress: Progress | None) -> None:
        if progress is None:
            return
        last, self._last = self._last, progress
        if last is None or (last.restart_count, last.world_size) != (progress.restart_count, progress.world_size):
            return
        elapsed, samples = progress.time - last.time, progress.samples - last.samples
        if elapsed < MIN_INTERVAL_S or samples <= 0:
            if elapsed < MIN_INTERVAL_S and samples >= 0:
                self._last = last  # keep the interval's start until it is long enough
            return
        workers = max(1, progress.world_size // max(1, self.procs_per_node))
        rate = samples / elapsed
        old = self.rates.get(workers)
        self.rates[workers] = rate if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate

    def curve(self, exponent: float) -> ThroughputCurve:
        """The curve in worker-equivalents: ``x ** exponent`` where nothing is measured, and the
        measured rates scaled so that the smallest measured count sits on that law. Only the
        job's own scaling is measured; its weight compares it with other jobs."""
        if not self.rates:
            return ThroughputCurve(exponent=exponent)
        smallest = min(self.rates)
        scale = smallest ** exponent / self.rates[smallest] if self.rates[smallest] > 0 else 0.0
        return ThroughputCurve(points=tuple((x, r * scale) for x, r in self.rates.items()), exponent=exponent)


def transition_seconds(spec: TrainingJobSpec, status: TrainingJobStatus) -> float:
    """The spec's ``scheduling.transitionSeconds``, else the job's last measured recovery
    (failure detected to training again), else 60 s."""
    if spec.scheduling.transition_seconds is not None:
        return spec.scheduling.transition_seconds
    failure = status.last_failure
    if failure is not None and failure.recovered_at is not None:
        return max(0.0, (failure.recovered_at - failure.detected_at).total_seconds())
    return DEFAULT_TRANSITION_S


@dataclass
class _Job:
    uid: str
    demand: JobDemand


@dataclass
class ClusterAllocations:
    """The operator's cross-job plan. Single-threaded (the operator's event loop)."""

    selector: dict[str, str] = field(default_factory=dict)
    horizon_s: float = DEFAULT_HORIZON_S
    jobs: dict[str, _Job] = field(default_factory=dict)
    nodes: dict[str, bool] = field(default_factory=dict)  # node -> schedulable
    allocations: dict[str, AllocationRecord] = field(default_factory=dict)
    last_plan: ClusterPlan | None = None
    last_plan_s: float = 0.0  # how long the newest plan took to compute

    @property
    def capacity(self) -> int:
        return sum(self.nodes.values())

    def observe_node(self, name: str, node: Mapping[str, Any] | None, now: float | None = None) -> bool:
        """Record a node (None: deleted); True when the capacity changed."""
        before = self.capacity
        if node is None:
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = schedulable(node, self.selector, time.time() if now is None else now)
        return self.capacity != before

    def allocation(self, key: str) -> AllocationRecord | None:
        return self.allocations.get(key)

    def submit(self, key: str, uid: str, demand: JobDemand, previous: AllocationRecord | None) -> bool:
        """Register or update a job's demand. True when a plan is due: a new job (unless it
        adopts ``previous``, its allocation from before an operator restart, and that still
        fits), or a changed min, max, weight or priority. ``current`` and the throughput curve
        are updated without asking for a plan."""
        known = self.jobs.get(key)
        self.jobs[key] = _Job(uid, demand)
        if known is not None and known.uid == uid:
            old = known.demand
            return (old.min_workers, old.max_workers, old.weight, old.priority) != (
                demand.min_workers, demand.max_workers, demand.weight, demand.priority)
        if previous is not None and key not in self.allocations and (
                previous.workers == 0 or demand.min_workers <= previous.workers <= demand.max_workers):
            # adopted as the job's current count: the next plan moves it only if worth a transition
            self.allocations[key] = previous
            return False
        return True

    def finish(self, key: str) -> bool:
        """Forget a finished or deleted job; True when it held workers (a plan is due)."""
        self.jobs.pop(key, None)
        gone = self.allocations.pop(key, None)
        return gone is not None and gone.workers > 0

    def replan(self, cause: str, now: datetime.datetime | None = None) -> dict[str, str]:
        """Plan every known job over the current capacity; record the allocations and return
        ``key -> uid`` of the jobs whose count changed (to be woken)."""
        now = now or datetime.datetime.now(datetime.UTC)
        demands = []
        for key, job in sorted(self.jobs.items()):
            held = self.allocations.get(key)
            current = held.workers if held is not None else 0
            d = job.demand
            demands.append(JobDemand(key, d.min_workers, d.max_workers, current, d.weight, d.priority,
                                     d.throughput, d.transition_s))
        started = time.perf_counter()
        result = plan(demands, self.capacity, self.horizon_s)
        self.last_plan_s = time.perf_counter() - started
        self.last_plan = result
        moved = result.changes(demands)
        for d in demands:
            # a job never planned before gets its first record even when the plan gives it 0
            if d.key in moved or d.key not in self.allocations:
                workers = result.workers[d.key]
                self.allocations[d.key] = AllocationRecord(workers=workers, capacity=result.capacity,
                                                           reason=_reason(d, workers, result, cause), planned_at=now)
                moved.setdefault(d.key, (0, workers))
        return {key: self.jobs[key].uid for key in moved}


def _reason(demand: JobDemand, workers: int, result: ClusterPlan, cause: str) -> str:
    """Why ``demand`` gets ``workers``, for status and events."""
    where = f"{cause}; {result.used} of {result.capacity} schedulable nodes planned across {len(result.workers)} jobs"
    if workers == 0:
        return f"{where}; the jobs planned ahead of it are worth more (priority {demand.priority}, " \
               f"weight {demand.weight:g})"
    if workers < demand.max_workers:
        return f"{where}; {workers} of at most {demand.max_workers} fit"
    return where
