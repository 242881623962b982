"""The operator's answers over the control plane: a verdict in every ack, and commands sent to a
job's agents unprompted (a hang's restart); a reconnecting agent replaces its old stream."""

from __future__ import annotations

import asyncio
import signal
import time

from salamander.controlplane import AgentIdentity
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander_operator.controlplane import ControlPlaneServer, JobCredentials
from salamander_operator.desired import JobRef
from salamander_operator.health import JobHealth, StepBeat, verdict
from salamander.api import parse_spec
from salamander_worker.controlplane import AgentClient
from tests.controlplane.test_controlplane import _eventually

SPEC = parse_spec({"failurePolicy": {"maxRestartsPerWindow": 1}, "worker": {"image": "i", "command": ["c"]}})


def me(pod: str) -> AgentIdentity:
    return AgentIdentity(namespace="ns", job="llm", pod=pod, node="node-a", first_rank=0, rank_count=1)


async def test_each_report_gets_the_policys_verdict_and_a_storm_fails_the_job() -> None:
    credentials = JobCredentials()
    token = credentials.issue("ns", "llm")
    health = JobHealth(JobRef("llm", "ns", "uid"), SPEC)
    server = ControlPlaneServer(credentials, host="127.0.0.1",
                                on_failure=lambda session, report: verdict(health.on_report(session.identity, report)))
    await server.start()
    client = AgentClient(f"127.0.0.1:{server.port}", token, me("llm-worker-0"))
    try:
        await client.connect()
        first = await client.report_failure(0, signal=signal.SIGKILL)
        assert first.action == pb.RESTART_PROCESSES and "SEV2" in first.reason
        await client.heartbeat(5, 0.1)  # the restart made progress: the next failure is a new one
        now = time.monotonic()
        health.check_hang([StepBeat(4, 0.1)], now)
        health.check_hang([StepBeat(5, 0.1)], now + 1.0)
        second = await client.report_failure(0, exception=("ValueError", "bad batch", "Traceback ..."))
        assert second.action == pb.FAIL_JOB and "restart storm" in second.reason
        assert [i.decision.action.value for i in health.drain(settle_s=0)] == ["RestartProcesses", "FailJob"]
    finally:
        await client.close()
        await server.stop(0)


async def test_restart_commands_reach_every_connected_agent_of_the_job_only() -> None:
    credentials = JobCredentials()
    token, other_token = credentials.issue("ns", "llm"), credentials.issue("ns", "other")
    server = ControlPlaneServer(credentials, host="127.0.0.1")
    await server.start()
    received: dict[str, list[pb.Command]] = {"0": [], "1": [], "x": []}
    clients = [AgentClient(f"127.0.0.1:{server.port}", token, me("llm-worker-0"), received["0"].append),
               AgentClient(f"127.0.0.1:{server.port}", token, me("llm-worker-1"), received["1"].append),
               AgentClient(f"127.0.0.1:{server.port}", other_token,
                           AgentIdentity("ns", "other", "other-worker-0", "n", 0, 1), received["x"].append)]
    try:
        for client in clients:
            await client.connect()
        assert server.restart_processes("ns", "llm", "no progress for 31.0 s") == 2
        await _eventually(lambda: received["0"] and received["1"], "both commands")
        assert received["0"][0].restart.reason == "no progress for 31.0 s"
        await asyncio.sleep(0.1)
        assert received["x"] == []
    finally:
        for client in clients:
            await client.close()
        await server.stop(0)


async def test_a_reconnecting_agent_replaces_its_old_session() -> None:
    credentials = JobCredentials()
    token = credentials.issue("ns", "llm")
    server = ControlPlaneServer(credentials, host="127.0.0.1")
    await server.start()
    old = AgentClient(f"127.0.0.1:{server.port}", token, me("llm-worker-0"))
    new = AgentClient(f"127.0.0.1:{server.port}", token, me("llm-worker-0"))
    try:
        await old.connect()
        first = server.sessions[("ns", "llm", "llm-worker-0")]
        await new.connect()
        second = server.sessions[("ns", "llm", "llm-worker-0")]
        assert second is not first and not first.connected and second.connected
        assert server.stats.connections == 1
        await new.heartbeat(7, 0.5, step_at=1_700_000_000.25)
        await _eventually(lambda: second.step == 7, "the heartbeat")
        assert abs(second.step_at - 1_700_000_000.25) < 1e-6
    finally:
        await old.close()
        await new.close()
        await server.stop(0)
