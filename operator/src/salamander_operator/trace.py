"""Ask every rank of a run for its timeline and merge the answers into one Chrome/Perfetto trace.

The request and answer formats, and the responder that runs in every training process, are in
:mod:`salamander_worker.timeline`. Here: post a request (:func:`request_trace`), wait for the
ranks' answers (:func:`collect_trace`), merge them (:func:`merge`, pure) and write the file
(:func:`write_trace`). Open the file in https://ui.perfetto.dev or chrome://tracing: one process
per rank, a ``steps`` lane and a ``main`` lane (sections) per rank, spans still open at
collection time in red and named ``<section> (open)``, and a ``collected`` marker per rank.

``store`` is anything with TCPStore's ``set``/``get``/``check``/``delete_key``: a
:class:`~salamander_operator.rendezvous.RendezvousHost`, a
:class:`~salamander_operator.rendezvous.RendezvousClient`, or a ``TCPStore`` client. Every
failure to reach it is a :class:`TraceError`; a malformed answer is skipped and named in the
result, never raised.
"""

from __future__ import annotations

import datetime
import gzip
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from salamander import wire
from salamander_worker.timeline import MAX_SPANS, STEP_LANE, RankAnswer, TraceError, TraceRequest

log = logging.getLogger(__name__)

__all__ = ["TraceError", "TraceResult", "TraceStore", "collect_trace", "default_path", "merge", "request_trace",
           "summary", "trace_in_background", "whereabouts", "write_trace"]

COLLECT_POLL_S = 0.1
HANG_TRACE_TIMEOUT_S = 3.0   # on a hang, how long the restart waits for the ranks' answers
CONFIG_MAP_MAX_BYTES = 900_000  # a packed trace fits a ConfigMap (1 MiB with its metadata)


class TraceStore(Protocol):
    def set(self, key: str, value: bytes | str) -> Any: ...

    def get(self, key: str) -> bytes: ...

    def check(self, keys: list[str]) -> bool: ...

    def delete_key(self, key: str) -> Any: ...


@dataclass(frozen=True)
class TraceResult:
    """What a collection got: the merged ``trace`` and, by rank, who answered, whose answer was
    malformed (rank -> why) and who did not answer in time. ``answered``, ``malformed`` and
    ``missing`` partition ``range(world_size)``."""

    request_id: str
    world_size: int
    trace: dict[str, Any]
    answered: list[int]
    malformed: dict[int, str] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


def _store_failed(what: str, exc: BaseException) -> TraceError:
    text = str(exc).strip()
    return TraceError(f"cannot {what}: {text.splitlines()[0] if text else type(exc).__name__}")


def request_trace(store: TraceStore, run_id: str, limit: int, *, clock: Callable[[], float] = time.time) -> str:
    """Post a fresh trace request for run ``run_id`` (the newest ``limit`` spans per rank, from 1
    to :data:`~salamander_worker.timeline.MAX_SPANS`); its id. Raises :class:`TraceError` for a
    bad ``limit`` or when the store cannot be reached."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SPANS:
        raise TraceError(f"the span limit must be from 1 to {MAX_SPANS}, got {limit!r}")
    now = clock()
    request = TraceRequest(f"{int(now):x}-{secrets.token_hex(4)}", limit, int(now * 1000))
    try:
        store.set(wire.trace_request_key(run_id), request.encode())
    except (RuntimeError, ValueError, OSError) as exc:  # RendezvousError is a RuntimeError
        raise _store_failed("post the trace request", exc) from None
    return request.id


def collect_trace(store: TraceStore, run_id: str, request_id: str, world_size: int, timeout_s: float, *,
                  poll_s: float = COLLECT_POLL_S, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> TraceResult:
    """Wait up to ``timeout_s`` for ranks ``0..world_size-1`` to answer request ``request_id``,
    then merge what came. Each answer is read once and its key deleted (best effort). Raises
    :class:`TraceError` only when the store cannot be reached at all (or for a bad argument);
    a malformed answer is skipped and named in :attr:`TraceResult.malformed`."""
    if world_size < 1:
        raise TraceError(f"the world size must be >= 1, got {world_size}")
    TraceRequest(request_id, 1, 0).check()  # the id is part of the keys
    answers: dict[int, RankAnswer] = {}
    malformed: dict[int, str] = {}
    deadline = clock() + max(0.0, timeout_s)
    while True:
        for rank in range(world_size):
            if rank not in answers and rank not in malformed:
                _read_answer(store, run_id, request_id, rank, answers, malformed)
        if len(answers) + len(malformed) == world_size or clock() >= deadline:
            break
        sleep(min(poll_s, max(0.0, deadline - clock())))
    missing = [r for r in range(world_size) if r not in answers and r not in malformed]
    trace = merge(answers, world_size=world_size, request_id=request_id, malformed=malformed)
    return TraceResult(request_id, world_size, trace, sorted(answers), malformed, missing)


def _read_answer(store: TraceStore, run_id: str, request_id: str, rank: int,
                 answers: dict[int, RankAnswer], malformed: dict[int, str]) -> None:
    key = wire.trace_rank_key(run_id, request_id, rank)
    try:
        if not store.check([key]):
            return
        raw = store.get(key)
    except (RuntimeError, ValueError, OSError) as exc:
        raise _store_failed(f"read rank {rank}'s trace answer", exc) from None
    try:
        answers[rank] = RankAnswer.decode(raw, rank=rank, request=request_id)
    except TraceError as exc:
        log.info("skipping a malformed trace answer: %s", exc)
        malformed[rank] = str(exc)
    try:
        store.delete_key(key)
    except (RuntimeError, ValueError, OSError):
        pass  # a few KiB left in the store; nothing reads it again


def merge(answers: Mapping[int, RankAnswer], *, world_size: int | None = None, request_id: str | None = None,
          malformed: Mapping[int, str] | None = None) -> dict[str, Any]:
    """One Chrome trace of every rank's answer (pure).

    ``traceEvents``: the metadata events of every rank first (rank order), then every other
    event sorted by ``ts`` (ties by rank, lane), with, per rank, an instant event ``collected``
    (``ph: "i"``, process scope) at the rank's clock when it answered, whose ``args.open`` lists
    the sections it was in (outermost first) and ``args.step`` the step under way. ``otherData``
    says which ranks answered, which were malformed (and why) and which are missing (of
    ``range(world_size)`` when it is given), the request id, the restart count and dropped spans
    of each rank."""
    malformed = dict(malformed or {})
    metadata: list[dict[str, Any]] = []
    timed: list[dict[str, Any]] = []
    for rank in sorted(answers):
        answer = answers[rank]
        for event in answer.events:
            (metadata if event.get("ph") == "M" else timed).append(event)
        opened = [e for e in answer.events if e.get("ph") == "X" and e.get("args", {}).get("open")]
        steps = [e["args"].get("step") for e in opened if isinstance(e["args"].get("step"), int)]
        timed.append({"name": "collected", "ph": "i", "s": "p", "pid": rank, "tid": STEP_LANE,
                      "ts": answer.at_ns / 1000,
                      "args": {"open": [e["args"].get("section", e["name"]) for e in opened],
                               "step": max(steps, default=None), "restart_count": answer.restart_count}})
    timed.sort(key=lambda e: (e["ts"], e["pid"], e["tid"]))
    known = set(answers) | set(malformed)
    expected = set(range(world_size)) if world_size is not None else known
    other: dict[str, Any] = {
        "request": request_id,
        "world_size": world_size,
        "answered": sorted(answers),
        "malformed": {str(r): malformed[r] for r in sorted(malformed)},
        "missing": sorted(expected - known),
        "restart_count": {str(r): answers[r].restart_count for r in sorted(answers)},
        "dropped_spans": {str(r): answers[r].dropped for r in sorted(answers) if answers[r].dropped},
    }
    return {"traceEvents": metadata + timed, "displayTimeUnit": "ms", "otherData": other}


def write_trace(path: Path, trace: Mapping[str, Any]) -> Path:
    """Write ``trace`` as JSON to ``path`` (parents created; replaced whole, never half written);
    ``path``. Raises :class:`TraceError` naming the path when it cannot be written."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("w") as f:
            json.dump(trace, f, separators=(",", ":"), allow_nan=False)
        os.replace(temporary, path)
    except (OSError, ValueError) as exc:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        raise TraceError(f"cannot write the trace to {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return path


def pack(trace: Mapping[str, Any], max_bytes: int = CONFIG_MAP_MAX_BYTES) -> bytes:
    """``trace`` as gzip-compressed JSON of at most ``max_bytes`` (a ConfigMap holds 1 MiB), for
    the Kubernetes path: while too big, the oldest half of the timed events is dropped (the
    metadata and the ``collected`` markers are kept) and ``otherData.truncated_events`` says how many."""
    events = list(trace.get("traceEvents", []))
    kept = [e for e in events if e.get("ph") == "M" or e.get("name") == "collected"]
    timed = [e for e in events if e not in kept]
    dropped = 0
    while True:
        body = {**trace, "traceEvents": kept + timed,
                "otherData": {**trace.get("otherData", {}), **({"truncated_events": dropped} if dropped else {})}}
        packed = gzip.compress(json.dumps(body, separators=(",", ":"), allow_nan=False).encode(), mtime=0)
        if len(packed) <= max_bytes or not timed:
            return packed
        cut = max(1, len(timed) // 2)
        dropped += cut
        timed = timed[cut:]


def unpack(raw: bytes) -> dict[str, Any]:
    """The trace :func:`pack` made; raises :class:`TraceError` for anything else."""
    try:
        data = json.loads(gzip.decompress(raw))
    except (OSError, EOFError, ValueError, RecursionError) as exc:
        raise TraceError(f"not a packed trace: {str(exc)[:200]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise TraceError("not a packed trace: no traceEvents list")
    return data


def summary(result: TraceResult) -> str:
    """One line: how many ranks answered and which did not."""
    text = f"{len(result.answered)}/{result.world_size} ranks answered"
    if result.malformed:
        text += f"; malformed: {_ranks(result.malformed)}"
    if result.missing:
        text += f"; no answer from: {_ranks(result.missing)}"
    return text


def whereabouts(trace: Mapping[str, Any], most: int = 16) -> list[str]:
    """One line per rank of a merged trace (the first ``most``, then a count): where it was
    when it answered (``rank 1 (step 41): in step > forward``), or that it did not answer."""
    lines = []
    for event in trace.get("traceEvents", []):
        if event.get("name") == "collected" and event.get("ph") == "i":
            args = event.get("args", {})
            step = f" (step {args['step']})" if args.get("step") is not None else ""
            where = " > ".join(args.get("open") or []) or "no open section"
            lines.append((event["pid"], f"rank {event['pid']}{step}: in {where}"))
    other = trace.get("otherData", {})
    lines += [(int(r), f"rank {r}: malformed answer ({why})") for r, why in other.get("malformed", {}).items()]
    lines += [(r, f"rank {r}: no answer") for r in other.get("missing", [])]
    lines.sort()
    shown = [text for _, text in lines[:most]]
    return shown + ([f"... and {len(lines) - most} more ranks"] if len(lines) > most else [])


def _ranks(ranks: Mapping[int, str] | list[int]) -> str:
    ordered = sorted(ranks)
    shown = ", ".join(str(r) for r in ordered[:16])
    return shown + (f" and {len(ordered) - 16} more" if len(ordered) > 16 else "")


def trace_in_background(store: TraceStore, run_id: str, *, world_size: int, limit: int, path: Path | None = None,
                        then: Callable[[], Any] | None = None, note: Callable[[str], None] | None = None,
                        timeout_s: float = HANG_TRACE_TIMEOUT_S,
                        write: Callable[[Mapping[str, Any]], str] | None = None) -> threading.Thread:
    """On a hang: request a trace, wait for the answers on a new daemon thread (up to
    ``timeout_s``), call ``then`` (the restart, which must not kill the ranks before they
    answer), and write the trace to ``path``, or hand it to ``write`` (which returns where it
    went, or raises). ``then`` is called exactly once, whatever happens to the trace; ``note``
    gets one line about the outcome. Returns the (started) thread."""

    def work() -> None:
        done = False
        try:
            request = request_trace(store, run_id, limit)
            result = collect_trace(store, run_id, request, world_size, timeout_s)
            done = True
            _call(then)
            where = write(result.trace) if write is not None else str(write_trace(Path(str(path)), result.trace))
            message = f"trace of the hang in {where} ({summary(result)})"
        except TraceError as exc:
            message = f"no trace of the hang: {exc}"
        except Exception as exc:  # noqa: BLE001 - the restart must still go out
            log.exception("tracing the hang failed")
            message = f"no trace of the hang: {exc}"
        finally:
            if not done:
                _call(then)
        if note is None:
            log.warning("%s", message)
        else:
            log.info("%s", message)
            _call(lambda: note(message))

    thread = threading.Thread(target=work, name=f"salamander-trace-{run_id[:8]}", daemon=True)
    thread.start()
    return thread


def _call(function: Callable[[], Any] | None) -> None:
    if function is None:
        return
    try:
        function()
    except Exception:  # noqa: BLE001 - a callback of a background thread: log, never lose the thread
        log.exception("a trace callback failed")


def default_path(directory: Path, label: str | None = None) -> Path:
    """``<directory>/trace-<label or local time>.json``."""
    return Path(directory) / f"trace-{label or datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
