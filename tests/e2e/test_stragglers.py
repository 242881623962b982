"""Issue 7 end to end on the local runtime: one of three GPT workers turns slow (a sleep on every
step of rank 2); the operator's detector finds it from the ranks' busy times sent with the
heartbeats, names it in status and events, evicts its worker to another "node" (quarantining
the slow one), and the job finishes."""

from __future__ import annotations

import pytest

from salamander.api import Phase, Reason, parse_manifest
from tests.e2e.test_local_run import gpt_manifest, local_run

pytestmark = pytest.mark.e2e

SLOW_AT = 20


def test_a_slow_rank_is_detected_and_its_worker_evicted(tmp_path) -> None:
    manifest = gpt_manifest("slow", steps=320, replicas=(2, 3), budget=3)
    manifest["spec"].update({
        "stragglers": {"action": "Evict", "persistSteps": 16, "evaluateSteps": 30},
        "faults": [{"kind": "SlowRank", "atStep": SLOW_AT, "rank": 2, "seconds": 0.08}],
    })
    run, out = local_run(parse_manifest(manifest), tmp_path)
    events: list = []
    original = run.view.event
    run.view.event = lambda e: (events.append(e), original(e))  # type: ignore[method-assign]
    statuses = []
    step = run.step

    def recording_step():
        plan = step()
        statuses.append(plan.status)
        return plan
    run.step = recording_step  # type: ignore[method-assign]
    outcome = run.run(timeout_s=600)
    log = out.getvalue()
    assert outcome.status.phase is Phase.SUCCEEDED, log[-5000:]
    detected = [e for e in events if e.reason == Reason.STRAGGLER_DETECTED]
    evicted = [e for e in events if e.reason == Reason.STRAGGLER_EVICTED]
    assert detected and "rank 2" in detected[0].message, log[-5000:]
    assert evicted and "worker 2" in evicted[0].message and "127.0.0.12" in evicted[0].message, log[-5000:]
    listed = [r for s in statuses for r in s.stragglers]
    assert listed and {r.rank for r in listed} == {2} and listed[0].cause in ("compute", "node"), listed
    # found within 50 steps of the slowdown's start plus the measurement window (32 steps)
    at = next(s.step for s in statuses if s.stragglers)
    assert at <= SLOW_AT + 32 + 50, at
    # Not charged to the restart budget: neither the eviction nor the survivors' processes that
    # break while the group re-forms without the evicted worker (a planned disruption).
    assert outcome.status.restarts == 0, log[-5000:]
