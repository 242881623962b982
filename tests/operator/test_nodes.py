"""The node channel and quarantine, end to end against the emulator.

The tests play the kubelet and the node lifecycle controller: they bind pods to nodes
(``spec.nodeName``), report pods' phases, and flip nodes' Ready condition or delete nodes.
"""

from __future__ import annotations

import datetime
from typing import Any

from tests.operator.conftest import NS, PODS, Cluster, job_manifest

NODES = "/api/v1/nodes"
UNTIL = "salamander.dev/quarantined-until"
BY = "salamander.dev/quarantined-by"


async def make_node(cluster: Cluster, name: str) -> None:
    code, body = await cluster._json("post", NODES, {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [_ready("True", "KubeletReady")]}}, "application/json")
    assert code in (200, 201), body


async def set_node_ready(cluster: Cluster, name: str, status: str, reason: str) -> None:
    code, body = await cluster._json("patch", f"{NODES}/{name}/status",
                                     {"status": {"conditions": [_ready(status, reason)]}})
    assert code == 200, body


async def delete_node(cluster: Cluster, name: str) -> None:
    code, body = await cluster._json("delete", f"{NODES}/{name}")
    assert code == 200, body


async def node(cluster: Cluster, name: str) -> dict[str, Any]:
    code, body = await cluster._json("get", f"{NODES}/{name}")
    assert code == 200, body
    return body


def _ready(status: str, reason: str) -> dict[str, Any]:
    return {"type": "Ready", "status": status, "reason": reason, "message": f"kubelet says {reason}",
            "lastTransitionTime": datetime.datetime.now(datetime.UTC).isoformat()}


async def bind(cluster: Cluster, pod: str, node_name: str) -> None:
    """Play the scheduler: put a pod on a node."""
    code, body = await cluster._json("patch", f"{PODS}/{pod}", {"spec": {"nodeName": node_name}})
    assert code == 200, body


async def fail_pod(cluster: Cluster, pod: str, reason: str, message: str) -> None:
    """Play the kubelet evicting a pod: the pod (not its container) failed, with a reason."""
    code, body = await cluster._json("patch", f"{PODS}/{pod}/status", {"status": {
        "phase": "Failed", "reason": reason, "message": message,
        "conditions": [{"type": "Ready", "status": "False"}]}})
    assert code == 200, body


async def running_on_nodes(cluster: Cluster, job: str, **spec: Any) -> dict[str, dict[str, Any]]:
    """A job of two workers, worker 0 on node n1 and worker 1 on n2, both running."""
    for name in ("n1", "n2"):
        await make_node(cluster, name)
    await cluster.apply_job(job_manifest(job, **spec))
    pods = await cluster.eventually(lambda: _count(cluster, job, 2), "two worker pods")
    for index, node_name in enumerate(("n1", "n2")):
        await bind(cluster, f"{job}-worker-{index}", node_name)
        await cluster.set_pod(f"{job}-worker-{index}", "Running", ready=True)
    await cluster.wait_status(job, "running", lambda s: s.get("readyWorkers") == 2)
    return pods


async def replaced(cluster: Cluster, job: str, index: int, old_uid: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        pod = (await cluster.pods(job)).get(f"{job}-worker-{index}")
        return pod if pod is not None and pod["metadata"]["uid"] != old_uid else None
    return await cluster.eventually(probe, f"a replacement for worker {index}")


async def reasons(cluster: Cluster, job: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for event in await cluster.events():
        if (event.get("involvedObject") or {}).get("name") == job:
            out.setdefault(event.get("reason", ""), []).append(event.get("message", ""))
    return out


def excluded_nodes(pod: dict[str, Any]) -> list[str]:
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    (term,) = terms
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "kubernetes.io/hostname" and expression["operator"] == "NotIn"
    return expression["values"]


async def test_a_notready_node_gets_its_worker_replaced_and_is_quarantined(cluster: Cluster) -> None:
    pods = await running_on_nodes(cluster, "llm")
    old_uid, healthy_uid = pods["llm-worker-1"]["metadata"]["uid"], pods["llm-worker-0"]["metadata"]["uid"]

    await set_node_ready(cluster, "n2", "False", "KubeletNotReady")

    replacement = await replaced(cluster, "llm", 1, old_uid)
    status = await cluster.wait_status("llm", "the failure recorded", lambda s: s.get("restarts") == 1)
    last = status["lastFailure"]
    assert (last["kind"], last["source"], last["severity"], last["action"], last["node"], last["worker"]) == (
        "NodeNotReady", "Node", "SEV1", "ReplaceNode", "n2", 1)
    assert "KubeletNotReady" in last["message"]
    assert status["failureCounts"] == {"NodeNotReady": 1}
    (quarantined,) = status["quarantinedNodes"]
    assert quarantined["node"] == "n2" and quarantined["reason"] == "NodeNotReady"
    events = await reasons(cluster, "llm")
    assert any("NodeNotReady" in m and "n2" in m for m in events["FailureDetected"]), events
    assert any("node n2 quarantined" in m for m in events["NodeQuarantined"]), events
    assert excluded_nodes(replacement) == ["n2"]
    assert "nodeName" not in replacement["spec"]
    assert (await cluster.pods("llm"))["llm-worker-0"]["metadata"]["uid"] == healthy_uid  # n1 is fine

    labels = await cluster.eventually(lambda: _labelled(cluster, "n2"), "the quarantine label on n2")
    assert abs(int(labels[UNTIL]) - _unix(quarantined["until"])) <= 1
    assert labels[BY] == f"{NS}.llm"
    assert UNTIL not in ((await node(cluster, "n1"))["metadata"].get("labels") or {})


async def test_a_deleted_node_gets_its_worker_replaced(cluster: Cluster) -> None:
    pods = await running_on_nodes(cluster, "gone")
    old_uid = pods["gone-worker-0"]["metadata"]["uid"]

    await delete_node(cluster, "n1")

    replacement = await replaced(cluster, "gone", 0, old_uid)
    status = await cluster.wait_status("gone", "the failure recorded", lambda s: s.get("restarts") == 1)
    last = status["lastFailure"]
    assert (last["kind"], last["source"], last["severity"], last["action"], last["node"]) == (
        "NodeDeleted", "Node", "SEV1", "ReplaceNode", "n1")
    assert [q["node"] for q in status["quarantinedNodes"]] == ["n1"]
    assert excluded_nodes(replacement) == ["n1"]
    events = await reasons(cluster, "gone")
    assert any("NodeDeleted" in m for m in events["FailureDetected"]), events
    assert "NodeQuarantined" in events


async def test_pod_channel_eviction_quarantines_but_oom_does_not(cluster: Cluster) -> None:
    evicted = await running_on_nodes(cluster, "evict")
    old_uid = evicted["evict-worker-1"]["metadata"]["uid"]
    await fail_pod(cluster, "evict-worker-1", "Evicted", "The node was low on resource: memory.")
    replacement = await replaced(cluster, "evict", 1, old_uid)
    status = await cluster.wait_status("evict", "the eviction recorded", lambda s: s.get("restarts") == 1)
    last = status["lastFailure"]
    assert (last["kind"], last["source"], last["severity"], last["action"], last["node"]) == (
        "Evicted", "Pod", "SEV1", "ReplaceNode", "n2")
    assert [q["node"] for q in status["quarantinedNodes"]] == ["n2"]
    assert excluded_nodes(replacement) == ["n2"]

    await cluster.apply_job(job_manifest("oom"))
    pods = await cluster.eventually(lambda: _count(cluster, "oom", 2), "two worker pods")
    for index in range(2):
        await bind(cluster, f"oom-worker-{index}", "n1")
        await cluster.set_pod(f"oom-worker-{index}", "Running", ready=True)
    await cluster.wait_status("oom", "running", lambda s: s.get("readyWorkers") == 2)
    await cluster.set_pod("oom-worker-0", "Failed", exit_code=137, reason="OOMKilled")
    replacement = await replaced(cluster, "oom", 0, pods["oom-worker-0"]["metadata"]["uid"])
    status = await cluster.wait_status("oom", "the OOM recorded", lambda s: s.get("restarts") == 1)
    last = status["lastFailure"]
    assert (last["kind"], last["severity"], last["action"]) == ("ContainerOOMKilled", "SEV2", "ReplacePod")
    assert status.get("quarantinedNodes", []) == []
    assert "affinity" not in replacement["spec"]
    assert "NodeQuarantined" not in await reasons(cluster, "oom")


async def test_a_quarantine_ends_and_the_label_goes(cluster: Cluster) -> None:
    pods = await running_on_nodes(cluster, "brief", failurePolicy={"quarantineSeconds": 2})
    await set_node_ready(cluster, "n2", "Unknown", "NodeStatusUnknown")
    await replaced(cluster, "brief", 1, pods["brief-worker-1"]["metadata"]["uid"])
    status = await cluster.wait_status("brief", "n2 quarantined", lambda s: bool(s.get("quarantinedNodes")))
    assert status["lastFailure"]["kind"] == "NodeNotReady"
    await cluster.eventually(lambda: _labelled(cluster, "n2"), "the quarantine label on n2")

    # No event comes; the operator wakes itself when the quarantine ends.
    status = await cluster.wait_status("brief", "n2 released", lambda s: s.get("quarantinedNodes") == [])
    events = await reasons(cluster, "brief")
    assert any("node n2 is out of quarantine" in m for m in events["NodeReleased"]), events

    async def unlabelled() -> bool:
        labels = (await node(cluster, "n2"))["metadata"].get("labels") or {}
        return UNTIL not in labels and BY not in labels and labels.get("kubernetes.io/hostname") == "n2"
    await cluster.eventually(unlabelled, "the quarantine labels gone from n2")


async def _labelled(cluster: Cluster, name: str) -> dict[str, str] | None:
    labels = (await node(cluster, name))["metadata"].get("labels") or {}
    return labels if UNTIL in labels else None


async def _count(cluster: Cluster, job: str, count: int) -> dict[str, dict[str, Any]] | None:
    pods = await cluster.pods(job)
    return pods if len(pods) == count else None


def _unix(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
