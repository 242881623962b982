"""The operator end to end against the emulator: create, fail, grow, fail for good, succeed, delete."""

from __future__ import annotations

import base64

import pytest

from salamander import wire
from tests.operator.conftest import NS, Cluster, job_manifest


async def test_create_makes_pods_service_and_status(cluster: Cluster) -> None:
    job = await cluster.apply_job(job_manifest("llm"))
    pods = await cluster.eventually(lambda: _pods_named(cluster, "llm", 2), "two worker pods")
    assert set(pods) == {"llm-worker-0", "llm-worker-1"}
    pod = pods["llm-worker-1"]
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"][wire.LABEL_JOB] == "llm" and meta["labels"][wire.LABEL_INDEX] == "1"
    assert meta["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert meta["ownerReferences"][0]["controller"] is True
    assert spec["restartPolicy"] == "Never"
    assert spec["hostname"] == "llm-worker-1" and spec["subdomain"] == "llm-workers"
    container = spec["containers"][0]
    assert container["image"] == "registry.local/train:1"
    assert container["command"][:7] == ["salamander-worker", "--nnodes", "1:2", "--nproc-per-node", "2",
                                        "--max-restarts", "2"]
    assert container["command"][7:] == ["--", "python", "train.py", "--steps", "10"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "8Gi"}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["FOO"] == "bar" and env[wire.ENV_RUN_ID] == job["metadata"]["uid"]
    # The job's own credential: in a Secret the job owns, handed to the pod by reference only.
    assert env[wire.ENV_CONTROL_TOKEN] == {"secretKeyRef": {"name": "llm-control", "key": "token"}}
    assert env[wire.ENV_CONTROL_ENDPOINT].startswith("127.0.0.1:")
    secret = (await cluster.secrets())["llm-control"]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert len(base64.b64decode(secret["data"]["token"])) >= 32
    assert env[wire.ENV_RDZV_ENDPOINT].startswith("127.0.0.1:") and env[wire.ENV_NODE_INDEX] == "1"

    service = (await cluster.eventually(cluster.services, "the service"))["llm-workers"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"][wire.LABEL_JOB] == "llm"
    assert service["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

    status = await cluster.wait_status("llm", "a pending status", lambda s: s.get("desiredWorkers") == 2)
    assert status["phase"] == "Pending" and status["readyWorkers"] == 0
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "WaitingForWorkers"

    for name in pods:
        await cluster.set_pod(name, "Running", ready=True)
    status = await cluster.wait_status("llm", "running", lambda s: s.get("readyWorkers") == 2)
    assert status["phase"] == "Running" and status["worldSize"] == 4 and status["startTime"]


async def test_failed_pod_is_replaced_and_counted(cluster: Cluster) -> None:
    await cluster.apply_job(job_manifest("llm"))
    pods = await cluster.eventually(lambda: _pods_named(cluster, "llm", 2), "two worker pods")
    for name in pods:
        await cluster.set_pod(name, "Running", ready=True)
    await cluster.wait_status("llm", "running", lambda s: s.get("phase") == "Running")
    old_uid = pods["llm-worker-0"]["metadata"]["uid"]
    healthy_uid = pods["llm-worker-1"]["metadata"]["uid"]

    await cluster.set_pod("llm-worker-0", "Failed", exit_code=137, reason="OOMKilled")

    async def replaced() -> bool:
        now = await cluster.pods("llm")
        pod = now.get("llm-worker-0")
        return pod is not None and pod["metadata"]["uid"] != old_uid
    await cluster.eventually(replaced, "a replacement for worker 0")
    status = await cluster.wait_status("llm", "one restart", lambda s: s.get("restarts") == 1)
    assert status["phase"] in ("Running", "Pending", "Restarting")
    assert (await cluster.pods("llm"))["llm-worker-1"]["metadata"]["uid"] == healthy_uid  # untouched
    messages = [e.get("message", "") for e in await cluster.events() if e.get("reason") == "FailureDetected"]
    assert any("exit code 137" in m and "OOMKilled" in m for m in messages), messages
    last = status["lastFailure"]
    assert (last["kind"], last["severity"], last["pod"], last["action"]) == (
        "ContainerOOMKilled", "SEV2", "llm-worker-0", "ReplacePod")
    assert status["failureCounts"] == {"ContainerOOMKilled": 1}
    assert 0.0 <= status["goodput"]["ratio"] <= 1.0 and "startup" in status["goodput"]["lostSeconds"]

    # the same pass exported it: the operator's metrics say what its status says
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(cluster.operator.telemetry.registry).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    job = (("namespace", NS), ("trainingjob", "llm"))
    assert got[("salamander_failures_detected_total", (*job[:1], ("severity", "SEV2"), ("source", "Pod"),
                                                      *job[1:]))] == 1
    assert got[("salamander_job_restarts_total", (*job[:1], ("reason", "ContainerOOMKilled"), *job[1:]))] == 1
    assert got[("salamander_job_workers_desired", job)] == 2
    assert got[("salamander_reconcile_duration_seconds_count", job)] >= 2


async def test_pending_worker_never_blocks_and_job_grows(cluster: Cluster) -> None:
    await cluster.apply_job(job_manifest("elastic", replicas={"min": 2, "max": 3}, procsPerNode=1))
    pods = await cluster.eventually(lambda: _pods_named(cluster, "elastic", 3), "three worker pods")
    uids = {name: pod["metadata"]["uid"] for name, pod in pods.items()}
    await cluster.set_pod("elastic-worker-0", "Running", ready=True)
    await cluster.set_pod("elastic-worker-1", "Running", ready=True)
    # elastic-worker-2 stays Pending (unschedulable): the job runs with two.
    status = await cluster.wait_status("elastic", "running with 2", lambda s: s.get("readyWorkers") == 2)
    assert status["phase"] == "Running" and status["desiredWorkers"] == 3
    now = await cluster.pods("elastic")
    assert {n: p["metadata"]["uid"] for n, p in now.items()} == uids  # nothing restarted or replaced
    assert status.get("restarts", 0) == 0

    await cluster.set_pod("elastic-worker-2", "Running", ready=True)
    status = await cluster.wait_status("elastic", "grown to 3", lambda s: s.get("readyWorkers") == 3)
    assert status["phase"] == "Running"


async def test_restart_budget_spent_fails_the_job(cluster: Cluster) -> None:
    await cluster.apply_job(job_manifest("flaky", restartBudget=1, replicas={"min": 1, "max": 1}))
    for attempt in range(2):
        pods = await cluster.eventually(lambda: _pods_named(cluster, "flaky", 1), f"worker, attempt {attempt}")
        uid = pods["flaky-worker-0"]["metadata"]["uid"]
        await cluster.set_pod("flaky-worker-0", "Failed", exit_code=1)
        if attempt == 0:
            async def replaced() -> bool:
                pod = (await cluster.pods("flaky")).get("flaky-worker-0")
                return pod is not None and pod["metadata"]["uid"] != uid
            await cluster.eventually(replaced, "the replacement")
    status = await cluster.wait_status("flaky", "failed", lambda s: s.get("phase") == "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "RestartBudgetExhausted"
    assert "restart budget of 1 is spent" in failed["message"]
    assert status["restarts"] == 1 and status["completionTime"]


async def test_all_workers_exit_zero_succeeds(cluster: Cluster) -> None:
    await cluster.apply_job(job_manifest("done"))
    pods = await cluster.eventually(lambda: _pods_named(cluster, "done", 2), "two worker pods")
    for name in pods:
        await cluster.set_pod(name, "Running", ready=True)
    await cluster.wait_status("done", "running", lambda s: s.get("phase") == "Running")
    for name in pods:
        await cluster.set_pod(name, "Succeeded", exit_code=0)
    status = await cluster.wait_status("done", "succeeded", lambda s: s.get("phase") == "Succeeded")
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "AllWorkersSucceeded"
    assert status["completionTime"]


async def test_invalid_spec_is_marked_and_creates_nothing(cluster: Cluster) -> None:
    await cluster.apply_job(job_manifest("bad", replicas={"min": 3, "max": 2}))
    status = await cluster.wait_status("bad", "InvalidSpec", lambda s: s.get("phase") == "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec.replicas:") and "min (3) must not exceed max (2)" in failed["message"]
    assert await cluster.pods("bad") == {}
    assert "bad-workers" not in await cluster.services()
    # Fixing the spec (a new generation) brings the job to life.
    await cluster.patch_job("bad", {"spec": {"replicas": {"min": 1, "max": 2}}})
    await cluster.eventually(lambda: _pods_named(cluster, "bad", 2), "pods after the fix")


async def test_a_name_kubernetes_accepts_but_pods_cannot_use_is_invalid(cluster: Cluster) -> None:
    await cluster.apply_job(job_manifest("llama-3.1"))
    status = await cluster.wait_status("llama-3.1", "InvalidSpec", lambda s: s.get("phase") == "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and failed["message"].startswith("metadata.name:")
    assert await cluster.pods("llama-3.1") == {}


async def test_garbage_spec_never_crashes_the_operator(cluster: Cluster) -> None:
    manifest = job_manifest("junk")
    manifest["spec"] = {"replicas": "lots", "worker": ["not", "a", "mapping"], "surprise": {"x": 1}}
    await cluster.apply_job(manifest)
    status = await cluster.wait_status("junk", "InvalidSpec", lambda s: s.get("phase") == "Failed")
    assert any(c["reason"] == "InvalidSpec" for c in status["conditions"])
    # The operator still serves other jobs.
    await cluster.apply_job(job_manifest("fine"))
    await cluster.eventually(lambda: _pods_named(cluster, "fine", 2), "pods of a good job")


async def test_delete_removes_everything(cluster: Cluster) -> None:
    await cluster.apply_job(job_manifest("gone"))
    await cluster.eventually(lambda: _pods_named(cluster, "gone", 2), "two worker pods")
    await cluster.eventually(cluster.services, "the service")
    await cluster.delete_job("gone")

    async def all_gone() -> bool:
        return (await cluster.job("gone") is None and await cluster.pods("gone") == {}
                and "gone-workers" not in await cluster.services() and "gone-control" not in await cluster.secrets())
    await cluster.eventually(all_gone, "the job, its pods and its service to be gone")


async def _pods_named(cluster: Cluster, job: str, count: int) -> dict | None:
    pods = await cluster.pods(job)
    return pods if len(pods) == count else None


async def test_only_the_jobs_own_agents_may_speak_for_it(cluster: Cluster) -> None:
    from salamander.controlplane import AgentIdentity
    from salamander_worker.controlplane import AgentClient, ControlPlaneError

    await cluster.apply_job(job_manifest("alpha"))
    await cluster.apply_job(job_manifest("beta"))
    secrets = await cluster.eventually(
        lambda: _both(cluster.secrets(), "alpha-control", "beta-control"), "both jobs' secrets")
    token = {name: base64.b64decode(s["data"]["token"]).decode() for name, s in secrets.items()}
    endpoint = cluster.operator.control_endpoint
    me = AgentIdentity("team-a", "alpha", "alpha-worker-0", "node-1", 0, 2)

    agent = AgentClient(endpoint, token["alpha-control"], me)
    await agent.connect()  # alpha's token speaks for alpha
    await agent.heartbeat(7, 0.5)
    await agent.close()
    impostor = AgentClient(endpoint, token["beta-control"], me)  # beta's token does not
    with pytest.raises(ControlPlaneError):
        await impostor.connect()
    await impostor.close()
    assert cluster.operator.control_plane.stats.rejected["unauthenticated"] == 1


async def _both(secrets_coro, *names: str) -> dict | None:
    secrets = await secrets_coro
    return {n: secrets[n] for n in names} if all(n in secrets for n in names) else None


async def test_a_silent_agent_gets_its_worker_replaced(cluster: Cluster) -> None:
    """Node loss, in band: the pod still says Running, but its agent's heartbeats stopped."""
    from salamander.controlplane import AgentIdentity
    from salamander_worker.controlplane import AgentClient

    cluster.operator.agent_timeout_s = 1.0
    await cluster.apply_job(job_manifest("lost"))
    pods = await cluster.eventually(lambda: _pods_named(cluster, "lost", 2), "two worker pods")
    for name in pods:
        await cluster.set_pod(name, "Running", ready=True)
    secret = await cluster.eventually(lambda: _both(cluster.secrets(), "lost-control"), "the secret")
    token = base64.b64decode(secret["lost-control"]["data"]["token"]).decode()
    agent = AgentClient(cluster.operator.control_endpoint, token,
                        AgentIdentity("team-a", "lost", "lost-worker-0", "node-1", 0, 2))
    await agent.connect()
    await agent.heartbeat(10, 0.5)
    old_uid = pods["lost-worker-0"]["metadata"]["uid"]
    healthy_uid = pods["lost-worker-1"]["metadata"]["uid"]
    # ...and then silence, with the stream still open, as when a node dies.

    async def replaced() -> bool:
        pod = (await cluster.pods("lost")).get("lost-worker-0")
        return pod is not None and pod["metadata"]["uid"] != old_uid
    await cluster.eventually(replaced, "a replacement for the silent worker")
    status = await cluster.wait_status("lost", "one restart", lambda s: s.get("restarts") == 1)
    assert status["restarts"] == 1
    assert (await cluster.pods("lost"))["lost-worker-1"]["metadata"]["uid"] == healthy_uid
    messages = [e.get("message", "") for e in await cluster.events() if e.get("reason") == "FailureDetected"]
    assert any("AgentLost" in m and "no heartbeat" in m for m in messages), messages
    await agent.close()


async def test_a_worker_left_waiting_in_rendezvous_after_training_finished_is_removed(cluster: Cluster) -> None:
    """A replacement that came up as the others finished: its agent waits in rendezvous for a
    round that will never start. Once a worker has succeeded, the operator removes it, and the
    job succeeds instead of waiting for it forever."""
    from salamander.controlplane import AgentIdentity
    from salamander_worker.controlplane import AgentClient

    await cluster.apply_job(job_manifest("late"))
    pods = await cluster.eventually(lambda: _pods_named(cluster, "late", 2), "two worker pods")
    secret = await cluster.eventually(lambda: _both(cluster.secrets(), "late-control"), "the secret")
    token = base64.b64decode(secret["late-control"]["data"]["token"]).decode()
    agent = AgentClient(cluster.operator.control_endpoint, token,
                        AgentIdentity("team-a", "late", "late-worker-1", "node-2", 1, 2))
    await agent.connect()
    await agent.heartbeat(0, 0.0, regrouping=True)
    await cluster.set_pod("late-worker-1", "Running", ready=True)
    await cluster.set_pod("late-worker-0", "Succeeded", exit_code=0)
    status = await cluster.wait_status("late", "Succeeded", lambda s: s.get("phase") == "Succeeded")
    assert status["phase"] == "Succeeded"

    async def removed() -> bool:
        pod = (await cluster.pods("late")).get("late-worker-1")
        return pod is None or bool(pod["metadata"].get("deletionTimestamp"))
    await cluster.eventually(removed, "the stranded worker's pod deleted")
    assert pods["late-worker-0"]["metadata"]["uid"] == (await cluster.pods("late"))["late-worker-0"]["metadata"]["uid"]
    await agent.close()


async def test_a_kill_worker_fault_is_fired_once_through_the_workers_agent(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Kubernetes the operator fires KillWorker: once the job reaches the fault's step, it
    claims the fault in the rendezvous store and tells that worker's agent to kill its worker."""
    import asyncio

    from salamander.controlplane import AgentIdentity
    from salamander_operator.kube import handlers
    from salamander_worker.controlplane import AgentClient

    monkeypatch.setattr(handlers, "RESYNC_S", 0.5)   # progress is polled
    job = await cluster.apply_job(job_manifest("chaos", faults=[{"kind": "KillWorker", "atStep": 5, "worker": 1}]))
    uid = job["metadata"]["uid"]
    pods = await cluster.eventually(lambda: _pods_named(cluster, "chaos", 2), "two worker pods")
    for name in pods:
        await cluster.set_pod(name, "Running", ready=True)
    secret = await cluster.eventually(lambda: _both(cluster.secrets(), "chaos-control"), "the secret")
    token = base64.b64decode(secret["chaos-control"]["data"]["token"]).decode()
    commands: dict[str, list] = {"chaos-worker-0": [], "chaos-worker-1": []}
    agents = [AgentClient(cluster.operator.control_endpoint, token,
                          AgentIdentity("team-a", "chaos", pod, f"node-{i}", 2 * i, 2),
                          on_command=commands[pod].append)
              for i, pod in enumerate(commands)]
    for agent in agents:
        await agent.connect()
    store = cluster.operator.rendezvous
    store.set(wire.progress_key(uid), wire.Progress(step=4, samples=64, world_size=4, time=0.0).encode())
    await asyncio.sleep(1.5)   # a few passes below the fault's step: nothing fires
    assert commands == {"chaos-worker-0": [], "chaos-worker-1": []}
    store.set(wire.progress_key(uid), wire.Progress(step=6, samples=96, world_size=4, time=0.0).encode())

    async def killed() -> list:
        return commands["chaos-worker-1"]
    [command] = await cluster.eventually(killed, "the kill command at worker 1's agent")
    assert command.WhichOneof("body") == "kill" and "killed worker 1 at step 6 (fault 1)" in command.kill.reason
    assert store.fault_fired_at(uid, 0) is not None
    assert not store.claim_fault(uid, 0)   # claimed once for the run
    await asyncio.sleep(1.5)
    assert len(commands["chaos-worker-1"]) == 1 and commands["chaos-worker-0"] == []
    messages = [e.get("message", "") for e in await cluster.events() if e.get("reason") == "FaultInjected"]
    assert messages == ["killed worker 1 at step 6 (fault 1)"]
    for agent in agents:
        await agent.close()
