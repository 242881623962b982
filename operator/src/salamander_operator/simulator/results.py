"""What a run gives back: each job's time by cause, the cluster's GPU-seconds by cause, and the
cluster's WAF over time. Plain data; :mod:`.engine` fills it, :mod:`.report` reads it.

Invariants (the engine's, checked by the tests): a job's ``productive_s`` and ``lost_s`` add up to
its ``alive_s``; a run's ``gpu_s`` add up to the cluster's GPU-seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from salamander_operator.simulator.model import ClusterConfig
from salamander_operator.simulator.policies import Policy

#: Why a job's time was lost (checkpoint: blocked on saves while running; suspended: by the planner).
LOST_CAUSES = ("detection", "queueing", "recovery", "resize", "recompute", "checkpoint", "suspended")
#: How the cluster's GPU-seconds split: held nodes by what their job does, then free and down nodes.
GPU_CAUSES = ("productive", "detection", "queueing", "recovery", "resize", "recompute", "checkpoint", "idle", "down")


@dataclass
class JobResult:
    """What one job got: seconds alive, productive and lost by cause (they add up), the WAF it
    earned (``weight * T(x)`` integrated over productive seconds, FLOP) and its incidents."""

    key: str
    nodes: int
    min_nodes: int
    weight: float
    alive_s: float
    productive_s: float
    lost_s: dict[str, float]
    waf_flop: float
    failures: int
    restarts: int
    resizes: int

    @property
    def goodput(self) -> float:
        return self.productive_s / self.alive_s if self.alive_s > 0 else 0.0


@dataclass
class PolicyRun:
    """One policy's run: the jobs' results, the cluster's GPU-seconds by cause, the cluster WAF
    rate over time (piecewise constant: ``rate_times``/``rates``, less the recompute
    ``impulse_times``/``impulses``), the counts of what happened, and the checks' outcome."""

    policy: Policy
    config: ClusterConfig
    jobs: list[JobResult]
    gpu_s: dict[str, float]
    rate_times: np.ndarray
    rates: np.ndarray
    impulse_times: np.ndarray
    impulses: np.ndarray
    counts: dict[str, int]
    overcommitted_events: int
    wall_s: float

    @property
    def waf_flop(self) -> float:
        return sum(j.waf_flop for j in self.jobs)

    def cumulative_waf(self, times: np.ndarray) -> np.ndarray:
        """The WAF integral (FLOP) from 0 to each of ``times``."""
        t, r = self.rate_times, self.rates
        segments = np.concatenate(([0.0], np.cumsum(r[:-1] * np.diff(t))))  # integral up to t[i]
        i = np.clip(np.searchsorted(t, times, side="right") - 1, 0, None)
        area = np.where(times >= t[0], segments[i] + r[i] * (times - t[i]), 0.0)
        k = np.searchsorted(self.impulse_times, times, side="right")
        return area + np.concatenate(([0.0], np.cumsum(self.impulses)))[k]
