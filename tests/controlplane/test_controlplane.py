"""The control plane over real gRPC on loopback: sessions, credentials, refusals."""

from __future__ import annotations

import filecmp
import math
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from salamander.controlplane import AUTH_METADATA, BEARER
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander_operator.controlplane import ControlPlaneServer, JobCredentials
from salamander.controlplane import AgentIdentity
from salamander_worker.controlplane import AgentClient, ControlPlaneError

REPO = Path(__file__).resolve().parents[2]
ME = AgentIdentity(namespace="ns", job="llm", pod="llm-worker-0", node="node-a", first_rank=0, rank_count=8)
SESSION = "/salamander.controlplane.v1.ControlPlane/Session"


@pytest.fixture
async def plane() -> AsyncIterator[tuple[ControlPlaneServer, str, list]]:
    credentials = JobCredentials()
    token = credentials.issue("ns", "llm")
    failures: list = []
    server = ControlPlaneServer(credentials, on_failure=lambda s, r: failures.append((s, r)), host="127.0.0.1")
    await server.start()
    try:
        yield server, token, failures
    finally:
        await server.stop(0)


async def _eventually(predicate, what: str) -> None:
    import asyncio
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_session_registers_heartbeats_and_reports(plane) -> None:
    server, token, failures = plane
    client = AgentClient(f"127.0.0.1:{server.port}", token, ME)
    await client.connect()
    assert client.session_id and client.heartbeat_interval_s == 1.0
    await client.heartbeat(step=41, step_time_s=0.25)
    await client.heartbeat(step=42, step_time_s=0.26)
    session = server.sessions[("ns", "llm", "llm-worker-0")]
    await _eventually(lambda: session.step == 42, "the second heartbeat")
    assert session.identity.node == "node-a" and session.identity.rank_count == 8 and session.step_time_s == 0.26
    assert server.stats.heartbeats == 2 and len(server.stats.latencies_s) == 2

    await client.report_failure(3, exception=("torch.OutOfMemoryError", "CUDA out of memory", "Traceback..."),
                                log_tail=["step 42", "x" * 5000])
    (who, report), = failures
    assert who is session and report.rank == 3 and report.exception.type == "torch.OutOfMemoryError"
    assert report.log_tail[-1] == "x" * 1000  # bounded by the client
    await client.report_failure(5, exit_code=0, signal=9)
    assert failures[-1][1].exit.signal == 9
    await client.close()
    await _eventually(lambda: not session.connected, "the disconnect")
    assert server.stats.connections == 0


@pytest.mark.parametrize("token", ["wrong", "", None])
async def test_a_wrong_or_missing_credential_is_refused_and_counted(plane, token) -> None:
    server, good, _ = plane
    client = AgentClient(f"127.0.0.1:{server.port}", token or "", ME)
    with pytest.raises(ControlPlaneError) as err:
        await client.connect()
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert server.stats.rejected["unauthenticated"] == 1 and server.sessions == {}
    await client.close()
    # Another job's token does not work either, and the right one still does.
    other = JobCredentials.issue(server.servicer.credentials, "ns", "other")
    for t, code in ((other, grpc.StatusCode.UNAUTHENTICATED), (good, None)):
        c = AgentClient(f"127.0.0.1:{server.port}", t, ME)
        if code is None:
            await c.connect()
        else:
            with pytest.raises(ControlPlaneError):
                await c.connect()
        await c.close()


async def _raw_session(port: int, token: str, messages: list[bytes]) -> grpc.aio.AioRpcError | None:
    """Send raw bytes as stream messages: the way a broken or hostile client would."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(SESSION, request_serializer=lambda b: b, response_deserializer=lambda b: b)(
            iter(messages), metadata=((AUTH_METADATA, BEARER + token),))
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc
    return None


def _hello(**overrides) -> bytes:
    fields = dict(namespace="ns", job="llm", pod="p", node="n", first_rank=0, rank_count=1) | overrides
    return pb.AgentMessage(hello=pb.Hello(**fields)).SerializeToString()


@pytest.mark.parametrize("messages, code, reason, words", [
    ([pb.AgentMessage(heartbeat=pb.Heartbeat(step=1)).SerializeToString()], grpc.StatusCode.INVALID_ARGUMENT,
     "no_hello", "must be a hello"),
    ([], grpc.StatusCode.INVALID_ARGUMENT, "no_hello", "must start with a hello"),
    ([_hello(job="")], grpc.StatusCode.INVALID_ARGUMENT, "invalid_hello", "hello.job is empty"),
    ([_hello(rank_count=0)], grpc.StatusCode.INVALID_ARGUMENT, "invalid_hello", "rank_count"),
    ([_hello(), pb.AgentMessage(heartbeat=pb.Heartbeat(step=-1)).SerializeToString()],
     grpc.StatusCode.INVALID_ARGUMENT, "invalid_heartbeat", "heartbeat.step"),
    ([_hello(), pb.AgentMessage(heartbeat=pb.Heartbeat(step=1, step_time_s=math.nan)).SerializeToString()],
     grpc.StatusCode.INVALID_ARGUMENT, "invalid_heartbeat", "step_time_s"),
    ([_hello(), pb.AgentMessage(failure=pb.FailureReport(rank=1)).SerializeToString()],
     grpc.StatusCode.INVALID_ARGUMENT, "invalid_failure", "exit or an exception"),
    ([_hello(), pb.AgentMessage().SerializeToString()], grpc.StatusCode.INVALID_ARGUMENT,
     "unexpected_message", "unexpected message"),
])
async def test_protocol_violations_are_refused_by_name(plane, messages, code, reason, words) -> None:
    server, token, _ = plane
    error = await _raw_session(server.port, token, messages)
    assert error is not None and error.code() is code and words in (error.details() or "")
    assert server.stats.rejected[reason] == 1


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", _hello()[:7], b"\x0a\x80\x80\x80\x80\x80\x80"])
async def test_malformed_bytes_are_refused_and_others_keep_working(plane, garbage) -> None:
    server, token, _ = plane
    error = await _raw_session(server.port, token, [garbage])
    assert error is not None and error.code() is not grpc.StatusCode.OK
    client = AgentClient(f"127.0.0.1:{server.port}", token, ME)
    await client.connect()
    await client.heartbeat(1, 0.1)
    await client.close()


async def test_an_oversized_message_is_refused(plane) -> None:
    server, token, _ = plane
    huge = pb.AgentMessage(failure=pb.FailureReport(rank=0, exit=pb.ProcessExit(exit_code=1),
                                                    log_tail=["y" * 1000] * 2000)).SerializeToString()
    error = await _raw_session(server.port, token, [_hello(), huge])
    assert error is not None and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_generated_code_is_reproducible_from_the_proto(tmp_path: Path) -> None:
    subprocess.run([str(REPO / "scripts" / "gen-proto.sh"), str(tmp_path)], check=True, cwd=REPO,
                   env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    generated = tmp_path / "salamander" / "controlplane" / "v1"
    committed = REPO / "src" / "salamander" / "controlplane" / "v1"
    names = ["controlplane_pb2.py", "controlplane_pb2.pyi", "controlplane_pb2_grpc.py"]
    match, mismatch, errors = filecmp.cmpfiles(generated, committed, names, shallow=False)
    assert mismatch == [] and errors == [], f"stale generated code {mismatch + errors}: run scripts/gen-proto.sh"
