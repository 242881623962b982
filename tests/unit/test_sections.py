"""Per-rank sections: spans for traces, windowed means for the straggler view."""

from __future__ import annotations

import pytest

from salamander_worker.sections import Recorder


def test_steps_close_their_sections_into_the_window() -> None:
    rec = Recorder(capacity=100, window=2)
    assert rec.end_step(1) is None  # the first step's start is unknown
    for step in (2, 3, 4):
        with rec.section("forward"):
            with rec.section("attention"):  # nested: counts in both
                pass
        with rec.section("forward"):
            pass
        assert rec.end_step(step) is not None
    mean, sections = rec.window_means()
    assert mean is not None and mean >= sections["forward"] >= sections["attention"] >= 0
    assert set(sections) == {"forward", "attention", "other"}  # other: the time outside any section
    names = [s.name for s in rec.spans()]
    assert names.count("step") == 3 and names.count("forward") == 6
    assert [s.step for s in rec.spans() if s.name == "step"] == [1, 2, 3]


def test_open_spans_say_where_a_rank_is_now() -> None:
    rec = Recorder()
    rec.end_step(7)
    with rec.section("backward"):
        where = [(s.name, s.duration_ns, s.step) for s in rec.open_spans()]
    assert where == [("step", None, 7), ("backward", None, 7)]
    assert [s.name for s in rec.open_spans()] == ["step"]


def test_an_exception_still_closes_its_span() -> None:
    rec = Recorder()
    with pytest.raises(ValueError), rec.section("data"):
        raise ValueError("bad batch")
    assert [s.name for s in rec.spans()] == ["data"] and rec.open_spans() == []


def test_the_ring_keeps_the_newest_spans() -> None:
    rec = Recorder(capacity=3)
    for n in range(10):
        with rec.section(f"s{n}"):
            pass
    assert [s.name for s in rec.spans()] == ["s7", "s8", "s9"]


class _Clock:
    """Wall-clock nanoseconds moved by hand."""

    def __init__(self) -> None:
        self.ns = 0

    def time_ns(self) -> int:
        return self.ns


def _steps(rec: Recorder, clock: _Clock, busy_ms: list[float], wait_ms: float = 5.0) -> None:
    """One step per entry: ``busy_ms`` in forward, then ``wait_ms`` in communication."""
    if rec._step_started_ns is None:
        rec.end_step(0)   # the first step's start
    for step, busy in enumerate(busy_ms, start=1):
        with rec.section("forward"):
            clock.ns += int(busy * 1e6)
        with rec.section("communication"):
            clock.ns += int(wait_ms * 1e6)
        rec.end_step(step)


def test_the_timing_carries_the_median_busy_time_of_the_newest_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from salamander_worker import sections

    clock = _Clock()
    monkeypatch.setattr(sections, "time", types.SimpleNamespace(time_ns=clock.time_ns))
    assert sections.MEDIAN_WINDOW == 16 <= sections.WINDOW_STEPS
    rec = Recorder()
    assert rec.busy_median() == (None, 0)
    _steps(rec, clock, [10.0] * 3)
    assert rec.busy_median() == (pytest.approx(0.010), 3)    # fewer steps than the window: all of them
    # 20 slow steps then one huge outlier: the median is the slow steps', over the newest 16
    _steps(rec, clock, [10.0] * 20 + [20.0] * 20 + [5000.0])
    median, count = rec.busy_median()
    assert count == 16 and median == pytest.approx(0.020)
    timing = rec.timing(4, 60)
    assert timing is not None and timing.check() is timing
    assert timing.busy_median_s == pytest.approx(0.020) and timing.median_window == 16 and timing.window == 32
    assert timing.busy_s > 0.1   # the mean took the outlier in


def test_an_even_count_takes_the_mean_of_the_two_middle_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from salamander_worker import sections

    clock = _Clock()
    monkeypatch.setattr(sections, "time", types.SimpleNamespace(time_ns=clock.time_ns))
    rec = Recorder(window=4, median_window=16)   # the median's window is at most the means'
    _steps(rec, clock, [1.0, 2.0, 4.0, 8.0, 30.0])
    median, count = rec.busy_median()
    assert count == 4 and median == pytest.approx((4.0 + 8.0) / 2 / 1e3)
    rec = Recorder(median_window=3)
    _steps(rec, clock, [9.0, 1.0, 2.0, 7.0])
    assert rec.busy_median() == (pytest.approx(0.002), 3)


def test_the_timing_file_carries_the_median(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import types

    from salamander import wire
    from salamander_worker import sections

    clock = _Clock()
    monkeypatch.setattr(sections, "time", types.SimpleNamespace(time_ns=clock.time_ns))
    rec = Recorder()
    _steps(rec, clock, [10.0, 30.0, 20.0])
    assert sections.TimingWriter(tmp_path, 7, rec=rec, clock=lambda: 0.0).maybe_write(3)
    timing = wire.decode_rank_timing((tmp_path / "rank-7.json").read_bytes())
    assert timing.busy_median_s == pytest.approx(0.020) and timing.median_window == 3 and timing.window == 3


def test_the_timing_carries_the_busy_time_of_each_newest_step(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import types

    from salamander import wire
    from salamander_worker import sections

    clock = _Clock()
    monkeypatch.setattr(sections, "time", types.SimpleNamespace(time_ns=clock.time_ns))
    rec = Recorder()
    assert rec.busy_steps() == (0, ())
    _steps(rec, clock, [10.0] * 70 + [20.0, 5000.0])   # steps 1..72; the newest 64 are kept
    first, busy = rec.busy_steps()
    assert first == 72 - sections.BUSY_STEPS + 1 and len(busy) == sections.BUSY_STEPS
    assert busy[-2:] == (pytest.approx(0.020), pytest.approx(5.0)) and busy[0] == pytest.approx(0.010)
    timing = rec.timing(4, 72)
    assert timing is not None and timing.check() is timing
    assert (timing.busy_first_step, timing.busy_steps) == (first, busy)
    assert rec.timing(4, 70).busy_steps == busy[:-2]   # never past the timing's step
    assert sections.TimingWriter(tmp_path, 4, rec=rec, clock=lambda: 0.0).maybe_write(72)
    assert wire.decode_rank_timing((tmp_path / "rank-4.json").read_bytes()).busy_steps == busy
    # the steps restart (a restore from a snapshot): only consecutive steps go out
    rec.end_step(10)
    with rec.section("forward"):
        clock.ns += 3_000_000
    rec.end_step(11)
    first, busy = rec.busy_steps()
    assert first == 10 and len(busy) == 2 and busy[1] == pytest.approx(0.003)
