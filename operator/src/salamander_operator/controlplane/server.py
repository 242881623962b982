"""The control-plane gRPC server the operator runs: one stream per agent.

Protocol (see ``controlplane.proto``): the first message of a stream is a Hello naming the
job, pod, node and ranks; the call's bearer token must be that job's. Then heartbeats update
the agent's :class:`AgentSession` (with the section timings of its ranks, for the straggler
detection: :meth:`ControlPlaneServer.job_timings`) and failure reports are handed to
``on_failure`` and acked.
Anything else is refused with a status naming the problem, counted in
:class:`ControlPlaneStats`, and never affects other streams.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from salamander import wire
from salamander.controlplane import AUTH_METADATA, BEARER, AgentIdentity
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander.controlplane.v1 import controlplane_pb2_grpc as pb_grpc
from salamander_operator.controlplane.credentials import JobCredentials

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0
MAX_MESSAGE_BYTES = 1 << 20  # log tails are bounded; nothing legitimate is larger
MAX_NAME = 253


class ProtocolError(ValueError):
    """A message broke the protocol; ``reason`` is the counter it is filed under."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass
class AgentSession:
    """One connected agent. ``last_heartbeat`` is ``time.monotonic()`` of the newest message.

    ``rank_timings``: the section timing of each of the agent's ranks, from the newest heartbeat
    that carried any (a heartbeat carries every rank the agent has a recent timing of, so ranks
    that left drop out), and ``timings_at``, ``time.monotonic()`` when it arrived (0: never)."""

    session_id: str
    identity: AgentIdentity
    connected_at: float
    last_heartbeat: float
    step: int = 0
    step_time_s: float = 0.0
    step_at: float = 0.0  # wall-clock time the step was reported (0: unknown)
    regrouping: bool = False  # the agent is restarting its processes
    connected: bool = True
    rank_timings: dict[int, wire.RankTiming] = field(default_factory=dict)
    timings_at: float = 0.0
    outbox: asyncio.Queue[pb.OperatorMessage | None] = field(default_factory=asyncio.Queue, repr=False)
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def send(self, message: pb.OperatorMessage) -> None:
        """Queue ``message`` for this agent; callable from any thread."""
        if self.loop is not None and self.connected:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, message)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.identity.namespace, self.identity.job, self.identity.pod


@dataclass
class ControlPlaneStats:
    """Counters for metrics and tests. ``latencies_s`` holds the newest heartbeat delivery
    latencies (agent send -> operator handled), bounded."""

    connections: int = 0
    heartbeats: int = 0
    failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))


#: Decides about a failure report; the verdict goes back to the agent in the ack.
FailureHandler = Callable[[AgentSession, pb.FailureReport], "pb.Verdict | None"]


def _check_name(value: str, name: str) -> None:
    if not value:
        raise ProtocolError("invalid_hello", f"hello.{name} is empty")
    if len(value) > MAX_NAME or not value.isprintable():
        raise ProtocolError("invalid_hello", f"hello.{name} is not a valid name")


def validate_hello(hello: pb.Hello) -> None:
    for name in ("namespace", "job", "pod", "node"):
        _check_name(getattr(hello, name), name)
    if hello.first_rank < 0 or hello.rank_count < 1:
        raise ProtocolError("invalid_hello", "hello.first_rank must be >= 0 and hello.rank_count >= 1")


def validate_heartbeat(hb: pb.Heartbeat) -> dict[int, wire.RankTiming]:
    """Check a heartbeat; returns its rank timings (:func:`heartbeat_timings`)."""
    if hb.step < 0:
        raise ProtocolError("invalid_heartbeat", "heartbeat.step must be >= 0")
    if not math.isfinite(hb.step_time_s) or hb.step_time_s < 0:
        raise ProtocolError("invalid_heartbeat", "heartbeat.step_time_s must be finite and >= 0")
    if hb.step_unix_ns < 0:
        raise ProtocolError("invalid_heartbeat", "heartbeat.step_unix_ns must be >= 0")
    return heartbeat_timings(hb)


def heartbeat_timings(hb: pb.Heartbeat) -> dict[int, wire.RankTiming]:
    """The heartbeat's rank timings by rank (the last of a rank wins), each checked
    (:meth:`salamander.wire.RankTiming.check`); a bad one is a :class:`ProtocolError` naming
    its rank and field."""
    if len(hb.ranks) > wire.MAX_TIMINGS_PER_HEARTBEAT:
        raise ProtocolError("invalid_heartbeat", f"heartbeat.ranks has {len(hb.ranks)} timings, "
                                                 f"at most {wire.MAX_TIMINGS_PER_HEARTBEAT}")
    timings: dict[int, wire.RankTiming] = {}
    for i, t in enumerate(hb.ranks):
        try:
            timing = wire.RankTiming(rank=t.rank, step=t.step, window=t.window, step_s=t.step_s,
                                     wait_s=t.wait_s, sections=dict(t.sections),
                                     busy_median_s=t.busy_median_s if t.HasField("busy_median_s") else None,
                                     median_window=t.median_window, busy_first_step=t.busy_first_step,
                                     busy_steps=wire.busy_steps_of(t.busy_steps)).check()
        except wire.WireError as exc:
            raise ProtocolError("invalid_heartbeat", f"heartbeat.ranks[{i}]: {exc}") from None
        timings[timing.rank] = timing
    return timings


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTH_METADATA and isinstance(value, str) and value.startswith(BEARER):
            return value[len(BEARER):]
    return None


class ControlPlaneServicer(pb_grpc.ControlPlaneServicer):
    def __init__(self, credentials: JobCredentials, on_failure: FailureHandler | None = None) -> None:
        self.credentials = credentials
        self.on_failure = on_failure
        self.sessions: dict[tuple[str, str, str], AgentSession] = {}
        self.stats = ControlPlaneStats()

    async def Session(self, request_iterator: AsyncIterator[pb.AgentMessage],  # noqa: N802 - gRPC name
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.OperatorMessage]:
        session: AgentSession | None = None
        try:
            try:
                first = await asyncio.wait_for(anext(request_iterator), timeout=HELLO_TIMEOUT_S)
            except (StopAsyncIteration, TimeoutError):
                raise ProtocolError("no_hello", "the stream must start with a hello") from None
            if first.WhichOneof("body") != "hello":
                raise ProtocolError("no_hello", "the first message must be a hello")
            hello = first.hello
            validate_hello(hello)
            if not self.credentials.verify(hello.namespace, hello.job, _bearer(context)):
                self.stats.rejected["unauthenticated"] += 1
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"no valid credential for job {hello.namespace}/{hello.job}")
            now = time.monotonic()
            identity = AgentIdentity(namespace=hello.namespace, job=hello.job, pod=hello.pod, node=hello.node,
                                     first_rank=hello.first_rank, rank_count=hello.rank_count)
            session = AgentSession(session_id=uuid.uuid4().hex, identity=identity, connected_at=now,
                                   last_heartbeat=now, loop=asyncio.get_running_loop())
            previous = self.sessions.get(session.key)
            if previous is not None and previous.connected:
                previous.connected = False  # a reconnecting agent replaces its old stream
                previous.outbox.put_nowait(None)
                self.stats.connections -= 1
            self.sessions[session.key] = session
            self.stats.connections += 1
            yield pb.OperatorMessage(welcome=pb.Welcome(session_id=session.session_id,
                                                        heartbeat_interval_s=HEARTBEAT_INTERVAL_S))
            reader = asyncio.create_task(self._read(session, request_iterator))
            try:
                while (outgoing := await session.outbox.get()) is not None:
                    yield outgoing
            finally:
                reader.cancel()
            error = reader.exception() if reader.done() and not reader.cancelled() else None
            if error is not None:
                raise error
        except ProtocolError as exc:
            self.stats.rejected[exc.reason] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            if session is not None and self.sessions.get(session.key) is session and session.connected:
                session.connected = False
                self.stats.connections -= 1

    async def _read(self, session: AgentSession, request_iterator: AsyncIterator[pb.AgentMessage]) -> None:
        """Handle the agent's messages; acks go to its outbox. Ends the stream (a None in the
        outbox) when the agent closes it or breaks the protocol (the error is kept)."""
        try:
            async for message in request_iterator:
                ack = self._handle(session, message)
                if ack is not None:
                    session.outbox.put_nowait(ack)
        finally:
            session.outbox.put_nowait(None)

    def _handle(self, session: AgentSession, message: pb.AgentMessage) -> pb.OperatorMessage | None:
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            hb = message.heartbeat
            timings = validate_heartbeat(hb)
            session.last_heartbeat = time.monotonic()
            if timings:
                session.rank_timings, session.timings_at = timings, session.last_heartbeat
            session.step, session.step_time_s = hb.step, hb.step_time_s
            session.step_at = hb.step_unix_ns / 1e9 if hb.step_unix_ns > 0 else 0.0
            session.regrouping = hb.regrouping
            self.stats.heartbeats += 1
            if hb.sent_unix_ns > 0:
                self.stats.latencies_s.append(max(0.0, (time.time_ns() - hb.sent_unix_ns) / 1e9))
            return None
        if kind == "failure":
            report = message.failure
            if report.WhichOneof("cause") is None:
                raise ProtocolError("invalid_failure", "failure must carry an exit or an exception")
            session.last_heartbeat = time.monotonic()
            self.stats.failures += 1
            verdict = self.on_failure(session, report) if self.on_failure is not None else None
            ack = pb.Ack(seq=report.seq)
            if verdict is not None:
                ack.verdict.CopyFrom(verdict)
            return pb.OperatorMessage(ack=ack)
        raise ProtocolError("unexpected_message", f"unexpected message {kind or '(empty)'} after hello")


class ControlPlaneServer:
    """The servicer on a port. ``start()`` binds (port 0 picks one) and returns the port."""

    def __init__(self, credentials: JobCredentials, on_failure: FailureHandler | None = None,
                 host: str = "0.0.0.0", port: int = 0) -> None:
        self.servicer = ControlPlaneServicer(credentials, on_failure)
        self._address = f"{host}:{port}"
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_concurrent_streams", 10_000),
        ])
        pb_grpc.add_ControlPlaneServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port(self._address)
        await self._server.start()
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)

    def forget(self, namespace: str, job: str, pod: str) -> None:
        """Drop a pod's session (its pod is being replaced; the new agent will register anew)."""
        self.servicer.sessions.pop((namespace, job, pod), None)

    def restart_processes(self, namespace: str, job: str, reason: str) -> int:
        """Tell every connected agent of a job to restart its training processes; how many were told."""
        sessions = [s for s in self.job_sessions(namespace, job) if s.connected]
        for n, session in enumerate(sessions, start=1):
            session.send(pb.OperatorMessage(command=pb.Command(
                seq=n, restart=pb.RestartProcesses(reason=reason[:500]))))
        return len(sessions)

    def kill_worker(self, namespace: str, job: str, pod: str, reason: str) -> int:
        """Tell the connected agent(s) of one worker pod to kill the worker (a KillWorker fault);
        how many were told."""
        sessions = [s for s in self.job_sessions(namespace, job) if s.connected and s.identity.pod == pod]
        for session in sessions:
            session.send(pb.OperatorMessage(command=pb.Command(seq=1, kill=pb.KillWorker(reason=reason[:500]))))
        return len(sessions)

    def job_sessions(self, namespace: str, job: str) -> list[AgentSession]:
        return [s for (ns, j, _), s in list(self.servicer.sessions.items()) if ns == namespace and j == job]

    def job_timings(self, namespace: str, job: str) -> dict[int, wire.RankTiming]:
        """The newest section timing of every rank of a job, from its connected agents; a rank
        two agents report (briefly, around a regroup) is taken from the newer heartbeat."""
        merged: dict[int, tuple[float, wire.RankTiming]] = {}
        for session in self.job_sessions(namespace, job):
            if not session.connected:
                continue
            for rank, timing in list(session.rank_timings.items()):
                if rank not in merged or merged[rank][0] < session.timings_at:
                    merged[rank] = (session.timings_at, timing)
        return {rank: merged[rank][1] for rank in sorted(merged)}

    @property
    def stats(self) -> ControlPlaneStats:
        return self.servicer.stats

    @property
    def sessions(self) -> dict[tuple[str, str, str], AgentSession]:
        return self.servicer.sessions
