"""In-band liveness: a worker whose agent stopped heartbeating is lost, whatever its pod says.

A node that dies or drops off the network leaves its pod ``Running`` for minutes (until the
node controller gives up); the agent's heartbeats stop at once. Only workers whose agent has
registered are judged, so a worker without a control-plane client is never declared lost. An
agent whose stream *closed* usually just exited, and its pod's phase says so within a second
or two, so a closed session is judged only after a longer grace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from salamander_operator.failures import classify_agent_loss
from salamander_operator.observed import ObservedWorker, WorkerPhase

DEFAULT_AGENT_TIMEOUT_S = 3.0  # three missed heartbeats at 1 Hz
CLOSED_SESSION_GRACE_S = 30.0


@dataclass(frozen=True)
class AgentBeat:
    """The newest sign of life of the agent in worker ``index``, on ``time.monotonic()``."""

    index: int
    last_heartbeat: float
    connected: bool = True
    regrouping: bool = False   # waiting in rendezvous for a round, with no training processes


def is_silent(last_heartbeat: float, connected: bool, now: float, timeout_s: float = DEFAULT_AGENT_TIMEOUT_S,
              closed_grace_s: float = CLOSED_SESSION_GRACE_S) -> bool:
    """Whether an agent has been quiet for longer than its limit."""
    return now - last_heartbeat > (timeout_s if connected else closed_grace_s)


def mark_lost_agents(observed: Sequence[ObservedWorker], beats: Iterable[AgentBeat], now: float,
                     timeout_s: float = DEFAULT_AGENT_TIMEOUT_S,
                     closed_grace_s: float = CLOSED_SESSION_GRACE_S) -> list[ObservedWorker]:
    """``observed`` with every running worker whose agent has been silent for more than
    ``timeout_s`` (``closed_grace_s`` if its stream closed) turned into a failed one (reason
    ``AgentLost``), so reconcile replaces it."""
    newest = _newest(beats)
    result = []
    for worker in observed:
        beat = newest.get(worker.index)
        if (beat is not None and worker.phase is WorkerPhase.RUNNING and not worker.deleting
                and is_silent(beat.last_heartbeat, beat.connected, now, timeout_s, closed_grace_s)):
            lost = classify_agent_loss(now - beat.last_heartbeat)
            worker = dataclasses.replace(worker, phase=WorkerPhase.FAILED, ready=False, reason=lost.kind,
                                         message=lost.evidence)
        result.append(worker)
    return result


def regrouping(beats: Iterable[AgentBeat]) -> frozenset[int]:
    """The workers whose agent's newest heartbeat, on a connected stream, says it is regrouping."""
    return frozenset(i for i, beat in _newest(beats).items() if beat.regrouping and beat.connected)


def _newest(beats: Iterable[AgentBeat]) -> dict[int, AgentBeat]:
    newest: dict[int, AgentBeat] = {}
    for beat in beats:
        if beat.index not in newest or beat.last_heartbeat > newest[beat.index].last_heartbeat:
            newest[beat.index] = beat
    return newest
