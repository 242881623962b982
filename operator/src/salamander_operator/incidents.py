"""Incidents: a detected failure with the decision taken, and how they are written into status.

An :class:`Incident` comes from any channel: an agent's failure report or a hang (decided when
detected, see :mod:`.health`), or a failed pod or lost agent (decided inside reconcile). Folding
one into the status is pure and does the bookkeeping the same way for all:

* ``failureCounts[kind]`` grows, except for failures healed by a recovery already under way;
* a charged decision adds one to ``restarts`` and its time to ``restartTimes``;
* ``lastFailure`` becomes this one, with the detection latency where the evidence dates it;
* a ``ReplaceNode`` decision quarantines the node for ``quarantineSeconds``;
* a replacement with a backoff (``delay_s``) holds every worker creation until
  ``replacementsAfter`` (the latest of the holds);
* every incident is one Warning event that names the failure, its latency, and the action.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from salamander.api import FailureAction, FailurePolicy, Reason, TrainingJobStatus
from salamander.api.models import FailureRecord, QuarantinedNode
from salamander_operator.failures import Classification
from salamander_operator.policy import COALESCE_S, Decision


@dataclass(frozen=True)
class Incident:
    """``worker`` is None for a job-wide failure (a hang). ``occurred_at`` is when the evidence
    says the failure happened, when it says so (the agent saw the exit, the last progress)."""

    classification: Classification
    decision: Decision
    detected_at: datetime.datetime
    worker: int | None = None
    pod: str = ""
    node: str = ""
    occurred_at: datetime.datetime | None = None

    @property
    def detection_s(self) -> float | None:
        if self.occurred_at is None:
            return None
        return max(0.0, (self.detected_at - self.occurred_at).total_seconds())

    def describe(self) -> str:
        c, d = self.classification, self.decision
        where = f"worker {self.worker} ({self.pod}" + (f" on {self.node})" if self.node else ")") \
            if self.worker is not None else "the job"
        latency = f"; detected in {self.detection_s:.2f} s" if self.detection_s is not None else ""
        return f"{c.kind} ({c.severity.name}, {c.source.value}) in {where}: {c.evidence[:200]}{latency}; " \
               f"action {d.action.value} ({d.why})"


@dataclass(frozen=True)
class Folded:
    """The status after the incidents, what they ask for, and what to tell people."""

    status: TrainingJobStatus
    replace: frozenset[int] = frozenset()
    failure: tuple[str, str] | None = None  # (reason, message) when an incident ends the job
    events: tuple[tuple[str, str, str], ...] = field(default=())  # (type, reason, message)


def _coalesced(decision: Decision) -> bool:
    return decision.restarts_processes and not decision.charged


def fold_incidents(status: TrainingJobStatus, incidents: Iterable[Incident], policy: FailurePolicy,
                   restart_budget: int, now: datetime.datetime) -> Folded:
    counts = dict(status.failure_counts)
    restarts, times = status.restarts, list(status.restart_times)
    record = status.last_failure
    quarantined = list(status.quarantined_nodes)
    hold = status.replacements_after
    replace: set[int] = set()
    failure: tuple[str, str] | None = None
    events: list[tuple[str, str, str]] = []
    for incident in incidents:
        incident = _as_symptom(incident, times)
        c, d = incident.classification, incident.decision
        message = incident.describe()
        events.append(("Warning", Reason.FAILURE_DETECTED, message))
        if _coalesced(d):
            continue
        counts[c.kind] = counts.get(c.kind, 0) + 1
        numbered = ""
        if d.charged:
            restarts += 1
            times = [t for t in times if (now - t).total_seconds() < policy.window_seconds] + [incident.detected_at]
            numbered = f"; restart {restarts} of {restart_budget}"
        record = FailureRecord(kind=c.kind, severity=c.severity.name, source=c.source.value,
                               worker=-1 if incident.worker is None else incident.worker, pod=incident.pod,
                               node=incident.node, message=c.evidence[:300], action=d.action.value,
                               occurred_at=incident.occurred_at, detected_at=incident.detected_at)
        if d.action is FailureAction.FAIL_JOB:
            failure = failure or (d.fail_reason or Reason.FAILED_BY_POLICY, f"{message}")
        elif d.action in (FailureAction.REPLACE_POD, FailureAction.REPLACE_NODE) and incident.worker is not None:
            replace.add(incident.worker)
            after = ""
            if d.delay_s > 0:
                until = incident.detected_at + datetime.timedelta(seconds=d.delay_s)
                hold = until if hold is None else max(hold, until)
                after = f" after {d.delay_s:.0f} s"
            events.append(("Normal", Reason.WORKER_REPLACED,
                           f"replacing worker {incident.worker} ({incident.pod}){after}{numbered}"))
            if d.action is FailureAction.REPLACE_NODE and incident.node and policy.quarantine_seconds > 0:
                quarantined = quarantine(quarantined, incident.node, now, policy.quarantine_seconds, c.kind)
                events.append(("Warning", Reason.NODE_QUARANTINED,
                               f"node {incident.node} quarantined for {policy.quarantine_seconds} s after {c.kind}"))
        elif d.restarts_processes:
            where = f"worker {incident.worker}" if incident.worker is not None else "every worker"
            delay = f" after {d.delay_s:.0f} s" if d.delay_s else ""
            events.append(("Normal", Reason.PROCESSES_RESTARTED,
                           f"restarting the processes of {where} in place{delay} ({c.kind}){numbered}"))
    status = status.model_copy(update={"failure_counts": counts, "restarts": restarts, "restart_times": times,
                                       "last_failure": record, "quarantined_nodes": quarantined,
                                       "replacements_after": hold})
    return Folded(status, frozenset(replace), failure, tuple(events))


def _as_symptom(incident: Incident, restart_times: Sequence[datetime.datetime]) -> Incident:
    """A transient retry (SEV3: a broken connection) next to another restart of the job is a
    symptom of that failure, whichever was reported first: healed by it, not charged again."""
    d = incident.decision
    if not (d.charged and d.action is FailureAction.RETRY_IN_PLACE):
        return incident
    if any(abs((incident.detected_at - t).total_seconds()) < COALESCE_S for t in restart_times):
        return dataclasses.replace(incident, decision=dataclasses.replace(
            d, charged=False, why=f"{d.why}; a symptom of the restart under way"))
    return incident


def quarantine(nodes: Sequence[QuarantinedNode], node: str, now: datetime.datetime, seconds: int,
               reason: str) -> list[QuarantinedNode]:
    """``nodes`` with ``node`` kept out until ``now + seconds`` (extended if already there)."""
    until = now + datetime.timedelta(seconds=seconds)
    kept = [q for q in nodes if q.node != node]
    return [*kept, QuarantinedNode(node=node, until=until, reason=reason)]


def release_expired(nodes: Sequence[QuarantinedNode], now: datetime.datetime) -> tuple[list[QuarantinedNode],
                                                                                      list[str]]:
    """(nodes still quarantined, nodes released now)."""
    return [q for q in nodes if q.until > now], [q.node for q in nodes if q.until <= now]
