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
