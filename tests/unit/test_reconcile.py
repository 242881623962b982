"""The pure reconcile decision: spec + observed workers + last status -> Plan."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander.api import ConditionType, InvalidSpec, Phase, Reason, TrainingJobSpec, TrainingJobStatus, parse_spec
from salamander.wire import Progress
from salamander_operator.desired import JobRef
from salamander_operator.observed import ObservedWorker, WorkerPhase
from salamander_operator.reconcile import Plan, reconcile, set_condition, with_restore
from tests.unit._support import FAST, QUICK, timeless

T0 = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=1)
T2 = T0 + datetime.timedelta(minutes=2)
T3 = T0 + datetime.timedelta(minutes=3)
JOB = JobRef(name="llm", namespace="team-a", uid="uid-1", generation=1)
FRESH = TrainingJobStatus()

P, R, S, F = WorkerPhase.PENDING, WorkerPhase.RUNNING, WorkerPhase.SUCCEEDED, WorkerPhase.FAILED


def spec(min_: int = 1, max_: int = 1, budget: int = 3, procs: int = 1) -> TrainingJobSpec:
    return parse_spec({"replicas": {"min": min_, "max": max_}, "procsPerNode": procs, "restartBudget": budget,
                       "worker": {"image": "img", "command": ["python", "train.py"]}})


def ready(index: int) -> ObservedWorker:
    return ObservedWorker(index=index, phase=R, ready=True)


def pending(index: int) -> ObservedWorker:
    return ObservedWorker(index=index, phase=P)


def failed(index: int, exit_code: int | None = 1, reason: str = "") -> ObservedWorker:
    return ObservedWorker(index=index, phase=F, exit_code=exit_code, reason=reason)


def succeeded(index: int) -> ObservedWorker:
    return ObservedWorker(index=index, phase=S, exit_code=0)


def cond(status: TrainingJobStatus, type_: str):
    c = status.condition(type_)
    assert c is not None, f"no {type_} condition in {status.conditions}"
    return c


def running_status(restarts: int = 0) -> TrainingJobStatus:
    """The status of a job that has been running since T0 with two ready workers (min 2, max 2)."""
    plan = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], FRESH, None, T0)
    assert plan.status.phase is Phase.RUNNING
    return plan.status.model_copy(update={"restarts": restarts})


# --- a fresh job -------------------------------------------------------------------------------

def test_fresh_job_creates_every_index_and_is_pending() -> None:
    plan = reconcile(JOB, spec(2, 4), [], FRESH, None, T0)
    assert plan.create == (0, 1, 2, 3)
    assert plan.delete == ()
    assert plan.events == ()
    st_ = plan.status
    assert st_.phase is Phase.PENDING
    assert st_.desired_workers == 4
    assert st_.ready_workers == 0
    assert st_.observed_generation == JOB.generation
    assert st_.start_time is None and st_.completion_time is None
    assert st_.restarts == 0
    ready_cond = cond(st_, ConditionType.READY)
    assert ready_cond.status == "False"
    assert ready_cond.reason == Reason.WAITING_FOR_WORKERS
    assert ready_cond.last_transition_time == T0


def test_existing_workers_are_not_created_again() -> None:
    plan = reconcile(JOB, spec(2, 4), [pending(0), pending(2)], FRESH, None, T0)
    assert plan.create == (1, 3)
    assert plan.delete == ()


def test_enough_ready_workers_make_the_job_running_with_a_start_time() -> None:
    plan = reconcile(JOB, spec(2, 3, procs=4), [ready(0), ready(1), pending(2)], FRESH, None, T1)
    assert plan.create == () and plan.delete == ()
    assert plan.status.phase is Phase.RUNNING
    assert plan.status.ready_workers == 2
    assert plan.status.desired_workers == 3
    assert plan.status.world_size == 2 * 4
    assert plan.status.start_time == T1
    c = cond(plan.status, ConditionType.READY)
    assert (c.status, c.reason) == ("True", Reason.ENOUGH_WORKERS)


def test_start_time_is_kept_on_later_passes() -> None:
    first = reconcile(JOB, spec(1, 1), [ready(0)], FRESH, None, T1)
    later = reconcile(JOB, spec(1, 1), [ready(0)], first.status, None, T3)
    assert later.status.start_time == T1


def test_running_but_not_ready_workers_do_not_count() -> None:
    not_ready = ObservedWorker(index=1, phase=R, ready=False)
    plan = reconcile(JOB, spec(2, 2), [ready(0), not_ready], FRESH, None, T0)
    assert plan.status.phase is Phase.PENDING
    assert plan.status.ready_workers == 1
    assert plan.create == () and plan.delete == ()


# --- elasticity --------------------------------------------------------------------------------

def test_pending_workers_never_block_or_restart_running_ones() -> None:
    s = spec(2, 4)
    observed = [ready(0), ready(1), pending(2), pending(3)]
    plan = reconcile(JOB, s, observed, FRESH, None, T0)
    assert plan.create == () and plan.delete == ()
    assert plan.status.phase is Phase.RUNNING
    assert plan.status.ready_workers == 2
    assert plan.status.restarts == 0
    # Passes later with the same observation neither touch nor count anything.
    again = reconcile(JOB, s, observed, plan.status, None, T2)
    assert again.create == () and again.delete == ()
    assert again.status.restarts == 0
    # A waiting worker becoming ready grows the job without any restart.
    grown = reconcile(JOB, s, [ready(0), ready(1), ready(2), pending(3)], again.status, None, T3)
    assert grown.status.phase is Phase.RUNNING
    assert grown.status.ready_workers == 3
    assert grown.create == () and grown.delete == ()
    assert grown.status.start_time == T0


def test_losing_workers_below_min_after_running_is_restarting() -> None:
    previous = running_status()
    plan = reconcile(JOB, spec(2, 2), [ready(0)], previous, None, T1)
    assert plan.status.phase is Phase.RESTARTING
    assert plan.create == (1,)
    c = cond(plan.status, ConditionType.READY)
    assert c.status == "False"
    assert c.last_transition_time == T1
    back = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], plan.status, None, T2)
    assert back.status.phase is Phase.RUNNING
    assert back.status.start_time == T0  # the first start, not the recovery


# --- failures and the restart budget -------------------------------------------------------------

def test_a_failed_worker_is_deleted_not_created_and_counted() -> None:
    previous = running_status()
    plan = reconcile(JOB, spec(2, 2), [ready(0), failed(1, exit_code=137, reason="OOMKilled")],
                     previous, None, T1)
    assert plan.delete == (1,)
    assert plan.create == ()
    assert plan.status.restarts == 1
    assert plan.status.phase is Phase.RESTARTING
    detected, replaced = plan.events
    assert detected.type == "Warning"
    assert detected.reason == Reason.FAILURE_DETECTED == "FailureDetected"
    assert "worker 1" in detected.message
    assert "exit code 137" in detected.message
    assert "OOMKilled" in detected.message
    assert "action ReplacePod" in detected.message
    assert (replaced.type, replaced.reason) == ("Normal", Reason.WORKER_REPLACED)
    assert "restart 1 of 3" in replaced.message


def test_recreation_after_the_deletion_is_observed_counts_nothing_again() -> None:
    s = spec(2, 2)
    observed_failed = [ready(0), failed(1, exit_code=1)]
    first = reconcile(JOB, s, observed_failed, running_status(), None, T1)
    assert first.status.restarts == 1 and first.delete == (1,)

    # The pod is being deleted: it still holds its name, nothing is created or counted.
    deleting = ObservedWorker(index=1, phase=F, exit_code=1, deleting=True)
    second = reconcile(JOB, s, [ready(0), deleting], first.status, None, T2)
    assert second.create == () and second.delete == ()
    assert second.status.restarts == 1
    assert second.events == ()

    # The pod is gone: it is created again under the same index, still one restart.
    third = reconcile(JOB, s, [ready(0)], second.status, None, T3)
    assert third.create == (1,)
    assert third.delete == ()
    assert third.status.restarts == 1
    assert third.events == ()

    # Level based: the same observation again gives the same plan and a fixed-point status.
    fourth = reconcile(JOB, s, [ready(0)], third.status, None, T3)
    assert fourth == third
    later = reconcile(JOB, s, [ready(0)], third.status, None, T3 + datetime.timedelta(hours=1)).status
    assert timeless(later) == timeless(third.status)


def test_a_replacement_waits_out_the_backoff() -> None:
    """``backoffSeconds`` delays pod replacements as it delays restarts in place: the failed pod
    is deleted at once, but nothing is created until the backoff has run out."""
    s = parse_spec({"replicas": {"min": 2, "max": 2}, "restartBudget": 5,
                    "failurePolicy": {"backoffSeconds": 30, "maxBackoffSeconds": 300},
                    "worker": {"image": "img", "command": ["python", "train.py"]}})
    first = reconcile(JOB, s, [ready(0), failed(1, exit_code=1)], running_status(), None, T1)
    assert first.delete == (1,) and first.create == ()
    assert first.status.replacements_after == T1 + datetime.timedelta(seconds=30)
    assert "replacing worker 1 (llm-worker-1) after 30 s" in " ".join(e.message for e in first.events)
    held = reconcile(JOB, s, [ready(0)], first.status, None, T1 + datetime.timedelta(seconds=29))
    assert held.create == () and held.status.replacements_after == first.status.replacements_after
    released = reconcile(JOB, s, [ready(0)], held.status, None, T1 + datetime.timedelta(seconds=30))
    assert released.create == (1,) and released.status.replacements_after is None
    # The second replacement in the window backs off twice as long.
    second = reconcile(JOB, s, [ready(0), failed(1, exit_code=1)], released.status, None, T2)
    assert second.status.replacements_after == T2 + datetime.timedelta(seconds=60)


def test_without_backoff_nothing_is_held() -> None:
    first = reconcile(JOB, spec(2, 2), [ready(0), failed(1, exit_code=1)], running_status(), None, T1)
    assert first.status.replacements_after is None
    assert reconcile(JOB, spec(2, 2), [ready(0)], first.status, None, T1).create == (1,)


def test_several_failures_in_one_pass_are_counted_and_numbered() -> None:
    plan = reconcile(JOB, spec(1, 3, budget=5), [ready(0), failed(1), failed(2, exit_code=2)],
                     FRESH.model_copy(update={"restarts": 1}), None, T0)
    assert plan.delete == (1, 2)
    assert plan.create == ()
    assert plan.status.restarts == 3
    messages = [e.message for e in plan.events if e.reason == Reason.WORKER_REPLACED]
    assert len(messages) == 2
    assert "restart 2 of 5" in messages[0] and "restart 3 of 5" in messages[1]


def test_exhausted_budget_fails_the_job_and_removes_unfinished_workers() -> None:
    s = spec(2, 4, budget=1)
    previous = running_status(restarts=1)
    observed = [ready(0), pending(1), failed(2, exit_code=3),
                ObservedWorker(index=3, phase=R, ready=True, deleting=True)]
    plan = reconcile(JOB, s, observed, previous, None, T2)
    assert plan.status.phase is Phase.FAILED
    assert plan.create == ()
    assert plan.delete == (0, 1)  # the failed pod is kept (for its logs), the deleting one is already going
    assert plan.status.completion_time == T2
    assert plan.status.restarts == 1
    failed_c = cond(plan.status, ConditionType.FAILED)
    assert (failed_c.status, failed_c.reason) == ("True", Reason.RESTART_BUDGET_EXHAUSTED)
    assert "exit code 3" in failed_c.message and "budget of 1" in failed_c.message
    assert cond(plan.status, ConditionType.SUCCEEDED).status == "False"
    assert cond(plan.status, ConditionType.READY).status == "False"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", Reason.FAILURE_DETECTED),
                                                         ("Warning", Reason.RESTART_BUDGET_EXHAUSTED)]


def test_a_zero_budget_fails_on_the_first_failure() -> None:
    plan = reconcile(JOB, spec(1, 1, budget=0), [failed(0)], FRESH, None, T0)
    assert plan.status.phase is Phase.FAILED
    assert cond(plan.status, ConditionType.FAILED).reason == Reason.RESTART_BUDGET_EXHAUSTED
    assert plan.create == ()


def test_the_last_restart_within_budget_is_allowed() -> None:
    plan = reconcile(JOB, spec(1, 1, budget=2), [failed(0)], FRESH.model_copy(update={"restarts": 1}), None, T0)
    assert plan.status.phase is not Phase.FAILED
    assert plan.status.restarts == 2
    assert plan.delete == (0,)


# --- completion ----------------------------------------------------------------------------------

def test_all_workers_succeeded_is_success() -> None:
    previous = running_status()
    plan = reconcile(JOB, spec(2, 2), [succeeded(0), succeeded(1)], previous, None, T3)
    assert plan.status.phase is Phase.SUCCEEDED
    assert plan.create == () and plan.delete == ()
    assert plan.status.completion_time == T3
    assert plan.status.start_time == T0
    sc = cond(plan.status, ConditionType.SUCCEEDED)
    assert (sc.status, sc.reason) == ("True", Reason.ALL_WORKERS_SUCCEEDED)
    assert cond(plan.status, ConditionType.FAILED).status == "False"
    assert cond(plan.status, ConditionType.READY).status == "False"
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", Reason.COMPLETED)]


def test_succeeded_while_others_still_run_waits_and_removes_waiting_ones() -> None:
    s = spec(2, 4)
    plan = reconcile(JOB, s, [succeeded(0), ready(1), pending(2)], running_status(), None, T1)
    assert not plan.status.phase.terminal
    assert plan.create == ()  # the missing index 3 is not created: the job is completing
    assert plan.delete == (2,)
    assert plan.status.completion_time is None


def test_a_worker_still_waiting_in_rendezvous_after_training_finished_is_removed() -> None:
    """A replacement that came up after the others finished waits for a round that will never
    start: it is removed with the waiting ones, and the job ends once nothing else runs."""
    s = spec(2, 3)
    plan = reconcile(JOB, s, [succeeded(0), ready(1), ready(2)], running_status(), None, T1,
                     regrouping=frozenset({2}))
    assert plan.delete == (2,) and not plan.status.phase.terminal   # worker 1 is still finishing
    plan = reconcile(JOB, s, [succeeded(0), succeeded(1), ready(2)], running_status(), None, T1,
                     regrouping=frozenset({2}))
    assert plan.delete == (2,) and plan.status.phase is Phase.SUCCEEDED
    assert reconcile(JOB, s, [succeeded(0), succeeded(1), ready(2)], running_status(), None, T1).status.phase \
        is Phase.RUNNING   # without the agent's word it could still be finishing


def test_regrouping_workers_are_left_alone_while_training_goes_on() -> None:
    plan = reconcile(JOB, spec(2, 3), [ready(0), ready(1), ready(2)], running_status(), None, T1,
                     regrouping=frozenset({0, 1, 2}))
    assert plan.delete == () and plan.status.phase is Phase.RUNNING


def test_succeeded_while_others_run_does_not_replace_a_failed_one() -> None:
    plan = reconcile(JOB, spec(2, 3), [succeeded(0), ready(1), failed(2)], running_status(), None, T1)
    assert plan.create == () and plan.delete == ()
    assert plan.status.restarts == 0
    assert not plan.status.phase.terminal


def test_succeeded_and_failed_with_none_running_is_failure_at_end() -> None:
    plan = reconcile(JOB, spec(2, 3), [succeeded(0), failed(1, exit_code=7), pending(2)],
                     running_status(), None, T2)
    assert plan.status.phase is Phase.FAILED
    assert plan.create == ()
    assert plan.delete == (2,)
    assert plan.status.restarts == 0
    fc = cond(plan.status, ConditionType.FAILED)
    assert (fc.status, fc.reason) == ("True", Reason.WORKERS_FAILED_AT_END)
    assert "worker 1" in fc.message and "exit code 7" in fc.message
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", Reason.WORKERS_FAILED_AT_END)]
    assert plan.status.completion_time == T2


# --- invalid specs ------------------------------------------------------------------------------

def invalid() -> InvalidSpec:
    return InvalidSpec("spec.replicas", "min (3) must not exceed max (2)")


def test_an_invalid_spec_fails_creates_nothing_and_deletes_what_exists() -> None:
    observed = [ready(0), pending(1), succeeded(2), failed(3),
                ObservedWorker(index=4, phase=R, deleting=True)]
    plan = reconcile(JOB, invalid(), observed, FRESH, None, T0)
    assert plan.status.phase is Phase.FAILED
    assert plan.create == ()
    assert plan.delete == (0, 1, 2, 3)
    fc = cond(plan.status, ConditionType.FAILED)
    assert (fc.status, fc.reason) == ("True", Reason.INVALID_SPEC)
    assert "spec.replicas" in fc.message and "must not exceed" in fc.message
    assert plan.status.observed_generation == JOB.generation
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", Reason.INVALID_SPEC)]
    assert "spec.replicas" in plan.events[0].message


def test_an_invalid_spec_warns_once_per_generation() -> None:
    first = reconcile(JOB, invalid(), [], FRESH, None, T0)
    again = reconcile(JOB, invalid(), [], first.status, None, T1)
    assert again.events == ()
    assert again.status == first.status
    assert again.create == () and again.delete == ()


def test_a_fixed_spec_in_a_new_generation_starts_over() -> None:
    failed_plan = reconcile(JOB, invalid(), [], FRESH, None, T0)
    still = reconcile(JOB, spec(2, 2), [], failed_plan.status, None, T1)  # same generation: stays failed
    assert still.status.phase is Phase.FAILED and still.create == ()

    fixed = JobRef(name=JOB.name, namespace=JOB.namespace, uid=JOB.uid, generation=2)
    plan = reconcile(fixed, spec(2, 2), [], failed_plan.status, None, T2)
    assert plan.create == (0, 1)
    assert plan.status.phase is Phase.PENDING
    assert plan.status.observed_generation == 2
    assert plan.status.completion_time is None
    assert plan.status.condition(ConditionType.FAILED) is None


def test_a_new_invalid_generation_warns_again() -> None:
    first = reconcile(JOB, invalid(), [], FRESH, None, T0)
    gen2 = JobRef(name=JOB.name, namespace=JOB.namespace, uid=JOB.uid, generation=2)
    plan = reconcile(gen2, InvalidSpec("spec.worker.image", "required field is missing"), [], first.status, None, T1)
    assert [e.reason for e in plan.events] == [Reason.INVALID_SPEC]
    assert "spec.worker.image" in cond(plan.status, ConditionType.FAILED).message
    assert plan.status.observed_generation == 2


def test_a_succeeded_job_stays_succeeded_when_its_spec_is_later_edited() -> None:
    done = reconcile(JOB, spec(1, 1), [succeeded(0)], running_status(), None, T1).status
    assert done.phase is Phase.SUCCEEDED
    gen2 = JobRef(name=JOB.name, namespace=JOB.namespace, uid=JOB.uid, generation=2)
    edited = reconcile(gen2, invalid(), [succeeded(0)], done, None, T2)
    assert edited.status.phase is Phase.SUCCEEDED
    gen3 = JobRef(name=JOB.name, namespace=JOB.namespace, uid=JOB.uid, generation=3)
    fixed = reconcile(gen3, spec(1, 1), [], edited.status, None, T3)
    assert fixed.create == ()
    assert fixed.status.phase is Phase.SUCCEEDED


# --- terminal jobs, deleting workers, scaling down ------------------------------------------------

@pytest.mark.parametrize("phase", [Phase.SUCCEEDED, Phase.FAILED])
def test_a_finished_job_only_deletes_unfinished_workers(phase: Phase) -> None:
    previous = FRESH.model_copy(update={"phase": phase, "restarts": 2, "completion_time": T0})
    observed = [pending(0), ready(1), succeeded(2), failed(3), ObservedWorker(index=4, phase=R, deleting=True)]
    plan = reconcile(JOB, spec(1, 8), observed, previous, None, T1)
    assert plan.delete == (0, 1)
    assert plan.create == ()
    assert plan.status == previous
    assert plan.events == ()


def test_deleting_workers_hold_their_index() -> None:
    s = spec(2, 3)
    observed = [ready(0), ObservedWorker(index=1, phase=R, ready=True, deleting=True),
                ObservedWorker(index=2, phase=P, deleting=True)]
    plan = reconcile(JOB, s, observed, FRESH, None, T0)
    assert plan.create == ()
    assert plan.delete == ()
    assert plan.status.ready_workers == 1  # a deleting worker does not count as ready


def test_lowering_max_deletes_the_indices_at_or_above_it() -> None:
    observed = [ready(0), ready(1), ready(2), pending(3), ObservedWorker(index=5, phase=R, deleting=True)]
    plan = reconcile(JOB, spec(1, 2), observed, running_status(), None, T1)
    assert plan.delete == (2, 3)
    assert plan.create == ()
    assert plan.status.desired_workers == 2


def test_raising_max_creates_the_new_indices() -> None:
    plan = reconcile(JOB, spec(2, 4), [ready(0), ready(1)], running_status(), None, T1)
    assert plan.create == (2, 3)
    assert plan.status.phase is Phase.RUNNING


# --- conditions and progress ----------------------------------------------------------------------

def test_set_condition_keeps_transition_time_while_status_is_unchanged() -> None:
    first = set_condition([], "Ready", False, "WaitingForWorkers", "0 ready", 1, T0)
    assert len(first) == 1 and first[0].last_transition_time == T0 and first[0].status == "False"
    same = set_condition(first, "Ready", False, "WaitingForWorkers", "1 ready", 2, T1)
    assert len(same) == 1
    assert same[0].last_transition_time == T0
    assert same[0].message == "1 ready" and same[0].observed_generation == 2
    flipped = set_condition(same, "Ready", True, "EnoughWorkers", "2 ready", 2, T2)
    assert flipped[0].last_transition_time == T2 and flipped[0].status == "True"


def test_set_condition_replaces_only_its_own_type() -> None:
    conditions = set_condition([], "Ready", True, "EnoughWorkers", "", 1, T0)
    conditions = set_condition(conditions, "Failed", False, "X", "", 1, T1)
    conditions = set_condition(conditions, "Ready", True, "EnoughWorkers", "again", 1, T2)
    assert sorted(c.type for c in conditions) == ["Failed", "Ready"]
    by_type = {c.type: c for c in conditions}
    assert by_type["Ready"].last_transition_time == T0
    assert by_type["Failed"].last_transition_time == T1


def test_ready_condition_transition_time_through_reconcile() -> None:
    s = spec(1, 1)
    a = reconcile(JOB, s, [pending(0)], FRESH, None, T0)
    b = reconcile(JOB, s, [pending(0)], a.status, None, T1)
    assert cond(b.status, ConditionType.READY).last_transition_time == T0
    c = reconcile(JOB, s, [ready(0)], b.status, None, T2)
    assert cond(c.status, ConditionType.READY).last_transition_time == T2
    d = reconcile(JOB, s, [ready(0)], c.status, None, T3)
    assert cond(d.status, ConditionType.READY).last_transition_time == T2


def test_progress_fills_step_loss_and_world_size() -> None:
    progress = Progress(step=42, samples=4200, world_size=16, time=1.0, loss=1.25)
    plan = reconcile(JOB, spec(2, 2, procs=8), [ready(0), ready(1)], FRESH, progress, T0)
    assert plan.status.step == 42
    assert plan.status.loss == 1.25
    assert plan.status.world_size == 16


def test_progress_without_enough_workers_keeps_step_but_world_size_follows_ready_workers() -> None:
    progress = Progress(step=7, samples=70, world_size=16, time=1.0, loss=None)
    plan = reconcile(JOB, spec(2, 2, procs=8), [ready(0)], FRESH, progress, T0)
    assert plan.status.step == 7
    assert plan.status.loss is None
    assert plan.status.world_size == 8


def test_no_progress_keeps_the_last_reported_step() -> None:
    first = reconcile(JOB, spec(1, 1), [ready(0)], FRESH, Progress(step=9, samples=9, world_size=1, time=0.0,
                                                                  loss=0.5), T0)
    later = reconcile(JOB, spec(1, 1), [ready(0)], first.status, None, T1)
    assert (later.status.step, later.status.loss) == (9, 0.5)


# --- restores: status.lastRestore and the SnapshotRestored event ------------------------------------

def restored(step: int = 50, tier: str | None = "memory", restore_step: int | None = 40,
             restart_count: int = 1) -> Progress:
    return Progress(step=step, samples=step, world_size=2, time=1.0, restart_count=restart_count,
                    restore_tier=tier, restore_step=restore_step)


def restore_events(plan: Plan) -> list:
    return [e for e in plan.events if e.reason == Reason.SNAPSHOT_RESTORED]


def test_a_restore_is_recorded_with_when_it_was_first_seen_and_announced() -> None:
    plan = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running_status(), restored(), T1)
    record = plan.status.last_restore
    assert record is not None
    assert (record.tier, record.step, record.at, record.restart_count) == ("memory", 40, T1, 1)
    (event,) = restore_events(plan)
    assert (event.type, event.message) == ("Normal", "restored step 40 from memory")
    assert plan.status.model_dump(mode="json", by_alias=True)["lastRestore"] == {
        "tier": "memory", "step": 40, "at": "2025-01-01T12:01:00Z", "restartCount": 1}


def test_the_same_restore_seen_again_changes_nothing() -> None:
    first = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running_status(), restored(step=50), T1)
    later = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], first.status, restored(step=90), T2)
    assert later.status.last_restore == first.status.last_restore  # at stays when first seen
    assert later.status.step == 90
    assert restore_events(later) == []


def test_a_progress_record_without_a_restore_keeps_the_last_one() -> None:
    first = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running_status(), restored(), T1)
    later = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], first.status, restored(tier=None, restore_step=None), T2)
    assert later.status.last_restore == first.status.last_restore and restore_events(later) == []
    assert reconcile(JOB, spec(2, 2), [ready(0), ready(1)], first.status, None, T2).status.last_restore == \
        first.status.last_restore


@pytest.mark.parametrize("tier, restore_step, restart_count", [
    ("peers", 40, 1),       # another tier in the same process life
    ("memory", 60, 1),      # another restore at the same restart count (a replaced worker's new round)
    ("persistent", 20, 2),  # the next restart
])
def test_a_new_restore_replaces_the_last(tier: str, restore_step: int, restart_count: int) -> None:
    first = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running_status(), restored(), T1)
    later = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], first.status,
                      restored(tier=tier, restore_step=restore_step, restart_count=restart_count), T2)
    record = later.status.last_restore
    assert record is not None
    assert (record.tier, record.step, record.at, record.restart_count) == (tier, restore_step, T2, restart_count)
    (event,) = restore_events(later)
    assert event.message == f"restored step {restore_step} from {tier}"


def test_a_fresh_start_with_nothing_to_restore_is_recorded_quietly() -> None:
    plan = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], FRESH, restored(tier="none", restore_step=None,
                                                                            restart_count=0), T0)
    assert plan.status.last_restore is not None and plan.status.last_restore.tier == "none"
    assert restore_events(plan) == []


def test_nothing_to_restore_after_a_restart_is_a_warning() -> None:
    plan = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running_status(),
                     restored(tier="none", restore_step=0, restart_count=3), T1)
    (event,) = restore_events(plan)
    assert event.type == "Warning" and "restart 3" in event.message and "started over" in event.message
    assert plan.status.last_restore is not None and plan.status.last_restore.step == 0


def test_a_restore_is_announced_beside_the_completion() -> None:
    plan = reconcile(JOB, spec(2, 2), [succeeded(0), succeeded(1)], running_status(), restored(), T1)
    assert plan.status.phase is Phase.SUCCEEDED
    assert [e.reason for e in plan.events] == [Reason.SNAPSHOT_RESTORED, Reason.COMPLETED]
    assert plan.status.last_restore is not None


def test_a_finished_job_records_no_restore() -> None:
    done = reconcile(JOB, spec(1, 1), [succeeded(0)], running_status(), None, T1).status
    assert done.phase.terminal
    plan = reconcile(JOB, spec(1, 1), [succeeded(0)], done, restored(), T2)
    assert plan.status == done and plan.events == ()


def test_with_restore_is_pure_and_ignores_no_progress() -> None:
    status = running_status()
    assert with_restore(status, None, T1) == (status, ())
    assert with_restore(status, restored(tier=None, restore_step=None), T1) == (status, ())
    new, events = with_restore(status, restored(), T1)
    assert status.last_restore is None and new.last_restore is not None and len(events) == 1
    assert with_restore(new, restored(step=99), T2) == (new, ())


# --- properties -----------------------------------------------------------------------------------

PHASES = list(WorkerPhase)


@st.composite
def observed_workers(draw: st.DrawFn, live_failures: bool = True) -> list[ObservedWorker]:
    indices = draw(st.lists(st.integers(0, 9), unique=True, max_size=8))
    workers = []
    for i in indices:
        phase = draw(st.sampled_from(PHASES))
        workers.append(ObservedWorker(
            index=i, phase=phase,
            ready=phase is WorkerPhase.RUNNING and draw(st.booleans()),
            deleting=(phase is WorkerPhase.FAILED and not live_failures) or draw(st.booleans()),
            exit_code=draw(st.none() | st.integers(-255, 255)),
            reason=draw(st.sampled_from(["", "OOMKilled", "Evicted", "Error"]))))
    return workers


@st.composite
def specs(draw: st.DrawFn) -> TrainingJobSpec:
    max_ = draw(st.integers(1, 7))
    min_ = draw(st.integers(1, max_))
    return spec(min_, max_, budget=draw(st.integers(0, 5)), procs=draw(st.integers(1, 4)))


invalid_specs = st.builds(InvalidSpec, st.sampled_from(["spec.replicas", "spec.worker.image", ""]),
                          st.sampled_from(["min (3) must not exceed max (2)", "required field is missing"]))


@st.composite
def previous_statuses(draw: st.DrawFn) -> TrainingJobStatus:
    phase = draw(st.sampled_from(list(Phase)))
    status = TrainingJobStatus(phase=phase, restarts=draw(st.integers(0, 6)),
                               observed_generation=draw(st.integers(0, 3)),
                               start_time=draw(st.none() | st.just(T0)))
    if phase is Phase.FAILED:
        reason = draw(st.sampled_from([Reason.RESTART_BUDGET_EXHAUSTED, Reason.WORKERS_FAILED_AT_END,
                                       Reason.INVALID_SPEC]))
        status = status.model_copy(update={
            "conditions": set_condition([], ConditionType.FAILED, True, reason, "m", status.observed_generation, T0),
            "completion_time": T0})
    return status


restores = (st.tuples(st.none(), st.none()) | st.tuples(st.just("none"), st.none() | st.just(0))
            | st.tuples(st.sampled_from(["memory", "peers", "persistent"]), st.integers(0, 10**6)))
progresses = st.none() | st.builds(
    lambda restore, **fields: Progress(**fields, restore_tier=restore[0], restore_step=restore[1]), restores,
    step=st.integers(0, 10**6), samples=st.integers(0, 10**9), world_size=st.integers(1, 64), time=st.floats(0, 2e9),
    loss=st.none() | st.floats(0, 100), restart_count=st.integers(0, 3))


def _starts_over(job: JobRef, spec_: object, previous: TrainingJobStatus) -> bool:
    failed_c = previous.condition(ConditionType.FAILED)
    return (isinstance(spec_, TrainingJobSpec) and previous.phase is Phase.FAILED and failed_c is not None
            and failed_c.reason == Reason.INVALID_SPEC and previous.observed_generation != job.generation)


@FAST
@given(spec_=specs() | invalid_specs, observed=observed_workers(), previous=previous_statuses(),
       progress=progresses, generation=st.integers(1, 3))
def test_reconcile_plan_invariants(spec_: TrainingJobSpec | InvalidSpec, observed: list[ObservedWorker],
                                   previous: TrainingJobStatus, progress: Progress | None, generation: int) -> None:
    job = JobRef(name="p", namespace="ns", uid="u", generation=generation)
    plan = reconcile(job, spec_, observed, previous, progress, T1)
    assert isinstance(plan, Plan)
    seen = {w.index for w in observed}

    # create and delete are disjoint, sorted, without duplicates
    assert not set(plan.create) & set(plan.delete)
    assert list(plan.create) == sorted(set(plan.create))
    assert list(plan.delete) == sorted(set(plan.delete))
    # only observed workers are deleted, and never one already being deleted
    assert set(plan.delete) <= {w.index for w in observed if not w.deleting}
    # only missing indices in [0, max) are created
    if isinstance(spec_, TrainingJobSpec):
        assert all(0 <= i < spec_.replicas.max for i in plan.create)
    assert not set(plan.create) & seen

    # nothing is created for an invalid spec, a finished job, or a pass that finishes it
    if isinstance(spec_, InvalidSpec):
        assert plan.create == ()
        if not previous.phase.terminal:
            assert plan.status.phase is Phase.FAILED
    # a finished job stays finished whatever its spec becomes, unless it failed for an invalid
    # spec and the spec has changed since (a new generation is evaluated afresh)
    failed_c = previous.condition(ConditionType.FAILED)
    reopened = (failed_c is not None and failed_c.status == "True" and failed_c.reason == Reason.INVALID_SPEC
                and previous.observed_generation != job.generation)
    if previous.phase.terminal and not reopened:
        assert plan.status == previous
    if previous.phase.terminal and not _starts_over(job, spec_, previous):
        assert plan.create == ()
    if plan.status.phase.terminal:
        assert plan.create == ()

    # restarts never decrease (except when an edited spec reopens an InvalidSpec job), and grow by
    # at most the number of failed workers observed in this pass
    if not reopened:
        assert plan.status.restarts >= previous.restarts
        live_failed = sum(1 for w in observed if not w.deleting and w.phase is WorkerPhase.FAILED)
        assert plan.status.restarts - previous.restarts <= live_failed

    # elastic: while the job runs on and nothing has succeeded, only failed or surplus workers go
    completing = any(w.phase is WorkerPhase.SUCCEEDED and not w.deleting for w in observed)
    if isinstance(spec_, TrainingJobSpec) and not plan.status.phase.terminal and not completing:
        for w in observed:
            if w.index in plan.delete:
                assert w.phase is WorkerPhase.FAILED or w.index >= spec_.replicas.max, w

    # deterministic: the same input gives the same plan
    assert reconcile(job, spec_, list(observed), previous, progress, T1) == plan


@QUICK
@given(spec_=specs(), observed=observed_workers(live_failures=False), progress=progresses)
def test_reconcile_reaches_a_fixed_point_on_a_stable_observation(spec_: TrainingJobSpec,
                                                                 observed: list[ObservedWorker],
                                                                 progress: Progress | None) -> None:
    """Level based: once a pass's status is fed back with an unchanged observation that has no
    freshly failed worker (those are being replaced), the next pass changes nothing more."""
    assert not any(w.phase is WorkerPhase.FAILED and not w.deleting for w in observed)
    first = reconcile(JOB, spec_, observed, FRESH, progress, T1)
    second = reconcile(JOB, spec_, observed, first.status, progress, T2)
    third = reconcile(JOB, spec_, observed, second.status, progress, T3)
    assert timeless(third.status) == timeless(second.status)
    assert third.create == second.create and third.delete == second.delete
    assert second.status.restarts == first.status.restarts == 0
    # a restore is recorded when first seen and announced once
    assert second.status.last_restore == first.status.last_restore
    assert not any(e.reason == Reason.SNAPSHOT_RESTORED for e in (*second.events, *third.events))
