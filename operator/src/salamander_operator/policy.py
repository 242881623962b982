"""The failure policy: a classified failure and the job's history in, the healing decision out.

Pure. Every channel (agent reports, hangs, pods, nodes, lost agents) ends here, so one set of
rules governs them all:

1. The job's ``failurePolicy.rules`` are tried in order; the first whose criteria all match
   decides the action. Otherwise the severity does: SEV1 replaces the node, SEV2 restarts the
   processes, SEV3 retries in place.
2. A pod that is already gone cannot have its processes restarted: its worker is replaced
   (``ReplacePod``; still ``ReplaceNode`` for SEV1, which also quarantines the node).
3. Failures during a restart the job is already doing (within :data:`COALESCE_S` of deciding
   it, and before training made a step since) are part of that recovery (the other ranks'
   broken collectives, for one): they are healed by it and not charged again. The time limit
   keeps a job that fails at every start from looping uncharged.
4. Every other restart is charged: it counts toward ``restartBudget`` for the job's life, and
   toward ``maxRestartsPerWindow`` in the last ``windowSeconds``. One over the window is a
   restart storm and fails the job with reason ``RestartStorm``; one over the budget fails it
   with ``RestartBudgetExhausted``. ``RetryInPlace`` is counted but never refused by the
   lifetime budget, only by the storm guard, so a transient fault that keeps coming back still
   ends the job.
5. The n-th charged restart (other than ``RetryInPlace``) in the window waits ``backoffSeconds * 2**(n-1)``, at most
   ``maxBackoffSeconds``.
"""

from __future__ import annotations

import datetime
import re
import signal
from dataclasses import dataclass

from salamander.api import FailureAction, FailurePolicy, FailureRule, Reason
from salamander_operator.failures import DEFAULT_ACTION, Classification, Severity

#: Failures this close after a restart decision are healed by that restart.
COALESCE_S = 10.0

_RESTARTS = (FailureAction.RETRY_IN_PLACE, FailureAction.RESTART_PROCESSES)


@dataclass(frozen=True)
class FailureEvidence:
    """Everything known about one failure, whichever channel saw it. ``pod_alive`` is whether its
    pod (and agent) still runs, so the processes can be restarted in place."""

    classification: Classification
    pod_alive: bool
    exit_code: int | None = None
    signal_number: int = 0
    exception_type: str = ""
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """What to do. ``charged``: counts as a restart. ``fail_reason`` is set exactly when
    ``action`` is ``FailJob``."""

    action: FailureAction
    charged: bool
    delay_s: float = 0.0
    why: str = ""
    fail_reason: str | None = None

    @property
    def restarts_processes(self) -> bool:
        return self.action in _RESTARTS


@dataclass(frozen=True)
class RestartHistory:
    """The job's restarts so far: the lifetime count and the times of recent ones."""

    restarts: int = 0
    times: tuple[datetime.datetime, ...] = ()

    def recent(self, window_s: float, now: datetime.datetime) -> list[datetime.datetime]:
        return [t for t in self.times if (now - t).total_seconds() < window_s]

    def charged(self, now: datetime.datetime, window_s: float) -> RestartHistory:
        """The history after one more charged restart at ``now``; times outside the window go."""
        return RestartHistory(self.restarts + 1, (*self.recent(window_s, now), now))


def _signal_names(number: int) -> set[str]:
    try:
        name = signal.Signals(number).name
    except ValueError:
        return set()
    return {name, name.removeprefix("SIG")}


def rule_matches(rule: FailureRule, evidence: FailureEvidence) -> bool:
    """All of the rule's given criteria hold for ``evidence`` (an empty criterion holds)."""
    c = evidence.classification
    if rule.kinds and c.kind not in rule.kinds:
        return False
    if rule.exit_codes and evidence.exit_code not in rule.exit_codes:
        return False
    if rule.signals and not ({s.upper() for s in rule.signals} & _signal_names(evidence.signal_number)):
        return False
    if rule.exception_types:
        full = evidence.exception_type
        short = full.rpartition(".")[2]
        if not full or not any(t in (full, short) for t in rule.exception_types):
            return False
    if rule.log_pattern is not None:
        pattern = re.compile(rule.log_pattern)
        if not any(pattern.search(line) for line in (*evidence.log_tail, c.evidence)):
            return False
    return True


def chosen_action(policy: FailurePolicy, evidence: FailureEvidence) -> tuple[FailureAction, str]:
    """The action rule 1 and 2 give, and why."""
    c = evidence.classification
    for n, rule in enumerate(policy.rules):
        if rule_matches(rule, evidence):
            action, why = rule.action, f"failurePolicy rule {n + 1}"
            break
    else:
        action, why = DEFAULT_ACTION[c.severity], f"default for {c.severity.name}"
    if not evidence.pod_alive and action in _RESTARTS:
        action = FailureAction.REPLACE_NODE if c.severity is Severity.SEV1 else FailureAction.REPLACE_POD
        why += "; the pod is gone, so it is replaced"
    return action, why


def decide(policy: FailurePolicy, restart_budget: int, evidence: FailureEvidence, history: RestartHistory,
           now: datetime.datetime, recovering_since: datetime.datetime | None = None) -> Decision:
    """The decision for one failure. ``recovering_since`` is when the job last decided a restart
    of its processes (rule 3), if that restart has not made a step yet."""
    action, why = chosen_action(policy, evidence)
    if action is FailureAction.FAIL_JOB:
        return Decision(action, charged=False, why=why, fail_reason=Reason.FAILED_BY_POLICY)
    if (action in _RESTARTS and recovering_since is not None
            and 0 <= (now - recovering_since).total_seconds() < COALESCE_S):
        return Decision(action, charged=False, why=f"{why}; part of the recovery already under way")
    recent = history.recent(policy.window_seconds, now)
    if len(recent) >= policy.max_restarts_per_window:
        return Decision(FailureAction.FAIL_JOB, charged=False, fail_reason=Reason.RESTART_STORM,
                        why=(f"restart storm: {len(recent)} restarts in the last {policy.window_seconds} s, "
                             f"at most {policy.max_restarts_per_window} allowed"))
    if action is not FailureAction.RETRY_IN_PLACE and history.restarts + 1 > restart_budget:
        return Decision(FailureAction.FAIL_JOB, charged=False, fail_reason=Reason.RESTART_BUDGET_EXHAUSTED,
                        why=f"the restart budget of {restart_budget} is spent")
    delay = 0.0
    if action is not FailureAction.RETRY_IN_PLACE and policy.backoff_seconds > 0:
        delay = min(policy.max_backoff_seconds, policy.backoff_seconds * 2 ** len(recent))
    return Decision(action, charged=True, delay_s=delay, why=why)
