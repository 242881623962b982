"""The reconcile decision: from a job's spec, its observed workers and its last status, what
to create, what to delete, and what the status is now.

Level based: the answer depends only on the current observation, never on which event woke
the operator, so running it twice on the same input is harmless. Rules, in order:

1. A finished job (Succeeded, Failed) stays finished whatever its spec becomes; it only
   removes workers that still run or wait.
2. An invalid spec fails the job with reason ``InvalidSpec``; nothing is created and any
   worker it had is deleted. A later spec change (new generation) re-evaluates it.
3. Once any worker has succeeded the job is completing: no worker is created or replaced,
   waiting ones are removed, and when none runs the job ends, Succeeded if no worker failed.
4. A failed worker is deleted, to be recreated under the same name on a later pass, and
   counts one restart. A failure beyond ``restartBudget`` fails the job instead.
5. Every index in ``[0, max)`` without a worker gets one; indices ``>= max`` are removed.
   Waiting (Pending) workers never block or restart running ones: the job is Running with
   any ready count in ``[min, max]``, and grows when a waiting worker becomes ready.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from salamander.api import ConditionType, InvalidSpec, Phase, Reason, TrainingJobSpec, TrainingJobStatus
from salamander.api.models import Condition, FailureRecord
from salamander.wire import Progress
from salamander_operator.desired import JobRef, worker_name
from salamander_operator.failures import classify_worker
from salamander_operator.observed import ObservedWorker, WorkerPhase


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
              now: datetime.datetime) -> Plan:
    """Decide one pass for one job. Pure: the caller observes and applies."""
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
    status = _with_progress(previous, progress)

    if succeeded:
        waiting = tuple(sorted(w.index for w in live if w.phase is WorkerPhase.PENDING))
        if running:
            return Plan(delete=waiting, status=_running_status(status, job, spec, running, progress, now,
                                                               completing=True))
        if failed:
            names = ", ".join(f"worker {w.index} ({w.describe_failure()})" for w in failed)
            message = f"training finished but {names} failed"
            return Plan(delete=waiting, status=_ended(status, job, Phase.FAILED, Reason.WORKERS_FAILED_AT_END,
                                                      message, now),
                        events=(Event("Warning", Reason.WORKERS_FAILED_AT_END, message),))
        message = f"all {len(succeeded)} workers exited 0"
        return Plan(delete=waiting,
                    status=_ended(status, job, Phase.SUCCEEDED, Reason.ALL_WORKERS_SUCCEEDED, message, now),
                    events=(Event("Normal", Reason.COMPLETED, message),))

    events: list[Event] = []
    if failed:
        budget = spec.restart_budget
        exhausted = status.restarts + len(failed) > budget
        status = _record_failures(status, job, failed, "FailJob" if exhausted else "ReplacePod", now)
        if exhausted:
            worst = failed[0]
            message = (f"worker {worst.index} failed ({worst.describe_failure()}) and the restart budget "
                       f"of {budget} is spent")
            return Plan(delete=_unfinished(live),
                        status=_ended(status, job, Phase.FAILED, Reason.RESTART_BUDGET_EXHAUSTED, message, now),
                        events=(Event("Warning", Reason.RESTART_BUDGET_EXHAUSTED, message),))
        for n, w in enumerate(failed, start=status.restarts + 1):
            events.append(Event("Warning", Reason.WORKER_FAILED,
                                f"worker {w.index} failed ({w.describe_failure()}); replacing it "
                                f"(restart {n} of {budget})"))
        status = status.model_copy(update={"restarts": status.restarts + len(failed)})

    held = {w.index for w in observed}  # a deleting worker still holds its name
    create = tuple(i for i in range(spec.replicas.max) if i not in held)
    delete = tuple(sorted({w.index for w in failed} | {w.index for w in live if w.index >= spec.replicas.max}))
    return Plan(create=create, delete=delete, status=_running_status(status, job, spec, running, progress, now),
                events=tuple(events))


def _record_failures(status: TrainingJobStatus, job: JobRef, failed: Sequence[ObservedWorker], action: str,
                     now: datetime.datetime) -> TrainingJobStatus:
    """Count each failed worker by kind and keep the newest as ``last_failure``."""
    counts = dict(status.failure_counts)
    record = status.last_failure
    for w in failed:
        c = classify_worker(w.reason, w.exit_code, w.describe_failure())
        counts[c.kind] = counts.get(c.kind, 0) + 1
        record = FailureRecord(kind=c.kind, severity=c.severity.name, source=c.source.value, worker=w.index,
                               pod=worker_name(job, w.index), node=w.node, message=c.evidence[:300],
                               action=action, detected_at=now)
    return status.model_copy(update={"failure_counts": counts, "last_failure": record})


def _reason(status: TrainingJobStatus) -> str | None:
    failed = status.condition(ConditionType.FAILED)
    return failed.reason if failed is not None and failed.status == "True" else None


def _with_progress(status: TrainingJobStatus, progress: Progress | None) -> TrainingJobStatus:
    if progress is None:
        return status
    return status.model_copy(update={"step": progress.step, "loss": progress.loss})


def _running_status(status: TrainingJobStatus, job: JobRef, spec: TrainingJobSpec,
                    running: Sequence[ObservedWorker], progress: Progress | None,
                    now: datetime.datetime, completing: bool = False) -> TrainingJobStatus:
    """The status of a live job. While ``completing`` (some workers already exited 0), the
    workers still finishing are not a shortfall: phase and conditions stay as they were."""
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
            reason, message = Reason.WAITING_FOR_WORKERS, (f"{ready} workers ready, "
                                                           f"waiting for at least {spec.replicas.min}")
        conditions = set_condition(conditions, ConditionType.READY, enough, reason, message, job.generation, now)
    last_failure = status.last_failure
    if phase is Phase.RUNNING and last_failure is not None and last_failure.recovered_at is None \
            and last_failure.detected_at < now:
        last_failure = last_failure.model_copy(update={"recovered_at": now})
    return status.model_copy(update={
        "phase": phase, "conditions": conditions, "observed_generation": job.generation,
        "last_failure": last_failure,
        "desired_workers": spec.replicas.max, "ready_workers": ready,
        "world_size": (status.world_size if completing else
                       progress.world_size if progress is not None and enough else ready * spec.procs_per_node),
        "start_time": status.start_time or (now if enough else None),
    })
