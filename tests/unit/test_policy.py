"""The failure policy: rules, defaults by severity, the storm guard, the budget, backoff, coalescing."""

from __future__ import annotations

import datetime
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander.api import FailureAction, FailurePolicy, FailureRule, Reason
from salamander_operator.failures import (classify_exception, classify_exit, classify_hang, classify_pod,
                                          classify_worker)
from salamander_operator.policy import (COALESCE_S, FailureEvidence, RestartHistory, chosen_action, decide,
                                        rule_matches)
from tests.unit._support import FAST

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
DEFAULT = FailurePolicy()


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def crash(**kw) -> FailureEvidence:
    return FailureEvidence(classify_exit(0, signal.SIGKILL), pod_alive=True, signal_number=signal.SIGKILL, **kw)


def oom_exception() -> FailureEvidence:
    return FailureEvidence(classify_exception("OutOfMemoryError", "CUDA out of memory"), pod_alive=True,
                           exception_type="torch.OutOfMemoryError", log_tail=("step 7", "Tried to allocate 2 GiB"))


def test_an_empty_policy_heals_each_severity_with_its_cheapest_action() -> None:
    assert decide(DEFAULT, 100, crash(), RestartHistory(), T0).action is FailureAction.RESTART_PROCESSES
    transient = FailureEvidence(classify_exception("RuntimeError", "Connection reset by peer"), pod_alive=True)
    assert decide(DEFAULT, 100, transient, RestartHistory(), T0).action is FailureAction.RETRY_IN_PLACE
    lost = FailureEvidence(classify_worker("AgentLost", None, "no heartbeat"), pod_alive=False)
    assert decide(DEFAULT, 100, lost, RestartHistory(), T0).action is FailureAction.REPLACE_NODE


def test_a_gone_pod_is_replaced_not_restarted_in_place() -> None:
    oom_pod = FailureEvidence(classify_pod("OOMKilled", 137), pod_alive=False, exit_code=137)
    action, why = chosen_action(DEFAULT, oom_pod)
    assert action is FailureAction.REPLACE_POD and "the pod is gone" in why
    evicted = FailureEvidence(classify_pod("Evicted", None), pod_alive=False)
    assert chosen_action(DEFAULT, evicted)[0] is FailureAction.REPLACE_NODE


@pytest.mark.parametrize("rule, matches", [
    (FailureRule(kinds=["OutOfMemory"], action=FailureAction.FAIL_JOB), True),
    (FailureRule(kinds=["Hang"], action=FailureAction.FAIL_JOB), False),
    (FailureRule(exception_types=["OutOfMemoryError"], action=FailureAction.FAIL_JOB), True),  # short name
    (FailureRule(exception_types=["torch.OutOfMemoryError"], action=FailureAction.FAIL_JOB), True),
    (FailureRule(exception_types=["ValueError"], action=FailureAction.FAIL_JOB), False),
    (FailureRule(log_pattern=r"allocate \d+ GiB", action=FailureAction.FAIL_JOB), True),
    (FailureRule(log_pattern=r"NCCL", action=FailureAction.FAIL_JOB), False),
    (FailureRule(kinds=["OutOfMemory"], exit_codes=[1], action=FailureAction.FAIL_JOB), False),  # all must hold
    (FailureRule(action=FailureAction.FAIL_JOB), True),  # no criteria: matches anything
])
def test_rule_criteria_all_have_to_hold(rule: FailureRule, matches: bool) -> None:
    assert rule_matches(rule, oom_exception()) is matches


def test_signals_match_with_or_without_the_sig_prefix() -> None:
    assert rule_matches(FailureRule(signals=["SIGKILL"], action=FailureAction.REPLACE_POD), crash())
    assert rule_matches(FailureRule(signals=["KILL"], action=FailureAction.REPLACE_POD), crash())
    assert not rule_matches(FailureRule(signals=["SIGSEGV"], action=FailureAction.REPLACE_POD), crash())


def test_the_first_matching_rule_decides_and_says_so() -> None:
    policy = FailurePolicy(rules=[FailureRule(kinds=["Hang"], action=FailureAction.REPLACE_NODE),
                                  FailureRule(kinds=["OutOfMemory"], action=FailureAction.FAIL_JOB),
                                  FailureRule(action=FailureAction.RETRY_IN_PLACE)])
    decision = decide(policy, 100, oom_exception(), RestartHistory(), T0)
    assert decision.action is FailureAction.FAIL_JOB and decision.fail_reason == Reason.FAILED_BY_POLICY
    assert decision.why == "failurePolicy rule 2" and not decision.charged


def test_the_storm_guard_fails_the_job_once_the_window_is_full() -> None:
    policy = FailurePolicy(max_restarts_per_window=3, window_seconds=600)
    history = RestartHistory(3, (at(0), at(100), at(200)))
    decision = decide(policy, 100, crash(), history, at(300))
    assert decision.action is FailureAction.FAIL_JOB and decision.fail_reason == Reason.RESTART_STORM
    assert "3 restarts in the last 600 s" in decision.why
    # Old restarts fall out of the window.
    assert decide(policy, 100, crash(), history, at(650)).action is FailureAction.RESTART_PROCESSES


def test_retry_in_place_is_not_refused_by_the_budget_but_is_by_the_storm_guard() -> None:
    transient = FailureEvidence(classify_exception("E", "Connection refused"), pod_alive=True)
    spent = RestartHistory(5, ())
    assert decide(DEFAULT, 5, transient, spent, T0).action is FailureAction.RETRY_IN_PLACE
    assert decide(DEFAULT, 5, crash(), spent, T0).fail_reason == Reason.RESTART_BUDGET_EXHAUSTED
    storm = RestartHistory(10, tuple(at(n) for n in range(10)))
    assert decide(DEFAULT, 100, transient, storm, at(20)).fail_reason == Reason.RESTART_STORM


def test_backoff_doubles_per_restart_in_the_window_and_is_capped() -> None:
    policy = FailurePolicy(backoff_seconds=5, max_backoff_seconds=12)
    delays = [decide(policy, 100, crash(), RestartHistory(n, tuple(at(i) for i in range(n))), at(30)).delay_s
              for n in range(4)]
    assert delays == [5.0, 10.0, 12.0, 12.0]


def test_failures_right_after_a_restart_are_part_of_it_and_not_charged() -> None:
    collateral = FailureEvidence(classify_exception("RuntimeError", "Connection closed by peer"), pod_alive=True)
    decision = decide(DEFAULT, 100, collateral, RestartHistory(1, (T0,)), at(2), recovering_since=T0)
    assert decision.restarts_processes and not decision.charged and "already under way" in decision.why
    later = decide(DEFAULT, 100, collateral, RestartHistory(1, (T0,)), at(COALESCE_S + 1), recovering_since=T0)
    assert later.charged


def test_history_keeps_only_the_window() -> None:
    history = RestartHistory(2, (at(0), at(10))).charged(at(700), window_s=600)
    assert history.restarts == 3 and history.times == (at(700),)


@given(restarts=st.integers(0, 50), budget=st.integers(0, 50), window=st.integers(1, 100),
       per_window=st.integers(0, 20), hang_s=st.floats(0, 1e6, allow_nan=False))
@FAST
def test_a_decision_is_always_coherent(restarts: int, budget: int, window: int, per_window: int,
                                       hang_s: float) -> None:
    policy = FailurePolicy(max_restarts_per_window=per_window, window_seconds=window)
    c = classify_hang(hang_s + 11, 10.0)
    assert c is not None
    history = RestartHistory(restarts, tuple(at(-i) for i in range(min(restarts, 30))))
    decision = decide(policy, budget, FailureEvidence(c, pod_alive=True), history, T0)
    assert (decision.action is FailureAction.FAIL_JOB) == (decision.fail_reason is not None)
    assert not (decision.charged and decision.action is FailureAction.FAIL_JOB)
    assert decision.delay_s >= 0
