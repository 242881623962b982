"""The agent's heartbeat thread against a real control-plane server."""

from __future__ import annotations

import asyncio
import itertools
import time

from salamander import wire
from salamander.controlplane import AgentIdentity
from salamander_operator.controlplane import ControlPlaneServer, JobCredentials
from salamander_worker.heartbeat import Heartbeat, StepClock

ME = AgentIdentity("ns", "llm", "llm-worker-0", "node-a", 0, 2)


def test_step_clock_derives_seconds_per_step() -> None:
    clock = StepClock()
    clock.update(None)
    clock.update(wire.Progress(step=10, samples=0, world_size=2, time=100.0))
    assert (clock.step, clock.step_time_s) == (10, 0.0)
    clock.update(wire.Progress(step=14, samples=0, world_size=2, time=102.0))
    assert (clock.step, clock.step_time_s) == (14, 0.5)
    clock.update(wire.Progress(step=14, samples=0, world_size=2, time=103.0))  # no new step
    assert clock.step_time_s == 0.5


async def _until(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_heartbeats_carry_the_step_and_survive_an_operator_restart() -> None:
    credentials = JobCredentials()
    token = credentials.issue("ns", "llm")
    server = ControlPlaneServer(credentials, host="127.0.0.1")
    port = await server.start()
    steps = itertools.count(1)
    heartbeat = Heartbeat(f"127.0.0.1:{port}", token, ME,
                          lambda: wire.Progress(step=next(steps) * 10, samples=0, world_size=2, time=time.time()))
    heartbeat.start()
    try:
        await _until(lambda: ("ns", "llm", "llm-worker-0") in server.sessions
                     and server.sessions[("ns", "llm", "llm-worker-0")].step >= 20, "two heartbeats")
        assert server.sessions[("ns", "llm", "llm-worker-0")].identity == ME

        await server.stop(0)  # the operator goes away ...
        restarted = ControlPlaneServer(credentials, host="127.0.0.1", port=port)
        await restarted.start()  # ... and comes back on the same address
        await _until(lambda: ("ns", "llm", "llm-worker-0") in restarted.sessions, "the agent to reconnect")
        await restarted.stop(0)
    finally:
        await asyncio.to_thread(heartbeat.stop)
    assert not heartbeat.is_alive() and heartbeat.sent >= 2


async def test_a_refused_agent_keeps_retrying_without_crashing() -> None:
    server = ControlPlaneServer(JobCredentials(), host="127.0.0.1")  # knows no job at all
    port = await server.start()
    heartbeat = Heartbeat(f"127.0.0.1:{port}", "not-a-token", ME, lambda: None)
    heartbeat.start()
    try:
        await _until(lambda: server.stats.rejected["unauthenticated"] >= 1, "a refusal")
        assert heartbeat.is_alive() and heartbeat.sent == 0
    finally:
        await asyncio.to_thread(heartbeat.stop)
        await server.stop(0)
