"""Straggler detection wired into a job's supervision: one :class:`StragglerWatch` per job.

Each reconcile pass the watch feeds the detector (:mod:`salamander_operator.stragglers`) with
the ranks' newest timings from the control plane and with where each rank runs, and turns its
decision into a :class:`StragglerVerdict` that :func:`~salamander_operator.reconcile.reconcile`
applies purely: the current stragglers in status, the eviction (replace the worker,
quarantine its node, not charged to the restart budget) and the undoing of one that did not
help (the quarantine lifted). Once the pass is applied, :meth:`StragglerWatch.applied`
records what was done, so an eviction is evaluated and never repeated by accident.

The detector's state lives in the operator's memory: after an operator restart detection
starts over (stragglers are found again within ``persistSteps``), while status keeps the
quarantines it wrote.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from salamander.api import TrainingJobSpec
from salamander.api.models import QuarantinedNode, StragglerRecord
from salamander.wire import RankTiming
from salamander_operator import stragglers
from salamander_operator.controlplane.server import AgentSession
from salamander_operator.desired import JobRef
from salamander_operator.health import worker_index


@dataclass(frozen=True)
class Eviction:
    """Replace ``worker`` and keep ``node`` out until ``until``."""

    worker: int
    node: str
    until: datetime.datetime
    why: str


@dataclass(frozen=True)
class StragglerVerdict:
    """What one pass of straggler detection asks of reconcile."""

    records: tuple[StragglerRecord, ...] = ()
    evictions: tuple[Eviction, ...] = ()
    releases: tuple[tuple[str, str], ...] = ()  # (node, why): quarantines to lift
    actions: tuple[stragglers.Action, ...] = field(default=(), compare=False)


def placement(job: JobRef, sessions: Iterable[AgentSession]) -> tuple[dict[int, str], dict[str, int]]:
    """(rank -> node, node -> worker) from the connected agents' registrations."""
    nodes: dict[int, str] = {}
    workers: dict[str, int] = {}
    for s in sessions:
        if not s.connected:
            continue
        index = worker_index(job, s.identity.pod)
        for rank in range(s.identity.first_rank, s.identity.first_rank + s.identity.rank_count):
            nodes[rank] = s.identity.node
        if index is not None and s.identity.node:
            workers[s.identity.node] = index
    return nodes, workers


class StragglerWatch:
    """One job's detector state, in memory."""

    def __init__(self) -> None:
        self.state = stragglers.DetectorState()

    def verdict(self, spec: TrainingJobSpec, timings: Mapping[int, RankTiming], nodes: Mapping[int, str],
                worker_of_node: Mapping[str, int], ready: int, now: datetime.datetime) -> StragglerVerdict:
        """Observe ``timings`` and decide; nothing is recorded as done until :meth:`applied`."""
        policy = spec.stragglers
        self.state, findings = stragglers.observe(self.state, timings, nodes, policy, now)
        actions = stragglers.decide(self.state, findings, policy,
                                    stragglers.Workers(ready=ready, minimum=spec.replicas.min,
                                                       worker_of_node=dict(worker_of_node)), now)
        until = now + datetime.timedelta(seconds=policy.quarantine_seconds)
        evictions = tuple(Eviction(a.worker, a.node, until,
                                   f"rank {a.rank} straggling ({a.cause}, {a.slowdown:.0%} slower)")
                          for a in actions if isinstance(a, stragglers.Evict))
        releases = tuple((a.node, a.why) for a in actions if isinstance(a, stragglers.Undo))
        return StragglerVerdict(tuple(stragglers.status_records(self.state, actions)), evictions, releases,
                                tuple(actions))

    def applied(self, verdict: StragglerVerdict, now: datetime.datetime) -> None:
        """Record that the pass carrying ``verdict`` was applied."""
        if verdict.actions:
            self.state = stragglers.applied(self.state, verdict.actions, now)


def quarantined(nodes: Iterable[QuarantinedNode], eviction: Eviction) -> list[QuarantinedNode]:
    """``nodes`` with ``eviction``'s node kept out until its ``until`` (a longer hold stays)."""
    kept = [q for q in nodes if q.node != eviction.node]
    old = next((q for q in nodes if q.node == eviction.node), None)
    until = max(eviction.until, old.until) if old is not None else eviction.until
    return [*kept, QuarantinedNode(node=eviction.node, until=until, reason=f"straggler: {eviction.why}")]
