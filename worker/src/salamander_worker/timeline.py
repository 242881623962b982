"""Each rank's timeline of sections, as Chrome/Perfetto trace events, on request.

A trace is asked for through the job's rendezvous store (the operator, ``salamander run`` on a
hang, or ``salamander trace``): the asker writes a :class:`TraceRequest` under
:func:`salamander.wire.trace_request_key`; every training process runs one responder thread
(:func:`ensure_started`) that polls that key about once a second on its own store connection
and answers each new request once, with a :class:`RankAnswer` (zlib-compressed JSON) under
:func:`salamander.wire.trace_rank_key`. The asker merges the answers into one trace
(:mod:`salamander_operator.trace`).

The responder is a thread of its own so it answers while the training thread is stuck, in a
collective or anywhere else that releases the GIL: that is where a trace is most useful. What
a rank was doing then shows as its *open* spans (:meth:`salamander_worker.sections.Recorder.open_spans`).

Wire formats (both sides use the codecs here, so they cannot drift):

* request: ASCII text ``<id>:<limit>:<posted_ms>``: an id of 1 to 64 characters from
  ``[A-Za-z0-9_-]``, the newest finished spans per rank to send (``1..MAX_SPANS``), and when it
  was posted (Unix milliseconds). Requests older than :data:`REQUEST_TTL_S` are not answered
  (a process started after the request has nothing of the moment it asks about).
* answer: zlib of a JSON object ``{"v": 1, "rank", "request", "at_ns", "restart_count",
  "dropped", "events"}``; ``events`` are Chrome trace events of that rank only (``pid`` = rank),
  ``dropped`` the finished spans left out by the limit. The first answer of a rank to a request
  stands (``compare_set``), so a restarted process never overwrites the stalled one's answer.

Lanes (Chrome ``tid``) within a rank (``pid``): :data:`STEP_LANE` holds the ``step`` spans,
:data:`MAIN_LANE` the sections of the main thread, and every other thread that recorded
sections gets a lane of its own, numbered from 2 in the order of its name.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from salamander import wire
from salamander_worker.sections import Recorder, Span, recorder

log = logging.getLogger(__name__)

MAX_SPANS = 100_000             # the most finished spans a request may ask of each rank
REQUEST_TTL_S = 120.0           # requests posted longer ago than this are not answered
POLL_S = 1.0                    # how often a responder looks for a new request
RETRY_MAX_S = 30.0              # a failing store is retried after 2 s, doubling up to this
MAX_ANSWER_BYTES = 64 << 20     # an answer that inflates beyond this is refused (a zip bomb)
ANSWER_VERSION = 1

STEP_LANE, MAIN_LANE = 0, 1
STEP_SPAN = "step"              # the name Recorder.end_step gives its step spans
OPEN_SUFFIX = " (open)"         # open spans are named "<section> (open)", category "open"

_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class TraceError(ValueError):
    """A trace request or answer is malformed, or a trace could not be collected or written.
    The message names what is wrong (and, for an answer, the rank)."""


# --- the request --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TraceRequest:
    """One request for every rank's timeline.

    Invariants (checked by :meth:`check`, so by :meth:`decode` too): ``id`` matches
    ``[A-Za-z0-9_-]{1,64}`` (it is part of store keys), ``1 <= limit <= MAX_SPANS``,
    ``posted_ms >= 0``."""

    id: str
    limit: int
    posted_ms: int

    def check(self) -> TraceRequest:
        """``self`` if it holds the invariants; raises :class:`TraceError` naming the bad field."""
        if not isinstance(self.id, str) or not _REQUEST_ID.fullmatch(self.id):
            raise TraceError(f"trace request id must be 1 to 64 characters of [A-Za-z0-9_-], got {_shown(self.id)}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_SPANS:
            raise TraceError(f"trace request span limit must be from 1 to {MAX_SPANS}, got {_shown(self.limit)}")
        if isinstance(self.posted_ms, bool) or not isinstance(self.posted_ms, int) or self.posted_ms < 0:
            raise TraceError(f"trace request time must be Unix milliseconds >= 0, got {_shown(self.posted_ms)}")
        return self

    def encode(self) -> bytes:
        """The store value; :meth:`decode` reads it back equal."""
        self.check()
        return f"{self.id}:{self.limit}:{self.posted_ms}".encode("ascii")

    @classmethod
    def decode(cls, raw: bytes | str) -> TraceRequest:
        """Parse a store value; raises :class:`TraceError` naming what is wrong, never anything else."""
        try:
            text = raw.decode("ascii") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            raise TraceError(f"trace request is not ASCII text: {_shown(raw)}") from None
        parts = text.split(":")
        if len(parts) != 3:
            raise TraceError(f"trace request must be <id>:<limit>:<posted_ms>, got {_shown(text)}")
        ident, limit, posted = parts
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 9):
            raise TraceError(f"trace request span limit must be a number, got {_shown(limit)}")
        if not (posted.isascii() and posted.isdigit() and len(posted) <= 16):
            raise TraceError(f"trace request time must be Unix milliseconds, got {_shown(posted)}")
        return cls(ident, int(limit), int(posted)).check()


def _shown(value: object, width: int = 60) -> str:
    """``value`` for an error message: repr, cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


# --- the events ---------------------------------------------------------------------------------

def lanes(spans: Iterable[Span]) -> dict[str, int]:
    """Thread name -> lane (Chrome ``tid``) for these spans: ``main`` is :data:`MAIN_LANE`, the
    other threads follow from 2 in the order of their names. (Step spans go to :data:`STEP_LANE`,
    whatever their thread.)"""
    others = sorted({s.thread for s in spans if s.name != STEP_SPAN and s.thread != "main"})
    return {"main": MAIN_LANE, **{name: MAIN_LANE + 1 + n for n, name in enumerate(others)}}


def _lane(span: Span, by_thread: dict[str, int]) -> int:
    return STEP_LANE if span.name == STEP_SPAN else by_thread[span.thread]


def chrome_events(spans: Sequence[Span], open_spans: Sequence[Span], rank: int, *, limit: int,
                  now_ns: int | None = None) -> list[dict[str, Any]]:
    """Rank ``rank``'s timeline as Chrome trace events (pure but for the default ``now_ns``).

    * metadata (``ph: "M"``) first: ``process_name`` ``rank <rank>``, its sort index, and the name
      and sort index of every lane used (``steps``, ``main``, then other threads);
    * then one complete event (``ph: "X"``, ``ts``/``dur`` in microseconds, ``pid`` = rank,
      ``tid`` = lane, ``args.step``) per span, oldest first: the newest ``limit`` of ``spans``
      (finished; category ``step`` or ``section``), and every one of ``open_spans``, extended to
      ``now_ns`` and marked: named ``<name> (open)``, category ``open``, ``args.open = true``,
      ``args.section`` its name, ``cname: "terrible"`` (red in chrome://tracing).

    Raises :class:`TraceError` if ``limit < 0`` or ``rank < 0``."""
    if limit < 0:
        raise TraceError(f"span limit must be >= 0, got {limit}")
    if rank < 0:
        raise TraceError(f"rank must be >= 0, got {rank}")
    now = time.time_ns() if now_ns is None else now_ns
    finished = list(spans)[-limit:] if limit else []
    stalled = list(open_spans)
    by_thread = lanes([*finished, *stalled])
    events = [_span_event(s, rank, _lane(s, by_thread), now) for s in finished]
    events.extend(_span_event(s, rank, _lane(s, by_thread), now, open_=True) for s in stalled)
    events.sort(key=lambda e: (e["ts"], e["tid"]))
    return _metadata(rank, by_thread) + events


def _span_event(span: Span, rank: int, lane: int, now_ns: int, *, open_: bool = False) -> dict[str, Any]:
    if open_ or span.duration_ns is None:
        duration = max(0, now_ns - span.start_ns)
        return {"name": span.name + OPEN_SUFFIX, "cat": "open", "ph": "X", "ts": span.start_ns / 1000,
                "dur": duration / 1000, "pid": rank, "tid": lane, "cname": "terrible",
                "args": {"step": span.step, "open": True, "section": span.name}}
    return {"name": span.name, "cat": "step" if span.name == STEP_SPAN else "section", "ph": "X",
            "ts": span.start_ns / 1000, "dur": max(0, span.duration_ns) / 1000, "pid": rank, "tid": lane,
            "args": {"step": span.step}}


def _metadata(rank: int, by_thread: dict[str, int]) -> list[dict[str, Any]]:
    names = {STEP_LANE: "steps", **{lane: thread for thread, lane in by_thread.items()}}
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}},
        {"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}},
    ]
    for lane in sorted(names):
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": lane, "args": {"name": names[lane]}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": rank, "tid": lane,
                       "args": {"sort_index": lane}})
    return events


# --- the answer ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankAnswer:
    """One rank's answer to one request.

    Invariants (checked by :meth:`decode`): ``rank >= 0``; ``at_ns`` (the rank's wall clock when
    it answered, epoch ns), ``restart_count`` and ``dropped`` are >= 0; every event is a Chrome
    trace event of this rank (``pid == rank``): ``ph`` one of ``M``, ``X``, ``i``, a string
    ``name``, an integer ``tid >= 0``, and for ``X``/``i`` a finite ``ts`` (and for ``X`` a finite
    ``dur >= 0``)."""

    rank: int
    request: str
    at_ns: int
    restart_count: int
    dropped: int
    events: tuple[dict[str, Any], ...]

    def encode(self) -> bytes:
        """zlib-compressed JSON; :meth:`decode` reads it back equal."""
        body = {"v": ANSWER_VERSION, "rank": self.rank, "request": self.request, "at_ns": self.at_ns,
                "restart_count": self.restart_count, "dropped": self.dropped, "events": list(self.events)}
        return zlib.compress(json.dumps(body, separators=(",", ":"), allow_nan=False).encode(), 6)

    @classmethod
    def decode(cls, raw: bytes, *, rank: int, request: str) -> RankAnswer:
        """Parse what rank ``rank`` left for request ``request``. Raises :class:`TraceError`
        naming the rank and what is wrong, never anything else."""
        what = f"rank {rank}'s answer"
        data = _inflate_json(raw, what)
        expected = {"v": int, "rank": int, "request": str, "at_ns": int, "restart_count": int, "dropped": int,
                    "events": list}
        for name, kind in expected.items():
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TraceError(f"{what} lacks field {name!r} of type {kind.__name__}")
        if unknown := set(data) - set(expected):
            raise TraceError(f"{what} has unknown fields: {sorted(unknown)[:5]}")
        if data["v"] != ANSWER_VERSION:
            raise TraceError(f"{what} has version {data['v']}; this reader knows version {ANSWER_VERSION}")
        if data["rank"] != rank or data["request"] != request:
            raise TraceError(f"{what} is labelled rank {data['rank']}, request {_shown(data['request'])}")
        if min(data["at_ns"], data["restart_count"], data["dropped"]) < 0:
            raise TraceError(f"{what} has a negative at_ns, restart_count or dropped")
        for n, event in enumerate(data["events"]):
            _check_event(event, rank, f"{what} event {n}")
        return cls(rank, request, data["at_ns"], data["restart_count"], data["dropped"], tuple(data["events"]))


def _inflate_json(raw: bytes, what: str) -> dict[str, Any]:
    """``raw`` inflated and parsed as a JSON object of at most :data:`MAX_ANSWER_BYTES`."""
    if not isinstance(raw, (bytes, bytearray)):
        raise TraceError(f"{what} is not bytes")
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(bytes(raw), MAX_ANSWER_BYTES)
    except zlib.error as exc:
        raise TraceError(f"{what} is not zlib data: {exc}") from None
    if inflater.unconsumed_tail:
        raise TraceError(f"{what} inflates beyond {MAX_ANSWER_BYTES >> 20} MiB")
    if not inflater.eof:
        raise TraceError(f"{what} is truncated zlib data")
    try:
        return wire.json_object(text, what)
    except wire.WireError as exc:
        raise TraceError(str(exc)) from None


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_event(event: object, rank: int, what: str) -> None:
    if not isinstance(event, dict):
        raise TraceError(f"{what} is not an object")
    ph, tid = event.get("ph"), event.get("tid")
    if ph not in ("M", "X", "i"):
        raise TraceError(f"{what} has phase {_shown(ph)}; expected 'M', 'X' or 'i'")
    if not isinstance(event.get("name"), str):
        raise TraceError(f"{what} has no name")
    if event.get("pid") != rank or isinstance(event.get("pid"), bool):
        raise TraceError(f"{what} has pid {_shown(event.get('pid'))}, not the rank {rank}")
    if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
        raise TraceError(f"{what} has lane (tid) {_shown(tid)}; expected an integer >= 0")
    if ph != "M" and not _finite(event.get("ts")):
        raise TraceError(f"{what} has no finite ts")
    if ph == "X" and not (_finite(event.get("dur")) and event["dur"] >= 0):
        raise TraceError(f"{what} has no finite dur >= 0")
    if "args" in event and not isinstance(event["args"], dict):
        raise TraceError(f"{what} has args that are not an object")


def answer(request: TraceRequest, rank: int, restart_count: int, source: Recorder = recorder,
           now_ns: int | None = None) -> RankAnswer:
    """This process's answer to ``request``: its newest ``request.limit`` spans and its open ones."""
    now = time.time_ns() if now_ns is None else now_ns
    spans, opened = source.spans(), source.open_spans()
    events = chrome_events(spans, opened, rank, limit=request.limit, now_ns=now)
    return RankAnswer(rank, request.id, now, restart_count, max(0, len(spans) - request.limit), tuple(events))


# --- the responder ------------------------------------------------------------------------------

class Responder:
    """Answers the trace requests of one run for one rank, over its own store connection.

    :meth:`poll` does one round (raising what the store raises); :meth:`run` loops forever on a
    thread, every :data:`POLL_S`, reconnecting with backoff after a failure. A request is
    answered once per process (the last value seen is remembered); a malformed one is logged
    once and ignored; a stale one (older than :data:`REQUEST_TTL_S`) is ignored."""

    def __init__(self, connect: Callable[[], Any], run_id: str, rank: int, restart_count: int = 0,
                 source: Recorder = recorder, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._connect = connect
        self._store: Any = None
        self._key = wire.trace_request_key(run_id)
        self._run_id = run_id
        self._rank = rank
        self._restart_count = restart_count
        self._source = source
        self._clock = clock
        self._sleep = sleep
        self._seen: bytes | None = None
        self.answered: list[str] = []   # the request ids answered, oldest first (for tests and logs)

    def poll(self) -> str | None:
        """Look once for a new request and answer it; the id answered, or None."""
        if self._store is None:
            self._store = self._connect()
        store = self._store
        if not store.check([self._key]):
            return None
        raw = bytes(store.get(self._key))
        if raw == self._seen:
            return None
        try:
            request = TraceRequest.decode(raw)
        except TraceError as exc:
            self._seen = raw
            log.warning("ignoring a malformed trace request of run %s: %s", self._run_id, exc)
            return None
        if self._clock() - request.posted_ms / 1000 > REQUEST_TTL_S:
            self._seen = raw
            log.debug("not answering trace request %s: posted before this process could see it", request.id)
            return None
        reply = answer(request, self._rank, self._restart_count, self._source)
        # The first answer stands: a process restarted after the request must not replace it.
        store.compare_set(wire.trace_rank_key(self._run_id, request.id, self._rank), "", reply.encode())
        self._seen = raw  # only now: a store that failed mid-answer gets the answer after reconnecting
        self.answered.append(request.id)
        return request.id

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll until ``stop`` is set (forever by default). Never raises: a store that fails is
        dropped and reconnected after 2 s, doubling up to :data:`RETRY_MAX_S`."""
        backoff = 0.0
        while stop is None or not stop.is_set():
            try:
                self.poll()
                backoff = 0.0
            except Exception as exc:  # noqa: BLE001 - a trace must never fail training
                if backoff == 0.0:
                    text = str(exc).strip()
                    log.warning("trace responder of rank %d: the rendezvous store failed (%s); retrying",
                                self._rank, text.splitlines()[0] if text else type(exc).__name__)
                self._store = None
                backoff = min(RETRY_MAX_S, backoff * 2 if backoff else 2.0)
            self._sleep(backoff or POLL_S)


STOP_JOIN_S = 5.0  # at exit, how long to wait for a store call in flight
_started_in: int | None = None   # the pid whose responder is running (a forked child has none)
_start_lock = threading.Lock()


def _stop_responder(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(timeout=STOP_JOIN_S)


def ensure_started(ctx: Any) -> None:
    """Start this process's responder thread, once per process (a daemon: it never keeps the
    process alive). A no-op without a rendezvous endpoint or run id in the environment (a
    standalone script). Never raises: failing to start only loses traces. ``ctx`` is the
    process's :class:`salamander_worker.topology.WorkerContext` (``rank``, ``run_id``,
    ``restart_count``)."""
    global _started_in
    pid = os.getpid()
    if _started_in == pid:
        return
    try:
        with _start_lock:
            if _started_in == pid:
                return
            _started_in = pid
            endpoint = os.environ.get(wire.ENV_RDZV_ENDPOINT, "")
            run_id = getattr(ctx, "run_id", "") or os.environ.get(wire.ENV_RUN_ID, "")
            if not endpoint or not run_id:
                return
            from salamander_worker.store import connect_store

            stop = threading.Event()
            responder = Responder(lambda: connect_store(endpoint), run_id, int(ctx.rank), int(ctx.restart_count),
                                  sleep=stop.wait)
            thread = threading.Thread(target=responder.run, args=(stop,), name="salamander-trace", daemon=True)
            thread.start()
            # Stop it before the interpreter finalizes: a daemon thread still inside a store call
            # while torch's C++ objects are torn down aborts the process ("terminate called ...").
            atexit.register(_stop_responder, stop, thread)
    except Exception as exc:  # noqa: BLE001 - a trace must never fail training
        log.warning("the trace responder did not start: %s", exc)
