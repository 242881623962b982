"""Cluster planning end to end against the emulator: the operator divides the schedulable
nodes among the TrainingJobs (``--plan``), and re-plans when a node fails or comes back and
when a job ends. The tests play the node lifecycle controller (nodes' Ready condition)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import time

import kmock
import pytest

from salamander_operator.allocations import ClusterAllocations
from salamander_operator.kube import handlers
from tests.operator.conftest import ApiServer, Cluster, _operator, job_manifest
from tests.operator.test_nodes import UNTIL, make_node, set_node_ready


@pytest.fixture
async def planning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setattr(handlers, "PLAN_STARTUP_S", 0.3)
    monkeypatch.setattr(handlers, "PLAN_DEBOUNCE_S", 0.1)
    allocations = ClusterAllocations(selector={"pool": "gpu"})
    async with ApiServer() as emulator, kmock.Server(emulator):
        async with _operator(emulator, tmp_path, monkeypatch, allocations=allocations) as hands:
            yield hands


async def gpu_node(cluster: Cluster, name: str, pool: str = "gpu") -> None:
    await make_node(cluster, name)
    code, body = await cluster._json("patch", f"/api/v1/nodes/{name}", {"metadata": {"labels": {"pool": pool}}})
    assert code == 200, body


async def events_of(cluster: Cluster, job: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for e in await cluster.events():
        if e.get("involvedObject", {}).get("name") == job:
            found.setdefault(e.get("reason", ""), []).append(e.get("message", ""))
    return found


def workers(job: str, **spec: Any) -> dict[str, Any]:
    return job_manifest(job, procsPerNode=1, **spec)


async def test_the_planner_divides_the_nodes_and_replans_on_failure_repair_and_completion(planning: Cluster) -> None:
    cluster = planning
    for name in ("n1", "n2", "n3", "n4"):
        await gpu_node(cluster, name)
    await gpu_node(cluster, "cpu1", pool="cpu")  # not capacity: outside the selector
    await cluster.apply_job(workers("big", replicas={"min": 2, "max": 3}))
    await cluster.apply_job(workers("small", replicas={"min": 2, "max": 2}, scheduling={"weight": 2.0}))

    # 4 schedulable nodes: 2 + 2 is worth more than 3 for big alone or 2 for small alone
    big = await cluster.wait_status("big", "big planned 2", lambda s: (s.get("allocation") or {}).get("workers") == 2)
    await cluster.wait_status("small", "small planned 2", lambda s: (s.get("allocation") or {}).get("workers") == 2)
    assert big["allocation"]["capacity"] == 4 and big["desiredWorkers"] == 2
    await cluster.eventually(lambda: _pods_are(cluster, "big", {"big-worker-0", "big-worker-1"}), "big's 2 pods")
    await cluster.eventually(lambda: _pods_are(cluster, "small", {"small-worker-0", "small-worker-1"}),
                             "small's 2 pods")

    # a node fails: 3 left, not enough for both; small (weight 2) is worth more: big is suspended
    await set_node_ready(cluster, "n4", "False", "KubeletNotReady")
    big = await cluster.wait_status("big", "big suspended", lambda s: s.get("phase") == "Suspended")
    assert big["allocation"]["workers"] == 0 and big["allocation"]["capacity"] == 3
    assert "node n4 not schedulable" in big["allocation"]["reason"]
    assert big["desiredWorkers"] == 0 and big["restarts"] == 0
    await cluster.eventually(lambda: _pods_are(cluster, "big", set()), "big's pods removed")
    assert (await cluster.job_status("small"))["allocation"]["workers"] == 2
    assert any("suspended" in m for m in (await events_of(cluster, "big")).get("Suspended", []))

    # repaired: big resumes with 2
    await set_node_ready(cluster, "n4", "True", "KubeletReady")
    big = await cluster.wait_status("big", "big resumed", lambda s: (s.get("allocation") or {}).get("workers") == 2)
    assert big["phase"] == "Pending" and big["restarts"] == 0
    await cluster.eventually(lambda: _pods_are(cluster, "big", {"big-worker-0", "big-worker-1"}), "big's pods back")
    await cluster.eventually(lambda: _has_event(cluster, "big", "Resumed"), "a Resumed event")

    # small is deleted: big grows to its max of 3
    await cluster.delete_job("small")
    big = await cluster.wait_status("big", "big grown", lambda s: (s.get("allocation") or {}).get("workers") == 3)
    assert "job team-a/small deleted" in big["allocation"]["reason"]
    await cluster.eventually(lambda: _pods_are(cluster, "big", {"big-worker-0", "big-worker-1", "big-worker-2"}),
                             "big's third pod")
    await cluster.eventually(lambda: _has_event(cluster, "big", "Rescaled"), "a Rescaled event")

    allocations = cluster.operator.allocations
    assert allocations.capacity == 4 and set(allocations.jobs) == {"team-a/big"}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for metric in cluster.operator.telemetry.registry.collect() for s in metric.samples}
    assert samples[("salamander_cluster_capacity_nodes", ())] == 4
    assert samples[("salamander_cluster_planned_workers", ())] == 3
    assert samples[("salamander_cluster_plans_total", ())] >= 4
    assert samples[("salamander_job_workers_planned", (("namespace", "team-a"), ("trainingjob", "big")))] == 3


async def test_a_higher_priority_job_shrinks_a_running_one(planning: Cluster) -> None:
    cluster = planning
    for name in ("n1", "n2", "n3"):
        await gpu_node(cluster, name)
    await cluster.apply_job(workers("batch", replicas={"min": 1, "max": 3}))
    await cluster.wait_status("batch", "batch planned 3", lambda s: (s.get("allocation") or {}).get("workers") == 3)
    await cluster.eventually(lambda: _pods_are(cluster, "batch", {f"batch-worker-{i}" for i in range(3)}), "3 pods")

    await cluster.apply_job(workers("urgent", replicas={"min": 2, "max": 2}, scheduling={"priority": 10}))
    await cluster.wait_status("urgent", "urgent planned 2", lambda s: (s.get("allocation") or {}).get("workers") == 2)
    batch = await cluster.wait_status("batch", "batch shrunk", lambda s: (s.get("allocation") or {}).get("workers") == 1)
    assert batch["restarts"] == 0 and batch["desiredWorkers"] == 1
    # the highest indices go
    await cluster.eventually(lambda: _pods_are(cluster, "batch", {"batch-worker-0"}), "batch down to worker 0")


async def test_a_quarantined_node_is_not_capacity(planning: Cluster) -> None:
    """A node a job quarantines (its quarantined-until label, in the future) leaves the capacity."""
    cluster = planning
    for name in ("n1", "n2", "n3"):
        await gpu_node(cluster, name)
    await cluster.apply_job(workers("solo", replicas={"min": 1, "max": 3}))
    await cluster.wait_status("solo", "solo planned 3", lambda s: (s.get("allocation") or {}).get("workers") == 3)
    code, body = await cluster._json("patch", "/api/v1/nodes/n3",
                                     {"metadata": {"labels": {UNTIL: str(int(time.time()) + 3600)}}})
    assert code == 200, body
    solo = await cluster.wait_status("solo", "solo shrunk", lambda s: (s.get("allocation") or {}).get("workers") == 2)
    assert solo["allocation"]["capacity"] == 2 and "node n3 not schedulable" in solo["allocation"]["reason"]


async def _pods_are(cluster: Cluster, job: str, names: set[str]) -> bool:
    pods = await cluster.pods(job)
    return {n for n, p in pods.items() if not p["metadata"].get("deletionTimestamp")} == names


async def _has_event(cluster: Cluster, job: str, reason: str) -> bool:
    return reason in await events_of(cluster, job)
