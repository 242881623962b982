"""A job's in-band health: agent reports decided at once, hangs judged from the job's own steps,
and the incidents folded into status with their events."""

from __future__ import annotations

import datetime
import signal

from salamander.api import FailureAction, Phase, Reason, TrainingJobStatus, parse_spec
from salamander.controlplane import AgentIdentity
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander_operator.desired import JobRef
from salamander_operator.health import JobHealth, StepBeat, StepWatch, verdict, worker_index
from salamander_operator.incidents import fold_incidents, release_expired
from salamander_operator.observed import ObservedWorker, WorkerPhase
from salamander_operator.reconcile import reconcile

JOB = JobRef(name="llm", namespace="ns", uid="u", generation=1)
SPEC = parse_spec({"replicas": {"min": 2, "max": 2}, "failurePolicy": {"hang": {"floorSeconds": 5}},
                   "worker": {"image": "i", "command": ["python", "train.py"]}})
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
AGENT = AgentIdentity("ns", "llm", "llm-worker-1", "gpu-7", 8, 8)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now


def killed_report() -> pb.FailureReport:
    report = pb.FailureReport(seq=1, rank=9, observed_unix_ns=int((T0.timestamp() - 0.2) * 1e9),
                              log_tail=["step 41", "step 42"])
    report.exit.CopyFrom(pb.ProcessExit(exit_code=0, signal=signal.SIGKILL))
    return report


def test_worker_index_reads_only_this_jobs_pod_names() -> None:
    assert worker_index(JOB, "llm-worker-3") == 3
    assert worker_index(JOB, "other-worker-3") is None and worker_index(JOB, "llm-worker-x") is None


def test_a_report_is_decided_at_once_and_queued_once() -> None:
    health = JobHealth(JOB, SPEC, clock=Clock())
    decision = health.on_report(AGENT, killed_report())
    assert decision.action is FailureAction.RESTART_PROCESSES and decision.charged
    assert verdict(decision).action == pb.RESTART_PROCESSES
    (incident,) = health.drain(settle_s=0)
    assert health.drain(settle_s=0) == []
    assert (incident.worker, incident.pod, incident.node) == (1, "llm-worker-1", "gpu-7")
    assert incident.classification.kind == "Killed"
    assert incident.detection_s is not None and abs(incident.detection_s - 0.2) < 1e-3


def test_a_second_report_of_the_same_recovery_is_not_charged() -> None:
    health = JobHealth(JOB, SPEC, clock=Clock())
    health.on_report(AGENT, killed_report())
    exc = pb.FailureReport(seq=2, rank=0)
    exc.exception.CopyFrom(pb.TrainingException(type="RuntimeError", message="Connection closed by peer"))
    second = health.on_report(AgentIdentity("ns", "llm", "llm-worker-0", "gpu-1", 0, 8), exc)
    assert second.action is FailureAction.RETRY_IN_PLACE and not second.charged


def test_processes_broken_by_a_planned_eviction_are_not_charged() -> None:
    clock = Clock()
    health = JobHealth(JOB, SPEC, clock=clock)
    health.planned_disruption()  # the operator evicted a straggler's worker just now
    clock.now = T0 + datetime.timedelta(seconds=2)
    decision = health.on_report(AGENT, killed_report())
    assert decision.action is FailureAction.RESTART_PROCESSES and not decision.charged
    clock.now = T0 + datetime.timedelta(seconds=60)  # long after: a failure of its own again
    assert health.on_report(AGENT, killed_report()).charged


def test_exhausting_the_window_turns_reports_into_fail_job() -> None:
    spec = parse_spec({"failurePolicy": {"maxRestartsPerWindow": 1},
                       "worker": {"image": "i", "command": ["c"]}})
    clock = Clock()
    health = JobHealth(JOB, spec, clock=clock)
    assert health.on_report(AGENT, killed_report()).charged
    clock.now = T0 + datetime.timedelta(seconds=60)
    decision = health.on_report(AGENT, killed_report())
    assert decision.action is FailureAction.FAIL_JOB and decision.fail_reason == Reason.RESTART_STORM
    assert verdict(decision).action == pb.FAIL_JOB


def test_a_step_watch_arms_only_after_progress() -> None:
    watch = StepWatch()
    watch.observe(10, 0.5, now=100.0)
    assert not watch.armed  # the first sight of a step is not progress
    watch.observe(11, 0.5, now=101.0, age_s=0.3)
    assert watch.armed and abs(watch.since - 100.7) < 1e-9
    watch.reset(200.0)
    assert not watch.armed


def test_a_hang_is_judged_from_the_jobs_own_step_times_and_only_once() -> None:
    health = JobHealth(JOB, SPEC, clock=Clock())
    assert health.check_hang([StepBeat(1, 0.2)], 0.0) is None
    for n in range(2, 12):
        assert health.check_hang([StepBeat(n, 0.2), StepBeat(n - 1, 0.2)], float(n)) is None
    assert health.check_hang([StepBeat(11, 0.2)], 11.0 + 4.9) is None  # floor 5 s beats 3 x 0.2 s
    incident = health.check_hang([StepBeat(11, 0.2)], 11.0 + 5.1)
    assert incident is not None and incident.worker is None
    assert incident.classification.kind == "Hang" and incident.decision.action is FailureAction.RESTART_PROCESSES
    assert health.check_hang([StepBeat(11, 0.2)], 30.0) is None  # disarmed until the job makes progress again


def test_a_disabled_hang_policy_never_fires() -> None:
    spec = parse_spec({"failurePolicy": {"hang": {"enabled": False}}, "worker": {"image": "i", "command": ["c"]}})
    health = JobHealth(JOB, spec)
    health.check_hang([StepBeat(1, 0.1)], 0.0)
    health.check_hang([StepBeat(2, 0.1)], 1.0)
    assert health.check_hang([StepBeat(2, 0.1)], 10_000.0) is None


def test_sync_adopts_a_status_that_knows_more_restarts() -> None:
    spec = parse_spec({"failurePolicy": {"maxRestartsPerWindow": 2}, "worker": {"image": "i", "command": ["c"]}})
    clock = Clock()
    health = JobHealth(JOB, spec, clock=clock)
    health.sync(spec, TrainingJobStatus(restarts=2, restart_times=[T0, T0]))
    clock.now = T0 + datetime.timedelta(seconds=30)
    assert health.on_report(AGENT, killed_report()).fail_reason == Reason.RESTART_STORM


def test_incidents_reach_status_and_events_and_a_replace_node_quarantines() -> None:
    health = JobHealth(JOB, SPEC, clock=Clock())
    health.on_report(AGENT, killed_report())
    ready = [ObservedWorker(0, WorkerPhase.RUNNING, ready=True, node="gpu-1"),
             ObservedWorker(1, WorkerPhase.RUNNING, ready=True, node="gpu-7")]
    plan = reconcile(JOB, SPEC, ready, TrainingJobStatus(phase=Phase.RUNNING), None, T0, health.drain(settle_s=0))
    assert plan.delete == () and plan.create == ()  # restarted in place: the pod stays
    assert plan.status.restarts == 1 and plan.status.failure_counts == {"Killed": 1}
    assert plan.status.last_failure.action == "RestartProcesses"
    assert [e.reason for e in plan.events] == [Reason.FAILURE_DETECTED, Reason.PROCESSES_RESTARTED]

    lost = [ready[0], ObservedWorker(1, WorkerPhase.FAILED, reason="NodeLost", node="gpu-7")]
    later = T0 + datetime.timedelta(minutes=5)
    plan = reconcile(JOB, SPEC, lost, plan.status, None, later)
    assert plan.delete == (1,)
    assert [(q.node, q.reason) for q in plan.status.quarantined_nodes] == [("gpu-7", "NodeLost")]
    assert Reason.NODE_QUARANTINED in [e.reason for e in plan.events]

    expired = later + datetime.timedelta(seconds=SPEC.failure_policy.quarantine_seconds + 1)
    kept, released = release_expired(plan.status.quarantined_nodes, expired)
    assert kept == [] and released == ["gpu-7"]
    healed = reconcile(JOB, SPEC, ready, plan.status, None, expired)
    assert healed.status.quarantined_nodes == [] and Reason.NODE_RELEASED in [e.reason for e in healed.events]


def test_coalesced_incidents_are_events_but_not_counts() -> None:
    health = JobHealth(JOB, SPEC, clock=Clock())
    health.on_report(AGENT, killed_report())
    exc = pb.FailureReport(seq=2, rank=0)
    exc.exception.CopyFrom(pb.TrainingException(type="RuntimeError", message="Connection closed by peer"))
    health.on_report(AgentIdentity("ns", "llm", "llm-worker-0", "gpu-1", 0, 8), exc)
    folded = fold_incidents(TrainingJobStatus(), health.drain(settle_s=0), SPEC.failure_policy, 100, T0)
    assert folded.status.failure_counts == {"Killed": 1} and folded.status.restarts == 1
    assert sum(1 for e in folded.events if e[1] == Reason.FAILURE_DETECTED) == 2


def test_the_scanner_is_told_when_the_hang_threshold_falls_due() -> None:
    health = JobHealth(JOB, SPEC, clock=Clock())
    health.check_hang([StepBeat(1, 0.2)], 0.0)
    assert health.seconds_to_hang(0.5) == 1799.5  # not armed: only the start-up deadline (default 1800 s)
    health.check_hang([StepBeat(2, 0.2)], 1.0)
    assert health.seconds_to_hang(3.0) == 3.0  # floor 5 s from the step at t=1
    assert health.check_hang([StepBeat(2, 0.2)], 6.0) is not None  # exactly at the threshold
    assert health.seconds_to_hang(6.0) is None


def test_the_root_cause_takes_the_charge_from_a_symptom_reported_first() -> None:
    health = JobHealth(JOB, SPEC, clock=Clock())
    symptom = pb.FailureReport(seq=1, rank=0)
    symptom.exception.CopyFrom(pb.TrainingException(type="RuntimeError", message="Connection closed by peer"))
    assert health.on_report(AgentIdentity("ns", "llm", "llm-worker-0", "gpu-1", 0, 8), symptom).charged
    cause = health.on_report(AGENT, killed_report())
    assert not cause.charged  # the agent was told to restart either way
    first, second = health.drain(settle_s=0)
    assert not first.decision.charged and "a symptom of Killed" in first.decision.why
    assert second.decision.charged and second.classification.kind == "Killed"
    folded = fold_incidents(TrainingJobStatus(), [first, second], SPEC.failure_policy, 100, T0)
    assert folded.status.restarts == 1 and folded.status.failure_counts == {"Killed": 1}
    assert folded.status.last_failure.kind == "Killed"


def test_incidents_settle_before_they_are_drained() -> None:
    clock = Clock()
    health = JobHealth(JOB, SPEC, clock=clock)
    health.on_report(AGENT, killed_report())
    assert health.drain() == []
    clock.now = T0 + datetime.timedelta(seconds=1.5)
    assert len(health.drain()) == 1


def test_a_regrouping_agent_or_a_lower_step_never_arms_the_hang_watch() -> None:
    health = JobHealth(JOB, SPEC, clock=Clock())
    health.check_hang([StepBeat(40, 0.2)], 0.0)
    health.check_hang([StepBeat(41, 0.2)], 1.0)  # progress: armed
    assert health.check_hang([StepBeat(41, 0.2, regrouping=True)], 2.0) is None  # a new round is forming
    assert health.seconds_to_hang(2.0) is None
    health.check_hang([StepBeat(35, 0.2)], 3.0)  # resumed from a checkpoint: not progress yet
    assert health.check_hang([StepBeat(35, 0.2)], 100.0) is None
    health.check_hang([StepBeat(36, 0.2)], 101.0)
    assert health.check_hang([StepBeat(36, 0.2)], 106.5) is not None


def test_a_failure_in_the_new_round_is_new_even_before_its_first_step_is_seen() -> None:
    clock = Clock()
    health = JobHealth(JOB, SPEC, clock=clock)
    assert health.on_report(AGENT, killed_report()).charged
    clock.now = T0 + datetime.timedelta(seconds=5)
    old_round = killed_report()
    old_round.round_started_unix_ns = int((T0.timestamp() - 60) * 1e9)  # a process of the broken round
    assert not health.on_report(AGENT, old_round).charged
    new_round = killed_report()
    new_round.round_started_unix_ns = int((T0.timestamp() + 3) * 1e9)  # started after the restart
    assert health.on_report(AGENT, new_round).charged


STARTUP = parse_spec({"failurePolicy": {"hang": {"floorSeconds": 5, "startupSeconds": 60}},
                      "worker": {"image": "i", "command": ["python", "train.py"]}})


def test_no_first_step_within_startup_seconds_is_a_hang() -> None:
    health = JobHealth(JOB, STARTUP, clock=Clock())
    assert health.check_hang([StepBeat(0, regrouping=True), StepBeat(0)], 0.0) is None   # rendezvous
    assert health.check_hang([StepBeat(0), StepBeat(0)], 100.0) is None   # the processes run: clock starts
    assert health.seconds_to_hang(130.0) == 30.0
    assert health.check_hang([StepBeat(0), StepBeat(0)], 159.9) is None
    incident = health.check_hang([StepBeat(0), StepBeat(0)], 160.0)
    assert incident is not None
    assert incident.classification.kind == "Hang" and incident.decision.action is FailureAction.RESTART_PROCESSES
    assert "no first step 60.0 s after the processes started" in incident.classification.evidence
    assert incident.occurred_at == T0 - datetime.timedelta(seconds=60)
    # judged once: the restarted round gets a clock of its own
    assert health.check_hang([StepBeat(0)], 161.0) is None
    assert health.seconds_to_hang(161.0) == 60.0


def test_startup_is_not_timed_while_agents_wait_or_none_report() -> None:
    health = JobHealth(JOB, STARTUP, clock=Clock())
    assert health.check_hang([], 0.0) is None   # pods not scheduled yet: no agent reports
    assert health.seconds_to_hang(0.0) is None
    for t in range(0, 1000, 10):   # an agent waits in rendezvous for a peer for a long time
        assert health.check_hang([StepBeat(0, regrouping=True), StepBeat(0)], float(t)) is None
    assert health.seconds_to_hang(1000.0) is None
    assert health.check_hang([StepBeat(0), StepBeat(0)], 1000.0) is None
    assert health.check_hang([StepBeat(0), StepBeat(0)], 1059.0) is None
    assert health.check_hang([StepBeat(0), StepBeat(0)], 1060.0) is not None


def test_a_first_step_ends_the_startup_clock() -> None:
    health = JobHealth(JOB, STARTUP, clock=Clock())
    health.check_hang([StepBeat(40)], 0.0)     # resumed at step 40 (a restore): not progress
    health.check_hang([StepBeat(40)], 50.0)
    assert health.check_hang([StepBeat(41, 0.2)], 59.0) is None    # the first step: armed
    assert health.watch.armed
    assert health.check_hang([StepBeat(41, 0.2)], 63.9) is None    # now the step-time rule: floor 5 s
    incident = health.check_hang([StepBeat(41, 0.2)], 64.1)
    assert incident is not None and "no progress for" in incident.classification.evidence


def test_startup_seconds_zero_never_judges_startup() -> None:
    spec = parse_spec({"failurePolicy": {"hang": {"startupSeconds": 0}}, "worker": {"image": "i", "command": ["c"]}})
    health = JobHealth(JOB, spec, clock=Clock())
    health.check_hang([StepBeat(0)], 0.0)
    assert health.check_hang([StepBeat(0)], 1e6) is None
    assert health.seconds_to_hang(1e6) is None


def test_a_restart_resets_the_startup_clock() -> None:
    health = JobHealth(JOB, STARTUP, clock=Clock())
    health.check_hang([StepBeat(0)], 0.0)
    health.planned_disruption()          # resets the watch (here: at the real monotonic time)
    assert health.watch.started is None
