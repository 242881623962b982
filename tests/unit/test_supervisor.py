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

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.writes.append(("delete", name))
        return self.pods.pop(name, None) is not None

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
