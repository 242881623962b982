"""One scenario end to end: the workload and the trace of a config, run through every policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from salamander_operator.simulator.engine import simulate
from salamander_operator.simulator.model import ClusterConfig, JobSpec, generate_jobs
from salamander_operator.simulator.policies import Policy, standard_policies
from salamander_operator.simulator.report import PolicySummary, summarize
from salamander_operator.simulator.results import PolicyRun
from salamander_operator.simulator.trace import FailureTrace, generate_trace


@dataclass(frozen=True)
class ScenarioRun:
    """The config, its seeded jobs and trace, and one run per policy (the baseline first)."""

    config: ClusterConfig
    jobs: tuple[JobSpec, ...]
    trace: FailureTrace
    runs: tuple[PolicyRun, ...]

    def summaries(self) -> list[PolicySummary]:
        return summarize(self.runs)


def prepare(config: ClusterConfig) -> tuple[tuple[JobSpec, ...], FailureTrace]:
    """The seeded jobs and failure trace of ``config``; raises :class:`SimulationError` for a
    workload that cannot be built."""
    return generate_jobs(config), generate_trace(config)


def run_scenario(config: ClusterConfig, policies: Sequence[Policy] | None = None,
                 progress: Callable[[Policy, float], None] | None = None,
                 prepared: tuple[tuple[JobSpec, ...], FailureTrace] | None = None) -> ScenarioRun:
    """Every policy (default: :func:`standard_policies`) over the same jobs and trace (those of
    ``config``, or ``prepared``). ``progress(policy, fraction)`` is told how far each run is in
    simulated time."""
    chosen = tuple(policies) if policies is not None else standard_policies(config.step_s)
    jobs, trace = prepared if prepared is not None else prepare(config)
    runs = []
    for policy in chosen:
        report = (lambda fraction, p=policy: progress(p, fraction)) if progress is not None else None
        runs.append(simulate(config, jobs, trace, policy, progress=report))
    return ScenarioRun(config, jobs, trace, tuple(runs))
