"""The reconcile decision: from a job's spec, its observed workers and its last status, what
to create, what to delete, and what the status is now.

Level based: the answer depends only on the current observation, never on which event woke
the operator, so running it twice on the same input is harmless. Rules, in order:

1. A finished job (Succeeded, Failed) stays finished whatever its spec becomes; it only
   removes workers that still run or wait.
2. An invalid spec fails the job with reason ``InvalidSpec``; nothing is created and any
   worker it had is deleted. A later spec change (new generation) re-evaluates it.
3. Once any worker has succeeded the job is completing: no worker is created or replaced,
   waiting ones are removed, and so are running ones whose agent is regrouping (waiting in
   rendezvous for a round that, with training done, will never start: e.g. a replacement
   that came up after the others finished). When none runs the job ends, Succeeded if no
   worker failed.
4. Failures are folded into status (:mod:`.incidents`): first the incidents the in-band
   channels decided (a process restarted in place, a hang), then each failed worker, decided
   by the failure policy (:mod:`.policy`). A worker to replace is deleted, to be recreated
   under the same name on a later pass; a ``ReplaceNode`` also quarantines its node. A
   ``FailJob`` decision (a rule, a restart storm, the budget spent) fails the job. A
   replacement decided with a backoff holds every creation until ``replacementsAfter``.
5. The job wants ``max`` workers, or the cluster planner's count when it plans (an
   ``allocation``, clamped to ``max``). Missing workers get the lowest free indices in
   ``[0, max)``; indices ``>= max`` are removed; beyond the wanted count, waiting workers go
   first, then the highest indices. Waiting (Pending) workers never block or restart running
   ones: the job is Running with any ready count in ``[min, max]``, and grows when a waiting
   worker becomes ready.
6. An allocation of 0 suspends the job: every worker is removed, the phase is ``Suspended``
   (not terminal), and a later allocation resumes it. Resizes by the planner are not failures:
   nothing is charged.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from salamander.api import ConditionType, InvalidSpec, Phase, Reason, TrainingJobSpec, TrainingJobStatus
from salamander.api.models import AllocationRecord, Condition, RestoreRecord
from salamander.wire import Progress
from salamander_operator import goodput
from salamander_operator.desired import JobRef, worker_name
from salamander_operator.failures import classify_worker
from salamander_operator.incidents import Incident, fold_incidents, release_expired
from salamander_operator.observed import ObservedWorker, WorkerPhase
from salamander_operator.policy import FailureEvidence, RestartHistory, decide
from salamander_operator.straggler_watch import StragglerVerdict, quarantined


@dataclass(frozen=True)
class Event:
    """Something a person should see in ``kubectl describe`` (or the local runtime's log)."""

    type: str  # "Normal" or "Warning"
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    """What to do now. ``create`` and ``delete`` are disjoint worker indices."""

    create: tuple[int, ...] = ()
    delete: tuple[int, ...] = ()
    status: TrainingJobStatus = field(default_factory=TrainingJobStatus)
    events: tuple[Event, ...] = ()
    incidents: tuple[Incident, ...] = ()  # every failure folded into status in this pass


def set_condition(conditions: Sequence[Condition], type_: str, status: bool, reason: str, message: str,
                  generation: int, now: datetime.datetime) -> list[Condition]:
    """Conditions with ``type_`` set; ``lastTransitionTime`` moves only when the status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == value else now
    new = Condition(type=type_, status=value, reason=reason, message=message,
                    last_transition_time=since, observed_generation=generation)
    return [c for c in conditions if c.type != type_] + [new]


def _ended(status: TrainingJobStatus, job: JobRef, phase: Phase, reason: str, message: str,
           now: datetime.datetime) -> TrainingJobStatus:
    ok = phase is Phase.SUCCEEDED
    conditions = set_condition(status.conditions, ConditionType.READY, False, reason, message,
                               job.generation, now)
    conditions = set_condition(conditions, ConditionType.SUCCEEDED, ok, reason, message, job.generation, now)
    conditions = set_condition(conditions, ConditionType.FAILED, not ok, reason, message, job.generation, now)
    return status.model_copy(update={
        "phase": phase, "conditions": conditions, "observed_generation": job.generation,
        "desired_workers": 0, "ready_workers": 0,
        "completion_time": status.completion_time or now,
    })


def _unfinished(observed: Sequence[ObservedWorker]) -> tuple[int, ...]:
    return tuple(sorted(w.index for w in observed
                        if not w.deleting and w.phase in (WorkerPhase.PENDING, WorkerPhase.RUNNING)))


def reconcile(job: JobRef, spec: TrainingJobSpec | InvalidSpec, observed: Sequence[ObservedWorker],
              previous: TrainingJobStatus, progress: Progress | None,
              now: datetime.datetime, incidents: Sequence[Incident] = (),
              straggling: StragglerVerdict | None = None, allocation: AllocationRecord | None = None,
              regrouping: frozenset[int] = frozenset()) -> Plan:
    """Decide one pass for one job. Pure: the caller observes and applies. ``incidents`` are the
    failures the in-band channels detected and decided since the last pass; ``straggling`` what
    straggler detection found and asks (status, an eviction, an undo); ``allocation`` the
    cluster planner's worker count (None: no planning, the job wants ``max``); ``regrouping``
    the workers whose agents say they wait in rendezvous (:func:`.liveness.regrouping`). The
    goodput ledger is brought up to ``now`` on every pass of a live job, and frozen once it ends."""
    plan = _decide(job, spec, observed, previous, progress, now, incidents, straggling, allocation, regrouping)
    if plan.status.phase.terminal and previous.phase.terminal:
        return plan
    ledger = goodput.account(plan.status.goodput, progress, plan.status.last_failure, now,
                             final=plan.status.phase.terminal)
    return replace(plan, status=plan.status.model_copy(update={"goodput": ledger}))


def _decide(job: JobRef, spec: TrainingJobSpec | InvalidSpec, observed: Sequence[ObservedWorker],
            previous: TrainingJobStatus, progress: Progress | None,
            now: datetime.datetime, incidents: Sequence[Incident] = (),
            straggling: StragglerVerdict | None = None, allocation: AllocationRecord | None = None,
            regrouping: frozenset[int] = frozenset()) -> Plan:
    if previous.phase.terminal:
        invalid_before = _reason(previous) == Reason.INVALID_SPEC
        if invalid_before and previous.observed_generation != job.generation:
            previous = TrainingJobStatus()  # the spec was edited after InvalidSpec: start over
        else:
            return Plan(delete=_unfinished(observed), status=previous)  # finished stays finished

    if isinstance(spec, InvalidSpec):
        alive = tuple(sorted(w.index for w in observed if not w.deleting))
        status = _ended(previous, job, Phase.FAILED, Reason.INVALID_SPEC, str(spec), now)
        changed = previous.observed_generation != job.generation or previous.phase is not Phase.FAILED
        events = (Event("Warning", Reason.INVALID_SPEC, str(spec)),) if changed else ()
        return Plan(delete=alive, status=status, events=events)

    live = [w for w in observed if not w.deleting]
    failed = [w for w in live if w.phase is WorkerPhase.FAILED]
    succeeded = [w for w in live if w.phase is WorkerPhase.SUCCEEDED]
    running = [w for w in live if w.phase is WorkerPhase.RUNNING]
    status, restored = with_restore(_with_progress(previous, progress), progress, now)

    if succeeded:
        stranded = [w for w in running if w.index in regrouping]   # their round will never start
        running = [w for w in running if w.index not in regrouping]
        waiting = tuple(sorted([w.index for w in live if w.phase is WorkerPhase.PENDING]
                               + [w.index for w in stranded]))
        if running:
            return Plan(delete=waiting, status=_running_status(status, job, spec, running, progress, now,
                                                               completing=True), events=restored)
        if failed:
            names = ", ".join(f"worker {w.index} ({w.describe_failure()})" for w in failed)
            message = f"training finished but {names} failed"
            return Plan(delete=waiting, status=_ended(status, job, Phase.FAILED, Reason.WORKERS_FAILED_AT_END,
                                                      message, now),
                        events=(*restored, Event("Warning", Reason.WORKERS_FAILED_AT_END, message)))
        message = f"all {len(succeeded)} workers exited 0"
        return Plan(delete=waiting,
                    status=_ended(status, job, Phase.SUCCEEDED, Reason.ALL_WORKERS_SUCCEEDED, message, now),
                    events=(*restored, Event("Normal", Reason.COMPLETED, message)))

    # Failures: first those the channels already decided (agent reports, hangs), then failed pods.
    folded = fold_incidents(status, incidents, spec.failure_policy, spec.restart_budget, now)
    pod_incidents = decide_failed_workers(job, spec, failed, folded.status, now)
    folded_pods = fold_incidents(folded.status, pod_incidents, spec.failure_policy, spec.restart_budget, now)
    status = folded_pods.status
    events = [*restored, *(Event(*e) for e in (*folded.events, *folded_pods.events))]
    failure = folded.failure or folded_pods.failure
    if failure is not None:
        reason, message = failure
        events.append(Event("Warning", reason, message))
        return Plan(delete=_unfinished(live), status=_ended(status, job, Phase.FAILED, reason, message, now),
                    events=tuple(events), incidents=(*incidents, *pod_incidents))
    status, released = _release_quarantine(status, now)
    status = _release_replacement_hold(status, now)
    events.extend(Event("Normal", Reason.NODE_RELEASED, f"node {node} is out of quarantine") for node in released)

    status, allocation_events = _with_allocation(status, allocation)
    events.extend(allocation_events)
    evicted: set[int] = set()
    if straggling is not None:
        status, straggler_events, evicted = _with_stragglers(status, straggling, {w.index for w in running}, now)
        events.extend(straggler_events)
    replaced = {w.index for w in failed} | folded.replace | folded_pods.replace | evicted
    wanted = spec.replicas.max if allocation is None else min(allocation.workers, spec.replicas.max)
    create, delete = _membership(observed, live, replaced, wanted, spec.replicas.max)
    if status.replacements_after is not None:
        create = ()   # backing off after a replacement (released on the first pass past it)
    kept = [w for w in running if w.index not in replaced and w.index not in delete]
    if wanted == 0:
        new_status = _suspended_status(status, job, allocation, now)
    else:
        new_status = _running_status(status, job, spec, kept, progress, now, wanted=wanted)
    events.extend(_membership_events(status, new_status, progress))
    return Plan(create=create, delete=delete, status=new_status, events=tuple(events),
                incidents=(*incidents, *pod_incidents))


def _membership(observed: Sequence[ObservedWorker], live: Sequence[ObservedWorker], replaced: set[int],
                wanted: int, maximum: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which indices to create and delete so that ``wanted`` workers (not being replaced) are
    kept or on the way. Live workers at ``>= maximum`` go; beyond ``wanted``, waiting ones
    go before running ones, higher indices first; the missing get the lowest free indices
    below ``maximum`` (a deleting worker still holds its name until it is gone). With
    ``wanted == maximum`` this is every free index created and nothing healthy deleted."""
    held = {w.index for w in observed}
    staying = [w for w in live if w.index not in replaced and w.index < maximum]
    staying.sort(key=lambda w: (w.phase is not WorkerPhase.RUNNING, not w.ready, w.index))
    surplus = {w.index for w in staying[wanted:]}
    delete = (replaced & {w.index for w in live}) | {w.index for w in live if w.index >= maximum} | surplus
    missing = max(0, wanted - len(staying))
    create = [i for i in range(maximum) if i not in held][:missing]
    return tuple(create), tuple(sorted(delete))


def _with_allocation(status: TrainingJobStatus,
                     allocation: AllocationRecord | None) -> tuple[TrainingJobStatus, list[Event]]:
    """Status with the planner's ``allocation`` recorded, and an event when its count changed:
    ``Suspended`` (to 0), ``Resumed`` (from 0) or ``Rescaled``. None (no planning, e.g. the
    operator restarted without it) clears a stale record."""
    if allocation is None:
        return (status if status.allocation is None else status.model_copy(update={"allocation": None})), []
    before = status.allocation
    events: list[Event] = []
    if before is None or before.workers != allocation.workers:
        old = "none" if before is None else str(before.workers)
        if allocation.workers == 0:
            events.append(Event("Warning", Reason.SUSPENDED, f"the cluster planner suspended the job: "
                                                              f"{allocation.reason}"))
        elif before is not None and before.workers == 0:
            events.append(Event("Normal", Reason.RESUMED, f"the cluster planner resumed the job with "
                                                           f"{allocation.workers} workers: {allocation.reason}"))
        elif before is not None:
            events.append(Event("Normal", Reason.RESCALED, f"the cluster planner moved the job from {old} to "
                                                            f"{allocation.workers} workers: {allocation.reason}"))
    return status.model_copy(update={"allocation": allocation}), events


def _suspended_status(status: TrainingJobStatus, job: JobRef, allocation: AllocationRecord | None,
                      now: datetime.datetime) -> TrainingJobStatus:
    message = f"suspended by the cluster planner: {allocation.reason}" if allocation is not None else "suspended"
    conditions = set_condition(status.conditions, ConditionType.READY, False, Reason.SUSPENDED, message,
                               job.generation, now)
    return status.model_copy(update={
        "phase": Phase.SUSPENDED, "conditions": conditions, "observed_generation": job.generation,
        "desired_workers": 0, "ready_workers": 0, "world_size": 0,
    })


def _with_stragglers(status: TrainingJobStatus, verdict: StragglerVerdict, running: set[int],
                     now: datetime.datetime) -> tuple[TrainingJobStatus, list[Event], set[int]]:
    """Status with the current stragglers, the evicted stragglers' nodes quarantined and the
    undone ones released; the events (a straggler new since the last pass, an eviction, an
    undo) and the workers to replace. An eviction is not a restart: it is not charged."""
    events: list[Event] = []
    known = {r.rank for r in status.stragglers}
    for r in verdict.records:
        if r.rank not in known:
            where = f" on node {r.node}" if r.node else ""
            events.append(Event("Warning", Reason.STRAGGLER_DETECTED,
                                f"rank {r.rank}{where} is {r.slowdown:.0%} slower than the median rank "
                                f"(z {r.score:.1f}, cause {r.cause})"))
    quarantined_nodes = list(status.quarantined_nodes)
    evicted: set[int] = set()
    for e in verdict.evictions:
        if e.worker in running:
            evicted.add(e.worker)
            quarantined_nodes = quarantined(quarantined_nodes, e)
            events.append(Event("Warning", Reason.STRAGGLER_EVICTED,
                                f"replacing worker {e.worker} and keeping node {e.node} out until "
                                f"{e.until:%H:%M:%S} UTC: {e.why}"))
    for node, why in verdict.releases:
        if any(q.node == node for q in quarantined_nodes):
            quarantined_nodes = [q for q in quarantined_nodes if q.node != node]
            events.append(Event("Normal", Reason.STRAGGLER_EVICTION_UNDONE, f"node {node} is back: {why}"))
    return status.model_copy(update={"stragglers": list(verdict.records),
                                     "quarantined_nodes": quarantined_nodes}), events, evicted


def decide_failed_workers(job: JobRef, spec: TrainingJobSpec, failed: Sequence[ObservedWorker],
                          status: TrainingJobStatus, now: datetime.datetime) -> list[Incident]:
    """One incident per failed worker (a failed pod, a lost agent), decided in index order so
    each sees the restarts charged before it."""
    history = RestartHistory(status.restarts, tuple(status.restart_times))
    incidents = []
    for w in failed:
        c = classify_worker(w.reason, w.exit_code, w.describe_failure())
        signal_number = w.exit_code - 128 if w.exit_code is not None and w.exit_code > 128 else 0
        evidence = FailureEvidence(c, pod_alive=False, exit_code=w.exit_code, signal_number=signal_number)
        decision = decide(spec.failure_policy, spec.restart_budget, evidence, history, now)
        if decision.charged:
            history = history.charged(now, spec.failure_policy.window_seconds)
        incidents.append(Incident(c, decision, now, worker=w.index, pod=worker_name(job, w.index), node=w.node,
                                  occurred_at=w.failed_at))
    return incidents


def _release_quarantine(status: TrainingJobStatus, now: datetime.datetime) -> tuple[TrainingJobStatus, list[str]]:
    kept, released = release_expired(status.quarantined_nodes, now)
    if not released:
        return status, []
    return status.model_copy(update={"quarantined_nodes": kept}), released


def _release_replacement_hold(status: TrainingJobStatus, now: datetime.datetime) -> TrainingJobStatus:
    """Status without a replacement backoff that has run out."""
    if status.replacements_after is None or status.replacements_after > now:
        return status
    return status.model_copy(update={"replacements_after": None})


def _membership_events(before: TrainingJobStatus, after: TrainingJobStatus,
                       progress: Progress | None) -> list[Event]:
    """Shrunk/Grew when the training's own world size changes (it re-formed with fewer or more)."""
    if progress is None or before.world_size <= 0 or after.world_size == before.world_size \
            or after.world_size != progress.world_size:
        return []
    reason = Reason.SHRUNK if after.world_size < before.world_size else Reason.GREW
    return [Event("Normal", reason, f"the training re-formed with world size {after.world_size} "
                                     f"(was {before.world_size})")]


def _reason(status: TrainingJobStatus) -> str | None:
    failed = status.condition(ConditionType.FAILED)
    return failed.reason if failed is not None and failed.status == "True" else None


def _with_progress(status: TrainingJobStatus, progress: Progress | None) -> TrainingJobStatus:
    if progress is None:
        return status
    return status.model_copy(update={"step": progress.step, "loss": progress.loss})


def with_restore(status: TrainingJobStatus, progress: Progress | None,
                 now: datetime.datetime) -> tuple[TrainingJobStatus, tuple[Event, ...]]:
    """``status.lastRestore`` brought up to date with the restore ``progress`` reports, and the
    ``SnapshotRestored`` event when it is news: a restore tier (or step) other than the one
    status has for that ``restart_count``, whose ``at`` is then ``now`` (when first seen).
    A record without a restore tier changes nothing; nor does the same restore seen again, so
    each restore is recorded and announced once. A fresh start with nothing to restore
    (tier ``none``, restart 0) is recorded without an event; ``none`` after a restart is a
    Warning, since training started over."""
    if progress is None or progress.restore_tier is None:
        return status, ()
    last = status.last_restore
    if last is not None and (last.restart_count, last.tier, last.step) == (
            progress.restart_count, progress.restore_tier, progress.restore_step):
        return status, ()
    record = RestoreRecord(tier=progress.restore_tier, step=progress.restore_step, at=now,
                           restart_count=progress.restart_count)
    status = status.model_copy(update={"last_restore": record})
    if record.tier != "none":
        return status, (Event("Normal", Reason.SNAPSHOT_RESTORED, f"restored step {record.step} from {record.tier}"),)
    if record.restart_count > 0:
        return status, (Event("Warning", Reason.SNAPSHOT_RESTORED,
                              f"restart {record.restart_count} found no snapshot or checkpoint to restore: "
                              "training started over"),)
    return status, ()


def _running_status(status: TrainingJobStatus, job: JobRef, spec: TrainingJobSpec,
                    running: Sequence[ObservedWorker], progress: Progress | None,
                    now: datetime.datetime, completing: bool = False, wanted: int | None = None) -> TrainingJobStatus:
    """The status of a live job that wants ``wanted`` workers (default ``max``). While
    ``completing`` (some workers already exited 0), the workers still finishing are not a
    shortfall: phase and conditions stay as they were."""
    ready = sum(1 for w in running if w.ready)
    enough = ready >= spec.replicas.min
    phase, conditions = status.phase, list(status.conditions)
    if not completing:
        if enough:
            phase = Phase.RUNNING
            reason, message = Reason.ENOUGH_WORKERS, (f"{ready} of {spec.replicas.min}..{spec.replicas.max} "
                                                      "workers ready")
        else:
            phase = Phase.RESTARTING if status.phase in (Phase.RUNNING, Phase.RESTARTING) else Phase.PENDING
            if status.phase is Phase.SUSPENDED:
                phase = Phase.PENDING  # resumed: waiting for its workers again
            reason, message = Reason.WAITING_FOR_WORKERS, (f"{ready} workers ready, "
                                                           f"waiting for at least {spec.replicas.min}")
        conditions = set_condition(conditions, ConditionType.READY, enough, reason, message, job.generation, now)
    last_failure = status.last_failure
    if phase is Phase.RUNNING and last_failure is not None and last_failure.recovered_at is None \
            and last_failure.detected_at < now and last_failure.action != "FailJob" \
            and (progress is None or progress.time > last_failure.detected_at.timestamp()):
        # healed: running again, and training made a step after the failure was detected (then)
        when = now if progress is None else min(now, datetime.datetime.fromtimestamp(progress.time, datetime.UTC))
        last_failure = last_failure.model_copy(update={"recovered_at": when})
    return status.model_copy(update={
        "phase": phase, "conditions": conditions, "observed_generation": job.generation,
        "last_failure": last_failure,
        "desired_workers": spec.replicas.max if wanted is None else wanted, "ready_workers": ready,
        "world_size": (status.world_size if completing else
                       progress.world_size if progress is not None and enough else ready * spec.procs_per_node),
        "start_time": status.start_time or (now if enough else None),
    })
