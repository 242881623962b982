"""Goodput: the share of a job's wall time that moved its training forward, and where the rest went.

Pure. :func:`account` is called on every reconcile pass with the newest progress record and
the job's newest failure, and returns the updated ledger that lives in ``status.goodput`` (so
it survives an operator restart). Wall time runs from the first pass that saw the job (its
submission, to within a pass) to now, or to completion.

Each stretch between two progress records, ``[a, b]`` on the reporting rank's clock, is
assigned once, to exactly one bucket per second:

* the part of a failure's window inside it: ``[occurred, detected]`` is *detection*,
  ``[detected, recovered]`` *recovery* (recovered is the first step after the restart), and
  the part before ``occurred`` is *recompute* (that work was lost with the process);
* of the rest, the training's own blocked time on checkpoints and snapshots (the record's
  ``blocked_s``) is *checkpointing*;
* of the rest, the share of steps below the job's high-water step is *recompute* (redone
  after a restore); the share of new steps is *productive*, except that a stretch whose time
  per new step exceeds :data:`STRAGGLE_FACTOR` times the job's baseline step time gives the
  excess to *straggling*;
* a stretch with no step at all (a record that only changed its restore fields) is *other*.

Before the first record is *startup* (scheduling, image pulls, rendezvous, restore); what no
record covered yet (since the newest record, or after a failure that never recovered) is
*other*. So ``productive + sum(lost) == wall`` always, and ``0 <= ratio <= 1``.

Approximations: only the newest failure's window is known (several failures inside one
stretch count as one), and straggling is judged on the job's step time against its own
baseline, not per rank.
"""

from __future__ import annotations

import datetime

from salamander.api import FailureRecord
from salamander.api.models import GoodputRecord
from salamander.metrics import LOST_CAUSES
from salamander.wire import Progress

REFRESH_S = 30.0  # a ledger without news is brought up to date this often
STRAGGLE_FACTOR = 1.5  # a stretch this much slower per step than the baseline is straggling
BASELINE_ALPHA = 0.2     # how fast the baseline follows normal stretches
BASELINE_ALPHA_SLOW = 0.02  # ... and slow ones (so a lasting change of speed becomes the norm)


def _overlap(a: float, b: float, lo: float, hi: float) -> float:
    return max(0.0, min(b, hi) - max(a, lo))


def account(ledger: GoodputRecord | None, progress: Progress | None, failure: FailureRecord | None,
            now: datetime.datetime, *, final: bool = False) -> GoodputRecord:
    """The ledger brought up to ``now`` with ``progress`` (None: nothing reported yet).

    Without a new record the ledger is returned unchanged until it is :data:`REFRESH_S` old
    (or ``final``, the job's last pass), so a quiet job's status is not rewritten every pass.
    """
    if ledger is None:
        ledger = GoodputRecord(since=now, updated_at=now, lost_seconds=dict.fromkeys(LOST_CAUSES, 0.0))
    news = progress is not None and _is_news(ledger, progress)
    if not (news or final or (now - ledger.updated_at).total_seconds() >= REFRESH_S):
        return ledger
    lost = {cause: ledger.lost_seconds.get(cause, 0.0) for cause in LOST_CAUSES}
    update: dict[str, object] = {"updated_at": now}
    if news:
        assert progress is not None
        b = progress.time
        if ledger.accounted_until is None:
            lost["startup"] += max(0.0, b - ledger.since.timestamp())
            update.update(high_water=progress.step)
        else:
            update.update(_stretch(ledger, progress, failure, lost))
        update.update(accounted_until=b, last_step=progress.step, restart_count=progress.restart_count,
                      blocked_seconds=progress.blocked_s,
                      high_water=max(int(update.get("high_water", ledger.high_water)), progress.step))
    productive = float(update.get("productive_seconds", ledger.productive_seconds))  # type: ignore[arg-type]
    wall = max(0.0, (now - ledger.since).total_seconds())
    named = sum(v for c, v in lost.items() if c != "other")
    lost["other"] = max(0.0, wall - productive - named)
    wall = max(wall, productive + named)  # clocks of reporter and operator may disagree a little
    return ledger.model_copy(update={
        **update, "lost_seconds": {c: round(v, 3) for c, v in lost.items()},
        "productive_seconds": round(productive, 3), "wall_seconds": round(wall, 3),
        "ratio": round(productive / wall, 4) if wall > 0 else 0.0})


def _is_news(ledger: GoodputRecord, progress: Progress) -> bool:
    if ledger.accounted_until is None:
        return True
    return progress.time > ledger.accounted_until and (
        progress.step != ledger.last_step or progress.restart_count != ledger.restart_count)


def _stretch(ledger: GoodputRecord, progress: Progress, failure: FailureRecord | None,
             lost: dict[str, float]) -> dict[str, object]:
    """Assign ``[accounted_until, progress.time]``; updates ``lost`` in place, returns the
    ledger fields that change."""
    a = float(ledger.accounted_until)  # type: ignore[arg-type]
    b = progress.time
    rest = b - a
    update: dict[str, object] = {}
    if failure is not None and failure.detected_at.timestamp() <= b and (
            ledger.failure_seen is None or failure.detected_at > ledger.failure_seen):
        detected = failure.detected_at.timestamp()
        occurred = min(detected, (failure.occurred_at or failure.detected_at).timestamp())
        recovered = failure.recovered_at.timestamp() if failure.recovered_at is not None else b
        windows = {"recompute": _overlap(a, b, a, occurred), "detection": _overlap(a, b, occurred, detected),
                   "recovery": _overlap(a, b, detected, recovered)}
        for cause, seconds in windows.items():
            lost[cause] += seconds
        rest -= sum(windows.values())
        update["failure_seen"] = failure.detected_at
    restarted = progress.restart_count != ledger.restart_count or progress.step < ledger.last_step
    base = (progress.restore_step or 0) if restarted else ledger.last_step
    steps = max(0, progress.step - base)
    new = max(0, progress.step - max(base, ledger.high_water))
    rest = max(0.0, rest)
    if steps == 0:
        return update  # no step: the remainder ("other") covers it
    blocked = progress.blocked_s - ledger.blocked_seconds if not restarted else progress.blocked_s
    blocked = min(rest, max(0.0, blocked))
    lost["checkpointing"] += blocked
    work = rest - blocked
    productive = work * new / steps
    lost["recompute"] += work - productive
    if new:
        per_step = productive / new
        baseline = ledger.step_seconds
        if baseline is not None and per_step > STRAGGLE_FACTOR * baseline:
            lost["straggling"] += productive - new * baseline
            productive = new * baseline
            update["step_seconds"] = baseline + BASELINE_ALPHA_SLOW * (per_step - baseline)
        else:
            update["step_seconds"] = per_step if baseline is None else baseline + BASELINE_ALPHA * (per_step - baseline)
    update["productive_seconds"] = ledger.productive_seconds + productive
    return update
