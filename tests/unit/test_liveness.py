"""Agent liveness: silent agents make their workers failed; nothing else changes."""

from __future__ import annotations

from salamander_operator.liveness import AgentBeat, mark_lost_agents, regrouping
from salamander_operator.observed import ObservedWorker, WorkerPhase

RUNNING = [ObservedWorker(index=i, phase=WorkerPhase.RUNNING, ready=True) for i in range(3)]


def test_a_silent_agent_fails_its_worker_with_evidence() -> None:
    beats = [AgentBeat(0, 100.0), AgentBeat(1, 94.0), AgentBeat(1, 93.0)]
    out = mark_lost_agents(RUNNING, beats, now=100.5, timeout_s=5.0)
    assert [w.phase for w in out] == [WorkerPhase.RUNNING, WorkerPhase.FAILED, WorkerPhase.RUNNING]
    lost = out[1]
    assert lost.reason == "AgentLost" and "no heartbeat for 6.5 s" in lost.message and not lost.ready
    assert "AgentLost" in lost.describe_failure()


def test_workers_without_an_agent_session_are_never_judged() -> None:
    assert mark_lost_agents(RUNNING, [], now=1e9) == RUNNING


def test_only_running_workers_can_be_lost() -> None:
    workers = [ObservedWorker(0, WorkerPhase.PENDING), ObservedWorker(1, WorkerPhase.SUCCEEDED, exit_code=0),
               ObservedWorker(2, WorkerPhase.RUNNING, deleting=True)]
    beats = [AgentBeat(i, 0.0) for i in range(3)]
    assert mark_lost_agents(workers, beats, now=100.0) == workers


def test_the_newest_beat_of_a_worker_counts() -> None:
    beats = [AgentBeat(0, 10.0), AgentBeat(0, 99.0)]  # e.g. a replaced agent's old and new sessions
    assert mark_lost_agents(RUNNING[:1], beats, now=100.0, timeout_s=5.0) == RUNNING[:1]


def test_a_closed_session_gets_a_longer_grace() -> None:
    closed = [AgentBeat(0, 90.0, connected=False)]
    assert mark_lost_agents(RUNNING[:1], closed, now=100.0, timeout_s=5.0, closed_grace_s=30.0) == RUNNING[:1]
    assert mark_lost_agents(RUNNING[:1], closed, now=121.0, timeout_s=5.0, closed_grace_s=30.0)[0].reason == \
        "AgentLost"


def test_regrouping_takes_each_workers_newest_beat_on_a_connected_stream() -> None:
    beats = [AgentBeat(0, 10.0, regrouping=True), AgentBeat(0, 11.0, regrouping=False),
             AgentBeat(1, 5.0, regrouping=False), AgentBeat(1, 6.0, regrouping=True),
             AgentBeat(2, 9.0, connected=False, regrouping=True)]
    assert regrouping(beats) == frozenset({1})
