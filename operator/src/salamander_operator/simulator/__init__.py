"""A discrete-event simulator of a large GPU cluster: Salamander's behaviour at scale, argued
before anyone owns 10,000 GPUs (see docs/simulator.md).

A seeded workload (:mod:`.model`) and failure trace (:mod:`.trace`, from published rates and
mixes) are run through each recovery policy (:mod:`.policies`) by the event loop
(:mod:`.engine`) into :mod:`.results`; :mod:`.report` turns the runs into goodput, WAF,
tables, plots and JSON; :mod:`.scenario` does it all for one config.
Pure Python and numpy: no cluster, no GPU.
"""

from __future__ import annotations

from salamander_operator.simulator.engine import simulate
from salamander_operator.simulator.model import ClusterConfig, JobSpec, SimulationError, generate_jobs
from salamander_operator.simulator.policies import (Allocation, Policy, Tier, elastic_per_job, restart_baseline,
                                                    salamander_full, salamander_no_planner, standard_policies)
from salamander_operator.simulator.report import PolicySummary, headline, summarize
from salamander_operator.simulator.results import GPU_CAUSES, LOST_CAUSES, JobResult, PolicyRun
from salamander_operator.simulator.scenario import ScenarioRun, prepare, run_scenario
from salamander_operator.simulator.trace import (DEFAULT_MIX, FailureEvent, FailureKind, FailureTrace,
                                                 generate_trace)

__all__ = [
    "DEFAULT_MIX", "GPU_CAUSES", "LOST_CAUSES", "Allocation", "ClusterConfig", "FailureEvent", "FailureKind",
    "FailureTrace", "JobResult", "JobSpec", "Policy", "PolicyRun", "PolicySummary", "ScenarioRun", "SimulationError",
    "Tier", "elastic_per_job", "generate_jobs", "generate_trace", "headline", "prepare", "restart_baseline",
    "run_scenario", "salamander_full", "salamander_no_planner", "simulate", "standard_policies", "summarize",
]
