"""A job's in-band health between reconcile passes: agent failure reports and hangs, decided at
once (the agent waits for the verdict) and queued as incidents for the next reconcile pass.

Thread safe: the control plane calls :meth:`JobHealth.on_report` from its event loop, the
liveness scan calls :meth:`JobHealth.check_hang`, and the reconcile loop calls :meth:`sync`
and :meth:`drain`, possibly from other threads (the local runtime).

Hang invariant: a hang is judged only while the watch is *armed*, that is after the job's step
has changed at least once since the watch was (re)set, so start-up, rendezvous and checkpoint
loading after a restart are never mistaken for a hang.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from salamander.api import TrainingJobSpec, TrainingJobStatus
from salamander.controlplane import AgentIdentity
from salamander.controlplane.v1 import controlplane_pb2 as pb
from salamander_operator.desired import JobRef
from salamander_operator.failures import classify_exception, classify_exit, classify_hang, hang_threshold
from salamander_operator.incidents import Incident
from salamander_operator.policy import Decision, FailureEvidence, RestartHistory, decide, history_of

Clock = Callable[[], datetime.datetime]


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
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def observe(self, step: int, step_time_s: float, now: float, age_s: float | None = None) -> None:
        """``age_s``: how long ago the step was reported, when known (else: now)."""
        if step != self.step:
            self.armed = self.step is not None
            self.step = step
            self.since = now - min(max(age_s or 0.0, 0.0), 60.0)  # a skewed clock cannot fake a hang
            if step_time_s > 0:
                self.step_times.append(step_time_s)

    def reset(self, now: float) -> None:
        """After a restart: wait for new progress before judging again."""
        self.armed, self.since = False, now


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
        operator restart; or restarts the reconcile itself charged for failed pods)."""
        with self._lock:
            self.spec = spec
            if status.restarts >= self._history.restarts:
                self._history = history_of(status.restarts, status.restart_times)
            if status.restart_times and (self._recovering_since is None
                                         or status.restart_times[-1] > self._recovering_since):
                self._recovering_since = status.restart_times[-1]

    def drain(self) -> list[Incident]:
        """The incidents since the last drain, oldest first; each is handed out once."""
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

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
        with self._lock:
            now = self._clock()
            decision = self._decide(evidence, now)
            if occurred is not None and occurred > now:
                occurred = now  # the agent's clock runs ahead: no negative latencies
            self._pending.append(Incident(classification, decision, now, worker=index, pod=identity.pod,
                                          node=identity.node, occurred_at=occurred))
        return decision

    def check_hang(self, steps: Iterable[tuple[int, float, float]], monotonic_now: float) -> Incident | None:
        """Feed the agents' latest (step, step time, wall-clock time of the step or 0); an
        incident when the job has hung. The job's step is the highest any agent reports (they
        read the same record at slightly different times, so taking each in turn would look like
        movement); it is timed from when it was reported, where known."""
        spec = self.spec
        reported = list(steps)
        with self._lock:
            if reported:
                step = max(s for s, _, _ in reported)
                step_time_s = max((t for s, t, _ in reported if s == step), default=0.0)
                step_at = max((a for s, _, a in reported if s == step), default=0.0)
                self.watch.observe(step, step_time_s, monotonic_now, time.time() - step_at if step_at > 0 else None)
            if not (spec.failure_policy.hang.enabled and self.watch.armed):
                return None
            hang = spec.failure_policy.hang
            threshold = hang_threshold(list(self.watch.step_times), hang.factor, hang.floor_seconds)
            silent_s = monotonic_now - self.watch.since
            classification = classify_hang(silent_s, threshold)
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
        hang = self.spec.failure_policy.hang
        with self._lock:
            if not (hang.enabled and self.watch.armed):
                return None
            threshold = hang_threshold(list(self.watch.step_times), hang.factor, hang.floor_seconds)
            return max(0.0, self.watch.since + threshold - monotonic_now)

    def _decide(self, evidence: FailureEvidence, now: datetime.datetime) -> Decision:
        """Under the lock: decide, then account for it."""
        spec = self.spec
        # Coalesce only while the recovery is still under way: no step since the restart.
        recovering = self._recovering_since if not self.watch.armed else None
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
