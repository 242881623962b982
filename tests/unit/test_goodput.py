"""The goodput ledger: every second of wall time lands in exactly one bucket."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander.api import FailureRecord
from salamander.metrics import LOST_CAUSES
from salamander.wire import Progress
from salamander_operator import goodput
from tests.unit._support import FAST

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
E0 = T0.timestamp()


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def rec(step: int, t: float, *, restart: int = 0, blocked: float = 0.0, restored: int | None = None) -> Progress:
    return Progress(step=step, samples=step, world_size=2, time=E0 + t, restart_count=restart, blocked_s=blocked,
                    restore_tier=None if restored is None else "memory", restore_step=restored)


def run(records: list[Progress], now: float, failure: FailureRecord | None = None):
    ledger = goodput.account(None, None, None, at(0))
    for r in records:
        ledger = goodput.account(ledger, r, failure, at(r.time - E0 + 0.1))
    return goodput.account(ledger, None, failure, at(now), final=True)


def test_a_steady_run_is_productive_after_startup() -> None:
    ledger = run([rec(s, 10 + s) for s in range(0, 21)], now=30)
    assert ledger.lost_seconds["startup"] == pytest.approx(10)
    assert ledger.productive_seconds == pytest.approx(20)
    assert ledger.wall_seconds == pytest.approx(30)
    assert ledger.ratio == pytest.approx(20 / 30, abs=1e-3)
    assert ledger.step_seconds == pytest.approx(1.0)


def test_blocked_time_is_checkpointing() -> None:
    records = [rec(0, 0), rec(10, 10), rec(20, 22, blocked=2.0), rec(30, 32, blocked=2.0)]
    ledger = run(records, now=32)
    assert ledger.lost_seconds["checkpointing"] == pytest.approx(2.0)
    assert ledger.productive_seconds == pytest.approx(30)


def test_a_failure_splits_into_recompute_detection_recovery_and_redone_steps() -> None:
    # steps 0..10 at 1 s each; crash at t=10.5 (step 10 reached at t=10), detected at t=12,
    # restored to step 5 and the first new step (6) at t=20; then steps to 12 at 1 s each.
    failure = FailureRecord(kind="ProcessCrash", severity="SEV2", source="Agent", worker=0, pod="p", action="x",
                            occurred_at=at(10.5), detected_at=at(12), recovered_at=at(20))
    records = [rec(s, s) for s in range(0, 11)] + [rec(6, 20, restart=1, restored=5)] + \
              [rec(s, 20 + s - 6, restart=1, restored=5) for s in range(7, 13)]
    ledger = run(records, now=26, failure=failure)
    lost = ledger.lost_seconds
    assert lost["detection"] == pytest.approx(1.5)
    assert lost["recovery"] == pytest.approx(8.0)
    # the half step lost in the crash, and steps 7..10 redone (step 6 is the recovery's end)
    assert lost["recompute"] == pytest.approx(0.5 + 4.0)
    assert ledger.productive_seconds == pytest.approx(10 + 2)  # steps 1..10, then 11 and 12
    assert ledger.wall_seconds == pytest.approx(26)
    assert ledger.failure_seen == failure.detected_at


def test_a_slow_stretch_is_straggling_beyond_the_baseline() -> None:
    records = [rec(s, s) for s in range(0, 11)] + [rec(12, 14)]  # two steps in 4 s: 2 s per step
    ledger = run(records, now=14)
    assert ledger.lost_seconds["straggling"] == pytest.approx(2.0)
    assert ledger.productive_seconds == pytest.approx(12.0)


def test_no_news_keeps_the_ledger_until_it_is_stale() -> None:
    ledger = run([rec(0, 0), rec(5, 5)], now=5.1)
    same = goodput.account(ledger, rec(5, 5), None, at(5.1 + goodput.REFRESH_S / 2))
    assert same is ledger
    later = goodput.account(ledger, rec(5, 5), None, at(5.1 + goodput.REFRESH_S))
    assert later.lost_seconds["other"] > ledger.lost_seconds["other"]
    assert later.ratio < ledger.ratio


@given(st.lists(st.tuples(st.integers(0, 50), st.floats(0.0, 5.0), st.integers(0, 2), st.floats(0.0, 1.0)),
                max_size=30), st.floats(0.0, 100.0))
@FAST
def test_buckets_always_add_up_to_wall_time(stretches: list[tuple[int, float, int, float]], tail: float) -> None:
    ledger = goodput.account(None, None, None, at(0))
    t, restart, blocked = 0.0, 0, 0.0
    for step, gap, restarts, more_blocked in stretches:
        t += gap
        if restarts > restart:
            restart, blocked = restarts, 0.0
        blocked += more_blocked
        ledger = goodput.account(ledger, rec(step, t, restart=restart, blocked=blocked), None, at(t + 0.05))
    ledger = goodput.account(ledger, None, None, at(t + 0.05 + tail), final=True)
    assert set(ledger.lost_seconds) == set(LOST_CAUSES)
    assert all(v >= 0 for v in ledger.lost_seconds.values())
    assert ledger.productive_seconds + sum(ledger.lost_seconds.values()) == pytest.approx(ledger.wall_seconds,
                                                                                          abs=0.01)
    assert 0.0 <= ledger.ratio <= 1.0
