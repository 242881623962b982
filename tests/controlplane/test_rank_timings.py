"""Per-rank section timings over the control plane: from the ranks' files, through the agent's
heartbeat, into the operator's sessions; malformed ones refused by name; sizes bounded."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from salamander import wire
from salamander.controlplane import AgentIdentity
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander_operator.controlplane import ControlPlaneServer, JobCredentials
from salamander_operator.controlplane.server import heartbeat_timings
from salamander_worker import controlplane as client_module
from salamander_worker.controlplane import AgentClient
from salamander_worker.heartbeat import Heartbeat, timings_reader
from tests.controlplane.test_controlplane import _raw_session

POD0 = AgentIdentity("ns", "llm", "llm-worker-0", "node-a", 0, 2)
POD1 = AgentIdentity("ns", "llm", "llm-worker-1", "node-b", 2, 2)


def timing(rank: int, step: int = 10, step_s: float = 0.5, wait_s: float = 0.1, **sections: float) -> wire.RankTiming:
    return wire.RankTiming(rank=rank, step=step, window=32, step_s=step_s, wait_s=wait_s,
                           sections=sections or {"forward": 0.2, "communication": wait_s, "other": 0.2})


@pytest.fixture
async def plane() -> AsyncIterator[tuple[ControlPlaneServer, str]]:
    credentials = JobCredentials()
    token = credentials.issue("ns", "llm")
    server = ControlPlaneServer(credentials, host="127.0.0.1")
    await server.start()
    try:
        yield server, token
    finally:
        await server.stop(0)


async def _until(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_timings_reach_the_session_and_merge_per_job(plane) -> None:
    server, token = plane
    first, second = AgentClient(f"127.0.0.1:{server.port}", token, POD0), AgentClient(f"127.0.0.1:{server.port}",
                                                                                      token, POD1)
    await first.connect()
    await second.connect()
    await first.heartbeat(10, 0.5, ranks=[timing(0), timing(1, wait_s=0.0, forward=0.5)])
    await second.heartbeat(10, 0.5, ranks=[timing(2), timing(3, wait_s=0.3)])
    s0, s1 = server.sessions[("ns", "llm", "llm-worker-0")], server.sessions[("ns", "llm", "llm-worker-1")]
    await _until(lambda: len(s0.rank_timings) == 2 and len(s1.rank_timings) == 2, "the timings")
    assert s0.rank_timings[1] == timing(1, wait_s=0.0, forward=0.5) and s0.timings_at > 0
    assert s0.rank_timings[1].busy_s == 0.5
    assert list(server.job_timings("ns", "llm")) == [0, 1, 2, 3]
    assert server.job_timings("ns", "other") == {}

    # A heartbeat without timings keeps the last ones; one with timings replaces them (ranks
    # that left drop out); a rank claimed by two agents comes from the newer heartbeat.
    at = s0.timings_at
    await first.heartbeat(11, 0.5)
    await first.heartbeat(12, 0.5, ranks=[timing(0, step=12), timing(2, step=12)])
    await _until(lambda: s0.step == 12 and s0.timings_at > at, "the newer timings")
    assert sorted(s0.rank_timings) == [0, 2]
    merged = server.job_timings("ns", "llm")
    assert sorted(merged) == [0, 2, 3] and merged[2].step == 12

    await second.close()
    await _until(lambda: not s1.connected, "the disconnect")
    assert sorted(server.job_timings("ns", "llm")) == [0, 2]  # connected agents only
    await first.close()



HELLO = pb.AgentMessage(hello=pb.Hello(namespace="ns", job="llm", pod="p", node="n", first_rank=0,
                                       rank_count=1)).SerializeToString()


def _beat(*ranks: pb.RankTiming) -> bytes:
    return pb.AgentMessage(heartbeat=pb.Heartbeat(step=1, ranks=list(ranks))).SerializeToString()


def _pb(rank: int = 4, **fields) -> pb.RankTiming:
    values = dict(rank=rank, step=5, window=8, step_s=0.5, wait_s=0.1, sections={"forward": 0.3}) | fields
    return pb.RankTiming(**values)


@pytest.mark.parametrize("bad, words", [
    (_pb(step_s=math.nan), ["ranks[1]", "rank 4", "step_s"]),
    (_pb(wait_s=-1.0), ["rank 4", "wait_s"]),
    (_pb(wait_s=0.9), ["rank 4", "exceeds step_s"]),
    (_pb(rank=-2), ["rank -2", "rank and step"]),
    (_pb(window=0), ["rank 4", "window"]),
    (_pb(sections={"forward": math.inf}), ["rank 4", "'forward'"]),
    (_pb(sections={"bad\nname": 0.1}), ["rank 4", "section name"]),
    (_pb(sections={"x" * 65: 0.1}), ["rank 4", "section name"]),
    (_pb(sections={f"s{i}": 0.01 for i in range(wire.MAX_TIMING_SECTIONS + 1)}), ["rank 4", "sections"]),
    (_pb(busy_median_s=math.nan, median_window=8), ["rank 4", "busy_median_s must be a finite number"]),
    (_pb(busy_median_s=-0.2, median_window=8), ["rank 4", "busy_median_s must be a finite number"]),
    (_pb(busy_median_s=0.3, median_window=0), ["rank 4", "median_window must be 1..window"]),
    (_pb(busy_median_s=0.3, median_window=9), ["rank 4", "median_window must be 1..window (8), got 9"]),
    (_pb(median_window=8), ["rank 4", "median_window is 8 without a busy_median_s"]),
    (_pb(busy_first_step=2, busy_steps=[0.3, math.nan]), ["ranks[1]", "busy_steps[1] must be finite"]),
    (_pb(busy_first_step=2, busy_steps=[0.3, -0.1]), ["rank 4", "busy_steps[1] must be a finite number >= 0"]),
    (_pb(busy_first_step=2, busy_steps=[0.3] * (wire.MAX_BUSY_STEPS + 1)), ["ranks[1]", "at most 256"]),
    (_pb(busy_first_step=3), ["rank 4", "busy_first_step is 3 without busy_steps"]),
    (_pb(busy_first_step=4, busy_steps=[0.3, 0.3, 0.3]), ["rank 4", "busy_steps end at step 6, after step 5"]),
    (_pb(busy_first_step=-1, busy_steps=[0.3]), ["rank 4", "busy_first_step must be an int64 >= 0"]),
])
async def test_a_malformed_timing_is_refused_by_name(plane, bad, words) -> None:
    server, token = plane
    error = await _raw_session(server.port, token, [HELLO, _beat(_pb(rank=3), bad)])
    assert error is not None and error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert all(w in (error.details() or "") for w in words), error.details()
    assert server.stats.rejected["invalid_heartbeat"] == 1


async def test_per_step_busy_times_round_trip_and_old_agents_still_decode(plane) -> None:
    """The per-step field survives the wire (the worker's message, the server's decoding); a
    timing without it (an older agent) decodes with none, exactly as before."""
    server, token = plane
    client = AgentClient(f"127.0.0.1:{server.port}", token, POD0)
    await client.connect()
    new = wire.RankTiming(rank=0, step=40, window=32, step_s=0.5, wait_s=0.1, sections={"forward": 0.4},
                          busy_median_s=0.4, median_window=16, busy_first_step=1, busy_steps=(0.4,) * 40)
    await client.heartbeat(40, 0.5, ranks=[new, timing(1, step=40)])
    session = server.sessions[("ns", "llm", "llm-worker-0")]
    await _until(lambda: len(session.rank_timings) == 2, "the timings")
    assert session.rank_timings[0] == new
    assert session.rank_timings[1] == timing(1, step=40) and session.rank_timings[1].busy_steps == ()
    message = client_module.timing_message(new)
    assert message.busy_first_step == 1 and list(message.busy_steps) == [0.4] * 40
    old = pb.RankTiming(rank=2, step=5, window=8, step_s=0.5, wait_s=0.1, sections={"forward": 0.3})
    assert pb.RankTiming.FromString(old.SerializeToString()).busy_steps == []
    decoded = heartbeat_timings(pb.Heartbeat(step=1, ranks=[old]))[2]
    assert decoded.busy_steps == () and decoded.busy_first_step == 0
    await client.close()


async def test_too_many_timings_are_refused_and_the_client_stays_within_bounds(plane, monkeypatch) -> None:
    server, token = plane
    error = await _raw_session(server.port, token, [HELLO, _beat(*[_pb(rank=r) for r in range(1025)])])
    assert error is not None and "at most 1024" in (error.details() or "")

    client = AgentClient(f"127.0.0.1:{server.port}", token, POD0)
    await client.connect()
    await client.heartbeat(1, 0.5, ranks=[timing(r) for r in range(2000)])  # the first 1024 are sent
    session = server.sessions[("ns", "llm", "llm-worker-0")]
    await _until(lambda: session.rank_timings, "the bounded heartbeat")
    assert sorted(session.rank_timings) == list(range(1024))

    # The largest timings the wire allows, 1024 of them, would exceed the server's message
    # limit: the client sends what fits in its byte budget, and the stream stays up.
    names = {f"{i:02d}" + "n" * (wire.MAX_SECTION_NAME - 2): 0.001 for i in range(wire.MAX_TIMING_SECTIONS)}
    big = [wire.RankTiming(rank=r, step=2, window=32, step_s=0.5, wait_s=0.0, sections=names) for r in range(1024)]
    await client.heartbeat(2, 0.5, ranks=big)
    await _until(lambda: session.step == 2, "the trimmed heartbeat")
    assert 0 < len(session.rank_timings) < 1024 and session.connected
    sent = len(session.rank_timings) * client_module.timing_message(big[0]).ByteSize()
    assert sent <= client_module.MAX_TIMINGS_BYTES
    await client.heartbeat(3, 0.5)
    await _until(lambda: session.step == 3, "a later heartbeat on the same stream")
    await client.close()


async def test_the_agents_heartbeat_carries_its_ranks_files(plane, tmp_path: Path) -> None:
    server, token = plane
    for t in (timing(0), timing(1, wait_s=0.4)):
        (tmp_path / wire.timing_file_name(t.rank)).write_bytes(wire.encode_rank_timing(t))
    (tmp_path / "rank-7.json").write_text("garbage")  # skipped, the others still go
    heartbeat = Heartbeat(f"127.0.0.1:{server.port}", token, POD0, lambda: None, timings_reader(tmp_path))
    heartbeat.start()
    try:
        key = ("ns", "llm", "llm-worker-0")
        await _until(lambda: key in server.sessions and server.sessions[key].rank_timings, "the timings")
        assert server.job_timings("ns", "llm") == {0: timing(0), 1: timing(1, wait_s=0.4)}
        (tmp_path / wire.timing_file_name(1)).write_bytes(wire.encode_rank_timing(timing(1, step=99, wait_s=0.2)))
        await _until(lambda: server.sessions[key].rank_timings[1].step == 99, "the rewritten file")
    finally:
        await asyncio.to_thread(heartbeat.stop)


@pytest.mark.parametrize("sent", [
    timing(5),
    wire.RankTiming(rank=5, step=10, window=32, step_s=0.5, wait_s=0.1, sections={"forward": 0.4},
                    busy_median_s=0.37, median_window=16),
    wire.RankTiming(rank=5, step=10, window=8, step_s=0.5, wait_s=0.1, sections={}, busy_median_s=0.0,
                    median_window=8),
])
def test_a_timing_and_its_median_round_trip_through_protobuf(sent: wire.RankTiming) -> None:
    message = client_module.timing_message(sent)
    assert message.HasField("busy_median_s") == (sent.busy_median_s is not None)
    raw = pb.Heartbeat(step=10, ranks=[message]).SerializeToString()
    assert heartbeat_timings(pb.Heartbeat.FromString(raw)) == {5: sent}


def test_a_message_from_an_older_agent_has_no_median() -> None:
    # the fields an older agent knew, nothing else: the median reads as None
    old = pb.RankTiming(rank=2, step=7, window=32, step_s=0.5, wait_s=0.1, sections={"forward": 0.4})
    (timing,) = heartbeat_timings(pb.Heartbeat(step=7, ranks=[old])).values()
    assert timing.busy_median_s is None and timing.median_window == 0


async def test_medians_reach_the_session(plane) -> None:
    server, token = plane
    client = AgentClient(f"127.0.0.1:{server.port}", token, POD0)
    await client.connect()
    sent = [wire.RankTiming(rank=r, step=10, window=32, step_s=0.5, wait_s=0.1, sections={"forward": 0.4},
                            busy_median_s=0.38 + r / 100, median_window=16) for r in (0, 1)]
    await client.heartbeat(10, 0.5, ranks=sent)
    session = server.sessions[("ns", "llm", "llm-worker-0")]
    await _until(lambda: len(session.rank_timings) == 2, "the timings")
    assert server.job_timings("ns", "llm") == {0: sent[0], 1: sent[1]}
    await client.close()
