"""An operator restart in the middle of a job loses nothing, when the rendezvous store runs on
its own (``salamander rendezvous``) and the operator is only its client.

The emulator and the store outlive the operator: the first operator is stopped, a second one
starts against the same API server and store, and the job carries on. Its pods are untouched,
``status.restarts`` stays, the step keeps coming from the store, and the agents, which
reconnect with backoff, are let in by the token the new operator adopted from the job's Secret.

The test talks to the emulator over HTTP sessions of its own, a fresh one per operator: when
kopf stops it cancels the tasks started while it ran, which include the emulator's handlers of
keep-alive connections opened meanwhile, so a request on such a connection never gets an answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import kubernetes
import pytest

from salamander import wire
from salamander.controlplane import AgentIdentity
from salamander_operator.kube import handlers
from salamander_operator.kube.cluster import KubeCluster
from salamander_operator.kube.handlers import OperatorContext, register
from salamander_operator.kube.main import build_memo
from salamander_operator.rendezvous import RendezvousClient, RendezvousHost, RendezvousStore
from salamander_worker.heartbeat import Heartbeat, store_progress_reader
from salamander_worker.store import connect_store
from tests.operator.conftest import NS, ApiServer, Cluster, declare_resources, job_manifest, write_kubeconfig


class Client:
    """Enough of kmock's client for :class:`Cluster`, over an HTTP session of our own."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    def __getattr__(self, method: str) -> Any:
        return lambda path, **kwargs: self.session.request(method.upper(), path, **kwargs)


@contextlib.asynccontextmanager
async def hands(emulator: ApiServer, ctx: OperatorContext | None = None) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession(base_url=str(emulator.url)) as session:
        yield Cluster(Client(session), ctx)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def operator(emulator: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   rendezvous: RendezvousStore, control_port: int = 0) -> AsyncIterator[OperatorContext]:
    """One operator's lifetime, in process, with the given store (the conftest's ``_operator``
    hosts its own, which is exactly what this file avoids)."""
    declare_resources(emulator)
    kubeconfig = write_kubeconfig(tmp_path, str(emulator.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    registry = kopf.OperatorRegistry()
    register(registry)
    memo = build_memo(KubeCluster(api_client), rendezvous, control_port=control_port, control_host="127.0.0.1")
    stop = asyncio.Event()
    logging.getLogger("kopf").setLevel(logging.INFO)
    task = asyncio.create_task(kopf.operator(registry=registry, memo=memo, clusterwide=True, standalone=True,
                                             stop_flag=stop))
    try:
        yield memo.context
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=15)
        api_client.close()


def publish(endpoint: str, run_id: str, step: int) -> None:
    """What rank 0 does each step: write its progress record into the rendezvous store."""
    store = connect_store(endpoint)
    store.set(wire.progress_key(run_id), wire.Progress(step=step, samples=step * 16, world_size=4,
                                                       time=time.time(), loss=2.0 / (step + 1)).encode())


async def _pods(cluster: Cluster, job: str, count: int) -> dict | None:
    pods = await cluster.pods(job)
    return pods if len(pods) == count else None


def _beating(ctx: OperatorContext, job: str, step: int) -> Callable[[], Awaitable[list | None]]:
    """A probe: both workers' agents hold a connected session with ``ctx`` that reported ``step``."""
    async def probe() -> list | None:
        assert ctx.control_plane is not None
        sessions = [s for s in ctx.control_plane.job_sessions(NS, job) if s.connected and s.step == step]
        return sessions if len(sessions) == 2 else None
    return probe


async def test_an_operator_restart_keeps_pods_status_progress_and_agents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "RESYNC_S", 1.0)  # progress is polled; do not wait 10 s for it
    store = RendezvousHost(advertise_host="127.0.0.1", port=0, bind_host="127.0.0.1")  # `salamander rendezvous`
    agents: list[Heartbeat] = []
    try:
        async with ApiServer() as emulator, kmock.Server(emulator):
            # --- the first operator: the job starts, trains, its agents beat -------------------------
            async with operator(emulator, tmp_path, monkeypatch, RendezvousClient(store.endpoint)) as first, \
                    hands(emulator, first) as cluster:
                uid = (await cluster.apply_job(job_manifest("keep")))["metadata"]["uid"]
                pods = await cluster.eventually(lambda: _pods(cluster, "keep", 2), "two worker pods")
                env = {e["name"]: e.get("value") for e in pods["keep-worker-0"]["spec"]["containers"][0]["env"]}
                assert env[wire.ENV_RDZV_ENDPOINT] == store.endpoint  # the external store, not the operator
                for name in pods:
                    await cluster.set_pod(name, "Running", ready=True)
                await cluster.wait_status("keep", "running", lambda s: s.get("phase") == "Running")
                await asyncio.to_thread(publish, store.endpoint, uid, 5)
                before = await cluster.wait_status("keep", "step 5", lambda s: s.get("step") == 5)

                secret = (await cluster.eventually(cluster.secrets, "the job's secret"))["keep-control"]
                token = base64.b64decode(secret["data"]["token"]).decode()
                control_endpoint = first.control_endpoint
                assert first.control_plane is not None
                control_port = first.control_plane.port
                for index in range(2):  # the agents, as salamander-worker runs them in each pod
                    agent = Heartbeat(control_endpoint, token,
                                      AgentIdentity(NS, "keep", f"keep-worker-{index}", f"node-{index}", index * 2, 2),
                                      store_progress_reader(store.endpoint, uid))
                    agent.start()
                    agents.append(agent)
                await cluster.eventually(_beating(first, "keep", 5), "both agents beating to the first operator")
                pod_uids = {name: pod["metadata"]["uid"] for name, pod in (await cluster.pods("keep")).items()}
                assert set(pod_uids) == {"keep-worker-0", "keep-worker-1"}

            # --- the operator is gone; training goes on, the store keeps its progress ---------------
            await asyncio.to_thread(publish, store.endpoint, uid, 7)

            # --- a new operator, same API server, same store, same control-plane port ---------------
            async with operator(emulator, tmp_path, monkeypatch, RendezvousClient(store.endpoint),
                                control_port=control_port) as second, hands(emulator, second) as cluster:
                status = await cluster.wait_status("keep", "step 7, read by the new operator",
                                                   lambda s: s.get("step") == 7)
                # The token came from the Secret: the agents reconnect with the one they always had.
                assert second.credentials.verify(NS, "keep", token)
                await cluster.eventually(_beating(second, "keep", 7), "both agents back, on the new operator")
                await asyncio.to_thread(publish, store.endpoint, uid, 9)
                status = await cluster.wait_status("keep", "step 9", lambda s: s.get("step") == 9)
                await cluster.eventually(_beating(second, "keep", 9), "the agents reporting step 9")

                assert {n: p["metadata"]["uid"] for n, p in (await cluster.pods("keep")).items()} == pod_uids
                assert status.get("restarts", 0) == before.get("restarts", 0) == 0
                assert status["phase"] == "Running" and status["readyWorkers"] == 2
                assert status["startTime"] == before["startTime"]
                assert not [e for e in await cluster.events() if e.get("reason") == "WorkerFailed"]
    finally:
        for agent in agents:
            agent.stop()
        store.close()


async def _stop(proc: asyncio.subprocess.Process) -> int:
    """SIGTERM, as Kubernetes stops a pod; the exit code."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
    return proc.returncode  # type: ignore[return-value]


async def test_the_commands_rendezvous_and_operator_survive_an_operator_crash(tmp_path: Path) -> None:
    """The real commands, each in its own process: ``salamander rendezvous``, and ``salamander
    operator --rendezvous-endpoint``, killed with SIGKILL and started again."""
    rdzv = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "salamander.cli", "rendezvous", "--port", "0", "--bind", "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=(tmp_path / "rendezvous.log").open("w"))
    try:
        line = (await asyncio.wait_for(rdzv.stdout.readline(), timeout=60)).decode()  # type: ignore[union-attr]
        match = re.fullmatch(r"salamander rendezvous: listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        endpoint = f"127.0.0.1:{match.group(1)}"
        async with ApiServer() as emulator, kmock.Server(emulator):
            declare_resources(emulator)
            kubeconfig = write_kubeconfig(tmp_path, str(emulator.url).rstrip("/"))
            env = {**os.environ, "KUBECONFIG": str(kubeconfig), "SALAMANDER_ADVERTISE": "127.0.0.1"}
            command = [sys.executable, "-m", "salamander.cli", "operator", "--all-namespaces",
                       "--rendezvous-endpoint", endpoint, "--control-port", "0", "--liveness", ""]
            first = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
            second = None
            try:
                cluster = Cluster(emulator)
                uid = (await cluster.apply_job(job_manifest("cmd")))["metadata"]["uid"]
                pods = await cluster.eventually(lambda: _pods(cluster, "cmd", 2), "pods", timeout=60)
                env_vars = {e["name"]: e.get("value") for e in pods["cmd-worker-0"]["spec"]["containers"][0]["env"]}
                assert env_vars[wire.ENV_RDZV_ENDPOINT] == endpoint  # the workers join the external store
                await asyncio.to_thread(publish, endpoint, uid, 3)
                for name in pods:
                    await cluster.set_pod(name, "Running", ready=True)
                await cluster.wait_status("cmd", "step 3", lambda s: s.get("step") == 3 and s.get("phase") == "Running")
                uids = {n: p["metadata"]["uid"] for n, p in pods.items()}

                first.kill()  # a crash, not a clean stop
                await first.wait()
                await asyncio.to_thread(publish, endpoint, uid, 6)
                second = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                              stderr=(tmp_path / "second.log").open("w"))
                status = await cluster.wait_status("cmd", "step 6, read by the new operator",
                                                   lambda s: s.get("step") == 6)
                assert {n: p["metadata"]["uid"] for n, p in (await cluster.pods("cmd")).items()} == uids
                assert status.get("restarts", 0) == 0 and status["phase"] == "Running"
            finally:  # before the emulator goes: it waits for open watches to end
                await _stop(first)
                if second is not None:
                    assert await _stop(second) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        code = await _stop(rdzv)
    assert code == 0, (tmp_path / "rendezvous.log").read_text()[-3000:]
