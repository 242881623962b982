"""Per-rank timelines: the trace events, the request and answer codecs, merging, collecting
(with a fake store and clock), the responder, and the hang path's ordering (restart after the
answers)."""

from __future__ import annotations

import json
import logging
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander import wire
from salamander_operator import trace
from salamander_worker import timeline
from salamander_worker.sections import Recorder, Span
from salamander_worker.timeline import RankAnswer, TraceError, TraceRequest, chrome_events
from tests.unit._support import FAST

NOW = 1_700_000_000_000_000_000  # ns


class FakeStore:
    """A dict with TCPStore's methods (``get`` of a missing key raises instead of blocking)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.fail = False

    def _up(self) -> None:
        if self.fail:
            raise RuntimeError("connection reset by peer")

    def set(self, key: str, value: bytes | str) -> None:
        self._up()
        self.data[key] = value.encode() if isinstance(value, str) else bytes(value)

    def get(self, key: str) -> bytes:
        self._up()
        if key not in self.data:
            raise RuntimeError(f"timeout waiting for {key}")
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        self._up()
        return all(k in self.data for k in keys)

    def delete_key(self, key: str) -> bool:
        self._up()
        return self.data.pop(key, None) is not None

    def compare_set(self, key: str, expected: str, desired: bytes) -> bytes:
        self._up()
        current = self.data.get(key)
        if (current is None and expected == "") or current == expected.encode():
            self.data[key] = desired
            return desired
        return current if current is not None else expected.encode()


def span(name: str, start_us: int, dur_us: int | None, step: int = 1, thread: str = "main") -> Span:
    return Span(name, NOW + start_us * 1000, None if dur_us is None else dur_us * 1000, step, thread)


def timed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["ph"] != "M"]


# --- chrome_events --------------------------------------------------------------------------------

def test_finished_and_open_spans_become_complete_events_in_microseconds() -> None:
    finished = [span("forward", 0, 50), span("step", 0, 100), span("load", 10, 5, thread="prefetch")]
    opened = [span("step", 100, None, step=2), span("forward", 120, None, step=2)]
    events = chrome_events(finished, opened, 3, limit=10, now_ns=NOW + 1_000_000)
    meta = {(e["name"], e["tid"]): e["args"] for e in events if e["ph"] == "M"}
    assert meta[("process_name", 0)] == {"name": "rank 3"} and meta[("process_sort_index", 0)] == {"sort_index": 3}
    assert {meta[("thread_name", t)]["name"] for t in (0, 1, 2)} == {"steps", "main", "prefetch"}
    assert meta[("thread_name", timeline.STEP_LANE)] == {"name": "steps"}
    assert meta[("thread_name", timeline.MAIN_LANE)] == {"name": "main"}
    by_name = {(e["name"], e["ts"]): e for e in timed(events)}
    forward = by_name[("forward", NOW / 1000)]
    assert forward == {"name": "forward", "cat": "section", "ph": "X", "ts": NOW / 1000, "dur": 50.0, "pid": 3,
                       "tid": timeline.MAIN_LANE, "args": {"step": 1}}
    assert by_name[("step", NOW / 1000)]["tid"] == timeline.STEP_LANE
    assert by_name[("step", NOW / 1000)]["cat"] == "step"
    assert by_name[("load", NOW / 1000 + 10)]["tid"] == 2
    stuck = by_name[("forward (open)", NOW / 1000 + 120)]
    assert stuck["cat"] == "open" and stuck["args"] == {"step": 2, "open": True, "section": "forward"}
    assert stuck["dur"] == 1000 - 120 and stuck["cname"] == "terrible"
    assert [e["ts"] for e in timed(events)] == sorted(e["ts"] for e in timed(events))
    assert events[: len(meta)] == [e for e in events if e["ph"] == "M"]  # metadata first


def test_only_the_newest_spans_are_kept_and_open_ones_always() -> None:
    finished = [span("s", i * 10, 5, step=i) for i in range(10)]
    opened = [span("step", 200, None)]
    events = timed(chrome_events(finished, opened, 0, limit=3, now_ns=NOW + 300_000))
    assert [e["args"]["step"] for e in events if not e["args"].get("open")] == [7, 8, 9]
    assert sum(1 for e in events if e["args"].get("open")) == 1
    assert [e["name"] for e in timed(chrome_events(finished, opened, 0, limit=0, now_ns=NOW))] == ["step (open)"]


def test_an_open_span_that_started_after_now_lasts_zero() -> None:
    [event] = timed(chrome_events([], [span("forward", 10, None)], 0, limit=1, now_ns=NOW))
    assert event["dur"] == 0


@pytest.mark.parametrize("limit, rank, needle", [(-1, 0, "span limit must be >= 0"), (1, -2, "rank must be >= 0")])
def test_bad_limits_and_ranks_are_refused(limit: int, rank: int, needle: str) -> None:
    with pytest.raises(TraceError, match=needle):
        chrome_events([], [], rank, limit=limit)


spans_st = st.lists(st.builds(
    Span, name=st.sampled_from(["step", "data", "forward", "backward"]),
    start_ns=st.integers(NOW, NOW + 10**12), duration_ns=st.integers(0, 10**10),
    step=st.integers(0, 10**6), thread=st.sampled_from(["main", "main", "prefetch", "saver"])), max_size=40)


@FAST
@given(finished=spans_st, opened=spans_st, rank=st.integers(0, 4096), limit=st.integers(0, 50))
def test_events_properties(finished: list[Span], opened: list[Span], rank: int, limit: int) -> None:
    """Every event is the rank's; the newest ``limit`` finished spans and every open span are
    there once, oldest first; every lane used is named; the answer round-trips."""
    opened = [Span(s.name, s.start_ns, None, s.step, s.thread) for s in opened]
    events = chrome_events(finished, opened, rank, limit=limit, now_ns=NOW + 2 * 10**12)
    assert all(e["pid"] == rank for e in events)
    spans = timed(events)
    assert len(spans) == min(limit, len(finished)) + len(opened)
    assert sum(1 for e in spans if e["args"].get("open")) == len(opened)
    assert [e["ts"] for e in spans] == sorted(e["ts"] for e in spans)
    named = {e["tid"] for e in events if e["name"] == "thread_name"}
    assert {e["tid"] for e in spans} <= named
    assert all(e["tid"] == timeline.STEP_LANE for e in spans if e["args"].get("section", e["name"]) == "step")
    answer = RankAnswer(rank, "r1", NOW, 0, max(0, len(finished) - limit), tuple(events))
    assert RankAnswer.decode(answer.encode(), rank=rank, request="r1") == answer


def test_open_spans_of_other_threads_share_the_lane_of_their_finished_spans() -> None:
    recorder = Recorder()
    inside, release = threading.Event(), threading.Event()

    def work() -> None:
        with recorder.section("load"):
            pass
        with recorder.section("load"):
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=work, name="prefetch")
    worker.start()
    try:
        assert inside.wait(5)
        events = chrome_events(recorder.spans(), recorder.open_spans(), 0, limit=10)
    finally:
        release.set()
        worker.join()
    assert {e["tid"] for e in timed(events)} == {2}
    assert {e["args"]["name"] for e in events if e["name"] == "thread_name" and e["tid"] == 2} == {"prefetch"}


# --- the request ----------------------------------------------------------------------------------

@FAST
@given(ident=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), limit=st.integers(1, timeline.MAX_SPANS),
       posted=st.integers(0, 10**15))
def test_requests_round_trip(ident: str, limit: int, posted: int) -> None:
    request = TraceRequest(ident, limit, posted)
    assert TraceRequest.decode(request.encode()) == request
    assert TraceRequest.decode(request.encode().decode()) == request


@pytest.mark.parametrize("raw, needle", [
    (b"abc", "must be <id>:<limit>:<posted_ms>"),
    (b"a:1:2:3", "must be <id>:<limit>:<posted_ms>"),
    (b"a b:10:0", "id must be 1 to 64 characters"),
    (b":10:0", "id must be 1 to 64 characters"),
    (b"a/../b:10:0", "id must be 1 to 64 characters"),
    (("x" * 65 + ":10:0").encode(), "id must be 1 to 64 characters"),
    (b"a:0:0", "span limit must be from 1 to 100000, got 0"),
    (b"a:100001:0", "span limit must be from 1 to 100000"),
    (b"a:-1:0", "span limit must be a number, got '-1'"),
    (b"a:ten:0", "span limit must be a number"),
    (b"a:10:", "time must be Unix milliseconds"),
    (b"a:10:1e5", "time must be Unix milliseconds"),
    ("a:\u0661:0".encode(), "not ASCII"),
    (b"\xff\xfe", "not ASCII"),
])
def test_malformed_requests_are_refused_by_name(raw: bytes, needle: str) -> None:
    with pytest.raises(TraceError, match=needle.replace("(", r"\(")):
        TraceRequest.decode(raw)


@FAST
@given(st.one_of(st.binary(max_size=80), st.text(max_size=80)))
def test_any_request_value_decodes_or_raises_trace_error(raw: bytes | str) -> None:
    try:
        request = TraceRequest.decode(raw)
    except TraceError:
        return
    assert request.check() is request


# --- the answer -----------------------------------------------------------------------------------

def _answer_bytes(body: Any) -> bytes:
    return zlib.compress(json.dumps(body).encode())


GOOD_BODY = {"v": 1, "rank": 2, "request": "r1", "at_ns": NOW, "restart_count": 0, "dropped": 0,
             "events": [{"name": "forward", "ph": "X", "ts": 1.0, "dur": 2.0, "pid": 2, "tid": 1}]}


@pytest.mark.parametrize("raw, needle", [
    (b"", "truncated zlib data"),
    (b"not zlib", "is not zlib data"),
    (_answer_bytes(GOOD_BODY)[:-3], "truncated zlib data"),
    (zlib.compress(b"\x00" * (timeline.MAX_ANSWER_BYTES + 1)), "inflates beyond 64 MiB"),
    (zlib.compress(b"{nope"), "is not JSON"),
    (zlib.compress(b"\xff\xfe"), "is not JSON"),
    (zlib.compress(b"[" * 100_000 + b"]" * 100_000), "nested too deeply|is not JSON"),
    (_answer_bytes([1, 2]), "is not a JSON object"),
    (_answer_bytes({**GOOD_BODY, "v": 2}), "has version 2"),
    (_answer_bytes({**GOOD_BODY, "rank": 3}), "is labelled rank 3"),
    (_answer_bytes({**GOOD_BODY, "request": "r2"}), "is labelled rank 2, request 'r2'"),
    (_answer_bytes({**GOOD_BODY, "extra": 1}), "unknown fields: \\['extra'\\]"),
    (_answer_bytes({k: v for k, v in GOOD_BODY.items() if k != "at_ns"}), "lacks field 'at_ns'"),
    (_answer_bytes({**GOOD_BODY, "dropped": True}), "lacks field 'dropped' of type int"),
    (_answer_bytes({**GOOD_BODY, "dropped": -1}), "negative"),
    (_answer_bytes({**GOOD_BODY, "events": {}}), "lacks field 'events' of type list"),
    (_answer_bytes({**GOOD_BODY, "events": [3]}), "event 0 is not an object"),
    (_answer_bytes({**GOOD_BODY, "events": [{**GOOD_BODY["events"][0], "ph": "B"}]}), "has phase 'B'"),
    (_answer_bytes({**GOOD_BODY, "events": [{**GOOD_BODY["events"][0], "pid": 0}]}), "has pid 0, not the rank 2"),
    (_answer_bytes({**GOOD_BODY, "events": [{**GOOD_BODY["events"][0], "tid": "main"}]}), "lane \\(tid\\)"),
    (_answer_bytes({**GOOD_BODY, "events": [{**GOOD_BODY["events"][0], "name": None}]}), "has no name"),
    (_answer_bytes({**GOOD_BODY, "events": [{**GOOD_BODY["events"][0], "dur": -1}]}), "dur >= 0"),
    (zlib.compress(json.dumps({**GOOD_BODY, "events": [{**GOOD_BODY["events"][0], "ts": float("nan")}]}).encode()),
     "no finite ts"),
    (_answer_bytes({**GOOD_BODY, "events": [{**GOOD_BODY["events"][0], "args": [1]}]}), "args that are not"),
])
def test_malformed_answers_are_refused_by_name(raw: bytes, needle: str) -> None:
    with pytest.raises(TraceError, match=f"rank 2's answer.*({needle})"):
        RankAnswer.decode(raw, rank=2, request="r1")


def test_a_good_answer_decodes() -> None:
    answer = RankAnswer.decode(_answer_bytes(GOOD_BODY), rank=2, request="r1")
    assert answer.rank == 2 and answer.events[0]["name"] == "forward"


@FAST
@given(st.binary(max_size=200))
def test_any_answer_bytes_decode_or_raise_trace_error(raw: bytes) -> None:
    for data in (raw, zlib.compress(raw)):
        try:
            RankAnswer.decode(data, rank=0, request="r")
        except TraceError:
            pass


# --- merge ----------------------------------------------------------------------------------------

def _answer(rank: int, opened: list[str], at_us: int = 500, restart_count: int = 0) -> RankAnswer:
    finished = [span("forward", 10 * rank, 5), span("step", 0, 100)]
    stalled = [span("step", 100, None, step=2), *[span(n, 200 + 10 * i, None, step=2) for i, n in enumerate(opened)]]
    events = chrome_events(finished, stalled, rank, limit=10, now_ns=NOW + at_us * 1000)
    return RankAnswer(rank, "r1", NOW + at_us * 1000, restart_count, 0, tuple(events))


def test_merge_orders_events_and_marks_where_each_rank_was() -> None:
    answers = {1: _answer(1, ["allreduce"], at_us=600), 0: _answer(0, ["forward"], restart_count=2)}
    before = json.dumps([a.events for a in answers.values()], sort_keys=True)
    merged = trace.merge(answers, world_size=4, request_id="r1", malformed={3: "rank 3's answer is not zlib data"})
    assert json.dumps([a.events for a in answers.values()], sort_keys=True) == before  # pure
    events = merged["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    assert events[: len(meta)] == meta and [e["pid"] for e in meta] == sorted(e["pid"] for e in meta)
    rest = events[len(meta):]
    assert [e["ts"] for e in rest] == sorted(e["ts"] for e in rest)
    markers = {e["pid"]: e for e in rest if e["name"] == "collected"}
    assert markers[0]["ph"] == "i" and markers[0]["s"] == "p" and markers[0]["ts"] == (NOW + 500_000) / 1000
    assert markers[0]["args"] == {"open": ["step", "forward"], "step": 2, "restart_count": 2}
    assert markers[1]["args"]["open"] == ["step", "allreduce"]
    assert merged["displayTimeUnit"] == "ms"
    assert merged["otherData"] == {"request": "r1", "world_size": 4, "answered": [0, 1],
                                   "malformed": {"3": "rank 3's answer is not zlib data"}, "missing": [2],
                                   "restart_count": {"0": 2, "1": 0}, "dropped_spans": {}}
    json.dumps(merged, allow_nan=False)
    assert trace.whereabouts(merged) == ["rank 0 (step 2): in step > forward", "rank 1 (step 2): in step > allreduce",
                                         "rank 2: no answer", "rank 3: malformed answer (rank 3's answer is not "
                                                                 "zlib data)"]


def test_merge_of_nothing_is_an_empty_trace() -> None:
    merged = trace.merge({}, world_size=2)
    assert merged["traceEvents"] == [] and merged["otherData"]["missing"] == [0, 1]


def test_whereabouts_shows_at_most_so_many_ranks() -> None:
    merged = trace.merge({}, world_size=40)
    lines = trace.whereabouts(merged, most=16)
    assert len(lines) == 17 and lines[-1] == "... and 24 more ranks"


# --- collect --------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_request_then_collect_what_the_ranks_left() -> None:
    store = FakeStore()
    request_id = trace.request_trace(store, "run", 7, clock=lambda: 1_700_000_000.5)
    request = TraceRequest.decode(store.data[wire.trace_request_key("run")])
    assert request == TraceRequest(request_id, 7, 1_700_000_000_500)
    store.set(wire.trace_rank_key("run", request_id, 0),
              RankAnswer(0, request_id, NOW, 0, 0, _answer(0, ["forward"]).events).encode())
    store.set(wire.trace_rank_key("run", request_id, 2), b"garbage")
    clock = Clock()
    result = trace.collect_trace(store, "run", request_id, 3, timeout_s=2.0, clock=clock, sleep=clock.sleep)
    assert result.answered == [0] and result.missing == [1] and list(result.malformed) == [2]
    assert "rank 2's answer is not zlib data" in result.malformed[2]
    assert 2.0 <= clock.now < 2.2  # waited the timeout for rank 1
    assert not any(k.startswith(f"salamander/run/trace/{request_id}/") for k in store.data)  # read and deleted
    assert trace.summary(result) == "1/3 ranks answered; malformed: 2; no answer from: 1"


def test_collect_returns_as_soon_as_every_rank_answered() -> None:
    store = FakeStore()
    for rank in range(2):
        store.set(wire.trace_rank_key("run", "r1", rank), _answer(rank, []).encode())
    clock = Clock()
    result = trace.collect_trace(store, "run", "r1", 2, timeout_s=5.0, clock=clock, sleep=clock.sleep)
    assert result.answered == [0, 1] and clock.now == 0.0


@pytest.mark.parametrize("call, needle", [
    (lambda s: trace.request_trace(s, "run", 0), "span limit must be from 1 to 100000, got 0"),
    (lambda s: trace.request_trace(s, "run", True), "span limit"),
    (lambda s: trace.collect_trace(s, "run", "r1", 0, 1.0), "world size must be >= 1"),
    (lambda s: trace.collect_trace(s, "run", "../x", 1, 1.0), "request id must be"),
])
def test_bad_arguments_are_trace_errors(call: Any, needle: str) -> None:
    with pytest.raises(TraceError, match=needle):
        call(FakeStore())


def test_an_unreachable_store_is_a_trace_error() -> None:
    store = FakeStore()
    store.fail = True
    with pytest.raises(TraceError, match="cannot post the trace request: connection reset by peer"):
        trace.request_trace(store, "run", 10)
    with pytest.raises(TraceError, match="cannot read rank 0's trace answer: connection reset"):
        trace.collect_trace(store, "run", "r1", 1, 1.0)


def test_write_trace(tmp_path: Path) -> None:
    merged = trace.merge({0: _answer(0, [])}, world_size=1)
    path = trace.write_trace(tmp_path / "a" / "b" / "t.json", merged)
    assert json.loads(path.read_text()) == merged and [p.name for p in path.parent.iterdir()] == ["t.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(TraceError, match="cannot write the trace to .*file/t.json"):
        trace.write_trace(tmp_path / "file" / "t.json", merged)


# --- the responder --------------------------------------------------------------------------------

def _responder(store: FakeStore, rank: int = 1, now: float = NOW / 1e9, source: Recorder | None = None
               ) -> timeline.Responder:
    recorder = source or Recorder()
    if source is None:
        with recorder.section("forward"):
            pass
    return timeline.Responder(lambda: store, "run", rank, restart_count=1, source=recorder, clock=lambda: now)


def test_the_responder_answers_each_new_request_once() -> None:
    store = FakeStore()
    responder = _responder(store)
    assert responder.poll() is None  # no request yet
    store.set(wire.trace_request_key("run"), TraceRequest("r1", 10, NOW // 10**6).encode())
    assert responder.poll() == "r1"
    assert responder.poll() is None  # the same request again
    answer = RankAnswer.decode(store.data[wire.trace_rank_key("run", "r1", 1)], rank=1, request="r1")
    assert answer.restart_count == 1 and [e["name"] for e in timed(list(answer.events))] == ["forward"]
    store.set(wire.trace_request_key("run"), TraceRequest("r2", 10, NOW // 10**6).encode())
    assert responder.poll() == "r2" and responder.answered == ["r1", "r2"]


def test_the_first_answer_of_a_rank_stands() -> None:
    """A process restarted after the request (same rank, fresh timeline) must not replace the
    answer of the stalled one."""
    store = FakeStore()
    store.set(wire.trace_request_key("run"), TraceRequest("r1", 10, NOW // 10**6).encode())
    _responder(store).poll()
    first = store.data[wire.trace_rank_key("run", "r1", 1)]
    assert _responder(store, source=Recorder()).poll() == "r1"
    assert store.data[wire.trace_rank_key("run", "r1", 1)] == first


def test_an_answer_the_store_dropped_is_sent_again_after_reconnecting() -> None:
    store = FakeStore()
    store.set(wire.trace_request_key("run"), TraceRequest("r1", 10, NOW // 10**6).encode())
    responder = _responder(store)
    real = store.compare_set

    def broken(*args: Any) -> bytes:
        store.compare_set = real  # type: ignore[method-assign]
        raise RuntimeError("connection reset by peer")

    store.compare_set = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        responder.poll()
    assert responder.poll() == "r1" and wire.trace_rank_key("run", "r1", 1) in store.data


def test_malformed_and_stale_requests_are_not_answered(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore()
    responder = _responder(store)
    store.set(wire.trace_request_key("run"), b"r1:lots:0")
    with caplog.at_level(logging.WARNING, logger="salamander_worker.timeline"):
        assert responder.poll() is None
        assert responder.poll() is None  # logged once
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring a malformed trace request of run run: trace request span limit must be a number, got 'lots'"]
    posted_long_ago = NOW // 10**6 - int(timeline.REQUEST_TTL_S * 1000) - 1
    store.set(wire.trace_request_key("run"), TraceRequest("old", 10, posted_long_ago).encode())
    assert responder.poll() is None
    assert not any("/trace/old/" in k for k in store.data)


def test_the_responder_survives_a_failing_store(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore()
    store.set(wire.trace_request_key("run"), TraceRequest("r1", 10, NOW // 10**6).encode())
    connects: list[int] = []
    sleeps: list[float] = []
    stop = threading.Event()

    def connect() -> FakeStore:
        connects.append(1)
        if len(connects) < 4:
            raise RuntimeError("connection refused")
        return store

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= 6:
            stop.set()

    responder = timeline.Responder(connect, "run", 0, clock=lambda: NOW / 1e9, sleep=sleep)
    with caplog.at_level(logging.WARNING, logger="salamander_worker.timeline"):
        responder.run(stop)  # returns only because stop was set
    assert sleeps[:3] == [2.0, 4.0, 8.0] and sleeps[3:] == [timeline.POLL_S] * 3
    assert responder.answered == ["r1"] and len(caplog.records) == 1  # one warning per outage
    assert "the rendezvous store failed (connection refused); retrying" in caplog.records[0].getMessage()


def test_ensure_started_is_a_no_op_without_a_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from salamander_worker.topology import context

    monkeypatch.delenv(wire.ENV_RDZV_ENDPOINT, raising=False)
    monkeypatch.setattr(timeline, "_started_in", None)
    before = {t.name for t in threading.enumerate()}
    timeline.ensure_started(context())
    timeline.ensure_started(context())
    assert "salamander-trace" not in {t.name for t in threading.enumerate()} - before


def test_ensure_started_never_raises(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(wire.ENV_RDZV_ENDPOINT, "127.0.0.1:1")
    monkeypatch.setenv(wire.ENV_RUN_ID, "run")
    monkeypatch.setattr(timeline, "_started_in", None)
    with caplog.at_level(logging.WARNING, logger="salamander_worker.timeline"):
        timeline.ensure_started(object())  # no rank: not a context at all
    assert "the trace responder did not start" in caplog.text


# --- the hang path --------------------------------------------------------------------------------

def test_on_a_hang_the_restart_waits_for_the_answers(tmp_path: Path) -> None:
    store = FakeStore()
    responders = [_responder(store, rank=r, now=0.0) for r in range(2)]
    order: list[str] = []

    def restart() -> None:
        order.append("restart")
        # every rank had answered before its process was restarted
        order.extend(f"answered {r}" for r in range(2) if responders[r].answered)

    def answer_soon() -> None:
        while not store.check([wire.trace_request_key("run")]):
            threading.Event().wait(0.01)
        for responder in responders:
            responder.poll()

    notes: list[str] = []
    helper = threading.Thread(target=answer_soon)
    helper.start()
    thread = trace.trace_in_background(store, "run", world_size=2, limit=5, path=tmp_path / "trace-hang-7.json",
                                       then=restart, note=notes.append, timeout_s=5.0)
    thread.join(10)
    helper.join(10)
    assert order == ["restart", "answered 0", "answered 1"]
    assert notes == [f"trace of the hang in {tmp_path / 'trace-hang-7.json'} (2/2 ranks answered)"]
    assert json.loads((tmp_path / "trace-hang-7.json").read_text())["otherData"]["answered"] == [0, 1]


def test_on_a_hang_the_restart_goes_out_even_when_tracing_fails(tmp_path: Path) -> None:
    store = FakeStore()
    store.fail = True
    restarts: list[int] = []
    notes: list[str] = []
    thread = trace.trace_in_background(store, "run", world_size=2, limit=5, path=tmp_path / "t.json",
                                       then=lambda: restarts.append(1), note=notes.append)
    thread.join(10)
    assert restarts == [1]
    assert notes == ["no trace of the hang: cannot post the trace request: connection reset by peer"]
    assert not (tmp_path / "t.json").exists()


def test_a_packed_trace_fits_a_config_map_by_dropping_the_oldest_events() -> None:
    import random

    from salamander_operator import trace as operator_trace

    rng = random.Random(0)
    events = [{"name": "M", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0"}},
              {"name": "collected", "ph": "i", "ts": 10**9, "pid": 0, "tid": 0, "s": "p"}]
    events += [{"name": f"s{n}-{rng.random()}", "ph": "X", "ts": n, "dur": 1, "pid": 0, "tid": 1}
               for n in range(20_000)]
    merged = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"answered": [0]}}
    small = operator_trace.pack(merged, max_bytes=50_000)
    assert len(small) <= 50_000
    back = operator_trace.unpack(small)
    names = [e["name"] for e in back["traceEvents"]]
    assert names[:2] == ["M", "collected"] and back["otherData"]["truncated_events"] > 0
    assert names[-1] == events[-1]["name"]  # the newest are kept
    whole = operator_trace.unpack(operator_trace.pack(merged))
    assert whole["traceEvents"] == events and "truncated_events" not in whole["otherData"]
    with pytest.raises(operator_trace.TraceError):
        operator_trace.unpack(b"not gzip")
