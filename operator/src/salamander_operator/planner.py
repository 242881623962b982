"""The cluster planner: how many workers each job gets from the healthy capacity (Unicron's plan).

Pure and fast: the operator calls :func:`plan` on every capacity change (a node failed, was
quarantined or repaired; a job was submitted or finished), and the simulator calls it in the
same places.

The objective is Unicron's weighted achieved throughput (WAF) over a planning horizon ``H``,
minus what transitions cost. A job ``j`` given ``x`` workers earns

    value_j(x) = weight_j * T_j(x) * (H - transition_j * [x != current_j])

where ``T_j`` is its throughput curve (:class:`ThroughputCurve`) and ``transition_j`` the seconds
of no progress a resize costs it (restart, re-rendezvous, restore). ``x`` is 0 (the job is
suspended, earning nothing) or in ``[min_j, max_j]``; nothing in between.

Priorities are strict: the jobs of a higher priority are planned first, over the whole
capacity, and take the least capacity that reaches their best value; the next priority plans
over what is left. Within one priority the plan maximises the sum of values exactly, by a
knapsack dynamic program over (jobs x capacity), as Unicron does.

Invariants of every plan (property-tested):
- each job gets 0 or a count in ``[min, max]``;
- the counts sum to at most the capacity;
- within a priority, no other assignment has a greater total value (brute force on small cases);
- on a tie a job keeps its current count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Relative tolerance when comparing plan values (ties keep the current allocation).
VALUE_RTOL = 1e-9
DEFAULT_HORIZON_S = 3600.0


class PlanError(ValueError):
    """A demand or capacity the planner cannot work with; the message names what is wrong."""


@dataclass(frozen=True)
class ThroughputCurve:
    """Achieved throughput as a function of worker count.

    ``points`` are measured ``(workers, throughput)`` pairs (workers >= 1, throughput >= 0,
    finite). Between two measured counts the curve is linear; outside them it follows the
    power law ``T(x) = T(s) * (x / s) ** exponent`` from the nearest measured count ``s``.
    With nothing measured, ``T(x) = per_worker * x ** exponent``. ``exponent`` in ``(0, 1]``:
    1 is perfect scaling, less is diminishing returns. ``T(0) = 0``.
    """

    points: tuple[tuple[int, float], ...] = ()
    per_worker: float = 1.0
    exponent: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 < self.exponent <= 1.0):
            raise PlanError(f"throughput exponent must be in (0, 1], got {self.exponent!r}")
        if not (math.isfinite(self.per_worker) and self.per_worker >= 0):
            raise PlanError(f"per-worker throughput must be finite and >= 0, got {self.per_worker!r}")
        for workers, value in self.points:
            if workers < 1 or not (math.isfinite(value) and value >= 0):
                raise PlanError(f"a measured throughput point must have workers >= 1 and a finite "
                                f"throughput >= 0, got ({workers!r}, {value!r})")
        if len({w for w, _ in self.points}) != len(self.points):
            raise PlanError("measured throughput points must have distinct worker counts")
        object.__setattr__(self, "points", tuple(sorted(self.points)))

    def at(self, workers: int) -> float:
        return float(self.table(np.array([workers]))[0])

    def table(self, workers: np.ndarray) -> np.ndarray:
        """``T`` at each count in ``workers`` (an int array), vectorised."""
        x = workers.astype(np.float64)
        if not self.points:
            out = self.per_worker * np.power(x, self.exponent)
        else:
            xs = np.array([w for w, _ in self.points], dtype=np.float64)
            ys = np.array([v for _, v in self.points], dtype=np.float64)
            out = np.interp(x, xs, ys)
            low, high = x < xs[0], x > xs[-1]
            out[low] = ys[0] * np.power(x[low] / xs[0], self.exponent)
            out[high] = ys[-1] * np.power(x[high] / xs[-1], self.exponent)
        out[x <= 0] = 0.0
        return out


@dataclass(frozen=True)
class JobDemand:
    """What the planner knows of one job. ``key`` names it (``namespace/name``); ``current``
    is the worker count it runs with now (0: new, suspended or down). ``transition_s`` is the
    seconds of no progress any change of its count costs it."""

    key: str
    min_workers: int
    max_workers: int
    current: int = 0
    weight: float = 1.0
    priority: int = 0
    throughput: ThroughputCurve = field(default_factory=ThroughputCurve)
    transition_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise PlanError(f"job {self.key}: need 1 <= min <= max workers, got min {self.min_workers}, "
                            f"max {self.max_workers}")
        if self.current < 0:
            raise PlanError(f"job {self.key}: current workers must be >= 0, got {self.current}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise PlanError(f"job {self.key}: weight must be finite and > 0, got {self.weight!r}")
        if not (math.isfinite(self.transition_s) and self.transition_s >= 0):
            raise PlanError(f"job {self.key}: transition seconds must be finite and >= 0, got {self.transition_s!r}")

    def choices(self, capacity: int) -> np.ndarray:
        """The counts it may get with ``capacity``: 0, then ``min..min(max, capacity)``."""
        top = min(self.max_workers, capacity)
        return np.concatenate(([0], np.arange(self.min_workers, top + 1))).astype(np.int64)

    def values(self, counts: np.ndarray, horizon_s: float) -> np.ndarray:
        """``value(x)`` for each count (see the module docstring)."""
        earning = horizon_s - self.transition_s * (counts != self.current)
        return self.weight * self.throughput.table(counts) * np.maximum(earning, 0.0)


@dataclass(frozen=True)
class ClusterPlan:
    """Worker counts by job key, the plan's total value and its weighted achieved throughput
    (``sum weight * T(x)``, the WAF the cluster earns once transitions are over)."""

    workers: dict[str, int]
    capacity: int
    value: float
    waf: float

    @property
    def used(self) -> int:
        return sum(self.workers.values())

    def changes(self, demands: Iterable[JobDemand]) -> dict[str, tuple[int, int]]:
        """``key -> (current, planned)`` for every job whose count the plan changes."""
        return {d.key: (d.current, self.workers[d.key]) for d in demands if self.workers[d.key] != d.current}


def plan(demands: Sequence[JobDemand], capacity: int, horizon_s: float = DEFAULT_HORIZON_S) -> ClusterPlan:
    """The best worker count for every job in ``demands`` with ``capacity`` workers' worth of
    healthy nodes. Deterministic: the same input gives the same plan."""
    if capacity < 0:
        raise PlanError(f"capacity must be >= 0, got {capacity}")
    if not (math.isfinite(horizon_s) and horizon_s > 0):
        raise PlanError(f"the planning horizon must be finite and > 0 seconds, got {horizon_s!r}")
    keys = [d.key for d in demands]
    if len(set(keys)) != len(keys):
        raise PlanError(f"job keys must be unique, got {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    workers: dict[str, int] = {}
    left = capacity
    value = 0.0
    for priority in sorted({d.priority for d in demands}, reverse=True):
        tier = sorted((d for d in demands if d.priority == priority), key=lambda d: d.key)
        counts, tier_value = _knapsack(tier, left, horizon_s)
        workers.update(counts)
        left -= sum(counts.values())
        value += tier_value
    waf = sum(d.weight * d.throughput.at(workers[d.key]) for d in demands)
    return ClusterPlan(workers={k: workers[k] for k in keys}, capacity=capacity, value=value, waf=waf)


def _knapsack(jobs: Sequence[JobDemand], capacity: int, horizon_s: float) -> tuple[dict[str, int], float]:
    """Exact: the counts maximising the summed value within ``capacity``, using the least
    capacity that reaches that value (so that lower priorities get the rest).

    Forward: ``best_j[c]`` is the best value of the first ``j`` jobs with at most ``c`` workers;
    ``best_j[c] = max over the job's choices x <= c of best_{j-1}[c - x] + value(x)``, one
    vectorised maximum per choice. Backward: from the chosen capacity, each job takes a choice
    that reaches ``best_j[c]`` (within :data:`VALUE_RTOL`), its current count when that is one
    of them (ties keep it), else the largest. Cost: sum over jobs of (choices x capacity)
    element operations, in numpy, and ``(jobs + 1) x (capacity + 1)`` floats of memory."""
    size = capacity + 1
    tables = [np.zeros(size)]
    options: list[tuple[np.ndarray, np.ndarray]] = []
    for job in jobs:
        counts = job.choices(capacity)
        values = job.values(counts, horizon_s)
        best, new = tables[-1], np.full(size, -1.0)  # below any value: values are >= 0
        for x, v in zip(counts.tolist(), values.tolist()):
            np.maximum(new[x:], best[: size - x] + v, out=new[x:])
        tables.append(new)
        options.append((counts, values))
    top = float(tables[-1][-1])
    # the least capacity reaching the best value, within the tolerance
    c = int(np.argmax(tables[-1] >= top - VALUE_RTOL * max(top, 1.0)))
    counts_by_key: dict[str, int] = {}
    for j in range(len(jobs) - 1, -1, -1):
        job, (counts, values) = jobs[j], options[j]
        fits = counts <= c
        reached = tables[j][c - counts[fits]] + values[fits]
        target = tables[j + 1][c]
        hits = counts[fits][reached >= target - VALUE_RTOL * max(target, 1.0)]
        x = job.current if job.current in hits else int(hits.max())
        counts_by_key[job.key] = x
        c -= x
    return counts_by_key, top
