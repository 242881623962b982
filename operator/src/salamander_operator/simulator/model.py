"""The simulated cluster and its workload: a :class:`ClusterConfig` and the jobs it runs.

A worker is one node of ``gpus_per_node`` GPUs. A job asks for ``nodes`` workers (its size, the
most it uses) and runs with any count in ``[min_nodes, nodes]`` (elastic policies) or exactly
``nodes`` (the rigid baseline). Its throughput is ``T(x) = node_flops * x ** exponent``.

Every job lives for a fixed window ``[arrive_s, depart_s)`` of simulated time, the same under
every policy: the policies differ in how much of that window trains, not in which jobs exist.
So the cluster's demand over time is identical for all policies, and their WAF is directly
comparable.

The job mix (an assumption, shaped like published cluster traces, where most jobs are small and
most GPU time goes to a few large ones): 75% small jobs of 1-8 nodes, 17% medium of 9-31, 8%
large of 32-256, sizes log-uniform within a class and capped at a quarter of the cluster;
``min_nodes = ceil(nodes / 2)``; weights 1, 2 or 3 with equal odds; scaling exponents uniform
in [0.85, 1.0]. Windows: durations log-normal (sigma 1) times one scale factor; starts uniform
in ``[-duration, days)`` so that jobs are already running at time 0 (a cluster in steady state);
windows clipped to ``[0, days)``. The scale factor is chosen so that the demand (the sum of the
sizes of the jobs alive) averages exactly ``load`` of the cluster's nodes over the run. Demand
still moves a lot around that mean (large jobs come and go): with the defaults it is above the
cluster's size about a third of the time.

Invariants: every job has ``1 <= min_nodes <= nodes <= max(1, cluster nodes // 4)`` and
``0 <= arrive_s < depart_s <= horizon_s``; the same config (seed included) gives the same jobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from salamander_operator.planner import ThroughputCurve

DAY_S = 86_400.0
HOUR_S = 3_600.0


class SimulationError(ValueError):
    """A configuration, workload or trace the simulator cannot run; the message names what is wrong."""


@dataclass(frozen=True)
class SizeClass:
    """``share`` of the jobs have a size log-uniform in ``[low, high]`` nodes."""

    share: float
    low: int
    high: int


#: The job-size mix (assumption; see the module docstring).
DEFAULT_SIZE_MIX: tuple[SizeClass, ...] = (SizeClass(0.75, 1, 8), SizeClass(0.17, 9, 31), SizeClass(0.08, 32, 256))

#: Effective training throughput of one GPU, FLOP/s (assumption: ~40% MFU of an H100's
#: 989 TFLOP/s dense BF16). Only ratios are reported, so its value scales the WAF's unit only.
GPU_FLOPS = 400e12


@dataclass(frozen=True)
class ClusterConfig:
    """One simulated cluster and its workload. Defaults: 1,024 nodes x 8 GPUs (8,192 GPUs) for
    28 days. ``jobs`` is how many jobs live during the run; None derives it from ``load`` and
    ``days`` (windows of a few days: 2-3 days median with the defaults). ``failure_rate_scale`` multiplies the published
    failure rate (0: no failures). ``repair_median_h`` and ``repair_sigma`` give the log-normal
    time a replaced (SEV1) node is out of service."""

    nodes: int = 1024
    gpus_per_node: int = 8
    days: float = 28.0
    seed: int = 0
    failure_rate_scale: float = 1.0
    jobs: int | None = None
    load: float = 0.9
    step_s: float = 6.0
    gpu_flops: float = GPU_FLOPS
    repair_median_h: float = 4.0
    repair_sigma: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SimulationError(f"{f.name} must be a finite number, got {value!r}")
        positive = {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "days": self.days,
                    "load": self.load, "step_s": self.step_s, "gpu_flops": self.gpu_flops,
                    "repair_median_h": self.repair_median_h}
        for name, value in positive.items():
            if value <= 0:
                raise SimulationError(f"{name} must be above 0, got {value!r}")
        for name in ("nodes", "gpus_per_node", "seed"):
            if not isinstance(getattr(self, name), int):
                raise SimulationError(f"{name} must be a whole number, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise SimulationError(f"seed must be >= 0, got {self.seed}")
        if self.failure_rate_scale < 0:
            raise SimulationError(f"failure_rate_scale must be >= 0, got {self.failure_rate_scale!r}")
        if self.repair_sigma < 0:
            raise SimulationError(f"repair_sigma must be >= 0, got {self.repair_sigma!r}")
        if self.load > 4:
            raise SimulationError(f"load must be at most 4 (demand of 4x the cluster), got {self.load!r}")
        if self.jobs is not None and (not isinstance(self.jobs, int) or self.jobs < 1):
            raise SimulationError(f"jobs must be a whole number >= 1, got {self.jobs!r}")

    @property
    def horizon_s(self) -> float:
        return self.days * DAY_S

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def node_flops(self) -> float:
        return self.gpus_per_node * self.gpu_flops

    @property
    def max_job_nodes(self) -> int:
        return max(1, self.nodes // 4)


@dataclass(frozen=True)
class JobSpec:
    """One job: ``key``, its size ``nodes`` (the most it uses) and ``min_nodes`` (the fewest it
    trains with), its planner ``weight``, throughput ``T(x) = node_flops * x ** exponent``, and
    its window ``[arrive_s, depart_s)``."""

    key: str
    nodes: int
    min_nodes: int
    weight: float
    exponent: float
    node_flops: float
    arrive_s: float
    depart_s: float

    def __post_init__(self) -> None:
        if not 1 <= self.min_nodes <= self.nodes:
            raise SimulationError(f"job {self.key}: need 1 <= min_nodes <= nodes, got {self.min_nodes}, {self.nodes}")
        if not 0 <= self.arrive_s < self.depart_s:
            raise SimulationError(f"job {self.key}: need 0 <= arrive_s < depart_s, "
                                  f"got {self.arrive_s}, {self.depart_s}")
        if not (self.weight > 0 and 0 < self.exponent <= 1):
            raise SimulationError(f"job {self.key}: need weight > 0 and exponent in (0, 1]")

    def throughput(self, x: int) -> float:
        """``T(x)`` in FLOP/s; 0 for no nodes."""
        return self.node_flops * x ** self.exponent if x > 0 else 0.0

    def curve(self) -> ThroughputCurve:
        """The same curve for the planner."""
        return ThroughputCurve(per_worker=self.node_flops, exponent=self.exponent)

    @property
    def alive_s(self) -> float:
        return self.depart_s - self.arrive_s


def _draw_size(rng: np.random.Generator, mix: tuple[SizeClass, ...], cap: int) -> int:
    u = rng.random()
    for size_class in mix:
        if u < size_class.share:
            break
        u -= size_class.share
    low, high = math.log(size_class.low), math.log(size_class.high + 1)
    return min(cap, int(math.exp(rng.uniform(low, high))))


def _realized_demand(sizes: np.ndarray, durations: np.ndarray, quantiles: np.ndarray, horizon_s: float) -> float:
    """The time-averaged sum of sizes of the jobs alive, with starts ``-d + q * (H + d)``
    (uniform in ``[-d, H)`` for uniform ``q``) and windows clipped to ``[0, H)``."""
    start = -durations + quantiles * (horizon_s + durations)
    alive = np.clip(start + durations, 0.0, horizon_s) - np.clip(start, 0.0, horizon_s)
    return float(np.sum(sizes * alive)) / horizon_s


def _window_scale(sizes: np.ndarray, raw: np.ndarray, quantiles: np.ndarray, horizon_s: float, target: float) -> float:
    """The factor ``c`` for which durations ``c * raw`` make the realized mean demand ``target``.
    Every job's clipped window grows with ``c``, so the demand does: bisection on logs."""
    lo, hi = 1e-6, 1e12
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _realized_demand(sizes, mid * raw, quantiles, horizon_s) < target else (lo, mid)
    return math.sqrt(lo * hi)


MEDIAN_WINDOW_DAYS = 4.0  # the derived job count (None) is load x nodes / size x (1 + days / this)
DURATION_SIGMA = 1.0  # of the log-normal job durations (assumption)


def generate_jobs(config: ClusterConfig, mix: tuple[SizeClass, ...] = DEFAULT_SIZE_MIX) -> tuple[JobSpec, ...]:
    """The seeded workload of ``config`` (see the module docstring). Raises :class:`SimulationError`
    when ``config.jobs`` is too few to reach ``config.load`` of the cluster."""
    if abs(sum(c.share for c in mix) - 1.0) > 1e-9:
        raise SimulationError("the shares of the job-size mix must add up to 1")
    rng = np.random.default_rng([config.seed, 0x10B5])
    cap = config.max_job_nodes
    target = config.load * config.nodes
    if config.jobs is None:
        wanted = target * (1.0 + config.days / MEDIAN_WINDOW_DAYS)
        sizes_list: list[int] = []
        while sum(sizes_list) < wanted:
            sizes_list.append(_draw_size(rng, mix, cap))
    else:
        sizes_list = [_draw_size(rng, mix, cap) for _ in range(config.jobs)]
    sizes = np.array(sizes_list, dtype=np.float64)
    if sizes.sum() <= target * 1.05:
        raise SimulationError(f"jobs: {len(sizes_list)} jobs ({int(sizes.sum())} nodes in all) are too few to keep "
                              f"load {config.load:g} of {config.nodes} nodes busy; ask for more jobs")
    raw = rng.lognormal(0.0, DURATION_SIGMA, len(sizes))
    quantiles = rng.random(len(sizes))
    horizon = config.horizon_s
    duration = _window_scale(sizes, raw, quantiles, horizon, target) * raw
    start = -duration + quantiles * (horizon + duration)
    weights = rng.integers(1, 4, len(sizes))
    exponents = rng.uniform(0.85, 1.0, len(sizes))
    width = len(str(len(sizes)))
    jobs = []
    for i, size in enumerate(sizes_list):
        arrive, depart = max(0.0, float(start[i])), min(horizon, float(start[i] + duration[i]))
        if depart - arrive < 1.0:  # a window of under a second: nothing to simulate
            continue
        jobs.append(JobSpec(key=f"job-{i:0{width}d}", nodes=size, min_nodes=math.ceil(size / 2),
                            weight=float(weights[i]), exponent=float(exponents[i]), node_flops=config.node_flops,
                            arrive_s=arrive, depart_s=depart))
    return tuple(jobs)
