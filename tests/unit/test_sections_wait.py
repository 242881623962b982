"""Waiting on peers in the section times: mark_ready, ``other``, RankTiming, CUDA events (faked),
and the timing files a rank writes for its agent's heartbeat."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import types
from pathlib import Path

import pytest

from salamander import wire
from salamander_worker import sections
from salamander_worker.heartbeat import timings_reader
from salamander_worker.sections import COMMUNICATION, MAX_UNRESOLVED_STEPS, OTHER, Recorder, TimingWriter

MS = 1_000_000  # ns


class Clock:
    """A wall clock the test moves by hand (milliseconds)."""

    def __init__(self) -> None:
        self.ns = 0

    def at(self, ms: float) -> None:
        self.ns = int(ms * MS)

    def time_ns(self) -> int:
        return self.ns


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(sections, "time", types.SimpleNamespace(time_ns=c.time_ns))
    return c


def _means(rec: Recorder) -> dict[str, float]:
    return {name: round(seconds, 6) for name, seconds in rec.window_means()[1].items()}


def test_the_time_after_the_mark_counts_as_communication(clock: Clock) -> None:
    rec = Recorder()
    rec.end_step(1)
    with rec.section("forward"):
        clock.at(100)
    with rec.section("backward"):
        clock.at(200)
        rec.mark_ready()  # an early bucket: superseded by the newer mark
        clock.at(250)
        rec.mark_ready()  # the last bucket is ready; from here on this rank waits on peers
        clock.at(400)
    clock.at(500)
    assert rec.end_step(2) == 0.5
    assert _means(rec) == {"forward": 0.1, "backward": 0.15, COMMUNICATION: 0.15, OTHER: 0.1}
    spans = [(s.name, s.start_ns // MS, s.duration_ns // MS) for s in rec.spans() if s.name != "step"]
    assert spans == [("forward", 0, 100), ("backward", 100, 300), (COMMUNICATION, 250, 150)]  # kept whole + a child


def test_a_mark_outside_a_section_is_ignored(clock: Clock) -> None:
    rec = Recorder()
    rec.end_step(1)
    rec.mark_ready()  # no section open
    clock.at(10)
    with rec.section("backward"):
        clock.at(60)
    with rec.section("optimizer"):  # the old mark is not this section's either
        clock.at(80)
    clock.at(100)
    rec.end_step(2)
    assert _means(rec) == {"backward": 0.05, "optimizer": 0.02, OTHER: 0.03}


def test_a_mark_belongs_to_the_innermost_open_section(clock: Clock) -> None:
    rec = Recorder()
    rec.end_step(1)
    with rec.section("train"):
        clock.at(100)
        with rec.section("backward"):
            clock.at(400)
            rec.mark_ready()
            clock.at(600)
        clock.at(900)
    clock.at(1000)
    rec.end_step(2)
    # backward loses its tail; the outer section keeps all its time; other counts top-level sections only
    assert _means(rec) == {"train": 0.9, "backward": 0.3, COMMUNICATION: 0.2, OTHER: 0.1}


def test_an_explicit_communication_section_and_a_marked_tail_add_up(clock: Clock) -> None:
    rec = Recorder()
    rec.end_step(1)
    with rec.section("backward"):
        clock.at(30)
        rec.mark_ready()
        clock.at(50)
    with rec.section(COMMUNICATION):
        clock.at(80)
    clock.at(100)
    rec.end_step(2)
    assert _means(rec) == {"backward": 0.03, COMMUNICATION: 0.05, OTHER: 0.02}


def test_a_mark_from_another_thread_applies_to_the_open_section(clock: Clock) -> None:
    """DDP calls its comm hooks on autograd threads on a GPU."""
    rec = Recorder()
    rec.end_step(1)
    with rec.section("backward"):
        clock.at(70)
        marker = threading.Thread(target=rec.mark_ready)
        marker.start()
        marker.join()
        clock.at(100)
    rec.end_step(2)
    assert _means(rec) == {"backward": 0.07, COMMUNICATION: 0.03, OTHER: 0.0}


def test_other_is_the_time_outside_top_level_sections_clamped_at_zero(clock: Clock) -> None:
    rec = Recorder()
    rec.end_step(1)
    # Sections of another thread are not this step's top level: they do not shrink `other`.
    done = threading.Event()

    def background() -> None:
        with rec.section("snapshot"):
            done.wait(5)

    worker = threading.Thread(target=background)
    worker.start()
    with rec.section("data"):
        clock.at(100)
    clock.at(1000)  # e.g. an injected sleep, or a data loader not wrapped in a section
    with rec.section("forward"):
        clock.at(1200)
        done.set()
        worker.join()
    clock.at(1500)
    rec.end_step(2)
    assert _means(rec) == {"data": 0.1, "forward": 0.2, "snapshot": 1.2, OTHER: 1.2}

    # A section the step closes inside of (report() called in a section) can exceed the next step.
    rec = Recorder()
    clock.at(0)
    rec.end_step(1)
    with rec.section("communication"):
        clock.at(500)
        rec.end_step(2)
        clock.at(900)
    clock.at(1000)
    rec.end_step(3)
    (_, first), (_, second) = rec._window
    assert first == {OTHER: 0.5} and second == {COMMUNICATION: 0.9, OTHER: 0.0}  # 0.9 s in a 0.5 s step


def test_timing_is_the_window_as_a_rank_timing(clock: Clock) -> None:
    rec = Recorder(window=4)
    assert rec.timing(0, 0) is None
    rec.end_step(1)
    for step in range(2, 8):
        start = (step - 2) * 100
        with rec.section("forward"):
            clock.at(start + 40)
        with rec.section("backward"):
            clock.at(start + 60)
            rec.mark_ready()
            clock.at(start + 90)
        clock.at(start + 100)
        rec.end_step(step)
    timing = rec.timing(3, 7)
    assert timing is not None and timing.check() is timing
    assert (timing.rank, timing.step, timing.window) == (3, 7, 4)
    assert math.isclose(timing.step_s, 0.1) and math.isclose(timing.wait_s, 0.03)
    assert math.isclose(timing.busy_s, 0.07)
    assert set(timing.sections) == {"forward", "backward", COMMUNICATION, OTHER}
    assert math.isclose(sum(timing.sections.values()), timing.step_s)


def test_timing_stays_within_the_wire_bounds(clock: Clock) -> None:
    rec = Recorder()
    rec.end_step(1)
    names = [f"s{i}-" + "x" * 100 for i in range(40)] + ["tab\there"]
    for i, name in enumerate(names):
        with rec.section(name):
            clock.at(i + 1)
    with rec.section(COMMUNICATION):
        clock.at(60)
    clock.at(100)
    rec.end_step(2)
    timing = rec.timing(0, 2)
    assert timing is not None and timing.check() is timing
    assert len(timing.sections) == wire.MAX_TIMING_SECTIONS
    assert COMMUNICATION in timing.sections and OTHER in timing.sections
    assert all(len(n) <= wire.MAX_SECTION_NAME and n.isprintable() for n in timing.sections)
    assert wire.decode_rank_timing(wire.encode_rank_timing(timing)) == timing


# --- CUDA events, faked: a device that runs behind the host


class Device:
    """Orders events; `finish_to(n)` lets the first n recorded ones complete."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.recorded, self.completed = clock, 0, 0
        self.lag_ms = 5.0  # the device time of an event: the host time it was recorded at + lag

    def event(self) -> FakeEvent:
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, device: Device) -> None:
        self.device, self.seq, self.ms = device, None, None

    def record(self) -> None:
        self.device.recorded += 1
        self.seq, self.ms = self.device.recorded, self.device.clock.ns / MS + self.device.lag_ms

    def query(self) -> bool:
        return self.seq is not None and self.seq <= self.device.completed

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.query() and end.query(), "elapsed_time on an event the device has not passed"
        return end.ms - self.ms


def test_cuda_events_resolve_lazily_once_the_device_passed_them(clock: Clock) -> None:
    device = Device(clock)
    rec = Recorder(events=device.event)
    assert rec.uses_events
    rec.end_step(1)
    with rec.section("forward"):
        clock.at(10)
        device.lag_ms = 25.0  # the forward kernels take longer on the device than their launch
    with rec.section("backward"):
        clock.at(30)
        rec.mark_ready()
        clock.at(50)
    clock.at(100)
    rec.end_step(2)
    assert rec.window_means() == (None, {})  # the device has not got there yet
    assert [s.name for s in rec.spans()] == ["forward", "backward", COMMUNICATION, "step"]  # on the wall clock
    device.completed = device.recorded
    clock.at(200)
    rec.end_step(3)  # resolves step 2; step 3 had no sections and follows it into the window
    (step2_s, step2), (step3_s, step3) = rec._window
    # device times: forward 5 -> 35 ms, backward 35 -> 75 ms with the mark at 55 ms
    assert (step2_s, {k: round(v, 6) for k, v in step2.items()}) == \
        (0.1, {"forward": 0.03, "backward": 0.02, COMMUNICATION: 0.02, OTHER: 0.03})
    assert (step3_s, step3) == (0.1, {OTHER: 0.1})


def test_cuda_events_that_never_complete_are_dropped_and_bounded(clock: Clock) -> None:
    device = Device(clock)
    rec = Recorder(events=device.event)
    rec.end_step(1)
    for step in range(2, 2 + 3 * MAX_UNRESOLVED_STEPS):
        with rec.section("forward"):
            clock.at(step * 10)
        rec.end_step(step)
        assert len(rec._unresolved) <= MAX_UNRESOLVED_STEPS + 1
    assert rec.window_means() == (None, {})
    device.completed = device.recorded  # the device catches up: the steps still held resolve
    clock.at(10_000)
    rec.end_step(100)
    mean, means = rec.window_means()
    assert mean is not None and 0 < len(rec._window) <= MAX_UNRESOLVED_STEPS + 1 and means["forward"] > 0


def test_an_event_that_fails_loses_its_section_not_the_step(clock: Clock) -> None:
    def broken() -> FakeEvent:
        raise RuntimeError("CUDA error: out of memory")

    rec = Recorder(events=broken)
    rec.end_step(1)
    with rec.section("forward"):
        clock.at(10)
    rec.mark_ready()
    clock.at(20)
    assert rec.end_step(2) == 0.02
    assert _means(rec) == {OTHER: 0.02}


def test_configure_keeps_the_wall_clock_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    rec = Recorder()
    monkeypatch.delenv(sections.ENV_SECTION_SYNC, raising=False)
    assert not sections.configure(torch.device("cpu"), rec) and not rec.uses_events
    monkeypatch.setenv(sections.ENV_SECTION_SYNC, "0")
    assert not sections.configure(types.SimpleNamespace(type="cuda"), rec) and not rec.uses_events
    monkeypatch.setenv(sections.ENV_SECTION_SYNC, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not sections.configure(torch.device("cpu"), rec) and not rec.uses_events
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sections.configure(torch.device("cpu"), rec) and rec.uses_events
    rec.use_events(None)
    assert not rec.uses_events


# --- the files: a rank writes, its agent's heartbeat reads


def _filled(clock: Clock, wait_ms: float = 20) -> Recorder:
    clock.at(0)
    rec = Recorder()
    rec.end_step(1)
    with rec.section("backward"):
        clock.at(80)
        rec.mark_ready()
        clock.at(80 + wait_ms)
    clock.at(110)
    rec.end_step(2)
    return rec


def test_a_rank_writes_its_timing_atomically_at_most_once_per_interval(clock: Clock, tmp_path: Path) -> None:
    now = [100.0]
    writer = TimingWriter(tmp_path, 5, interval_s=1.0, rec=_filled(clock), clock=lambda: now[0])
    assert writer.maybe_write(2)
    assert not writer.maybe_write(3)  # throttled
    now[0] += 1.0
    assert writer.maybe_write(4)
    assert writer.maybe_write(4, force=True) and writer.written == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-5.json"]  # no temporary left behind
    timing = wire.decode_rank_timing((tmp_path / "rank-5.json").read_bytes())
    assert (timing.rank, timing.step) == (5, 4) and math.isclose(timing.wait_s, 0.02)

    assert not TimingWriter(None, 0, rec=_filled(clock)).maybe_write(1)  # no agent: nothing to do
    assert not TimingWriter(tmp_path, 0, rec=Recorder()).maybe_write(1)  # nothing measured yet


def test_the_environment_names_the_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(wire.ENV_TIMINGS_DIR, str(tmp_path))
    assert TimingWriter.from_environment(2).directory == tmp_path
    monkeypatch.delenv(wire.ENV_TIMINGS_DIR)
    assert TimingWriter.from_environment(2).directory is None


def test_a_failing_write_never_raises_and_logs_once(clock: Clock, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    writer = TimingWriter(tmp_path / "gone", 0, interval_s=0.0, rec=_filled(clock))
    with caplog.at_level(logging.WARNING, logger="salamander_worker.sections"):
        assert not writer.maybe_write(1)
        assert not writer.maybe_write(2)
    assert len(caplog.records) == 1 and "cannot write the section timing" in caplog.text


def test_the_heartbeat_reads_the_ranks_files(clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for rank, wait in ((9, 10), (8, 30)):
        TimingWriter(tmp_path, rank, rec=_filled(clock, wait)).maybe_write(2)
    (tmp_path / "rank-3.json").write_text("{not json")
    (tmp_path / "rank-4.json").write_text(json.dumps({"rank": 4, "step": 1, "window": 1, "step_s": 0.1,
                                                     "wait_s": 0.5, "sections": {}}))  # wait > step
    (tmp_path / ".rank-7.json.123.tmp").write_text("half written")
    (tmp_path / "notes.txt").write_text("not a timing")
    (tmp_path / "rank-6.json").write_bytes(b" " * (wire.MAX_TIMING_BYTES + 10))
    stale = tmp_path / "rank-1.json"
    TimingWriter(tmp_path, 1, rec=_filled(clock)).maybe_write(2)
    os.utime(stale, (1.0, 1.0))
    read = timings_reader(tmp_path)
    with caplog.at_level(logging.WARNING, logger="salamander_worker.heartbeat"):
        timings = read()
        assert read() == timings  # the same files: no more log lines
    assert [(t.rank, round(t.wait_s, 6)) for t in timings] == [(8, 0.03), (9, 0.01)]
    assert sorted(r.getMessage().split()[4] for r in caplog.records) == \
        sorted(str(tmp_path / f"rank-{r}.json:") for r in (3, 4, 6))
    assert timings_reader(tmp_path / "missing")() == []


def test_the_heartbeat_reads_at_most_the_bound(clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_TIMINGS_PER_HEARTBEAT", 3)
    rec = _filled(clock)
    for rank in range(6):
        TimingWriter(tmp_path, rank, rec=rec).maybe_write(2)
    assert [t.rank for t in timings_reader(tmp_path)()] == [0, 1, 2]


def test_the_agent_gives_its_processes_a_timings_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tempfile

    from salamander_worker import agent

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "salamander-timings-999999999-abc"  # an agent killed without cleanup
    dead.mkdir()
    monkeypatch.setattr(agent.psutil, "pid_exists", lambda pid: pid != 999999999)
    monkeypatch.setenv(wire.ENV_TIMINGS_DIR, "")  # restored, then removed, after the test
    monkeypatch.delenv(wire.ENV_TIMINGS_DIR)
    made = agent.timings_directory()
    assert made is not None and made.is_dir() and made.parent == tmp_path and not dead.exists()
    assert os.environ[wire.ENV_TIMINGS_DIR] == str(made)
    assert made.name.startswith(f"salamander-timings-{os.getpid()}-")
    assert agent.timings_directory() is None  # given already: the agent neither makes nor removes it
