"""The recovery policies compared, as data: what each costs, and how it allocates nodes.

Every figure below is either published (with its source) or an assumption, said so.

**Restart** (the common baseline): whole-job restart from periodic disk checkpoints. Unicron
(arXiv 2401.00134, its motivating measurement) breaks one restart of a job into 68 minutes:
30 min of NCCL timeout before the failure is detected, 9 min in the scheduler's queue, 14 min
of setup, 15 min of recompute (half the 30-min checkpoint interval). So every failure kind is detected after 30
min, then 9 min queueing, then, once the job has all its nodes again (a lost node is replaced
from free healthy nodes, or waited for), 14 min setup; the recompute is what was trained since
the last checkpoint. A checkpoint every 30 min (published, as above) blocks training 1 min
(assumption). The job always runs on exactly its size.

**Elastic** (per job; torchelastic / DLRover style; timings are assumptions): a crash or a link
error (which kills the NCCL communicator) is seen by the agent in ~1 min; a hang only by a
watchdog timeout, 10 min; a lost node by the rendezvous keep-alive, 5 min. Restart processes,
re-rendezvous and reload the disk checkpoint: 5 min. Same checkpoints as the baseline. A job
that lost a node continues with its survivors if they are at least its minimum (a free node,
if any, replaces the lost one at that restart), else waits for one; it grows back to its size
when a node is free, and every resize is a restart that reloads the checkpoint (the work since
it is recomputed). It never takes nodes from other jobs.

**Salamander** (the full stack; all its timings are assumptions, deliberately slower than what
BENCHMARKS.md measured on a 2-worker job: a crash decided in 0.2 s, a lost agent in 3.7 s, a
hang at its 10 s threshold, a crash to the resumed step in 5.2 s; a job of thousands of GPUs
restarts and restores more slowly): in-band detection: a crash in ~5 s, a lost node
in ~10 s (heartbeat timeout), a hang in ~30 s (a few step times); a SEV3 link error is retried
in place (~10 s, nothing recomputed); a SEV2 failure restarts the processes in place and
restores from the in-memory snapshot (~60 s); a SEV1 failure replaces the node (or the planner
reallocates) and rebuilds the lost state from erasure-coded peers (~120 s). Snapshots every 10
steps cost ~0.5% of the step time (assumption; measured at noise level on CPU); every 50th
snapshot is persisted to disk in the background, the fallback when a second node of the same
job is lost while its state is being rebuilt (then the job reloads from disk: 5 min). The
cluster planner (:mod:`salamander_operator.planner`) runs on every capacity change; a planned
resize restarts the processes at the new size from a fresh in-memory snapshot: 90 s, nothing
recomputed.

**Salamander without the planner** (the ablation): Salamander's detection, snapshots and
recovery, with the elastic per-job allocation (survivors, grow back from free nodes, never
take from other jobs), resizes as cheap as the planner's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from salamander_operator.planner import DEFAULT_HORIZON_S
from salamander_operator.simulator.model import SimulationError
from salamander_operator.simulator.trace import KINDS, FailureKind

MINUTE = 60.0


class Allocation(StrEnum):
    """How a policy gives nodes to jobs."""

    RIGID = "rigid"      # exactly the job's size; a lost node is waited for
    ELASTIC = "elastic"  # any count in [min, size]; free nodes only, first come first served
    PLANNER = "planner"  # the cluster planner decides every job's count on every capacity change


@dataclass(frozen=True)
class Tier:
    """A place training state is saved to: every ``interval_s`` seconds of training, blocking
    training for ``blocking_s``. Its overhead is ``blocking / (interval + blocking)``."""

    name: str
    interval_s: float
    blocking_s: float

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.blocking_s >= 0):
            raise SimulationError(f"tier {self.name}: need interval_s > 0 and blocking_s >= 0")

    @property
    def overhead(self) -> float:
        return self.blocking_s / (self.interval_s + self.blocking_s)


@dataclass(frozen=True)
class Policy:
    """One policy. After a failure of kind ``k``: ``detect_s[k]`` with the job stalled, then
    ``queue_s`` in a scheduler queue, then (once the job has nodes) ``recover_s[k]`` of restart
    and restore, and the work since the newest save of ``tiers[0]`` is recomputed. Kinds in
    ``retry_in_place`` lose nothing but their detection and recovery. With ``fallback_recover_s``
    set, ``tiers[0]`` lives on the nodes (memory): a second node lost while it is being rebuilt
    falls back to ``tiers[-1]`` and costs ``fallback_recover_s``. A resize costs ``resize_s`` of no
    progress, plus the recompute since the newest save of ``tiers[0]`` when ``resize_recompute``."""

    name: str
    label: str
    allocation: Allocation
    detect_s: Mapping[FailureKind, float]
    recover_s: Mapping[FailureKind, float]
    tiers: tuple[Tier, ...]
    resize_s: float
    resize_recompute: bool
    queue_s: float = 0.0
    retry_in_place: frozenset[FailureKind] = frozenset()
    fallback_recover_s: float | None = None
    plan_horizon_s: float = DEFAULT_HORIZON_S
    notes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in ("detect_s", "recover_s"):
            values = getattr(self, table)
            if set(values) != set(KINDS) or any(not v >= 0 for v in values.values()):
                raise SimulationError(f"policy {self.name}: {table} needs a value >= 0 for every kind {list(KINDS)}")
        if not self.tiers:
            raise SimulationError(f"policy {self.name}: needs at least one tier to save to")
        if self.resize_s < 0 or self.queue_s < 0:
            raise SimulationError(f"policy {self.name}: resize_s and queue_s must be >= 0")

    @property
    def overhead(self) -> float:
        """The share of running time blocked on saves (all tiers)."""
        return sum(t.overhead for t in self.tiers)

    def describe(self) -> dict[str, object]:
        """The parameters, for the JSON report."""
        return {"name": self.name, "label": self.label, "allocation": str(self.allocation),
                "detect_s": {str(k): v for k, v in self.detect_s.items()},
                "recover_s": {str(k): v for k, v in self.recover_s.items()},
                "queue_s": self.queue_s, "retry_in_place": sorted(str(k) for k in self.retry_in_place),
                "tiers": [{"name": t.name, "interval_s": t.interval_s, "blocking_s": t.blocking_s} for t in self.tiers],
                "fallback_recover_s": self.fallback_recover_s, "resize_s": self.resize_s,
                "resize_recompute": self.resize_recompute, "overhead": self.overhead,
                "plan_horizon_s": self.plan_horizon_s if self.allocation is Allocation.PLANNER else None,
                "notes": dict(self.notes)}


def _every(value: float) -> dict[FailureKind, float]:
    return dict.fromkeys(KINDS, value)


DISK = Tier("disk", interval_s=30 * MINUTE, blocking_s=1 * MINUTE)


def restart_baseline() -> Policy:
    return Policy(
        name="restart", label="Whole-job restart (disk checkpoints)", allocation=Allocation.RIGID,
        detect_s=_every(30 * MINUTE), queue_s=9 * MINUTE, recover_s=_every(14 * MINUTE), tiers=(DISK,),
        resize_s=0.0, resize_recompute=True,
        notes={"detect, queue, setup, checkpoint interval": "Unicron's breakdown of one restart (30 + 9 + 14 min; "
                                                            "15 min recompute = half a 30-min interval)",
               "checkpoint blocking 1 min": "assumption"})


def elastic_per_job() -> Policy:
    detect = {FailureKind.NODE: 5 * MINUTE, FailureKind.CRASH: 1 * MINUTE, FailureKind.HANG: 10 * MINUTE,
              FailureKind.LINK: 1 * MINUTE}
    return Policy(
        name="elastic", label="Elastic per job (torchelastic-style)", allocation=Allocation.ELASTIC,
        detect_s=detect, recover_s=_every(5 * MINUTE), tiers=(DISK,), resize_s=5 * MINUTE, resize_recompute=True,
        notes={"detection 1/5/10 min, restart 5 min": "assumption", "checkpoints": "as the baseline"})


SNAPSHOT_STEPS = 10
PERSIST_EVERY_SNAPSHOTS = 50
SNAPSHOT_OVERHEAD = 0.005


def _salamander(step_s: float, allocation: Allocation, name: str, label: str) -> Policy:
    interval = SNAPSHOT_STEPS * step_s
    memory = Tier("memory", interval_s=interval, blocking_s=interval * SNAPSHOT_OVERHEAD / (1 - SNAPSHOT_OVERHEAD))
    persisted = Tier("disk", interval_s=interval * PERSIST_EVERY_SNAPSHOTS, blocking_s=0.0)
    detect = {FailureKind.NODE: 10.0, FailureKind.CRASH: 5.0, FailureKind.HANG: 30.0, FailureKind.LINK: 5.0}
    recover = {FailureKind.NODE: 120.0, FailureKind.CRASH: 60.0, FailureKind.HANG: 60.0, FailureKind.LINK: 10.0}
    return Policy(
        name=name, label=label, allocation=allocation, detect_s=detect, recover_s=recover,
        tiers=(memory, persisted), retry_in_place=frozenset({FailureKind.LINK}), fallback_recover_s=5 * MINUTE,
        resize_s=90.0, resize_recompute=False,
        notes={"detection 5 s / 10 s / 30 s, restore 60 s / 120 s":
               "assumption, above the small-scale measurements in BENCHMARKS.md (0.2 s / 3.7 s / 10 s, 5.2 s)",
               "snapshot overhead 0.5%, retry 10 s, resize 90 s, disk reload 5 min": "assumption"})


def salamander_full(step_s: float = 6.0) -> Policy:
    return _salamander(step_s, Allocation.PLANNER, "salamander", "Salamander (detection, snapshots, planner)")


def salamander_no_planner(step_s: float = 6.0) -> Policy:
    return _salamander(step_s, Allocation.ELASTIC, "salamander-no-planner", "Salamander without the planner")


def standard_policies(step_s: float = 6.0) -> tuple[Policy, ...]:
    """The four policies compared, the baseline first."""
    return (restart_baseline(), elastic_per_job(), salamander_no_planner(step_s), salamander_full(step_s))
