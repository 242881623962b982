"""Straggler verdicts applied by reconcile: status lists them, an eviction replaces the worker
and quarantines its node without charging a restart, an undo lifts the quarantine."""

from __future__ import annotations

import datetime

from salamander.api import Reason
from salamander.api.models import StragglerRecord
from salamander_operator.reconcile import reconcile
from salamander_operator.straggler_watch import Eviction, StragglerVerdict
from tests.unit.test_reconcile import JOB, T0, T1, ready, running_status, spec

RECORD = StragglerRecord(rank=1, worker=1, node="gpu-7", slowdown=0.31, score=9.5, cause="compute", since=T0)


def test_a_new_straggler_is_listed_and_announced_once() -> None:
    verdict = StragglerVerdict(records=(RECORD,))
    first = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running_status(), None, T1, straggling=verdict)
    assert first.status.stragglers == [RECORD]
    assert [e.reason for e in first.events] == [Reason.STRAGGLER_DETECTED]
    assert "rank 1 on node gpu-7 is 31% slower" in first.events[0].message
    assert first.delete == () and first.status.restarts == 0
    again = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], first.status, None, T1, straggling=verdict)
    assert again.events == () and again.status.stragglers == [RECORD]
    gone = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], again.status, None, T1, straggling=StragglerVerdict())
    assert gone.status.stragglers == []


def test_an_eviction_replaces_the_worker_and_quarantines_its_node_uncharged() -> None:
    until = T1 + datetime.timedelta(hours=1)
    verdict = StragglerVerdict(records=(RECORD,), evictions=(Eviction(1, "gpu-7", until, "rank 1 straggling"),))
    plan = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running_status(), None, T1, straggling=verdict)
    assert plan.delete == (1,)
    assert plan.status.restarts == 0  # not a failure: the budget is untouched
    assert [(q.node, q.until) for q in plan.status.quarantined_nodes] == [("gpu-7", until)]
    assert Reason.STRAGGLER_EVICTED in [e.reason for e in plan.events]
    # the eviction of a worker that is not running does nothing
    idle = reconcile(JOB, spec(2, 2), [ready(0)], running_status(), None, T1,
                     straggling=StragglerVerdict(evictions=(Eviction(1, "gpu-7", until, "x"),)))
    assert 1 not in idle.delete and idle.status.quarantined_nodes == []


def test_an_undo_lifts_the_quarantine() -> None:
    until = T1 + datetime.timedelta(hours=1)
    evicted = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], running_status(), None, T1,
                        straggling=StragglerVerdict(evictions=(Eviction(1, "gpu-7", until, "slow"),))).status
    undone = reconcile(JOB, spec(2, 2), [ready(0), ready(1)], evicted, None, T1,
                       straggling=StragglerVerdict(releases=(("gpu-7", "no faster after the eviction"),)))
    assert undone.status.quarantined_nodes == []
    assert [e.reason for e in undone.events] == [Reason.STRAGGLER_EVICTION_UNDONE]
