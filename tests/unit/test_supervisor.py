"""The kube adapter's apply step: idempotent writes, and status patched only when it changed."""

from __future__ import annotations

import logging
from typing import Any

from salamander.api import TrainingJobStatus, parse_spec
from salamander_operator.desired import JobRef, build_worker_pod
from salamander_operator.kube.handlers import JobSupervisor, OperatorContext

SPEC = {"replicas": {"min": 1, "max": 2}, "worker": {"image": "img", "command": ["python", "train.py"]}}
REF = JobRef(name="job", namespace="ns", uid="uid-1", generation=1)
LOG = logging.getLogger("test")


class FakeCluster:
    """Records every write; serves the pods it 'created' back on list."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []
        self.graces: dict[str, int | None] = {}
        self.node_labels: dict[str, dict[str, str]] = {}
        self.label_errors = 0  # this many label_node calls fail first

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.secrets.get(name)

    async def list_worker_pods(self, namespace: str, job_name: str, job_uid: str) -> list[dict[str, Any]]:
        return list(self.pods.values())

    async def create(self, manifest: dict[str, Any]) -> bool:
        self.writes.append(("create", manifest["metadata"]["name"]))
        table = {"Pod": self.pods, "Secret": self.secrets}.get(manifest["kind"])
        if table is not None:
            if manifest["metadata"]["name"] in table:
                return False
            table[manifest["metadata"]["name"]] = manifest
        return True

    async def delete(self, kind: str, namespace: str, name: str, grace_period_s: int | None = None) -> bool:
        self.writes.append(("delete", name))
        self.graces[name] = grace_period_s
        return self.pods.pop(name, None) is not None

    async def label_node(self, name: str, labels: dict[str, str | None]) -> bool:
        self.writes.append(("label", name))
        if self.label_errors:
            self.label_errors -= 1
            from salamander_operator.kube.cluster import ClusterError
            raise ClusterError(f"labelling node {name}: 500 Internal Server Error")
        current = self.node_labels.setdefault(name, {})
        for key, value in labels.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        return True

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.writes.append(("status", name))


class FakeBody(dict):
    pass


async def test_a_steady_pass_writes_nothing(monkeypatch: Any) -> None:
    monkeypatch.setattr("kopf.event", lambda *a, **k: None)
    cluster = FakeCluster()
    supervisor = JobSupervisor(OperatorContext(cluster=cluster, rendezvous=None), TrainingJobStatus())
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert ("status", "job") in cluster.writes
    assert {w for w in cluster.writes if w[0] == "create"} == {
        ("create", "job-control"), ("create", "job-workers"), ("create", "job-worker-0"), ("create", "job-worker-1")}

    cluster.writes.clear()
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert cluster.writes == []  # nothing changed: no create, no delete, no status patch


async def test_status_is_patched_when_a_worker_becomes_ready(monkeypatch: Any) -> None:
    monkeypatch.setattr("kopf.event", lambda *a, **k: None)
    cluster = FakeCluster()
    supervisor = JobSupervisor(OperatorContext(cluster=cluster, rendezvous=None), TrainingJobStatus())
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    pod = build_worker_pod(REF, parse_spec(SPEC), 0, "")
    pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    cluster.pods["job-worker-0"] = pod
    cluster.writes.clear()
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert cluster.writes == [("status", "job")]
    assert supervisor.status.ready_workers == 1 and supervisor.status.phase.value == "Running"


async def test_a_restarted_operator_adopts_the_token_in_the_jobs_secret(monkeypatch: Any) -> None:
    """The credential survives an operator restart: it lives in the Secret, not in memory."""
    import base64

    monkeypatch.setattr("kopf.event", lambda *a, **k: None)
    cluster = FakeCluster()
    cluster.secrets["job-control"] = {"data": {"token": base64.b64encode(b"from-before").decode()}}
    ctx = OperatorContext(cluster=cluster, rendezvous=None)
    await JobSupervisor(ctx, TrainingJobStatus()).reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert ctx.credentials.verify("ns", "job", "from-before")
    assert ("create", "job-control") not in cluster.writes


async def test_the_token_is_adopted_even_when_every_pod_already_exists(monkeypatch: Any) -> None:
    import base64

    monkeypatch.setattr("kopf.event", lambda *a, **k: None)
    cluster = FakeCluster()
    cluster.secrets["job-control"] = {"data": {"token": base64.b64encode(b"kept").decode()}}
    for i in range(2):
        cluster.pods[f"job-worker-{i}"] = build_worker_pod(REF, parse_spec(SPEC), i, "")
    ctx = OperatorContext(cluster=cluster, rendezvous=None)
    plan = await JobSupervisor(ctx, TrainingJobStatus()).reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert plan.create == () and ctx.credentials.verify("ns", "job", "kept")


async def test_a_malformed_token_is_a_clear_error_not_a_crash(monkeypatch: Any) -> None:
    import pytest

    from salamander_operator.kube.cluster import ClusterError
    cluster = FakeCluster()
    cluster.secrets["job-control"] = {"data": {"token": "%%% not base64 %%%"}}
    supervisor = JobSupervisor(OperatorContext(cluster=cluster, rendezvous=None), TrainingJobStatus())
    with pytest.raises(ClusterError, match="malformed token"):
        await supervisor.ensure_credential(REF)


def _running_on(cluster: FakeCluster, index: int, node: str, deleting: bool = False) -> None:
    pod = build_worker_pod(REF, parse_spec(SPEC), index, "")
    pod["spec"]["nodeName"] = node
    pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2025-03-01T12:00:00Z"
    cluster.pods[pod["metadata"]["name"]] = pod


async def test_a_worker_on_a_failed_node_is_removed_at_once_replaced_elsewhere_and_the_node_marked(
        monkeypatch: Any) -> None:
    from salamander_operator.nodes import LABEL_QUARANTINED_BY, LABEL_QUARANTINED_UNTIL, NodeState

    monkeypatch.setattr("kopf.event", lambda *a, **k: None)
    cluster = FakeCluster()
    cluster.label_errors = 1  # the first label patch fails: the pass goes on, and a later one retries
    ctx = OperatorContext(cluster=cluster, rendezvous=None)
    supervisor = JobSupervisor(ctx, TrainingJobStatus())
    _running_on(cluster, 0, "n0")
    _running_on(cluster, 1, "n1")
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert ctx.job_nodes["uid-1"] == {"n0", "n1"}
    assert ctx.jobs_on("n1") == ["uid-1"] and ctx.jobs_on("elsewhere") == []

    ctx.observe_node("n1", NodeState(ready=False, reason="KubeletNotReady"))
    cluster.writes.clear()
    plan = await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert plan.delete == (1,) and cluster.graces["job-worker-1"] == 0  # no kubelet will confirm a graceful one
    assert supervisor.status.last_failure.kind == "NodeNotReady"
    assert [q.node for q in supervisor.status.quarantined_nodes] == ["n1"]
    assert ("label", "n1") in cluster.writes and "n1" not in cluster.node_labels  # it failed

    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)  # recreates worker 1, off n1; labels n1
    affinity = cluster.pods["job-worker-1"]["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"] == ["n1"]
    until = supervisor.status.quarantined_nodes[0].until
    assert cluster.node_labels["n1"] == {LABEL_QUARANTINED_UNTIL: str(int(until.timestamp())),
                                         LABEL_QUARANTINED_BY: "ns.job"}
    cluster.writes.clear()
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert not [w for w in cluster.writes if w[0] == "label"]  # labelled once, not on every pass

    # The quarantine ends: the labels go (the pass is due then, not a resync later).
    assert 0 < supervisor.next_pass_in(10.0) <= 10.0
    expired = [q.model_copy(update={"until": q.until.replace(year=2000)}) for q in supervisor.status.quarantined_nodes]
    supervisor.status = supervisor.status.model_copy(update={"quarantined_nodes": expired})
    assert supervisor.next_pass_in(10.0) == 0.05
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert supervisor.status.quarantined_nodes == [] and cluster.node_labels["n1"] == {}
    assert supervisor.next_pass_in(10.0) == 10.0


async def test_a_pod_stuck_terminating_on_a_failed_node_is_removed_without_grace(monkeypatch: Any) -> None:
    from salamander_operator.nodes import NodeState

    monkeypatch.setattr("kopf.event", lambda *a, **k: None)
    cluster = FakeCluster()
    ctx = OperatorContext(cluster=cluster, rendezvous=None)
    _running_on(cluster, 0, "n0")
    _running_on(cluster, 1, "n1", deleting=True)  # e.g. deleted after its agent fell silent
    supervisor = JobSupervisor(ctx, TrainingJobStatus())
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert ("delete", "job-worker-1") not in cluster.writes  # a healthy node finishes it by itself
    ctx.observe_node("n1", NodeState(ready=None, deleted=True))
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert cluster.graces["job-worker-1"] == 0 and "job-worker-1" not in cluster.pods


async def test_a_restarted_operator_relabels_and_still_releases_its_quarantined_nodes(monkeypatch: Any) -> None:
    import datetime

    from salamander.api.models import QuarantinedNode

    monkeypatch.setattr("kopf.event", lambda *a, **k: None)
    cluster = FakeCluster()
    past = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    stored = TrainingJobStatus(quarantined_nodes=[QuarantinedNode(node="old", until=past),
                                                  QuarantinedNode(node="theirs", until=past),
                                                  QuarantinedNode(node="kept", until=future)])
    ctx = OperatorContext(cluster=cluster, rendezvous=None)
    ctx.node_quarantined_by["theirs"] = "ns.another-job"  # quarantined by another job since
    supervisor = JobSupervisor(ctx, stored)
    await supervisor.reconcile_once(REF, SPEC, FakeBody(), LOG)
    assert ("label", "old") in cluster.writes and cluster.node_labels["old"] == {}  # released after the restart
    assert ("label", "theirs") not in cluster.writes  # the other job's labels stay
    assert cluster.node_labels["kept"]["salamander.dev/quarantined-by"] == "ns.job"
    assert set(supervisor.node_labels) == {"kept"}


def test_a_node_event_wakes_only_the_jobs_on_it_and_only_when_it_fails() -> None:
    import asyncio

    from salamander_operator.nodes import NodeState

    ctx = OperatorContext(cluster=FakeCluster(), rendezvous=None)
    ctx.triggers = {"a": asyncio.Event(), "b": asyncio.Event()}
    ctx.job_nodes = {"a": frozenset({"n1"}), "b": frozenset({"n2"})}
    ctx.observe_node("n1", NodeState(ready=True))
    assert not ctx.triggers["a"].is_set()  # healthy: nobody to wake
    ctx.observe_node("n1", NodeState(ready=False))
    assert ctx.triggers["a"].is_set() and not ctx.triggers["b"].is_set()
    ctx.triggers["a"].clear()
    ctx.observe_node("n1", NodeState(ready=False, message="still down"))
    assert not ctx.triggers["a"].is_set()  # no change that matters
    ctx.observe_node("n1", NodeState(ready=None, deleted=True))
    assert ctx.triggers["a"].is_set() and ctx.nodes["n1"].deleted
