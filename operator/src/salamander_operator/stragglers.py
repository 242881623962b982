"""Straggler detection: every rank's timing in, stragglers with a cause and what to do out.

Pure: no clock, no I/O; the operator keeps a :class:`DetectorState` per job in memory and
feeds it the newest :class:`~salamander.wire.RankTiming` of every rank about once a second.

**Signal.** In a synchronous job every rank's step takes about as long (the collectives line
them up), so the step time names no one. What differs is *busy* time, ``step_s - wait_s``:
the straggler computes (or loads data) longest while the others wait for it. :func:`score`
compares every rank's busy time with the job's median: ``slowdown = busy / median - 1`` and a
robust ``z = (busy - median) / max(1.4826 * MAD, 1% of median)``. The median and the MAD hold
as long as fewer than half the ranks are slow (their breakdown point). Two ranks have no
median to speak of: the slower is compared with the faster, its ``z`` is its slowdown in units
of the 1% floor, so the slowdown threshold decides alone. One rank has nothing to compare with.

Busy time comes in two forms, scored separately, each against the same form of the other
ranks: the *mean* over the rank's last ``W = window`` (32) steps, which every worker sends, and
the *median* of its per-step busy time over its last ``n = median_window`` (16) steps
(``busy_median_s``), which newer workers send; medians are scored only when every judged rank
has one (:func:`uses_medians`), so a job with an older worker is judged from the means alone.

**Evidence and persistence.** An observation of the means is *evidence* against a rank when
its slowdown is at least ``E = EVIDENCE_FRACTION * minSlowdown`` and its ``z`` at least
``z_N`` (:func:`family_z_threshold`: ``zThreshold`` corrected for the ``N`` ranks judged); an
observation of the medians, when its slowdown is at least
``E_m = MEDIAN_EVIDENCE_FRACTION * minSlowdown`` (``minSlowdown`` itself) and its ``z`` at least
``z_N``.
Each form keeps its own unbroken run of evidence (steps counted with ``RankTiming.step``, never
by observations: one observation or a dozen within a step add no evidence), with its own
accounting of the steps that prove the slowdown lasted ``persistSteps``. A rank becomes a
straggler once either run spans its steps and the newest slowdown of that form is at least
``CONFIRM_FRACTION * minSlowdown``; a run of the medians also needs evidence from the means at
that observation (:data:`MEDIAN_NEEDS_MEANS`).

*Why the medians' evidence is stricter.* The medians are the fast path: they confirm about 20
steps sooner than the means, so a healthy rank that is a few percent slower for about 50 steps
(a stretch of contention on its core) can be confirmed by them where the means would have ridden
it out; and a 16-step median is noisier than a 32-step mean, so among ``N`` ranks the chance
that *some* healthy rank's median crosses a fixed ``z`` grows about ``N``-fold. Hence: evidence
from a median needs the full ``minSlowdown`` (a rank near the threshold is left to the means,
whose longer window averages the noise), and ``z_N`` is Bonferroni-corrected: the ``z`` whose
one-sided normal tail is that of ``zThreshold`` divided by ``N`` (3.59 for 8 ranks and 4.10 for
64 at ``zThreshold`` 3), so the chance of a false crossing in the job stays that of one rank at
``zThreshold``. The same correction applies to the means (:data:`MEANS_FAMILY_Z`): among 64
ranks on a noisy machine, healthy ranks' 32-step means cross ``z`` 3 for ``persistSteps`` too
(18 false flags in 80 replayed healthy runs at this machine's noise, none with it); its cost is
latency near the threshold, where ``z`` is small (a 10% slowdown), none for a large one.
Agreement of the means costs a real straggler nothing: a slowdown of most steps of
``X >= minSlowdown`` is evidence in the means ``r = W E / X <= W / 2`` steps after it starts,
long before the medians' run spans its ``n / 2 + persistSteps + MEDIAN_MARGIN`` steps. A slowdown
of 25% or more clears ``E_m`` and ``z_N`` with room to spare at the noise measured, so it keeps
the medians' latency; one close to ``minSlowdown`` is found by the means, at their latency.

*From the medians* (:func:`median_confirm_span`). A median of ``n`` values (the mean of the two
middle ones when ``n`` is even) is at least a level only if at least ``ceil(n / 2)`` of them
are. So evidence at step ``a`` means that at least ``ceil(n_a / 2)`` steps of its window were
above the evidence level, the earliest at or before ``a - ceil(n_a / 2) + 1``; evidence at a
later step ``b``, that the latest such step came at or after ``b - floor(n_b / 2)``. Steps
above the evidence level that form one stretch therefore number at least
``b - a - floor(n_b / 2) + ceil(n_a / 2)``: once the windows are full, exactly the span of the
evidence. Evidence spanning ``persistSteps + floor(n_b / 2) - ceil(n_a / 2)`` steps proves the
stretch lasted ``persistSteps``; the run also needs :data:`MEDIAN_MARGIN` (4) more steps, room
for healthy steps that noise lifts above the evidence level at the stretch's ends (each
counts toward the ``ceil(n / 2)``). Invariants, for healthy steps that stay below the evidence
level (``E_m``): a burst of slow steps shorter than ``persistSteps`` never makes a straggler, whatever
its size (with the margin to spare; measured with uniform +-10% noise per step, which does
cross the level, 0 of 300 bursts of 20-29 steps qualified at ``persistSteps`` 30, against 19
without the margin); a single outlying step, however long, is one value of ``n`` and never
evidence on its own; a persistent slowdown clearly above ``minSlowdown`` (so that the window's
median stays above ``E_m`` and ``z_N`` over the noise) is evidence once more than half the window
is slow, about ``n / 2`` steps after it starts whatever its size, and a
straggler ``persistSteps + MEDIAN_MARGIN`` later: ``n / 2 + persistSteps + 4`` steps after it
starts (42 at the defaults, plus up to the gap between two observations).

*From the means* (:func:`confirm_span`): a median does not move for a slowdown confined to
fewer than half the steps (a data loader that stalls every 4th batch), so the means keep
judging beside the medians, and alone for older workers. A mean lags: evidence starts ``r``
steps after a slowdown of ``X`` starts (when ``r X / W`` reaches ``E``: ``r = W E / X``) and
lasts until ``W - r`` steps after it ends. So a slowdown that lasted ``L`` steps shows evidence
over ``L + W - 2r`` steps, and evidence spanning ``persistSteps + W - 2r`` steps proves
``L >= persistSteps``: that is the span required. ``X``, hence ``r``, is estimated from how
fast the mean rose: its rise from the last observation without evidence over at least
:data:`RISE_STEPS` steps, times ``W`` (the mean rises by ``X / W`` per slow step), and never
below the run's peak; ``r`` is at most ``W / 2``. (A peak alone would not do: a short burst's
mean peaks at ``L X / W``, far below ``X``.) Consequences: a single outlying step, however
long, or a burst shorter than ``persistSteps`` never makes a straggler (exactly up to the
noise of the rise and a few steps of rounding, when ``persistSteps >= 2 * RISE_STEPS``); a
persistent slowdown is found about ``persistSteps + W - r`` steps after it starts (``W - r``:
what the window needs to rule out a burst that has already ended), and a rank slow since it
was first observed (no rise seen) once its evidence spans ``persistSteps + W - 2r`` with ``X``
its peak. Outlying steps that cluster on one rank (several within a window) raise its mean as
a sparse slowdown does, and the means cannot tell them apart.

Near the threshold: a rank exactly ``minSlowdown`` slower has a windowed slowdown below
``minSlowdown`` about half the time, hence evidence from half of it and confirmation at 3/4
of it (``z`` keeps the healthy ranks out). Whichever form proves persistence first decides:
the medians for a slowdown of most steps clearly above ``minSlowdown``, the means for a sparse
one or one near the threshold.

**The sequential test** (:func:`fold_steps`, :func:`seq_confirmed`), when every judged rank
(three or more) also sends the busy time of each of its newest steps (``RankTiming.busy_steps``,
newer workers). Windows of fixed length plus a persistence span cost ``persistSteps`` plus
half a window or more whatever the slowdown, and near ``minSlowdown`` the windows' ``z`` wavers
and restarts the runs (79 steps for 10% at half this machine's noise). A one-sided CUSUM per
rank accumulates evidence at a rate that grows with the slowdown instead. Ranks are lined up by
step number; at each step, ``r = log(busy / median of the ranks' busy)`` (the step's common load
cancels), clipped to ``+-log(1 + 5 minSlowdown)`` so one outlying step adds a bounded amount;
``S = max(0, S + r - k)`` with ``k = log(1 + minSlowdown) / 2``, so a healthy rank's ``S`` drifts
down by ``k`` a step and one ``minSlowdown`` slower gains ``k`` a step. Evidence: ``S > h`` and
the median of the rank's newest ``persistSteps`` log-ratios at least ``k``; a straggler once the
run of ``S > 0`` has lasted ``persistSteps`` steps (:func:`seq_confirmed`). ``h`` is set from
the noise (:func:`sequential_threshold`): the Brownian approximation of the CUSUM's average
run length, with the long-run variance of ``r`` (which counts the noise's autocorrelation:
healthy ranks on a busy host are several percent slow for tens of steps), split over the ranks
(Bonferroni) for a job false-alarm rate of one in :data:`SEQ_ARL_STEPS` steps. The variance is
estimated from the ranks' own ``persistSteps``-step means of ``r`` (:func:`long_run_variance`,
a mean square, not a MAD: the healthy slow stretches are its heavy tail), averaged over
:data:`SEQ_VAR_STEPS` steps (optionally without suspects, ranks whose ``S`` is above
:data:`SEQ_VAR_SUSPECT_FRACTION` of ``h``, so that a straggler does not raise the threshold it
has to cross; off by default). Invariants (for healthy steps whose log-ratio stays below ``k``):
a burst of slow steps shorter than ``persistSteps / 2`` is never evidence, whatever its size (the
median of the newest ``persistSteps`` stays below ``k``); no rank is confirmed before a run of
``S > 0`` spanning ``persistSteps`` steps (which noise may have begun before the slowdown: the
slowdown itself has then lasted at least ``persistSteps / 2`` steps); a slowdown of ``X >= minSlowdown`` on most steps is
confirmed about ``max(persistSteps, h / (log(1 + X) - k))`` steps after it starts. ``S`` is capped
at ``SEQ_CAP h``, so it drains within ``SEQ_CAP h / k`` steps after a slowdown ends. The test
adds confirmations and evidence (which keeps a straggler one, and counts toward ``node``);
causes, findings' slowdown and ``z`` (from the means), and everything after are as below. A
job with a rank that sends no per-step times is judged without it.

**Hysteresis.** By the same accounting, a straggler stops being one after it has been below
the evidence threshold for ``persistSteps`` steps: observations without evidence of either
form spanning ``persistSteps - W + r`` steps (at least :data:`MIN_WINDOW`), since its first
calm mean already holds about ``W - r`` calm steps, and, when medians are judged, at least
``persistSteps - floor(n / 2)`` (:func:`median_clear_span`), since its first calm median came
more than ``n / 2`` steps after the slowdown ended. Both bounds hold whichever form showed the
slowdown; for one both showed, the medians' adds up to ``W - r - n / 2`` steps (8 to 21 at the
defaults). Evidence is judged at half of ``minSlowdown``, so a straggler hovering around the
threshold does not flap.

**Causes**, from where the straggler's excess over the median rank lies:

* ``node``: every rank of its node (two or more) has busy-time evidence (of either form): the
  node is slow;
* ``data``: the data section holds most of the excess busy time; ``compute``: the other
  sections (forward, backward, optimizer, any others, and ``other``, the time outside any
  section) do;
* ``communication``: the rank's *step* is longer than the others' and the excess is in its own
  communication section. Limits: a slow link in a ring all-reduce slows every rank's
  communication alike, so no rank stands out and nothing here names it (the job's step time,
  in the goodput ledger, shows it); and since waiting counts as communication, a rank that
  merely computes faster has more communication but the same step, so only a longer step counts;
* ``imbalance``: no eviction fixes it. Either the slow rank moves (within the last
  :data:`IMBALANCE_SPANS` persistence spans at least :data:`IMBALANCE_RANKS` ranks on two or more
  nodes had an *episode*, a run of evidence that reached ``minSlowdown`` and lasted a window but
  ended before the rank became a straggler, and no rank is a straggler; once that has held for a
  persistence span, the ranks in a run of evidence that reached ``minSlowdown`` and has lasted
  half a window are reported), or the same rank is slow again on a new node after its old one
  was evicted: the excess follows the rank's data shard, not the node. Episodes and those runs
  are the means' (also when the job has medians: among many ranks, noise makes runs of evidence
  from 16-step medians that reach ``minSlowdown`` and last their window far more often).

The cause is read from the sections' means in both cases, and a finding reports the rank's
slowdown and ``z`` from the means (what it costs the job), also when the medians found it.

**Decision** (:func:`decide`, pure; :func:`applied` records what the operator did): every
straggler is reported. With ``action: Evict`` one node at a time is evicted, only for causes
``node``, ``compute``, or ``data`` when the data stragglers are on that one node; at most
``maxEvictionsPerHour`` within any hour; never when the job would drop below ``replicas.min``
ready workers; never while an earlier eviction is still being evaluated. :func:`observe`
evaluates each eviction: once the evicted node no longer hosts a rank, it takes the job's
median step time from full windows over ``evaluateSteps`` steps; if that is not at least
``minImprovement`` below the step time before the eviction, :func:`decide` emits
:class:`Undo` (release the node's quarantine early).

Malformed timings are rejected with :class:`~salamander.wire.WireError` before any state
changes. Ranks may be missing from an observation (their track is kept) or disappear (their
track is dropped after two persistence spans of the job's steps); a rank whose step goes back
(a restart) or that moves to another node starts over.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from salamander.api import StragglerAction, StragglerPolicy, StragglerRecord
from salamander.wire import RankTiming, WireError

#: 1.4826 x MAD estimates the standard deviation of normally distributed values.
MAD_SCALE = 1.4826
#: The robust scale is never below this fraction of the median (all ranks equal: MAD 0).
MAD_FLOOR = 0.01
#: A window counts as evidence at this fraction of ``minSlowdown`` ...
EVIDENCE_FRACTION = 0.5
#: ... and a rank is confirmed a straggler when its newest window is at this fraction of it.
CONFIRM_FRACTION = 0.75
#: Timings over fewer steps than this (a process that just started) are not judged.
MIN_WINDOW = 8
#: The rise of a rank's mean is measured over at least this many steps (see :func:`_level`).
RISE_STEPS = 16
#: Steps of evidence from windowed medians required beyond ``persistSteps`` (see
#: :func:`median_confirm_span`): room for healthy steps that noise lifts above the evidence level.
MEDIAN_MARGIN = 4
#: Evidence from the windowed medians needs a slowdown of at least this fraction of
#: ``minSlowdown`` (the means: :data:`EVIDENCE_FRACTION`).
MEDIAN_EVIDENCE_FRACTION = 1.0
#: Whether the ``z`` threshold of the medians' evidence, and of the means', is corrected for
#: the number of ranks judged (:func:`family_z_threshold`); False: ``zThreshold`` as given.
MEDIAN_FAMILY_Z = True
MEANS_FAMILY_Z = True
#: Whether a run of evidence from the medians confirms a straggler only at an observation with
#: evidence from the means too.
MEDIAN_NEEDS_MEANS = True
#: Whether the per-step sequential test (:func:`fold_steps`) judges jobs whose workers send
#: per-step busy times (``RankTiming.busy_steps``); False: the windowed forms alone, as before.
SEQUENTIAL = True
#: The sequential test needs at least this many ranks with per-step busy times at a step.
SEQ_MIN_RANKS = 3
#: Each step's log-ratio is clipped to +-log(1 + SEQ_CLIP_FRACTION * minSlowdown): one outlying
#: step (a GC pause) adds at most that much to a rank's statistic.
SEQ_CLIP_FRACTION = 5.0
#: The job's average run length between false alarms of the sequential test, in steps, split
#: over its ranks (Bonferroni): see :func:`sequential_threshold`. Chosen on healthy replays with
#: seeds other than the reported ones (docs/straggler-cusum.md). With suspects left out of the
#: variance estimate (:data:`SEQ_VAR_SUSPECT_FRACTION`), 3e6 was chosen the same way: healthy
#: slow stretches then no longer raise their own threshold.
SEQ_ARL_STEPS = 1e6
#: Steps over which the long-run variance of the ranks' log busy time is averaged (a running
#: mean over the first ones, then an exponential average).
SEQ_VAR_STEPS = 512
#: Steps of that estimate needed before the sequential test judges anyone.
SEQ_WARMUP_STEPS = 32
#: Suspects left out of the long-run variance estimate: ranks whose statistic ``S`` is above
#: this fraction of the current threshold ``h`` (:func:`long_run_variance`). None (the default):
#: every rank counts, and a straggler raises ``h`` on its way to it. Off because, measured
#: (docs/straggler-cusum.md), 0.5 with ``SEQ_ARL_STEPS`` 3e6 found 10% slowdowns sooner but
#: added healthy evictions at this machine's raw noise (4 -> 7 in 300 runs of 8 ranks).
SEQ_VAR_SUSPECT_FRACTION: float | None = None
#: With :data:`SEQ_VAR_SUSPECT_FRACTION` set, suspects are left out only once the running
#: variance estimate spans at least this many steps (of :data:`SEQ_VAR_STEPS`): while it is
#: young, a healthy rank's slow stretch left out of it would not raise its own threshold. 0
#: (the default): as soon as the test is armed. No effect while the fraction is None. Measured
#: (docs/straggler-cusum.md): 150 with 0.5 and 3e6 removed 2 of the 3 added healthy evictions,
#: but early onsets were then found later than with every rank counted, so it stays unused.
SEQ_VAR_SUSPECT_MIN_STEPS = 0
#: A rank's statistic is capped at this multiple of the threshold: after a slowdown ends it
#: drains in at most ``SEQ_CAP * h / k`` steps.
SEQ_CAP = 2.0
#: Ranks with episodes of evidence that did not persist, on two or more nodes within the last
#: IMBALANCE_SPANS persistence spans, that make an imbalance.
IMBALANCE_RANKS = 3
IMBALANCE_SPANS = 4
#: An eviction still unevaluated after this long (its node never left, the job stalled) expires.
EVALUATION_TIMEOUT_S = 3600.0
#: Eviction records kept beyond those the decision still needs (the last hour's, the ones
#: being evaluated or to be undone).
MAX_RECORDS = 32
#: Below this many seconds a median busy time means nothing to compare.
TINY_S = 1e-9

Cause = Literal["node", "compute", "data", "communication", "imbalance"]
CAUSES: tuple[str, ...] = ("node", "compute", "data", "communication", "imbalance")
#: Sections whose excess is data loading; ``communication`` is waiting; every other is compute.
DATA_SECTION = "data"
COMMUNICATION_SECTION = "communication"
Verdict = Literal["pending", "helped", "no_improvement", "expired"]
HOUR = datetime.timedelta(hours=1)


# --- scores ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankScore:
    """One rank against the job. ``slowdown`` and ``z`` compare its busy time with the median
    rank's (``slowdown = busy / median - 1``, ``z`` in robust standard deviations);
    ``step_slowdown`` and ``step_z`` do the same for its step time (nearly 0 in a synchronous
    job, except for a rank whose own communication is slow)."""

    rank: int
    busy_s: float
    slowdown: float
    z: float
    step_slowdown: float = 0.0
    step_z: float = 0.0


def _checked(timings: Mapping[int, RankTiming]) -> dict[int, RankTiming]:
    """``timings`` if every one holds :meth:`RankTiming.check` and sits under its own rank;
    raises :class:`WireError` naming the first that does not."""
    out: dict[int, RankTiming] = {}
    for rank, timing in timings.items():
        if not isinstance(timing, RankTiming):
            raise WireError(f"timing of rank {rank} is a {type(timing).__name__}, not a RankTiming")
        if rank != timing.rank:
            raise WireError(f"timing of rank {timing.rank} is filed under rank {rank}")
        out[rank] = timing.check()
    return out


def _reference(values: Sequence[float]) -> tuple[float, float]:
    """(reference, scale) of ``values`` (two or more): the median and max(1.4826 MAD, 1% of
    the median); with exactly two, the smaller and 1% of it."""
    if len(values) == 2:
        ref = min(values)
        return ref, MAD_FLOOR * ref
    ref = statistics.median(values)
    mad = statistics.median([abs(v - ref) for v in values])
    return ref, max(MAD_SCALE * mad, MAD_FLOOR * ref)


def uses_medians(timings: Iterable[RankTiming]) -> bool:
    """Whether the ranks' windowed medians of busy time can be compared: every timing (one or
    more) carries one (``RankTiming.busy_median_s``)."""
    timings = list(timings)
    return bool(timings) and all(t.busy_median_s is not None for t in timings)


def score(timings: Mapping[int, RankTiming], medians: bool = False) -> dict[int, RankScore]:
    """Every rank's :class:`RankScore` against the others in ``timings`` (rank -> newest timing):
    busy time is the windowed mean (``step_s - wait_s``), or with ``medians`` the windowed
    median (``busy_median_s``; empty unless every timing carries one); step time is the mean.

    Invariants: the result has the keys of ``timings`` or is empty (fewer than two ranks, or a
    median busy time of zero: nothing to compare); it does not depend on how ranks are
    numbered (relabelling ranks relabels the scores); a rank with the median busy time has
    slowdown 0 and z 0. Raises :class:`WireError` for a malformed timing.
    """
    checked = _checked(timings)
    if len(checked) < 2 or (medians and not uses_medians(checked.values())):
        return {}

    def busy_of(t: RankTiming) -> float:
        return t.busy_median_s if medians and t.busy_median_s is not None else t.busy_s
    busy = [busy_of(t) for t in checked.values()]
    steps = [t.step_s for t in checked.values()]
    b_ref, b_scale = _reference(busy)
    if b_ref <= TINY_S:
        return {}
    s_ref, s_scale = _reference(steps)
    out = {}
    for rank, t in checked.items():
        step_slowdown = t.step_s / s_ref - 1.0 if s_ref > TINY_S else 0.0
        step_z = (t.step_s - s_ref) / s_scale if s_scale > TINY_S else 0.0
        b = busy_of(t)
        out[rank] = RankScore(rank=rank, busy_s=b, slowdown=b / b_ref - 1.0,
                              z=(b - b_ref) / b_scale, step_slowdown=step_slowdown, step_z=step_z)
    return out


# --- state -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankTrack:
    """What the detector remembers of one rank.

    ``evidence_since`` is the step of the first observation of the rank's current unbroken run
    of evidence (None: no evidence at its newest observation); ``calm_since`` the same for a
    run without evidence. ``straggler_since`` is set exactly while the rank is a straggler;
    ``cause`` is the cause of its newest evidence, ``peak`` the highest slowdown of its newest
    run of evidence and ``level`` its estimated slowdown per step (None: not measured yet);
    ``base_step`` and ``base_slowdown`` are its newest observation without evidence.
    These follow the windowed means; ``median_since`` is the step of the first observation of
    the current unbroken run of evidence from the windowed medians (None: none at the newest
    observation), ``lead`` (set with it) ``ceil(n / 2)`` for the median window ``n`` of that
    first observation. ``last_step`` is the newest step seen. The sequential test
    (:func:`fold_steps`) keeps ``seq_s``, the rank's statistic ``S >= 0``, ``seq_since``, the
    first step of its current run with ``S > 0`` (None: ``S == 0``), and ``seq_recent``, its
    newest (at most ``persistSteps``) clipped log-ratios, oldest first.
    """

    rank: int
    node: str
    last_step: int
    slowdown: float = 0.0
    z: float = 0.0
    evidence_since: int | None = None
    calm_since: int | None = None
    cause: str | None = None
    straggler_since: datetime.datetime | None = None
    peak: float = 0.0
    level: float | None = None
    base_step: int | None = None
    base_slowdown: float = 0.0
    median_since: int | None = None
    lead: int | None = None
    seq_s: float = 0.0
    seq_since: int | None = None
    seq_recent: tuple[float, ...] = ()


@dataclass(frozen=True)
class EvictionRecord:
    """An eviction the operator carried out (:func:`applied`), and its evaluation.

    ``pre_step_s`` is the job's median step time when it was decided, ``window`` the steps
    per timing then; ``samples`` are (job step, median step time) from full windows after the
    node left; ``verdict`` is ``pending`` until they span ``evaluateSteps`` (or the record
    expires), then ``helped`` or ``no_improvement``. ``undone``: its quarantine was released.
    """

    node: str
    worker: int
    rank: int
    cause: str
    at: datetime.datetime
    step: int
    pre_step_s: float
    window: int
    samples: tuple[tuple[int, float], ...] = ()
    verdict: str = "pending"
    undone: bool = False


@dataclass(frozen=True)
class DetectorState:
    """A job's detector. Immutable: :func:`observe` and :func:`applied` return new states.
    Plain data (:meth:`encode` / :meth:`decode` round-trip it through JSON), kept in memory by
    the operator: after an operator restart detection starts over, which costs one
    persistence span.

    ``recent`` holds (job step, rank) of the episodes that ended in the last
    :data:`IMBALANCE_SPANS` persistence spans (runs of evidence that reached ``minSlowdown``
    and lasted a window, but ended before the rank became a straggler), for the imbalance rule,
    which has held since ``imbalance_since`` (job step ``imbalance_step``) when set;
    ``job_step``, ``job_step_s`` and ``job_window`` are the newest observation's highest step,
    median step time and longest window. ``seq_step`` is the newest step the sequential test
    folded in (None: none yet, or the test is off), ``seq_var`` its estimate of the long-run
    variance of a rank's log busy time per step, averaged over ``seq_var_steps`` steps.
    """

    tracks: Mapping[int, RankTrack] = field(default_factory=dict)
    recent: tuple[tuple[int, int], ...] = ()
    imbalance_since: datetime.datetime | None = None
    imbalance_step: int | None = None
    job_step: int = 0
    job_step_s: float | None = None
    job_window: int = 0
    evictions: tuple[EvictionRecord, ...] = ()
    seq_step: int | None = None
    seq_var: float | None = None
    seq_var_steps: int = 0

    def stragglers(self) -> list[int]:
        """The ranks that are stragglers now."""
        return sorted(r for r, t in self.tracks.items() if t.straggler_since is not None)

    def encode(self) -> str:
        """JSON text; :meth:`decode` reads it back equal."""
        def when(value: datetime.datetime | None) -> str | None:
            return None if value is None else value.isoformat()
        return json.dumps({
            "tracks": [{**_plain(t), "straggler_since": when(t.straggler_since)} for t in self.tracks.values()],
            "recent": [list(e) for e in self.recent],
            "imbalance_since": when(self.imbalance_since), "imbalance_step": self.imbalance_step,
            "job_step": self.job_step, "job_step_s": self.job_step_s, "job_window": self.job_window,
            "evictions": [{**_plain(e), "at": when(e.at), "samples": [list(p) for p in e.samples]}
                          for e in self.evictions],
            "seq_step": self.seq_step, "seq_var": self.seq_var, "seq_var_steps": self.seq_var_steps,
        }, sort_keys=True)

    @classmethod
    def decode(cls, raw: str) -> DetectorState:
        data = json.loads(raw)

        def when(value: str | None) -> datetime.datetime | None:
            return None if value is None else datetime.datetime.fromisoformat(value)
        tracks = {t["rank"]: RankTrack(**{**t, "straggler_since": when(t["straggler_since"]),
                                          "seq_recent": tuple(float(v) for v in t.get("seq_recent", ()))})
                  for t in data["tracks"]}
        evictions = tuple(EvictionRecord(**{**e, "at": when(e["at"]),
                                            "samples": tuple((int(s), float(v)) for s, v in e["samples"])})
                          for e in data["evictions"])
        return cls(tracks=tracks, recent=tuple((int(s), int(r)) for s, r in data["recent"]),
                   imbalance_since=when(data["imbalance_since"]), imbalance_step=data["imbalance_step"],
                   job_step=data["job_step"],
                   job_step_s=data["job_step_s"], job_window=data["job_window"], evictions=evictions,
                   seq_step=data.get("seq_step"), seq_var=data.get("seq_var"),
                   seq_var_steps=data.get("seq_var_steps", 0))


def _plain(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


@dataclass(frozen=True)
class Finding:
    """A straggler now: its rank, node ("" when unknown), newest slowdown and z, cause, and
    since when it has been one."""

    rank: int
    node: str
    slowdown: float
    z: float
    cause: str
    since: datetime.datetime


# --- observation -------------------------------------------------------------------------------

def _span(policy: StragglerPolicy, window: int) -> int:
    """Steps evidence (or its absence) must span: ``persistSteps``, and at least one window."""
    return max(policy.persist_steps, window)


def _busy_cause(t: RankTiming, median_sections: Mapping[str, float]) -> str:
    """``data`` when the data section holds most of the rank's excess busy time over the median
    rank's sections (means), ``compute`` otherwise."""
    excess = {name: t.sections.get(name, 0.0) - median_sections.get(name, 0.0)
              for name in set(t.sections) | set(median_sections) if name != COMMUNICATION_SECTION}
    data = excess.pop(DATA_SECTION, 0.0)
    compute = sum(excess.values())
    return "data" if data > compute else "compute"


def family_z_threshold(policy: StragglerPolicy, ranks: int) -> float:
    """The ``z`` a rank's window needs to be evidence among ``ranks`` judged ranks:
    ``zThreshold`` corrected for the ranks compared (Bonferroni), the ``z`` whose one-sided
    normal tail is that of ``zThreshold`` divided by ``ranks``, so that the chance that *some*
    healthy rank of the job crosses it is about the chance that one given rank crosses
    ``zThreshold``. At ``zThreshold`` 3: 3.21 for 2 ranks, 3.32 for 3, 3.59 for 8, 4.10 for 64, 4.70
    for 1024.
    Never below ``zThreshold``; ``zThreshold`` itself for one rank, or where the tail is too
    small for a float (``zThreshold`` above about 37)."""
    if ranks <= 1:
        return policy.z_threshold
    tail = 0.5 * math.erfc(policy.z_threshold / math.sqrt(2.0)) / ranks
    if not 0.0 < tail < 0.5:
        return policy.z_threshold
    return max(policy.z_threshold, -statistics.NormalDist().inv_cdf(tail))


# --- the sequential test ---------------------------------------------------------------------

@dataclass(frozen=True)
class SeqRank:
    """One rank's sequential statistic: ``s >= 0``, the first step of its current run with
    ``s > 0`` (None when ``s == 0``), and its newest clipped log-ratios (at most
    ``persistSteps``), oldest first."""

    s: float = 0.0
    since: int | None = None
    recent: tuple[float, ...] = ()


def seq_drift(policy: StragglerPolicy) -> float:
    """``k``, subtracted from every step's log-ratio: half of ``log(1 + minSlowdown)``, so a
    rank exactly ``minSlowdown`` slower gains ``k`` per step on average and a healthy one loses
    ``k``."""
    return 0.5 * math.log1p(policy.min_slowdown)


def seq_clip(policy: StragglerPolicy) -> float:
    """The bound on one step's log-ratio: ``log(1 + SEQ_CLIP_FRACTION * minSlowdown)``."""
    return math.log1p(SEQ_CLIP_FRACTION * policy.min_slowdown)


def long_run_variance(ranks: Iterable[SeqRank], steps: int, suspect_above: float = math.inf) -> float | None:
    """An estimate, from the ranks' newest ``steps`` clipped log-ratios (``SeqRank.recent``), of
    the long-run variance per step of a rank's log-ratio: ``steps`` times the mean square
    deviation of the ranks' means of those from their median, at least
    ``steps * MAD_FLOOR ** 2``. The variance of an ``L``-step mean of autocorrelated values is
    their long-run variance over ``L``, so this counts the noise's autocorrelation over up to
    ``L`` steps (healthy ranks slow for tens of steps on a busy host), which a per-step scale
    would miss. A mean square, not a MAD: healthy ranks' slow stretches are the heavy tail of
    this distribution, and a MAD would ignore exactly them (docs/straggler-cusum.md); the
    clipping bounds what one outlying step adds.

    Suspects, ranks whose statistic ``S`` is above ``suspect_above``, are left out of the
    estimate, its median included: a straggler on its way to the threshold would otherwise
    raise the threshold it has to cross (by about a quarter in a job of 8 ranks).

    Invariants: pure; the result does not depend on the order of ``ranks``; adding a rank with
    ``S > suspect_above`` changes nothing, whatever its log-ratios (with ``suspect_above``
    infinite, the default, every rank counts); at least ``steps * MAD_FLOOR ** 2``. None with
    fewer than :data:`SEQ_MIN_RANKS` ranks that are not suspects and hold ``steps`` values."""
    means = [sum(x.recent[-steps:]) / steps for x in ranks
             if steps >= 1 and len(x.recent) >= steps and not x.s > suspect_above]
    if len(means) < SEQ_MIN_RANKS:
        return None
    ref = statistics.median(means)
    return steps * max(sum((m - ref) ** 2 for m in means) / len(means), MAD_FLOOR ** 2)


def sequential_threshold(variance: float, k: float, ranks: int, arl_steps: float | None = None) -> float:
    """``h`` for a job of ``ranks`` ranks: ``variance / (2 k) * max(1, ln(ranks * arl_steps * 2 k^2 /
    variance))``.

    For a statistic ``S = max(0, S + r - k)`` over steps whose ``r`` has mean 0 and long-run
    variance ``v``, the average run length to ``S > h`` is about ``v / (2 k^2) * exp(2 k h / v)``
    (Brownian approximation); setting it to ``ranks * arl_steps`` gives ``h``: a Bonferroni
    split, so the job's ``ranks`` statistics together raise a false alarm about once in
    ``arl_steps`` steps. Invariants: positive for a positive ``variance`` and ``k``; grows with
    ``variance``, ``ranks`` and ``arl_steps`` (default :data:`SEQ_ARL_STEPS`)."""
    if variance <= 0.0 or k <= 0.0:
        raise ValueError("variance and k must be positive")
    arl_steps = SEQ_ARL_STEPS if arl_steps is None else arl_steps
    return variance / (2.0 * k) * max(1.0, math.log(max(1, ranks) * arl_steps * 2.0 * k * k / variance))


def uses_steps(timings: Iterable[RankTiming]) -> bool:
    """Whether the sequential test can judge these ranks: at least :data:`SEQ_MIN_RANKS`, and
    every one sends per-step busy times (``RankTiming.busy_steps``)."""
    timings = list(timings)
    return len(timings) >= SEQ_MIN_RANKS and all(t.busy_steps for t in timings)


def fold_steps(ranks: Mapping[int, SeqRank], timings: Mapping[int, RankTiming], after: int | None,
               policy: StragglerPolicy, cap: float = math.inf) -> tuple[dict[int, SeqRank], int | None]:
    """Every rank's :class:`SeqRank` after the steps of ``timings`` (checked, rank -> newest)
    later than step ``after`` (None: every step they hold), and the newest step folded in.

    Ranks are lined up by step number. Steps are folded in order up to the *frontier*, the
    oldest of the ranks' newest steps (a rank that is ahead keeps its newer steps for the next
    observation, which sends them again); a step is folded when at least :data:`SEQ_MIN_RANKS`
    ranks, and at least half of them, hold it (steps lost between two observations are skipped).
    At a step, rank ``i``'s log-ratio is ``r_i = log(busy_i / median of the ranks' busy)``,
    clipped to ``+-seq_clip``, and ``S_i = min(cap, max(0, S_i + r_i - k))``.

    Invariants: pure; folding the same timings again changes nothing (no step after ``after``
    is left below the frontier); the result does not depend on how ranks are numbered; a step
    whose median busy time is zero is skipped; a rank missing at a step keeps its statistic.
    ``after`` beyond the frontier (the job restarted and its steps went back) starts every rank
    over."""
    newest = {r: t.busy_first_step + len(t.busy_steps) - 1 for r, t in timings.items() if t.busy_steps}
    if len(newest) < SEQ_MIN_RANKS:
        return dict(ranks), after
    frontier = min(newest.values())
    out = dict(ranks)
    if after is not None and after > frontier:
        out, after = {r: SeqRank() for r in ranks}, None
    first = min(t.busy_first_step for r, t in timings.items() if r in newest)
    start = first if after is None else max(first, after + 1)
    k, clip = seq_drift(policy), seq_clip(policy)
    keep = max(1, policy.persist_steps)
    folded = after
    for step in range(start, frontier + 1):
        values = {r: timings[r].busy_steps[step - timings[r].busy_first_step] for r in newest
                  if timings[r].busy_first_step <= step}
        if len(values) < max(SEQ_MIN_RANKS, (len(newest) + 1) // 2):
            continue
        ref = statistics.median(values.values())
        folded = step
        if ref <= TINY_S:
            continue
        for r, v in values.items():
            x = max(-clip, min(clip, math.log(max(v, TINY_S) / ref)))
            old = out.get(r, SeqRank())
            new_s = min(cap, max(0.0, old.s + x - k))
            since = None if new_s <= 0.0 else (old.since if old.since is not None else step)
            out[r] = SeqRank(new_s, since, (old.recent + (x,))[-keep:])
    return out, folded


def seq_evidence(rank: SeqRank, h: float, policy: StragglerPolicy) -> bool:
    """Evidence from the sequential test: ``S > h``, and the median of the rank's newest
    ``persistSteps`` clipped log-ratios at least ``k`` (so a burst of slow steps shorter than
    half of ``persistSteps`` is never evidence, however slow, when the healthy steps around it
    stay below ``k``)."""
    keep = max(1, policy.persist_steps)
    return (rank.s > h and len(rank.recent) >= keep
            and statistics.median(rank.recent[-keep:]) >= seq_drift(policy))


def seq_confirmed(rank: SeqRank, h: float, policy: StragglerPolicy, step: int) -> bool:
    """A straggler by the sequential test: :func:`seq_evidence`, and a run of ``S > 0`` that has
    lasted ``persistSteps`` steps up to ``step``."""
    return (seq_evidence(rank, h, policy) and rank.since is not None
            and step - rank.since + 1 >= policy.persist_steps)


def _median_evidence(s: RankScore, t: RankTiming, median_sections: Mapping[str, float],
                     policy: StragglerPolicy, z_min: float) -> str | None:
    """The cause (``data`` or ``compute``) when the rank's median score ``s`` is evidence (a
    slowdown of at least ``MEDIAN_EVIDENCE_FRACTION * minSlowdown`` and a ``z`` of at least
    ``z_min``), None otherwise."""
    if s.slowdown >= MEDIAN_EVIDENCE_FRACTION * policy.min_slowdown and s.z >= z_min:
        return _busy_cause(t, median_sections)
    return None


def _evidence(s: RankScore, t: RankTiming, median_sections: Mapping[str, float],
              policy: StragglerPolicy, z_min: float) -> str | None:
    """The cause this observation of the means suggests for the rank (``data``, ``compute`` or
    ``communication``; ``node`` and ``imbalance`` are decided across ranks), None when it is
    no evidence: a slowdown (of busy time, or of the step) of at least ``E`` and a ``z`` of at
    least ``z_min``."""
    floor = EVIDENCE_FRACTION * policy.min_slowdown
    if s.slowdown >= floor and s.z >= z_min:
        return _busy_cause(t, median_sections)
    if s.step_slowdown >= floor and s.step_z >= z_min:
        step_excess = s.step_slowdown * (t.step_s / (1.0 + s.step_slowdown))
        comm_excess = t.sections.get(COMMUNICATION_SECTION, 0.0) - median_sections.get(COMMUNICATION_SECTION, 0.0)
        if comm_excess >= 0.5 * step_excess:
            return "communication"
    return None


def observe(state: DetectorState, timings: Mapping[int, RankTiming], nodes: Mapping[int, str],
            policy: StragglerPolicy, now: datetime.datetime) -> tuple[DetectorState, tuple[Finding, ...]]:
    """Feed one observation: ``timings`` (rank -> its newest timing), ``nodes`` (rank -> the
    node it runs on; missing: unknown). Returns the new state and the stragglers now, slowest
    first.

    Invariants: a rank is a straggler only after evidence from the means spanning
    :func:`confirm_span` of its steps, or from the medians (when every judged rank has one:
    slowdown at least ``MEDIAN_EVIDENCE_FRACTION * minSlowdown``, ``z`` at least
    :func:`family_z_threshold` of the ranks judged) spanning :func:`median_confirm_span`, with
    evidence from the means at that observation, and stops being one only after :func:`clear_span` (or
    :func:`median_clear_span`) steps without evidence of either form; feeding the same timings
    again changes nothing (no new step, no new evidence); a timing too old (more than a window
    behind the job's newest) or over fewer than :data:`MIN_WINDOW` steps (means or median) is
    not judged; the result does not depend on how ranks are numbered. Raises
    :class:`WireError` for a malformed timing, before anything changes.
    """
    checked = _checked(timings)
    if not checked:
        return state, ()
    job_step = max(t.step for t in checked.values())
    job_window = max(t.window for t in checked.values())
    fresh = {r: t for r, t in checked.items()
             if t.window >= MIN_WINDOW and t.step >= job_step - job_window
             and (t.busy_median_s is None or t.median_window >= MIN_WINDOW)}
    scores = score(fresh)
    median_scores = score(fresh, medians=True)
    span = _span(policy, job_window)
    median_sections = _median_sections(fresh.values())

    mean_z = family_z_threshold(policy, len(scores)) if MEANS_FAMILY_Z else policy.z_threshold
    evidence = {r: cause for r in scores
                if (cause := _evidence(scores[r], fresh[r], median_sections, policy, mean_z)) is not None}
    median_z = family_z_threshold(policy, len(median_scores)) if MEDIAN_FAMILY_Z else policy.z_threshold
    median_evidence = {r: cause for r in median_scores
                       if (cause := _median_evidence(median_scores[r], fresh[r], median_sections, policy, median_z))
                       is not None}
    # the sequential test, on per-step busy times lined up by step
    seq, seq_step, seq_var, seq_var_steps, seq_h = _sequential(state, fresh, nodes, policy)
    seq_evidence_of = {r: _busy_cause(fresh[r], median_sections) for r, x in seq.items()
                       if r in scores and seq_h is not None and seq_evidence(x, seq_h, policy)}
    # node: every rank (two or more) of a known node has busy evidence (from any signal)
    by_node: dict[str, list[int]] = {}
    for r in scores:
        if nodes.get(r):
            by_node.setdefault(nodes[r], []).append(r)
    for ranks in by_node.values():
        if len(ranks) >= 2 and all(evidence.get(r) in ("data", "compute") or r in median_evidence
                                   or r in seq_evidence_of for r in ranks):
            evidence.update({r: "node" for r in ranks if evidence.get(r) in ("data", "compute")})
            median_evidence.update({r: "node" for r in ranks if r in median_evidence})
            seq_evidence_of.update({r: "node" for r in ranks if r in seq_evidence_of})

    tracks: dict[int, RankTrack] = {}
    episodes: list[tuple[int, int]] = []
    for rank, t in checked.items():
        node = nodes.get(rank, "")
        old = state.tracks.get(rank)
        if old is not None and (old.node != node or t.step < old.last_step):
            old = None  # moved to another node, or restarted: start over
        x = seq.get(rank)
        if old is None:
            old = RankTrack(rank=rank, node=node, last_step=t.step)
        elif t.step == old.last_step or rank not in scores:
            tracks[rank] = old if x is None else _with_seq(old, x)  # nothing new (or not judged)
            continue
        confirm = (x is not None and rank in seq_evidence_of and seq_h is not None and seq_step is not None
                   and seq_confirmed(x, seq_h, policy, seq_step))
        new = _advance(old, t, scores.get(rank), evidence.get(rank), policy, now,
                       median_scores.get(rank), median_evidence.get(rank), seq_evidence_of.get(rank), confirm)
        tracks[rank] = new = new if x is None else _with_seq(new, x)
        if (old.evidence_since is not None and new.evidence_since is None and old.straggler_since is None
                and _episode(old, policy, t.window)):
            episodes.append((t.step, rank))
    for rank, old in state.tracks.items():  # missing now: kept a while, then forgotten
        if rank not in checked and job_step - old.last_step <= 2 * span and old.last_step <= job_step:
            tracks[rank] = old

    recent = tuple(e for e in state.recent if job_step - IMBALANCE_SPANS * span <= e[0] <= job_step)
    recent += tuple(sorted(episodes))
    churn = _churn(recent, tracks, nodes, checked)
    imbalance_since, imbalance_step = None, None
    if churn:
        ongoing = state.imbalance_step is not None and state.imbalance_step <= job_step
        imbalance_since = state.imbalance_since if ongoing and state.imbalance_since else now
        imbalance_step = state.imbalance_step if ongoing else job_step

    evictions = tuple(_evaluate(e, fresh, nodes, job_step, policy, now) for e in state.evictions)
    step_s = statistics.median(t.step_s for t in fresh.values()) if fresh else state.job_step_s
    new = DetectorState(tracks=tracks, recent=recent, imbalance_since=imbalance_since,
                        imbalance_step=imbalance_step, job_step=job_step, job_step_s=step_s, job_window=job_window,
                        evictions=evictions, seq_step=seq_step, seq_var=seq_var, seq_var_steps=seq_var_steps)
    imbalance = imbalance_step is not None and job_step - imbalance_step >= span
    return new, _findings(new, checked, evidence, imbalance, policy)


def _with_seq(track: RankTrack, x: SeqRank) -> RankTrack:
    return replace(track, seq_s=x.s, seq_since=x.since, seq_recent=x.recent)


def _sequential(state: DetectorState, fresh: Mapping[int, RankTiming],
                nodes: Mapping[int, str], policy: StragglerPolicy
                ) -> tuple[dict[int, SeqRank], int | None, float | None, int, float | None]:
    """The sequential test after one observation: every judged rank's :class:`SeqRank`, the
    newest step folded in, the long-run variance estimate and the steps it spans, and ``h``
    (None while the estimate spans fewer than :data:`SEQ_WARMUP_STEPS` steps). Off (the state's
    values, nothing judged) unless :data:`SEQUENTIAL` and every fresh rank sends per-step busy
    times (:func:`uses_steps`). The variance is averaged over the steps the job advanced (a
    running mean over its first :data:`SEQ_VAR_STEPS` steps, then an exponential average of that
    length) from :func:`long_run_variance` over ``persistSteps`` steps, once at least half the
    ranks hold that many (a shorter stretch would miss the noise's autocorrelation). Once armed,
    with :data:`SEQ_VAR_SUSPECT_FRACTION` set and once the estimate spans at least
    :data:`SEQ_VAR_SUSPECT_MIN_STEPS` steps, ranks whose statistic is above that fraction of
    ``h`` are left out of it (when too few are left, the estimate is kept as it was)."""
    if not SEQUENTIAL or not uses_steps(fresh.values()):
        return {}, state.seq_step, state.seq_var, state.seq_var_steps, None
    var, var_steps = state.seq_var, state.seq_var_steps
    k = seq_drift(policy)
    old: dict[int, SeqRank] = {}
    for r, t in fresh.items():
        track = state.tracks.get(r)
        if track is not None and track.node == nodes.get(r, "") and t.step >= track.last_step:
            old[r] = SeqRank(track.seq_s, track.seq_since, track.seq_recent)
        else:
            old[r] = SeqRank()
    cap = math.inf
    if var is not None and var_steps >= SEQ_WARMUP_STEPS:
        cap = SEQ_CAP * sequential_threshold(var, k, len(fresh))
    seq, step = fold_steps(old, fresh, state.seq_step, policy, cap)
    advanced = 0 if step is None else step - (state.seq_step if state.seq_step is not None else step - 1)
    suspect_above = (SEQ_VAR_SUSPECT_FRACTION * cap / SEQ_CAP
                     if SEQ_VAR_SUSPECT_FRACTION is not None and cap < math.inf
                     and var_steps >= SEQ_VAR_SUSPECT_MIN_STEPS else math.inf)
    estimate = (long_run_variance(seq.values(), max(1, policy.persist_steps), suspect_above)
                if advanced > 0 else None)
    if estimate is not None and len([x for x in seq.values()
                                     if len(x.recent) >= policy.persist_steps]) >= (len(fresh) + 1) // 2:
        advanced = min(SEQ_VAR_STEPS, advanced)
        weight = advanced / min(SEQ_VAR_STEPS, var_steps + advanced)
        var = estimate if var is None else var + weight * (estimate - var)
        var_steps = min(SEQ_VAR_STEPS, var_steps + advanced)
    h = (sequential_threshold(var, k, len(fresh)) if var is not None and var_steps >= SEQ_WARMUP_STEPS
         else None)
    return seq, step, var, var_steps, h


def _episode(track: RankTrack, policy: StragglerPolicy, window: int) -> bool:
    """Whether the track's run of evidence from the means is an episode: it reached
    ``minSlowdown`` and has lasted a window."""
    return (track.evidence_since is not None and track.peak >= policy.min_slowdown
            and track.last_step - track.evidence_since >= window)


def _median_sections(timings: Iterable[RankTiming]) -> dict[str, float]:
    timings = list(timings)
    names = {n for t in timings for n in t.sections}
    return {n: statistics.median(t.sections.get(n, 0.0) for t in timings) for n in names}


def _ramp(policy: StragglerPolicy, window: int, level: float) -> float:
    """Steps a window's mean takes to show evidence of a slowdown of ``level`` per step:
    ``W E / level``, at most half the window."""
    floor = EVIDENCE_FRACTION * policy.min_slowdown
    return window / 2 if level <= floor else min(window / 2, window * floor / level)


def confirm_span(policy: StragglerPolicy, window: int, level: float) -> float:
    """Steps of unbroken evidence that prove a slowdown of ``level`` per step lasted ``persistSteps``."""
    return policy.persist_steps + window - 2 * _ramp(policy, window, level)


def clear_span(policy: StragglerPolicy, window: int, level: float) -> float:
    """Steps without evidence after which a straggler (slower by ``level`` per step) has been
    below the threshold for ``persistSteps``."""
    return max(MIN_WINDOW, policy.persist_steps - window + _ramp(policy, window, level))


def median_confirm_span(policy: StragglerPolicy, lead: int, median_window: int) -> int:
    """Steps of unbroken evidence from windowed medians that prove a slowdown lasted
    ``persistSteps``: ``persistSteps + floor(n / 2) - lead`` (+ :data:`MEDIAN_MARGIN`) for the
    run's ``lead`` and the newest median window ``n``: ``persistSteps`` (+ the margin) once
    the windows are full (``lead = n / 2``, ``n`` even)."""
    return policy.persist_steps + median_window // 2 - lead + MEDIAN_MARGIN


def median_clear_span(policy: StragglerPolicy, median_window: int) -> int:
    """Steps without evidence after which a straggler that the windowed medians (of
    ``median_window`` steps) showed has been below the threshold for ``persistSteps``: its first
    calm median came more than ``floor(n / 2)`` steps after the slowdown ended."""
    return max(MIN_WINDOW, policy.persist_steps - median_window // 2)


def _level(old: RankTrack, t: RankTiming, newest: float, peak: float, fresh_run: bool,
           cause: str) -> float | None:
    """The per-step slowdown ``X`` of a run of evidence: at least its peak, and at least the rise
    of the window's mean from the last observation without evidence over :data:`RISE_STEPS`
    or more steps, times the window (the mean rises by ``X / W`` a slow step). None while that
    rise is not measured yet. Without an earlier calm observation (slow since it was first
    judged) or for communication: the peak."""
    if old.base_step is None or cause == "communication":
        return peak
    known = None if fresh_run else old.level
    if known is None:
        if t.step - old.base_step < RISE_STEPS:
            return None
        known = t.window * (newest - old.base_slowdown) / (t.step - old.base_step)
    return max(known, peak)


def _advance(old: RankTrack, t: RankTiming, s: RankScore | None, cause: str | None, policy: StragglerPolicy,
             now: datetime.datetime, ms: RankScore | None = None, median_cause: str | None = None,
             seq_cause: str | None = None, seq_confirm: bool = False) -> RankTrack:
    """The track after one new observation of the rank (at a new step): ``s`` and ``cause``
    from the windowed means, ``ms`` and ``median_cause`` from the windowed medians (None
    without them), ``seq_cause`` the cause when the sequential test shows evidence (None
    otherwise) and ``seq_confirm`` whether it confirms the rank (:func:`seq_confirmed`)."""
    if s is None:  # a fresh track whose timing is not judged
        return old
    track = replace(old, last_step=t.step, slowdown=s.slowdown, z=s.z)
    confirmed = False
    if cause is not None:  # the means: a run of evidence, its span from the mean's rise
        newest = s.step_slowdown if cause == "communication" else s.slowdown
        fresh_run = old.evidence_since is None
        since = t.step if fresh_run else old.evidence_since
        peak = newest if fresh_run else max(old.peak, newest)
        level = _level(old, t, newest, peak, fresh_run, cause)
        track = replace(track, evidence_since=since, calm_since=None, cause=cause, peak=peak, level=level)
        confirmed = (level is not None and t.step - since >= confirm_span(policy, t.window, level)
                     and newest >= CONFIRM_FRACTION * policy.min_slowdown)
    else:
        track = replace(track, evidence_since=None, base_step=t.step, base_slowdown=s.slowdown)
    if median_cause is not None and ms is not None:  # the medians: a run spanning persistSteps
        lead = old.lead if old.median_since is not None and old.lead is not None else (t.median_window + 1) // 2
        median_since = t.step if old.median_since is None else old.median_since
        track = replace(track, median_since=median_since, lead=lead, calm_since=None, cause=median_cause)
        confirmed = confirmed or (t.step - median_since >= median_confirm_span(policy, lead, t.median_window)
                                  and ms.slowdown >= CONFIRM_FRACTION * policy.min_slowdown
                                  and (cause is not None or not MEDIAN_NEEDS_MEANS))
    else:
        track = replace(track, median_since=None, lead=None)
    if seq_cause is not None:  # the sequential test: its own persistence (seq_confirmed)
        track = replace(track, calm_since=None, cause=track.cause if confirmed else seq_cause)
        confirmed = confirmed or seq_confirm
    if confirmed and track.straggler_since is None:
        track = replace(track, straggler_since=now)
    if cause is not None or median_cause is not None or seq_cause is not None:
        return track
    calm = old.calm_since if old.calm_since is not None else t.step
    track = replace(track, calm_since=calm)
    clear = clear_span(policy, t.window, old.level if old.level is not None else old.peak)
    if ms is not None:  # the medians may have shown what the means did not: their bound too
        clear = max(clear, median_clear_span(policy, t.median_window))
    if track.straggler_since is not None and t.step - calm >= clear:
        track = replace(track, straggler_since=None, cause=None)
    return track


def _churn(recent: tuple[tuple[int, int], ...], tracks: Mapping[int, RankTrack],
           nodes: Mapping[int, str], present: Mapping[int, RankTiming]) -> bool:
    """Imbalance: in the recent spans episodes of at least :data:`IMBALANCE_RANKS` ranks on two
    or more nodes, and none of the present ranks persisted (is a straggler)."""
    ranks = {r for _, r in recent}
    if len(ranks) < IMBALANCE_RANKS:
        return False
    places = {nodes.get(r) or f"rank {r}" for r in ranks}
    if len(places) < 2:
        return False
    return not any(tracks[r].straggler_since is not None for r in present if r in tracks)


def _findings(state: DetectorState, present: Mapping[int, RankTiming], evidence: Mapping[int, str],
              imbalance: bool, policy: StragglerPolicy) -> tuple[Finding, ...]:
    out = []
    for rank in present:
        t = state.tracks[rank]
        if t.straggler_since is not None:
            cause = t.cause or "compute"
            moved = any(e.rank == rank and e.node != t.node and t.node for e in state.evictions)
            if moved and cause in ("node", "compute", "data"):
                cause = "imbalance"  # slow again on a new node: the excess follows the rank's data
            out.append(Finding(rank, t.node, t.slowdown, t.z, cause, t.straggler_since))
        elif (imbalance and rank in evidence and state.imbalance_since is not None
              and _episode(t, policy, present[rank].window // 2)):
            out.append(Finding(rank, t.node, t.slowdown, t.z, "imbalance", state.imbalance_since))
    return tuple(sorted(out, key=lambda f: (-f.slowdown, f.rank)))


def _evaluate(record: EvictionRecord, fresh: Mapping[int, RankTiming], nodes: Mapping[int, str], job_step: int,
              policy: StragglerPolicy, now: datetime.datetime) -> EvictionRecord:
    """An eviction after one more observation: sampled once its node hosts no rank (and the
    windows are full again), judged once the samples span ``evaluateSteps``."""
    if record.verdict != "pending":
        return record
    if (now - record.at).total_seconds() > EVALUATION_TIMEOUT_S:
        return replace(record, verdict="expired")
    if not nodes or record.node in set(nodes.values()):
        return record
    full = [t.step_s for t in fresh.values() if t.window >= record.window]
    if len(full) < max(1, len(fresh) // 2):
        return record
    samples = record.samples
    if samples and job_step < samples[-1][0]:
        samples = ()  # restarted again during the evaluation: start over
    if not samples or job_step > samples[-1][0]:
        samples += ((job_step, statistics.median(full)),)
    record = replace(record, samples=samples)
    if samples[-1][0] - samples[0][0] < policy.evaluate_steps:
        return record
    after = statistics.median(v for _, v in samples)
    helped = after <= (1.0 - policy.min_improvement) * record.pre_step_s
    return replace(record, verdict="helped" if helped else "no_improvement")


# --- decision ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workers:
    """The job's workers as the decision needs them: how many are ready, ``replicas.min``, and
    which worker (pod index) runs on which node."""

    ready: int
    minimum: int
    worker_of_node: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    """List a straggler in status (and an event when it is new)."""

    rank: int
    node: str
    worker: int | None
    slowdown: float
    z: float
    cause: str
    since: datetime.datetime


@dataclass(frozen=True)
class Evict:
    """Replace ``worker`` and quarantine ``node`` for ``policy.quarantineSeconds``."""

    node: str
    worker: int
    rank: int
    cause: str
    slowdown: float


@dataclass(frozen=True)
class Undo:
    """Release ``node``'s quarantine early: evicting it did not make the job faster."""

    node: str
    worker: int
    why: str


Action = Report | Evict | Undo
EVICTABLE = ("node", "compute", "data")


def decide(state: DetectorState, findings: Sequence[Finding], policy: StragglerPolicy, workers: Workers,
           now: datetime.datetime) -> list[Action]:
    """What to do now: a :class:`Report` for every finding; an :class:`Undo` for every eviction
    judged not to have helped and not yet undone; with ``action: Evict``, at most one
    :class:`Evict`, for the slowest evictable straggler.

    Invariants: pure and idempotent until :func:`applied` records what was done; never an
    :class:`Evict` in ``Report`` mode, for cause ``communication`` or ``imbalance``, for
    ``data`` stragglers on more than one node, for a node of unknown worker, while an eviction
    is being evaluated, beyond ``maxEvictionsPerHour`` within the last hour, or when
    ``workers.ready - 1 < workers.minimum``.
    """
    actions: list[Action] = [Report(f.rank, f.node, workers.worker_of_node.get(f.node) if f.node else None,
                                    f.slowdown, f.z, f.cause, f.since) for f in findings]
    for e in state.evictions:
        if e.verdict == "no_improvement" and not e.undone:
            before, after = e.pre_step_s, statistics.median(v for _, v in e.samples)
            actions.append(Undo(e.node, e.worker, f"median step time {after:.4g}s after the eviction against "
                                                  f"{before:.4g}s before: less than {policy.min_improvement:.0%} "
                                                  "better"))
    evict = _eviction(state, findings, policy, workers, now)
    if evict is not None:
        actions.append(evict)
    return actions


def _eviction(state: DetectorState, findings: Sequence[Finding], policy: StragglerPolicy, workers: Workers,
              now: datetime.datetime) -> Evict | None:
    if policy.action != StragglerAction.EVICT or policy.max_evictions_per_hour < 1:
        return None
    if sum(1 for e in state.evictions if now - e.at < HOUR) >= policy.max_evictions_per_hour:
        return None
    if any(e.verdict == "pending" for e in state.evictions):
        return None
    if workers.ready - 1 < workers.minimum:
        return None
    data_nodes = {f.node for f in findings if f.cause == "data"}
    quarantined = {e.node for e in state.evictions
                   if not e.undone and now < e.at + datetime.timedelta(seconds=policy.quarantine_seconds)}
    candidates = [f for f in findings
                  if f.node and f.node in workers.worker_of_node and f.node not in quarantined
                  and (f.cause in ("node", "compute") or (f.cause == "data" and len(data_nodes) == 1))]
    if not candidates:
        return None
    worst = min(candidates, key=lambda f: (-f.slowdown, f.rank))
    return Evict(worst.node, workers.worker_of_node[worst.node], worst.rank, worst.cause, worst.slowdown)


def applied(state: DetectorState, actions: Iterable[Action], now: datetime.datetime) -> DetectorState:
    """The state after the operator carried out ``actions`` (only those it did): an
    :class:`Evict` starts an evaluation against the job's current median step time, an
    :class:`Undo` marks its eviction undone; reports change nothing."""
    evictions = list(state.evictions)
    for action in actions:
        if isinstance(action, Evict):
            evictions.append(EvictionRecord(node=action.node, worker=action.worker, rank=action.rank,
                                            cause=action.cause, at=now, step=state.job_step,
                                            pre_step_s=state.job_step_s or 0.0, window=max(1, state.job_window)))
        elif isinstance(action, Undo):
            evictions = [replace(e, undone=True) if e.node == action.node and e.verdict == "no_improvement" else e
                         for e in evictions]
    keep = len(evictions) - MAX_RECORDS
    return replace(state, evictions=tuple(
        e for i, e in enumerate(evictions)
        if i >= keep or now - e.at < HOUR or e.verdict == "pending"
        or (e.verdict == "no_improvement" and not e.undone)))


def status_records(state: DetectorState, actions: Iterable[Action]) -> list[StragglerRecord]:
    """``status.stragglers`` for the reports among ``actions``, slowest first; ``action`` says
    what was done about the straggler's node: Evicted (a live eviction), Undone, or Reported."""
    out = []
    for a in actions:
        if not isinstance(a, Report):
            continue
        done = [e for e in state.evictions if a.node and e.node == a.node]
        what = "Reported"
        if done:
            what = "Undone" if done[-1].undone else "Evicted"
        out.append(StragglerRecord(rank=a.rank, worker=a.worker, node=a.node,
                                   slowdown=_finite(a.slowdown), score=_finite(a.z), cause=a.cause,
                                   since=a.since, action=what))
    return sorted(out, key=lambda r: (-r.slowdown, r.rank))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0
