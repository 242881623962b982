"""The discrete-event loop: one workload, one failure trace, one policy, simulated to the horizon.

Events (a heap of ``(time, sequence, kind, subject)``, merged with the trace, which is sorted):
a job arrives or departs; a node fails (from the trace) or comes back from repair; a failure is
detected; a job's scheduler queueing, restart or resize ends. Ties are broken by insertion
order, so a run is a pure function of its inputs: the same workload, trace and policy give the
same result.

Each job is in one :class:`Phase` at a time. Its time is charged to one bucket per phase:
running time is *productive*, less the share blocked on saves (*checkpoint*, a fluid
approximation: the policy's overhead fraction of every running second); the other phases are
lost time by cause (:data:`CAUSE`). When a failure is detected, the work trained since the
newest save of the tier restored from is moved from productive to *recompute*. The newest save
is tracked per tier as training seconds since it, modulo the tier's interval (saves happen
every ``interval_s`` of training), with the GPU-seconds and WAF those seconds earned: a tier's
unsaved work may span resizes (the disk tier's, behind the in-memory snapshots), so a recompute
takes back what that work earned at the node counts it ran on, never more. Every tier's unsaved
work is the newest part of the job's kept training, so a recompute of one tier's takes the same
amount off the longer ones and empties the shorter ones.

Invariants (checked by the tests; ``check=True`` verifies the node books after every event):
- for every job, ``productive + sum(lost) == alive`` (its window clipped to the run);
- nodes held by jobs never exceed healthy nodes; free + held == healthy; a node has at most one
  job, and a job's nodes are healthy;
- the cluster's GPU-seconds split exactly into productive, the lost causes of held nodes, idle
  (healthy and free) and down (under repair): the sum is ``nodes * gpus_per_node * horizon``;
- a job that is running, restarting (RECOVERING) or resizing holds a count its policy allows
  (rigid: its size; elastic and planner: ``[min, size]``): those phases end in RUNNING without
  another allocation. Other phases may hold fewer (a failed job's survivors) or none (pending,
  suspended). So a job the planner gives no nodes is suspended even when it already held none
  (it lost every node): a plan of 0 for a restarting job is a suspension, not "no change".

The planner policy calls :func:`salamander_operator.planner.plan` on every capacity change: a
node lost (at its detection when it was a job's, at once when it was free) or repaired, a job
arrived or departed. Jobs whose failure is not yet detected are left out of the plan and their
nodes out of its capacity (the operator does not know yet).
"""

from __future__ import annotations

import heapq
import time as walltime
from collections import Counter
from collections.abc import Callable, Sequence
from enum import IntEnum

import numpy as np

from salamander_operator import planner
from salamander_operator.planner import JobDemand
from salamander_operator.simulator.model import ClusterConfig, JobSpec, SimulationError
from salamander_operator.simulator.policies import Allocation, Policy
from salamander_operator.simulator.results import GPU_CAUSES, LOST_CAUSES, JobResult, PolicyRun
from salamander_operator.simulator.trace import KINDS, FailureKind, FailureTrace


class Phase(IntEnum):
    PENDING = 0     # alive, never started, no nodes
    RUNNING = 1
    DETECTING = 2   # failed; the failure is not detected yet
    QUEUED = 3      # in the scheduler's queue before a restart (the baseline's fixed 9 min)
    WAITING = 4     # waiting for nodes to restart with
    RECOVERING = 5  # restarting and restoring
    RESIZING = 6    # a planned resize (or a resume after a suspension)
    SUSPENDED = 7   # the planner gave it no nodes
    DONE = 8


#: Lost-time cause of every phase but RUNNING (whose lost share is "checkpoint").
CAUSE = {Phase.PENDING: "queueing", Phase.DETECTING: "detection", Phase.QUEUED: "queueing",
         Phase.WAITING: "queueing", Phase.RECOVERING: "recovery", Phase.RESIZING: "resize",
         Phase.SUSPENDED: "suspended"}
#: Which failure's handling wins when several strike a job before it is detected.
_WORST = {FailureKind.NODE: 3, FailureKind.HANG: 2, FailureKind.CRASH: 1, FailureKind.LINK: 0}

_ARRIVE, _DEPART, _DETECTED, _QUEUE_DONE, _READY, _REPAIR = range(6)


class _Job:
    __slots__ = ("spec", "index", "phase", "since", "nodes", "epoch", "unsaved", "unsaved_gpu", "unsaved_waf",
                 "pending", "rebuilding", "fallback", "recover_s", "rate", "productive_s", "lost", "gpu", "waf",
                 "failures", "restarts", "resizes", "alive_from")

    def __init__(self, spec: JobSpec, index: int, tiers: int) -> None:
        self.spec, self.index = spec, index
        self.phase = Phase.PENDING
        self.since = self.alive_from = spec.arrive_s
        self.nodes: set[int] = set()
        self.epoch = 0
        # per tier: training seconds since its newest save, and the GPU-seconds and WAF they earned
        self.unsaved = [0.0] * tiers
        self.unsaved_gpu = [0.0] * tiers
        self.unsaved_waf = [0.0] * tiers
        self.pending: FailureKind | None = None
        self.rebuilding = self.fallback = False
        self.recover_s = 0.0
        self.rate = 0.0
        self.productive_s = self.waf = 0.0
        self.lost = dict.fromkeys(LOST_CAUSES, 0.0)
        self.gpu = dict.fromkeys(GPU_CAUSES[:-2], 0.0)
        self.failures = self.restarts = self.resizes = 0

    def saved(self, tier: int) -> None:
        """A fresh save of ``tier``: nothing of it is unsaved."""
        self.unsaved[tier] = self.unsaved_gpu[tier] = self.unsaved_waf[tier] = 0.0


Progress = Callable[[float], None]


class Engine:
    """Runs one policy; use :func:`simulate`."""

    def __init__(self, config: ClusterConfig, jobs: Sequence[JobSpec], trace: FailureTrace, policy: Policy,
                 progress: Progress | None = None, check: bool = False) -> None:
        if trace.nodes_total != config.nodes or trace.horizon_s != config.horizon_s:
            raise SimulationError(f"the trace is of {trace.nodes_total} nodes over {trace.horizon_s:g} s, the cluster "
                                  f"of {config.nodes} nodes over {config.horizon_s:g} s")
        for spec in jobs:
            if spec.nodes > config.nodes or spec.depart_s > config.horizon_s:
                raise SimulationError(f"job {spec.key} does not fit the cluster ({spec.nodes} nodes, "
                                      f"departs at {spec.depart_s:g} s)")
        if len({s.key for s in jobs}) != len(jobs):
            raise SimulationError("job keys must be unique")
        self.config, self.trace, self.policy = config, trace, policy
        self.progress, self.check = progress, check
        self.g = config.gpus_per_node
        self.horizon = config.horizon_s
        self.overhead = policy.overhead
        self.intervals = [t.interval_s for t in policy.tiers]
        self.resume_s = policy.fallback_recover_s if policy.fallback_recover_s is not None else policy.resize_s
        self.jobs = [_Job(spec, i, len(policy.tiers)) for i, spec in enumerate(jobs)]
        self.curves = [spec.curve() for spec in jobs]
        self.now = 0.0
        self.healthy = config.nodes
        self.held = 0
        self.down = [False] * config.nodes
        self.owner = [-1] * config.nodes
        self.free: set[int] = set(range(config.nodes))
        self.alive: dict[int, _Job] = {}
        self.queue: dict[int, _Job] = {}  # jobs waiting for nodes, in request order
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.total_rate = 0.0
        self.rate_log: list[tuple[float, float]] = [(0.0, 0.0)]
        self.impulses: list[tuple[float, float]] = []
        self.idle_node_s = self.down_node_s = 0.0
        self.clock = 0.0
        self.counts: Counter[str] = Counter()
        self.overcommitted = 0

    # --- bookkeeping -------------------------------------------------------------------------

    def _push(self, at: float, kind: int, subject: int, epoch: int = 0) -> None:
        """Schedule an event; a job's timed event carries its epoch and is dropped when the job
        has changed phase since (every :meth:`_enter` starts a new epoch)."""
        heapq.heappush(self.heap, (at, self.seq, kind, subject, epoch))
        self.seq += 1

    def _tick(self, t: float) -> None:
        """Advance the cluster's clock to ``t``: free and down node-seconds."""
        dt = t - self.clock
        if dt > 0:
            self.idle_node_s += (self.healthy - self.held) * dt
            self.down_node_s += (self.config.nodes - self.healthy) * dt
            self.clock = t
        self.now = t

    def _settle(self, job: _Job) -> None:
        """Charge the job's time since ``since`` to its phase's bucket."""
        dt = self.now - job.since
        job.since = self.now
        if dt <= 0:
            return
        x = len(job.nodes)
        if job.phase is Phase.RUNNING:
            blocked = dt * self.overhead
            trained = dt - blocked
            gpu_rate, value = x * self.g, job.spec.weight * job.spec.throughput(x)
            job.productive_s += trained
            job.lost["checkpoint"] += blocked
            job.gpu["productive"] += trained * gpu_rate
            job.gpu["checkpoint"] += blocked * gpu_rate
            job.waf += value * trained
            for i, interval in enumerate(self.intervals):
                unsaved = job.unsaved[i] + trained
                if unsaved >= interval:  # saved during this stretch: what is unsaved ran on these x nodes
                    unsaved %= interval
                    job.unsaved_gpu[i], job.unsaved_waf[i] = unsaved * gpu_rate, unsaved * value
                else:
                    job.unsaved_gpu[i] += trained * gpu_rate
                    job.unsaved_waf[i] += trained * value
                job.unsaved[i] = unsaved
        else:
            cause = CAUSE[job.phase]
            job.lost[cause] += dt
            if x:
                job.gpu[cause] += dt * x * self.g

    def _rate(self, job: _Job) -> None:
        """Update the cluster's WAF rate after the job's phase or nodes changed."""
        new = (job.spec.weight * job.spec.throughput(len(job.nodes)) * (1 - self.overhead)
               if job.phase is Phase.RUNNING else 0.0)
        if new != job.rate:
            self.total_rate += new - job.rate
            job.rate = new
            self.rate_log.append((self.now, self.total_rate))

    def _enter(self, job: _Job, phase: Phase, until: float | None = None) -> None:
        """Settle the job and put it in ``phase``; with ``until``, a READY event then."""
        self._settle(job)
        job.phase = phase
        job.epoch += 1
        if phase is Phase.SUSPENDED:
            job.rebuilding = False
        if until is not None:
            self._push(until, _READY, job.index, job.epoch)
        self._rate(job)

    def _recompute(self, job: _Job, tier: int) -> None:
        """Lose the training since the newest save of ``tier``: productive becomes recompute, at
        the GPU-seconds and WAF that training earned."""
        lost, lost_gpu, lost_waf = job.unsaved[tier], job.unsaved_gpu[tier], job.unsaved_waf[tier]
        if lost > 0:
            job.productive_s -= lost
            job.lost["recompute"] += lost
            job.gpu["productive"] -= lost_gpu
            job.gpu["recompute"] += lost_gpu
            job.waf -= lost_waf
            self.impulses.append((self.now, -lost_waf))
        for i in range(len(job.unsaved)):  # the lost work is the newest: of every tier's unsaved work too
            if job.unsaved[i] <= lost:
                job.saved(i)
            else:
                job.unsaved[i] -= lost
                job.unsaved_gpu[i] = max(0.0, job.unsaved_gpu[i] - lost_gpu)
                job.unsaved_waf[i] = max(0.0, job.unsaved_waf[i] - lost_waf)

    def _give(self, job: _Job, n: int) -> None:
        for _ in range(n):
            node = self.free.pop()
            self.owner[node] = job.index
            job.nodes.add(node)
        self.held += n

    def _release(self, job: _Job, n: int) -> None:
        for node in sorted(job.nodes)[len(job.nodes) - n:]:
            job.nodes.remove(node)
            self.owner[node] = -1
            self.free.add(node)
        self.held -= n

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> PolicyRun:
        started = walltime.perf_counter()
        for job in self.jobs:
            self._push(job.spec.arrive_s, _ARRIVE, job.index)
            self._push(job.spec.depart_s, _DEPART, job.index)
        times, nodes, kinds, repairs = (self.trace.times.tolist(), self.trace.nodes.tolist(),
                                        self.trace.kinds.tolist(), self.trace.repair_s.tolist())
        f, events = 0, 0
        while True:
            next_failure = times[f] if f < len(times) else self.horizon
            if self.heap and self.heap[0][0] <= next_failure and self.heap[0][0] < self.horizon:
                at, _, kind, subject, epoch = heapq.heappop(self.heap)
                self._tick(at)
                self._dispatch(kind, subject, epoch)
            elif next_failure < self.horizon:
                self._tick(next_failure)
                self._failure(nodes[f], KINDS[kinds[f]], repairs[f])
                f += 1
            else:
                break
            events += 1
            if self.held > self.healthy:
                self.overcommitted += 1
            if self.check:
                self._check_books()
            if self.progress is not None and events % 512 == 0:
                self.progress(self.now / self.horizon)
        self._tick(self.horizon)
        for job in self.alive.values():
            self._settle(job)
        if self.progress is not None:
            self.progress(1.0)
        return self._result(walltime.perf_counter() - started)

    def _dispatch(self, kind: int, subject: int, epoch: int) -> None:
        if kind == _REPAIR:
            self.down[subject] = False
            self.healthy += 1
            self.free.add(subject)
            self.counts["repairs"] += 1
            self._capacity_changed()
            return
        job = self.jobs[subject]
        if kind == _ARRIVE:
            self.alive[job.index] = job
            job.since = self.now
            if self.policy.allocation is Allocation.PLANNER:
                self._replan()
            else:
                self.queue[job.index] = job
                self._serve()
        elif kind == _DEPART:
            self._settle(job)
            self._release(job, len(job.nodes))
            job.phase = Phase.DONE
            job.epoch += 1
            self._rate(job)
            del self.alive[job.index]
            self.queue.pop(job.index, None)
            self._capacity_changed()
        elif epoch != job.epoch:
            return  # superseded: the job changed phase since
        elif kind == _DETECTED:
            self._detected(job)
        elif kind == _QUEUE_DONE:
            self._enter(job, Phase.WAITING)
            self.queue[job.index] = job
            self._serve()
        elif kind == _READY:
            job.rebuilding = False
            self._enter(job, Phase.RUNNING)

    # --- failures ----------------------------------------------------------------------------

    def _failure(self, node: int, kind: FailureKind, repair_s: float) -> None:
        if self.down[node]:
            self.counts["failures_on_down_nodes"] += 1
            return
        index = self.owner[node]
        job = self.jobs[index] if index >= 0 else None
        self.counts[f"failures_{kind}"] += 1
        if kind is FailureKind.NODE:
            if job is not None:
                self._settle(job)
                job.nodes.remove(node)
                self.held -= 1
                self.owner[node] = -1
            else:
                self.free.remove(node)
            self.down[node] = True
            self.healthy -= 1
            self._push(self.now + repair_s, _REPAIR, node)
        if job is None:
            self.counts["failures_on_free_nodes"] += 1
            if kind is FailureKind.NODE:
                self._capacity_changed()
            return
        job.failures += 1
        self._rate(job)
        if job.phase is Phase.RUNNING:
            self._stall(job, kind)
        elif job.phase is Phase.DETECTING:
            job.pending = kind if _WORST[kind] > _WORST[job.pending or kind] else job.pending
        elif kind is FailureKind.NODE and job.phase in (Phase.RECOVERING, Phase.RESIZING):
            # the processes were starting on the lost node: start over; a second loss while the
            # in-memory state is being rebuilt falls back to the disk tier
            if job.rebuilding and self.policy.fallback_recover_s is not None:
                job.fallback = True
            self._stall(job, kind)
        elif kind is FailureKind.NODE:
            self._capacity_changed()  # waiting, queued or suspended: the job will ask for what it lacks

    def _stall(self, job: _Job, kind: FailureKind) -> None:
        job.pending = kind
        self._enter(job, Phase.DETECTING)
        self._push(self.now + self.policy.detect_s[kind], _DETECTED, job.index, job.epoch)

    def _detected(self, job: _Job) -> None:
        policy = self.policy
        kind = job.pending or FailureKind.CRASH
        job.pending = None
        if kind in policy.retry_in_place:
            self.counts["retries_in_place"] += 1
            self._enter(job, Phase.RECOVERING, self.now + policy.recover_s[kind])
            return
        self.counts["restarts"] += 1
        job.restarts += 1
        if job.fallback:
            self.counts["fallbacks_to_disk"] += 1
            self._settle(job)
            self._recompute(job, len(policy.tiers) - 1)
            job.recover_s, job.fallback, job.rebuilding = policy.fallback_recover_s or 0.0, False, False
        else:
            self._settle(job)
            self._recompute(job, 0)
            job.recover_s = policy.recover_s[kind]
            job.rebuilding = kind is FailureKind.NODE and policy.fallback_recover_s is not None
        if policy.allocation is Allocation.PLANNER:
            self._enter(job, Phase.RECOVERING, self.now + job.recover_s)
            if kind is FailureKind.NODE:
                self._replan()
        elif policy.queue_s > 0:
            self._enter(job, Phase.QUEUED)
            self._push(self.now + policy.queue_s, _QUEUE_DONE, job.index, job.epoch)
        else:
            self._enter(job, Phase.WAITING)
            self.queue[job.index] = job
            self._serve()

    # --- allocation --------------------------------------------------------------------------

    def _capacity_changed(self) -> None:
        if self.policy.allocation is Allocation.PLANNER:
            self._replan()
        else:
            self._serve()

    def _serve(self) -> None:
        """Rigid and elastic allocation: queued jobs in request order, each as soon as free nodes
        cover what it lacks (later ones may pass an earlier one that does not fit: backfill);
        then elastic jobs below their size grow into what is left."""
        rigid = self.policy.allocation is Allocation.RIGID
        for job in list(self.queue.values()):
            have, free = len(job.nodes), len(self.free)
            lacking = job.spec.nodes - have if rigid else max(0, job.spec.min_nodes - have)
            if lacking > free:
                continue
            del self.queue[job.index]
            self._settle(job)
            self._give(job, job.spec.nodes - have if rigid else min(free, job.spec.nodes - have))
            if job.phase is Phase.PENDING:
                self._enter(job, Phase.RUNNING)  # a first start costs every policy the same: nothing
            else:
                self._enter(job, Phase.RECOVERING, self.now + job.recover_s)
        if rigid or not self.free:
            return
        for job in self.alive.values():
            if not self.free:
                break
            if job.phase is Phase.RUNNING and len(job.nodes) < job.spec.nodes:
                self._settle(job)
                if self.policy.resize_recompute:
                    self._recompute(job, 0)
                else:
                    job.saved(0)  # a fresh snapshot before the resize
                self._give(job, min(len(self.free), job.spec.nodes - len(job.nodes)))
                self._resize(job, self.policy.resize_s)
                self.counts["grows"] += 1

    def _resize(self, job: _Job, seconds: float) -> None:
        job.resizes += 1
        self.counts["resizes"] += 1
        self._enter(job, Phase.RESIZING, self.now + seconds)

    def _replan(self) -> None:
        """Run the cluster planner over the jobs the operator knows of and apply its plan:
        shrinks and suspensions first (freeing nodes), then grows, starts and resumes."""
        policy = self.policy
        demands, unknown = [], 0
        for job in self.alive.values():
            if job.phase is Phase.DETECTING:
                unknown += len(job.nodes)
                continue
            transition = {Phase.PENDING: 0.0, Phase.RECOVERING: 0.0, Phase.SUSPENDED: self.resume_s}.get(
                job.phase, policy.resize_s)
            demands.append(JobDemand(job.spec.key, job.spec.min_nodes, job.spec.nodes, current=len(job.nodes),
                                     weight=job.spec.weight, throughput=self.curves[job.index],
                                     transition_s=transition))
        self.counts["plans"] += 1
        if not demands:
            return
        result = planner.plan(demands, self.healthy - unknown, policy.plan_horizon_s)
        by_key = {job.spec.key: job for job in self.alive.values()}
        planned_changes = result.changes(demands)
        for key, count in result.workers.items():
            # a job restarting on no nodes (it lost every node) that the plan gives none is no
            # change of its count (0 -> 0) to the planner, but it must be suspended here: never
            # restarted onto nothing
            if count == 0 and not by_key[key].nodes and by_key[key].phase is Phase.RECOVERING:
                planned_changes[key] = (0, 0)
        changes = sorted(planned_changes.items(), key=lambda kv: kv[1][1] - kv[1][0])  # shrinks first
        for key, (current, planned) in changes:
            job = by_key[key]
            self._settle(job)
            if planned < current:
                self._release(job, current - planned)
            else:
                self._give(job, planned - current)
            if planned == 0:
                self.counts["suspensions"] += 1
                self._enter(job, Phase.SUSPENDED)
            elif job.phase is Phase.PENDING:
                self._enter(job, Phase.RUNNING)
            elif job.phase is Phase.SUSPENDED:
                self.counts["resumes"] += 1
                self._resize(job, self.resume_s)
            elif job.phase is Phase.RECOVERING:
                self._rate(job)  # the resize folds into the restart under way
            else:  # running or resizing: a planned transition from a fresh snapshot
                job.saved(0)
                self.counts["shrinks" if planned < current else "grows"] += 1
                self._resize(job, policy.resize_s)

    # --- checks and results ------------------------------------------------------------------

    def _check_books(self) -> None:
        """Every node's books agree (the invariants of the module docstring)."""
        held = 0
        for job in self.alive.values():
            held += len(job.nodes)
            for node in job.nodes:
                if self.owner[node] != job.index or self.down[node]:
                    raise SimulationError(f"node {node} of {job.spec.key} is not its own or is down")
            x = len(job.nodes)
            if job.phase in (Phase.RUNNING, Phase.RECOVERING, Phase.RESIZING):  # each ends in RUNNING as it is
                low = job.spec.nodes if self.policy.allocation is Allocation.RIGID else job.spec.min_nodes
                if not low <= x <= job.spec.nodes:
                    doing = {Phase.RUNNING: "runs", Phase.RECOVERING: "restarts", Phase.RESIZING: "resizes"}
                    raise SimulationError(f"{job.spec.key} {doing[job.phase]} on {x} nodes, "
                                          f"outside [{low}, {job.spec.nodes}]")
        if held != self.held or len(self.free) != self.healthy - self.held or self.held > self.healthy:
            raise SimulationError(f"node books disagree: held {held}/{self.held}, free {len(self.free)}, "
                                  f"healthy {self.healthy}")

    def _result(self, wall_s: float) -> PolicyRun:
        jobs, gpu = [], dict.fromkeys(GPU_CAUSES, 0.0)
        for job in self.jobs:
            alive = max(0.0, min(job.spec.depart_s, self.horizon) - job.alive_from)
            jobs.append(JobResult(key=job.spec.key, nodes=job.spec.nodes, min_nodes=job.spec.min_nodes,
                                  weight=job.spec.weight, alive_s=alive, productive_s=job.productive_s,
                                  lost_s=dict(job.lost), waf_flop=job.waf, failures=job.failures,
                                  restarts=job.restarts, resizes=job.resizes))
            for cause, value in job.gpu.items():
                gpu[cause] += value
        gpu["idle"] = self.idle_node_s * self.g
        gpu["down"] = self.down_node_s * self.g
        log = np.array(self.rate_log, dtype=np.float64)
        impulses = np.array(self.impulses, dtype=np.float64).reshape(-1, 2)
        return PolicyRun(policy=self.policy, config=self.config, jobs=jobs, gpu_s=gpu,
                         rate_times=log[:, 0], rates=log[:, 1], impulse_times=impulses[:, 0],
                         impulses=impulses[:, 1], counts=dict(self.counts), overcommitted_events=self.overcommitted,
                         wall_s=wall_s)


def simulate(config: ClusterConfig, jobs: Sequence[JobSpec], trace: FailureTrace, policy: Policy,
             progress: Progress | None = None, check: bool = False) -> PolicyRun:
    """Run ``policy`` over ``jobs`` and ``trace`` on ``config``'s cluster (deterministic)."""
    return Engine(config, jobs, trace, policy, progress, check).run()
