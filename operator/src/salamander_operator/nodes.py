"""The node channel: a worker on a node that is NotReady, Unknown or deleted is failed.

The node lifecycle controller marks a node's Ready condition Unknown once its kubelet stops
posting status (40 s by default) and only evicts its pods minutes later; a deleted node leaves
its pods behind until the pod garbage collector gets to them. Meanwhile the pods still say
``Running``. This channel turns those workers into failed ones (reason ``NodeNotReady`` or
``NodeDeleted``, a SEV1 Node failure), so reconcile replaces them and quarantines the node.

Only nodes the operator has seen are judged: a node never seen is unknown, not failed.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from salamander.api import GROUP
from salamander_operator.failures import classify_node
from salamander_operator.observed import ObservedWorker, WorkerPhase, _timestamp

#: Set on a node while a job keeps it in quarantine, for other schedulers and for people to see.
#: What keeps the job itself off the node is its pods' node affinity, not these labels.
LABEL_QUARANTINED_UNTIL = f"{GROUP}/quarantined-until"  # unix seconds
LABEL_QUARANTINED_BY = f"{GROUP}/quarantined-by"        # <namespace>.<job>
MAX_LABEL_VALUE = 63


@dataclass(frozen=True)
class NodeState:
    """What the node channel needs of a node. ``ready`` is its Ready condition: True, False,
    or None for Unknown. ``deleted`` marks the tombstone of a node that is gone. ``since`` is
    when that state began (the condition's last transition, or when the deletion was seen),
    ``reason`` and ``message`` are the condition's, for the failure's evidence."""

    ready: bool | None = True
    deleted: bool = False
    reason: str = ""
    message: str = ""
    since: datetime.datetime | None = None

    @property
    def failed(self) -> bool:
        return classify_node(self.ready, self.deleted) is not None


def node_state(node: Mapping[str, Any]) -> NodeState:
    """Read a Node's Ready condition. A node that has not posted one yet counts as ready: the
    node lifecycle controller sets it to Unknown (``NodeStatusNeverUpdated``) when the kubelet
    never reports, so a node really lost always gets one."""
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") != "Ready":
            continue
        ready = {"True": True, "False": False}.get(condition.get("status") or "")
        return NodeState(ready=ready, reason=condition.get("reason") or "", message=condition.get("message") or "",
                         since=_timestamp(condition.get("lastTransitionTime")))
    return NodeState()


def mark_failed_nodes(observed: Sequence[ObservedWorker], nodes: Mapping[str, NodeState]) -> list[ObservedWorker]:
    """``observed`` with every running worker (not being deleted) on a node that is NotReady,
    Unknown or deleted turned into a failed one (reason ``NodeNotReady`` or ``NodeDeleted``),
    so reconcile replaces it. Workers on nodes not in ``nodes`` are left as they are."""
    result = []
    for worker in observed:
        state = nodes.get(worker.node) if worker.node else None
        if state is not None and worker.phase is WorkerPhase.RUNNING and not worker.deleting:
            c = classify_node(state.ready, state.deleted)
            if c is not None:
                detail = "; ".join(p for p in (state.reason, state.message[:200]) if p)
                worker = dataclasses.replace(
                    worker, phase=WorkerPhase.FAILED, ready=False, reason=c.kind, exit_code=None,
                    message=f"node {worker.node}: {c.evidence}" + (f" ({detail})" if detail else ""),
                    failed_at=state.since)
        result.append(worker)
    return result


def stranded(observed: Sequence[ObservedWorker], nodes: Mapping[str, NodeState]) -> list[int]:
    """Indices of workers being deleted on a failed node. A NotReady node's kubelet cannot
    confirm a graceful deletion, so such a pod stays Terminating (holding the worker's name)
    until it is deleted with no grace period."""
    return [w.index for w in observed
            if w.deleting and w.node and (state := nodes.get(w.node)) is not None and state.failed]


def quarantined_by(namespace: str, job: str) -> str:
    """The ``quarantined-by`` label value of a job: ``<namespace>.<job>``, shortened with a hash
    of the whole when it is longer than a label value may be."""
    value = f"{namespace}.{job}"
    if len(value) <= MAX_LABEL_VALUE:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[:MAX_LABEL_VALUE - 11].rstrip('.-_')}-{digest}"


def quarantine_labels(namespace: str, job: str, until: datetime.datetime | None) -> dict[str, str | None]:
    """The labels that mark a node quarantined by a job until ``until`` (a merge patch), or
    that remove the marks (``until`` None)."""
    if until is None:
        return {LABEL_QUARANTINED_UNTIL: None, LABEL_QUARANTINED_BY: None}
    return {LABEL_QUARANTINED_UNTIL: str(int(until.timestamp())), LABEL_QUARANTINED_BY: quarantined_by(namespace, job)}
