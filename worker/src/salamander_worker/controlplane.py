"""An agent's session with the operator over the control plane (see ``controlplane.proto``).

``await AgentClient(...).connect()`` opens the stream, says hello with the job's token and
waits for the welcome. Then ``heartbeat`` is fire-and-forget, ``report_failure`` waits for the
operator's ack and returns its verdict, and commands the operator sends unprompted go to
``on_command``. Errors surface as :class:`ControlPlaneError` with the gRPC status.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence

import grpc

from salamander import wire
from salamander.controlplane import AUTH_METADATA, BEARER, AgentIdentity
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander.controlplane.v1 import controlplane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_LOG_LINES = 50
MAX_LOG_LINE = 1000
MAX_TIMINGS_BYTES = 512 * 1024  # the rank timings of one heartbeat, encoded (the server takes 1 MiB messages)


class ControlPlaneError(RuntimeError):
    """The operator refused the session or the stream broke. ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        self.code = code
        super().__init__(f"{code.name if code else 'UNKNOWN'}: {details}")


def timing_message(timing: wire.RankTiming) -> pb.RankTiming:
    """``timing`` as its protobuf message."""
    message = pb.RankTiming(rank=timing.rank, step=timing.step, window=timing.window, step_s=timing.step_s,
                            wait_s=timing.wait_s, sections=timing.sections)
    if timing.busy_median_s is not None:  # unset otherwise: the operator then reads None
        message.busy_median_s = timing.busy_median_s
        message.median_window = timing.median_window
    if timing.busy_steps:  # empty otherwise: the operator then reads ()
        message.busy_first_step = timing.busy_first_step
        message.busy_steps.extend(timing.busy_steps)
    return message


class AgentClient:
    """One agent's stream. Use from a single asyncio loop."""

    def __init__(self, target: str, token: str, identity: AgentIdentity,
                 on_command: Callable[[pb.Command], None] | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.ControlPlaneStub(self._channel)
        self._token = token
        self._identity = identity
        self._call: grpc.aio.StreamStreamCall | None = None
        self._seq = itertools.count(1)
        self._acks: dict[int, asyncio.Future[pb.Verdict]] = {}
        self._on_command = on_command
        self._reader: asyncio.Task[None] | None = None
        self.session_id = ""
        self.heartbeat_interval_s = 1.0
        self._trimmed = False  # a heartbeat's rank timings were cut to the byte budget (logged once)

    async def connect(self, timeout_s: float = 10.0) -> None:
        self._call = self._stub.Session(metadata=((AUTH_METADATA, BEARER + self._token),))
        i = self._identity
        await self._write(pb.AgentMessage(hello=pb.Hello(
            namespace=i.namespace, job=i.job, pod=i.pod, node=i.node, first_rank=i.first_rank,
            rank_count=i.rank_count, agent_version="salamander/0.1")))
        try:
            reply = await asyncio.wait_for(self._call.read(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise ControlPlaneError(exc.code(), exc.details() or "") from None
        if reply is grpc.aio.EOF or reply.WhichOneof("body") != "welcome":
            raise ControlPlaneError(await self._call.code(), await self._call.details() or "no welcome")
        self.session_id = reply.welcome.session_id
        self.heartbeat_interval_s = reply.welcome.heartbeat_interval_s or 1.0
        self._reader = asyncio.create_task(self._read_acks())

    async def heartbeat(self, step: int, step_time_s: float, step_at: float = 0.0, regrouping: bool = False,
                        ranks: Sequence[wire.RankTiming] = ()) -> None:
        """``step_at``: when ``step`` was reported (seconds since the epoch; 0 if unknown);
        ``regrouping``: the agent is restarting its processes; ``ranks``: the section timings of
        its training processes (the first :data:`salamander.wire.MAX_TIMINGS_PER_HEARTBEAT`, and
        no more than :data:`MAX_TIMINGS_BYTES` of them encoded, are sent)."""
        hb = pb.Heartbeat(seq=next(self._seq), step=step, step_time_s=step_time_s, sent_unix_ns=time.time_ns(),
                          step_unix_ns=int(step_at * 1e9) if step_at > 0 else 0, regrouping=regrouping)
        budget = MAX_TIMINGS_BYTES
        for timing in list(ranks)[:wire.MAX_TIMINGS_PER_HEARTBEAT]:
            message = timing_message(timing)
            budget -= message.ByteSize() + 4  # the field's tag and length
            if budget < 0:
                if not self._trimmed:
                    self._trimmed = True
                    log.warning("heartbeat: %d rank timings exceed %d bytes; sending fewer",
                                len(ranks), MAX_TIMINGS_BYTES)
                break
            hb.ranks.append(message)
        await self._write(pb.AgentMessage(heartbeat=hb))

    async def report_failure(self, rank: int, *, exit_code: int = 0, signal: int = 0,
                             exception: tuple[str, str, str] | None = None, log_tail: list[str] | None = None,
                             round_started: float = 0.0, timeout_s: float = 10.0) -> pb.Verdict:
        """Send a failure report and wait for the operator's ack; returns its verdict (action
        ``ACTION_UNSPECIFIED`` when the operator gave none)."""
        seq = next(self._seq)
        report = pb.FailureReport(seq=seq, rank=rank, observed_unix_ns=time.time_ns(),
                                  round_started_unix_ns=int(round_started * 1e9) if round_started > 0 else 0,
                                  log_tail=[line[:MAX_LOG_LINE] for line in (log_tail or [])[-MAX_LOG_LINES:]])
        if exception is not None:
            report.exception.CopyFrom(pb.TrainingException(type=exception[0], message=exception[1],
                                                           traceback=exception[2]))
        else:
            report.exit.CopyFrom(pb.ProcessExit(exit_code=exit_code, signal=signal))
        ack = asyncio.get_running_loop().create_future()
        self._acks[seq] = ack
        await self._write(pb.AgentMessage(failure=report))
        try:
            return await asyncio.wait_for(ack, timeout=timeout_s)
        finally:
            self._acks.pop(seq, None)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()

    async def _write(self, message: pb.AgentMessage) -> None:
        if self._call is None:
            raise ControlPlaneError(None, "not connected")
        try:
            await self._call.write(message)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            raise ControlPlaneError(code, str(exc)) from None

    async def _read_acks(self) -> None:
        assert self._call is not None
        try:
            while (reply := await self._call.read()) is not grpc.aio.EOF:
                body = reply.WhichOneof("body")
                if body == "ack":
                    future = self._acks.pop(reply.ack.seq, None)
                    if future is not None and not future.done():
                        future.set_result(reply.ack.verdict)
                elif body == "command" and self._on_command is not None:
                    self._on_command(reply.command)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        for future in self._acks.values():
            if not future.done():
                future.set_exception(ControlPlaneError(None, "the stream closed before the ack"))
