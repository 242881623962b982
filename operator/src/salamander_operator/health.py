"""A job's in-band health between reconcile passes: agent failure reports and hangs, decided at
once (the agent waits for the verdict) and queued as incidents for the next reconcile pass.

Thread safe: the control plane calls :meth:`JobHealth.on_report` from its event loop, the
liveness scan calls :meth:`JobHealth.check_hang`, and the reconcile loop calls :meth:`sync`
and :meth:`drain`, possibly from other threads (the local runtime).

Hang invariant: a hang is judged only while the watch is *armed*, that is after the job's step
has changed at least once since the watch was (re)set, so start-up, rendezvous and checkpoint
loading after a restart are never mistaken for a hang. Before that, start-up is judged on its own
clock (``hang.startupSeconds``), which runs only while agents report and none is regrouping: it
starts when the round's processes have started everywhere, never while pods wait to be scheduled
or agents wait in rendezvous.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
import dataclasses
from dataclasses import dataclass, field

from salamander.api import TrainingJobSpec, TrainingJobStatus
from salamander.api.models import HangPolicy
from salamander.controlplane import AgentIdentity
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander_operator.desired import JobRef
from salamander_operator.failures import (Classification, classify_exception, classify_exit, classify_hang,
                                          classify_startup_hang, hang_threshold)
from salamander_operator.incidents import Incident
from salamander_operator.policy import Decision, FailureEvidence, RestartHistory, decide

Clock = Callable[[], datetime.datetime]

#: Incidents reach status this long after detection, so a failure's root cause can still take
#: the charge from a symptom reported a moment before it (a peer's broken connection reported
#: before the killed process itself). Decisions reach agents at once regardless.
SETTLE_S = 1.0


@dataclass(frozen=True)
class StepBeat:
    """What the hang detector needs of one agent's newest heartbeat."""

    step: int
    step_time_s: float = 0.0
    step_at: float = 0.0  # wall-clock time of the step, 0 if unknown
    regrouping: bool = False


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def worker_index(job: JobRef, pod: str) -> int | None:
    """The worker slot of ``<job>-worker-<i>``; None for any other name."""
    prefix, _, index = pod.rpartition("-")
    return int(index) if prefix == f"{job.name}-worker" and index.isdigit() else None


@dataclass
class StepWatch:
    """The job's newest step and since when (``time.monotonic()``), with recent step times."""

    step: int | None = None
    since: float = 0.0
    armed: bool = False
    reset_at: float = float("-inf")
    started: float | None = None   # when the round's processes were first seen running, unarmed
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def observe(self, step: int, step_time_s: float, now: float, age_s: float | None = None) -> None:
        """``age_s``: how long ago the step was reported, when known (else: now). Only a higher
        step arms the watch: a lower one is a resume from a checkpoint, or a stale report
        leaving with its agent, not progress."""
        if step != self.step:
            reported_at = now - min(max(age_s or 0.0, 0.0), 60.0)  # a skewed clock cannot fake a hang
            # progress: a higher step, reported after the last restart (not a late report of
            # a step made before it)
            self.armed = self.armed or (self.step is not None and step > self.step and reported_at >= self.reset_at)
            self.step = step
            self.since = max(reported_at, self.reset_at)
            if step_time_s > 0:
                self.step_times.append(step_time_s)

    def reset(self, now: float) -> None:
        """After a restart: wait for new progress before judging again."""
        self.armed, self.since, self.reset_at, self.started = False, now, now, None

    def running(self, now: float) -> None:
        """Every reporting agent has its processes running: the start-up clock runs from now,
        unless it already does or the job has made progress."""
        if not self.armed and self.started is None:
            self.started = now


class JobHealth:
    def __init__(self, job: JobRef, spec: TrainingJobSpec, clock: Clock = utc_now) -> None:
        self.job = job
        self.spec = spec
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: list[Incident] = []
        self._history = RestartHistory()
        self._recovering_since: datetime.datetime | None = None
        self.watch = StepWatch()

    def sync(self, spec: TrainingJobSpec, status: TrainingJobStatus) -> None:
        """Adopt the newest spec, and the status's restart history when it knows more (after an
        operator restart; or restarts the reconcile itself charged for failed pods). Call it
        before each reconcile pass and again with the status the pass produced."""
        with self._lock:
            self.spec = spec
            # the status's history, plus the restarts decided here that it does not hold yet
            history = RestartHistory(status.restarts, tuple(status.restart_times))
            for incident in self._pending:
                if incident.decision.charged:
                    history = history.charged(incident.detected_at, spec.failure_policy.window_seconds)
            self._history = history
            if status.restart_times and (self._recovering_since is None
                                         or status.restart_times[-1] > self._recovering_since):
                # a restart the reconcile charged (a replaced worker): its recovery is under way
                self._recovering_since = status.restart_times[-1]
                self.watch.reset(time.monotonic())

    def planned_disruption(self) -> None:
        """The operator itself just took a worker away (a straggler's eviction): the survivors'
        processes that break while the group re-forms are part of that change, so their reports
        in the next moments are coalesced into it (not charged), and no hang is judged until
        the training steps again."""
        with self._lock:
            self._recovering_since = self._clock()
            self.watch.reset(time.monotonic())

    def drain(self, settle_s: float = SETTLE_S) -> list[Incident]:
        """The incidents detected at least ``settle_s`` ago, oldest first; each is handed out
        once. The newer ones wait for the next drain (see :data:`SETTLE_S`)."""
        with self._lock:
            cutoff = self._clock() - datetime.timedelta(seconds=settle_s)
            ready = [i for i in self._pending if i.detected_at <= cutoff]
            self._pending = [i for i in self._pending if i.detected_at > cutoff]
        return ready

    def on_report(self, identity: AgentIdentity, report: pb.FailureReport) -> Decision:
        """An agent's failure report: classify, decide, queue. The agent acts on the decision."""
        cause = report.WhichOneof("cause")
        exception_type = ""
        if cause == "exception":
            exception_type = report.exception.type
            classification = classify_exception(exception_type, report.exception.message)
            exit_code, signal_number = None, 0
        else:
            classification = classify_exit(report.exit.exit_code, report.exit.signal)
            exit_code, signal_number = report.exit.exit_code, report.exit.signal
        evidence = FailureEvidence(classification, pod_alive=True, exit_code=exit_code,
                                   signal_number=signal_number, exception_type=exception_type,
                                   log_tail=tuple(report.log_tail))
        occurred = (datetime.datetime.fromtimestamp(report.observed_unix_ns / 1e9, datetime.UTC)
                    if report.observed_unix_ns > 0 else None)
        index = worker_index(self.job, identity.pod)
        round_started = (datetime.datetime.fromtimestamp(report.round_started_unix_ns / 1e9, datetime.UTC)
                         if report.round_started_unix_ns > 0 else None)
        with self._lock:
            now = self._clock()
            decision = self._decide(evidence, now, round_started)
            if occurred is not None and occurred > now:
                occurred = now  # the agent's clock runs ahead: no negative latencies
            incident = Incident(classification, decision, now, worker=index, pod=identity.pod,
                                node=identity.node, occurred_at=occurred)
            self._pending.append(self._take_the_charge(incident))
        return decision

    def _take_the_charge(self, incident: Incident) -> Incident:
        """Under the lock. A failure more severe than the one its recovery was charged to (still
        pending) is the root cause: it takes the charge, the other becomes its symptom."""
        if incident.decision.charged or not incident.decision.restarts_processes:
            return incident
        for n, other in enumerate(self._pending):
            if (other.decision.charged and other.decision.restarts_processes
                    and incident.classification.severity < other.classification.severity):
                symptom = f"{other.decision.why}; a symptom of {incident.classification.kind}"
                self._pending[n] = dataclasses.replace(
                    other, decision=dataclasses.replace(other.decision, charged=False, why=symptom))
                root = dataclasses.replace(incident.decision, charged=True, delay_s=other.decision.delay_s,
                                           why=incident.decision.why.split("; part of")[0])
                return dataclasses.replace(incident, decision=root)
        return incident

    def check_hang(self, beats: Iterable[StepBeat], monotonic_now: float) -> Incident | None:
        """Feed the agents' latest heartbeats; an incident when the job has hung. The job's step
        is the highest any agent reports (they read the same record at slightly different times,
        so taking each in turn would look like movement), timed from when it was reported where
        known. While any agent is regrouping (restarting its processes for a new round), no step
        is due and the watch waits for the new round's progress."""
        spec = self.spec
        reported = list(beats)
        with self._lock:
            if any(b.regrouping for b in reported):
                self.watch.reset(monotonic_now)
                return None
            if reported:
                step = max(b.step for b in reported)
                step_time_s = max((b.step_time_s for b in reported if b.step == step), default=0.0)
                step_at = max((b.step_at for b in reported if b.step == step), default=0.0)
                self.watch.observe(step, step_time_s, monotonic_now, time.time() - step_at if step_at > 0 else None)
                self.watch.running(monotonic_now)
            judged = self._judged(spec.failure_policy.hang)
            if judged is None or not (reported or self.watch.armed):
                return None
            since, limit_s, classify = judged
            silent_s = monotonic_now - since
            classification = classify(silent_s, limit_s)
            if classification is None:
                return None
            now = self._clock()
            decision = self._decide(FailureEvidence(classification, pod_alive=True), now)
            incident = Incident(classification, decision, now,
                                occurred_at=now - datetime.timedelta(seconds=silent_s))
            self._pending.append(incident)
            self.watch.reset(monotonic_now)
            return incident

    def seconds_to_hang(self, monotonic_now: float) -> float | None:
        """How long until the job counts as hung if it makes no step meanwhile (None: it cannot
        hang now), so a scanner can wake exactly then instead of a scan interval late."""
        with self._lock:
            judged = self._judged(self.spec.failure_policy.hang)
            if judged is None:
                return None
            since, limit_s, _ = judged
            return max(0.0, since + limit_s - monotonic_now)

    def _judged(self, hang: HangPolicy) -> tuple[float, float, Callable[[float, float], Classification | None]] | None:
        """Under the lock: what a hang is timed from now, as (since, limit in seconds, classify):
        the newest progress and the step-time threshold once the watch is armed, the processes'
        start and ``startupSeconds`` before; None when nothing can hang now."""
        if not hang.enabled:
            return None
        if self.watch.armed:
            threshold = hang_threshold(list(self.watch.step_times), hang.factor, hang.floor_seconds)
            return self.watch.since, threshold, classify_hang
        if self.watch.started is not None and hang.startup_seconds > 0:
            return self.watch.started, hang.startup_seconds, classify_startup_hang
        return None

    def _decide(self, evidence: FailureEvidence, now: datetime.datetime,
                round_started: datetime.datetime | None = None) -> Decision:
        """Under the lock: decide, then account for it. ``round_started``: when the failed
        process's round began, if known."""
        spec = self.spec
        # Coalesce only while the recovery is still under way (no step since the restart) and
        # the failed process belongs to a round from before it.
        recovering = self._recovering_since if not self.watch.armed else None
        if recovering is not None and round_started is not None and round_started > recovering:
            recovering = None
        decision = decide(spec.failure_policy, spec.restart_budget, evidence, self._history, now, recovering)
        if decision.charged:
            self._history = self._history.charged(now, spec.failure_policy.window_seconds)
        if decision.restarts_processes:
            if decision.charged:
                self._recovering_since = now
            self.watch.reset(time.monotonic())
        return decision


VERDICT_ACTIONS = {
    "RetryInPlace": pb.RETRY_IN_PLACE, "RestartProcesses": pb.RESTART_PROCESSES, "ReplacePod": pb.REPLACE_POD,
    "ReplaceNode": pb.REPLACE_NODE, "FailJob": pb.FAIL_JOB,
}


def verdict(decision: Decision) -> pb.Verdict:
    """The decision as the agent receives it."""
    return pb.Verdict(action=VERDICT_ACTIONS[decision.action.value], delay_s=decision.delay_s,
                      reason=decision.why[:500])
