"""The failure trace: when which node fails, how badly, and how long a lost node stays out.

**Rate (published).** Meta's Llama 3 report (Dubey et al., 2024): 419 unexpected interruptions
in 54 days of pre-training on 16,384 H100 GPUs, 78% of them attributed to hardware. That is
4.74e-4 per GPU-day, one per 264 node-days for nodes of 8 GPUs: :data:`FAILURES_PER_GPU_DAY`.
MegaScale (Jiang et al., NSDI'24) reports the same order: over 100 restarts in a run of several
weeks on 12,288 GPUs. A node's rate scales with its GPU count (most failures are GPU-side).

**Mix.** Unicron (He et al., arXiv 2401.00134) sorts failures by the cheapest action that heals
them, as :mod:`salamander_operator.failures` does:

- SEV1, replace the node: lost connection, ECC errors, NVLink errors, GPU driver errors;
- SEV2, restart the processes: abnormal exit, illegal memory access, CUDA errors, hangs;
- SEV3, retry in place: link flapping, connection refused or reset.

Unicron reports that 73% of the errors it saw were transient (cured by a restart), so 27% need
a new node: that share is published. How the transient 73% splits into crashes (45%), hangs
(15%) and SEV3 link errors (13%) is **our assumption** (:data:`DEFAULT_MIX`).

**Repair (assumption).** A SEV1 node is out of service for a log-normal time, median
``repair_median_h`` hours (4 by default), sigma ``repair_sigma`` (1: a quarter of repairs take
under 2 hours, one in ten over 14), the time to drain, diagnose and swap or reboot it.

**Generation.** Failures form one Poisson process per node; their superposition is generated at
once: the count is Poisson with mean ``rate * nodes * days``, times uniform in the run, nodes
uniform, kinds drawn from the mix, a repair time drawn for every SEV1. Invariants: times sorted,
in ``[0, horizon)``; nodes in ``[0, nodes)``; ``repair_s > 0`` exactly for SEV1; the same config
(seed included) gives the same trace, whatever the policy. A failure that strikes a node that is
down at the time is ignored by the engine (a node under repair cannot fail again).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from salamander_operator.failures import Severity
from salamander_operator.simulator.model import DAY_S, HOUR_S, ClusterConfig, SimulationError

#: Llama 3: 419 interruptions / (54 days x 16,384 GPUs).
FAILURES_PER_GPU_DAY = 419 / (54 * 16_384)


class FailureKind(StrEnum):
    """What failed, by the action that heals it."""

    NODE = "node"    # SEV1: lost node, ECC, NVLink, GPU driver: replace the node
    CRASH = "crash"  # SEV2: abnormal exit, illegal memory access, CUDA error: restart the processes
    HANG = "hang"    # SEV2: a collective that never returns: restart the processes
    LINK = "link"    # SEV3: link flapping, connection refused or reset: retry in place

    @property
    def severity(self) -> Severity:
        return _SEVERITY[self]


_SEVERITY = {FailureKind.NODE: Severity.SEV1, FailureKind.CRASH: Severity.SEV2,
             FailureKind.HANG: Severity.SEV2, FailureKind.LINK: Severity.SEV3}
KINDS: tuple[FailureKind, ...] = tuple(FailureKind)

#: Shares of each kind: SEV1 27% (published: 1 - Unicron's 73% transient); the rest our assumption.
DEFAULT_MIX: Mapping[FailureKind, float] = {FailureKind.NODE: 0.27, FailureKind.CRASH: 0.45,
                                            FailureKind.HANG: 0.15, FailureKind.LINK: 0.13}


@dataclass(frozen=True)
class FailureEvent:
    """``node`` fails at ``time_s`` with ``kind``; a SEV1 node is out for ``repair_s``."""

    time_s: float
    node: int
    kind: FailureKind
    repair_s: float


@dataclass(frozen=True)
class FailureTrace:
    """A seeded failure trace, as parallel arrays sorted by time (``kinds`` index :data:`KINDS`)."""

    times: np.ndarray
    nodes: np.ndarray
    kinds: np.ndarray
    repair_s: np.ndarray
    nodes_total: int
    horizon_s: float
    rate_per_node_s: float

    def __len__(self) -> int:
        return len(self.times)

    def __iter__(self) -> Iterator[FailureEvent]:
        for t, n, k, r in zip(self.times.tolist(), self.nodes.tolist(), self.kinds.tolist(), self.repair_s.tolist()):
            yield FailureEvent(t, n, KINDS[k], r)

    def counts(self) -> dict[FailureKind, int]:
        """How many failures of each kind."""
        found = np.bincount(self.kinds, minlength=len(KINDS))
        return {kind: int(found[i]) for i, kind in enumerate(KINDS)}

    @property
    def expected(self) -> float:
        """The mean count of the process that drew it: rate x nodes x time."""
        return self.rate_per_node_s * self.nodes_total * self.horizon_s

    @classmethod
    def of(cls, events: list[FailureEvent], nodes_total: int, horizon_s: float) -> FailureTrace:
        """A hand-written trace (tests, what-ifs); checked and sorted."""
        for e in events:
            if not (0 <= e.node < nodes_total and 0 <= e.time_s < horizon_s):
                raise SimulationError(f"failure {e} is outside nodes [0, {nodes_total}) or time [0, {horizon_s:g})")
            if (e.kind is FailureKind.NODE) != (e.repair_s > 0):
                raise SimulationError(f"failure {e}: a repair time is needed for node failures, and only for them")
        ordered = sorted(events, key=lambda e: (e.time_s, e.node))
        return cls(times=np.array([e.time_s for e in ordered], dtype=np.float64),
                   nodes=np.array([e.node for e in ordered], dtype=np.int64),
                   kinds=np.array([KINDS.index(e.kind) for e in ordered], dtype=np.int64),
                   repair_s=np.array([e.repair_s for e in ordered], dtype=np.float64),
                   nodes_total=nodes_total, horizon_s=horizon_s, rate_per_node_s=0.0)


def failure_rate_per_node_s(config: ClusterConfig) -> float:
    """Failures per node-second of ``config``: the published rate, scaled."""
    return FAILURES_PER_GPU_DAY * config.gpus_per_node * config.failure_rate_scale / DAY_S


def generate_trace(config: ClusterConfig, mix: Mapping[FailureKind, float] = DEFAULT_MIX) -> FailureTrace:
    """The seeded trace of ``config`` (see the module docstring)."""
    shares = np.array([float(mix.get(kind, 0.0)) for kind in KINDS])
    if np.any(shares < 0) or abs(shares.sum() - 1.0) > 1e-9:
        raise SimulationError(f"failure mix shares must be >= 0 and add up to 1, got {dict(mix)}")
    rng = np.random.default_rng([config.seed, 0xFA11])
    rate = failure_rate_per_node_s(config)
    horizon = config.horizon_s
    count = int(rng.poisson(rate * config.nodes * horizon))
    times = np.sort(rng.uniform(0.0, horizon, count))
    nodes = rng.integers(0, config.nodes, count)
    kinds = rng.choice(len(KINDS), size=count, p=shares)
    repairs = rng.lognormal(np.log(config.repair_median_h * HOUR_S), config.repair_sigma, count)
    repairs = np.where(kinds == KINDS.index(FailureKind.NODE), np.maximum(repairs, 1.0), 0.0)
    return FailureTrace(times=times, nodes=nodes.astype(np.int64), kinds=kinds.astype(np.int64), repair_s=repairs,
                        nodes_total=config.nodes, horizon_s=horizon, rate_per_node_s=rate)
