"""The straggler detector: scores, persistence, hysteresis, causes and the mitigation decision."""

from __future__ import annotations

import datetime
import json
import math
import random
import statistics
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander.api import (InvalidSpec, StragglerAction, StragglerPolicy, StragglerRecord, TrainingJobSpec,
                            parse_spec)
from salamander.wire import RankTiming, WireError
from salamander_operator import stragglers as sg
from salamander_operator.stragglers import (CONFIRM_FRACTION, EVIDENCE_FRACTION, MIN_WINDOW, DetectorState, Evict,
                                            Finding, Report, Undo, Workers, applied, decide, observe, score)
from tests.unit._support import FAST, QUICK
from tests.unit.test_api import VALID_SPEC

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
POLICY = StragglerPolicy()
EVICT = StragglerPolicy(action=StragglerAction.EVICT)
WINDOW = 32
MEDIAN_WINDOW = 16   # salamander_worker.sections.MEDIAN_WINDOW
BUSY_STEPS = 64      # salamander_worker.sections.BUSY_STEPS


def timing(rank: int, busy: float, *, step: int = 100, wait: float = 0.02, window: int = WINDOW,
           data: float = 0.0, comm_extra: float = 0.0) -> RankTiming:
    """A rank's timing with ``busy`` seconds of compute (``data`` of them loading data)."""
    sections = {"data": data, "forward": busy - data, "communication": wait + comm_extra}
    return RankTiming(rank=rank, step=step, window=window, step_s=busy + wait + comm_extra,
                      wait_s=wait + comm_extra, sections=sections)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


# --- a simulated synchronous job: per-step times, windowed as the worker does ----------------------

Busy = Callable[[int, int], float]          # (rank, step) -> busy seconds of that step
DataShare = Callable[[int, int], float]     # (rank, step) -> the data part of it


class Job:
    """``n`` ranks whose per-step busy time comes from ``busy``; every rank reports the mean of
    its last 32 steps and, with ``medians`` (as ``salamander_worker.sections`` does; without,
    as older workers did), the median of its busy time over its last 16; the operator observes
    every ``every`` steps."""

    def __init__(self, n: int, busy: Busy, *, nodes: dict[int, str] | None = None, data: DataShare | None = None,
                 policy: StragglerPolicy = POLICY, every: int = 1, comm: float = 0.02,
                 medians: bool = False, per_step: bool = False) -> None:
        self.n, self.busy, self.data, self.policy, self.every, self.comm = n, busy, data, policy, every, comm
        self.medians, self.per_step = medians, per_step
        self.steps: dict[int, deque[float]] = {r: deque(maxlen=BUSY_STEPS) for r in range(n)}
        self.nodes = nodes if nodes is not None else {r: f"node-{r}" for r in range(n)}
        self.windows: dict[int, deque[tuple[float, float, float]]] = {r: deque(maxlen=WINDOW) for r in range(n)}
        self.state = DetectorState()
        self.step = 0
        self.history: list[tuple[int, tuple[Finding, ...]]] = []

    def timings(self) -> dict[int, RankTiming]:
        out = {}
        for r, w in self.windows.items():
            k = len(w)
            busy, data, step = (sum(x[i] for x in w) / k for i in range(3))
            wait = step - busy
            median: dict[str, float | int] = {}
            if self.medians:
                newest = [x[0] for x in w][-MEDIAN_WINDOW:]
                median = {"busy_median_s": statistics.median(newest), "median_window": len(newest)}
            if self.per_step:
                kept = tuple(self.steps[r])
                median |= {"busy_first_step": self.step - len(kept) + 1, "busy_steps": kept}
            out[r] = RankTiming(rank=r, step=self.step, window=k, step_s=step, wait_s=wait,
                                sections={"data": data, "forward": busy - data, "communication": wait}, **median)
        return out

    def advance(self, steps: int) -> tuple[Finding, ...]:
        findings: tuple[Finding, ...] = ()
        for _ in range(steps):
            self.step += 1
            busy = {r: self.busy(r, self.step) for r in range(self.n)}
            step_s = max(busy.values()) + self.comm
            for r in range(self.n):
                data = self.data(r, self.step) if self.data else 0.0
                self.windows[r].append((busy[r], data, step_s))
                self.steps[r].append(busy[r])
            if self.step % self.every == 0 and self.step >= MIN_WINDOW:
                self.state, findings = observe(self.state, self.timings(), self.nodes, self.policy, at(self.step))
                self.history.append((self.step, findings))
        return findings

    def first(self, rank: int) -> int | None:
        """The first step at which ``rank`` was a finding."""
        return next((s for s, fs in self.history if any(f.rank == rank for f in fs)), None)


def noisy(base: float = 0.1, noise: float = 0.02, seed: int = 0, slow: dict[int, float] | None = None,
          onset: int = 0, until: int | None = None) -> Busy:
    """Busy times with uniform relative noise, ranks in ``slow`` slower by their factor from
    ``onset`` (until ``until``)."""
    rng = random.Random(seed)
    cache: dict[tuple[int, int], float] = {}

    def busy(rank: int, step: int) -> float:
        if (rank, step) not in cache:
            value = base * (1.0 + rng.uniform(-noise, noise))
            if slow and rank in slow and step > onset and (until is None or step <= until):
                value *= 1.0 + slow[rank]
            cache[rank, step] = value
        return cache[rank, step]
    return busy


# --- score -------------------------------------------------------------------------------------------

def test_score_is_relative_to_the_median_with_a_robust_scale() -> None:
    timings = {r: timing(r, b) for r, b in enumerate([0.10, 0.10, 0.10, 0.10, 0.15])}
    scores = score(timings)
    assert scores[4].slowdown == pytest.approx(0.5)
    assert scores[0].slowdown == pytest.approx(0.0) and scores[0].z == pytest.approx(0.0)
    # MAD is 0: the scale is the 1% floor of the median
    assert scores[4].z == pytest.approx(0.05 / (sg.MAD_FLOOR * 0.10))
    spread = {r: timing(r, b) for r, b in enumerate([0.09, 0.10, 0.11, 0.10, 0.13])}
    s = score(spread)
    assert s[4].z == pytest.approx((0.13 - 0.10) / (sg.MAD_SCALE * 0.01))


def test_two_ranks_compare_the_slower_with_the_faster() -> None:
    scores = score({0: timing(0, 0.10), 1: timing(1, 0.11)})
    assert scores[1].slowdown == pytest.approx(0.10) and scores[0].slowdown == pytest.approx(0.0)
    assert scores[1].z == pytest.approx(10.0)


def test_too_few_ranks_or_no_busy_time_score_nothing() -> None:
    assert score({}) == {}
    assert score({0: timing(0, 0.1)}) == {}
    idle = {r: RankTiming(r, 10, 8, 0.05, 0.05, {"communication": 0.05}) for r in range(4)}
    assert score(idle) == {}


def test_a_synchronous_step_time_with_uneven_waits_names_the_busiest_rank() -> None:
    # every rank's step takes 0.2 s; rank 2 computes 0.15 s while the others wait for it
    timings = {r: RankTiming(r, 50, 32, 0.2, 0.2 - b, {"forward": b, "communication": 0.2 - b})
               for r, b in enumerate([0.1, 0.1, 0.15, 0.1])}
    scores = score(timings)
    assert max(scores, key=lambda r: scores[r].slowdown) == 2
    assert all(abs(s.step_slowdown) < 1e-9 for s in scores.values())


busy_lists = st.lists(st.floats(0.001, 10.0, allow_nan=False), min_size=3, max_size=12)


@FAST
@given(busy_lists, st.randoms(use_true_random=False))
def test_score_does_not_depend_on_how_ranks_are_numbered(busy: list[float], rnd: random.Random) -> None:
    timings = {r: timing(r, b) for r, b in enumerate(busy)}
    labels = list(range(100, 100 + len(busy)))
    rnd.shuffle(labels)
    relabelled = {labels[r]: timing(labels[r], b) for r, b in enumerate(busy)}
    a, b = score(timings), score(relabelled)
    for r in range(len(busy)):
        assert a[r].slowdown == pytest.approx(b[labels[r]].slowdown)
        assert a[r].z == pytest.approx(b[labels[r]].z)


@FAST
@given(busy_lists)
def test_scores_are_finite_and_ordered_like_busy_time(busy: list[float]) -> None:
    scores = score({r: timing(r, b) for r, b in enumerate(busy)})
    assert set(scores) == set(range(len(busy)))
    for r, s in scores.items():
        assert math.isfinite(s.slowdown) and math.isfinite(s.z) and s.slowdown >= -1.0
    order = sorted(range(len(busy)), key=lambda r: busy[r])
    assert [scores[r].z for r in order] == sorted(scores[r].z for r in order)


@pytest.mark.parametrize("bad", [
    RankTiming(0, 10, 32, float("nan"), 0.0, {}),
    RankTiming(0, 10, 32, -1.0, 0.0, {}),
    RankTiming(0, 10, 32, 0.1, 0.5, {}),
    RankTiming(0, 10, 0, 0.1, 0.0, {}),
    RankTiming(0, 10, 32, 0.1, 0.0, {"forward": float("inf")}),
    RankTiming(0, 10, 32, 0.1, 0.0, {"": 0.1}),
])
def test_malformed_timings_are_rejected_by_name_and_change_nothing(bad: RankTiming) -> None:
    good = {r: timing(r, 0.1) for r in (1, 2, 3)}
    with pytest.raises(WireError, match="rank 0"):
        score({0: bad, **good})
    state = DetectorState()
    with pytest.raises(WireError):
        observe(state, {0: bad, **good}, {}, POLICY, T0)


def test_a_timing_under_the_wrong_rank_or_not_a_timing_is_rejected() -> None:
    with pytest.raises(WireError, match="filed under rank 5"):
        score({5: timing(1, 0.1), 2: timing(2, 0.1)})
    with pytest.raises(WireError, match="not a RankTiming"):
        score({1: {"step_s": 0.1}, 2: timing(2, 0.1)})  # type: ignore[dict-item]


# --- persistence and hysteresis -----------------------------------------------------------------------

def test_no_straggler_when_ranks_are_equal_up_to_noise_below_the_threshold() -> None:
    job = Job(8, noisy(noise=0.02, seed=1))
    job.advance(1000)
    assert all(not fs for _, fs in job.history)
    assert job.state.stragglers() == []


@QUICK
@given(st.integers(3, 16), st.integers(0, 2**32 - 1), st.floats(0.0, 0.02))
def test_noise_below_the_evidence_threshold_never_makes_a_straggler(n: int, seed: int, noise: float) -> None:
    # relative noise of +-2% keeps every windowed slowdown under 2 * 2% / 0.98 < 5% = half of minSlowdown
    job = Job(n, noisy(noise=noise, seed=seed), every=3)
    job.advance(200)
    assert all(not fs for _, fs in job.history)


def test_a_persistent_ten_percent_slowdown_is_found_after_the_persistence_span_and_not_before() -> None:
    onset = 100
    job = Job(8, noisy(noise=0.01, seed=2, slow={3: 0.10}, onset=onset))
    job.advance(400)
    found = job.first(3)
    assert found is not None
    # slow for persistSteps, and found within one more window
    assert onset + POLICY.persist_steps <= found <= onset + POLICY.persist_steps + WINDOW, found
    (finding,) = job.history[-1][1]
    assert finding.rank == 3 and finding.cause == "compute" and finding.slowdown == pytest.approx(0.10, abs=0.02)
    assert finding.since == at(found)
    assert all(f.rank == 3 for _, fs in job.history for f in fs)


@FAST
@given(st.sampled_from([0.1, 0.15, 0.25, 0.5, 1.0, 3.0]), st.sampled_from([1, 8, 16, 30, 32, 50, 100]))
def test_a_persistent_slowdown_is_found_after_persist_steps_and_within_one_more_window(level: float,
                                                                                       persist: int) -> None:
    onset = 60
    policy = StragglerPolicy(persist_steps=persist)
    job = Job(6, noisy(noise=0.0, slow={1: level}, onset=onset), policy=policy)
    job.advance(onset + persist + WINDOW + 5)
    found = job.first(1)
    assert found is not None
    assert found - onset <= persist + WINDOW, found - onset
    if persist >= WINDOW - 2:   # exact once the persistence is about a window or longer
        assert found - onset >= persist - 2, found - onset


@FAST
@given(st.floats(0.1, 20.0), st.integers(30, 100), st.data())
def test_a_burst_shorter_than_persist_steps_is_never_a_straggler(level: float, persist: int,
                                                                 data: st.DataObject) -> None:
    length = data.draw(st.integers(1, persist - 4), label="burst length")
    policy = StragglerPolicy(persist_steps=persist)
    job = Job(6, noisy(noise=0.0, slow={2: level}, onset=60, until=60 + length), policy=policy)
    job.advance(60 + length + 2 * WINDOW + persist)
    assert job.first(2) is None


def test_a_slowdown_longer_than_persist_steps_is_a_straggler_while_it_lasts() -> None:
    job = Job(6, noisy(noise=0.0, slow={2: 0.5}, onset=60, until=60 + POLICY.persist_steps + WINDOW))
    job.advance(300)
    assert job.first(2) is not None


def test_observations_at_one_step_or_many_per_step_count_the_same() -> None:
    busy = noisy(noise=0.0, slow={2: 0.3}, onset=40)
    every_step = Job(5, busy)
    every_step.advance(200)
    sparse = Job(5, busy, every=4)
    sparse.advance(200)
    a, b = every_step.first(2), sparse.first(2)
    assert a is not None and b is not None and a <= b < a + 8
    # the same timings observed again add no evidence
    state, findings = observe(every_step.state, every_step.timings(), every_step.nodes, POLICY, at(999))
    assert state == every_step.state


def test_a_single_outlying_step_never_makes_a_straggler() -> None:
    def busy(rank: int, step: int) -> float:
        return 1.0 if (rank == 2 and step == 100) else 0.1   # one step 10x as long
    job = Job(6, busy)
    job.advance(400)
    assert job.first(2) is None
    assert all(job.state.tracks[r].straggler_since is None for r in range(6))


@pytest.mark.parametrize("medians", [False, True])
def test_hysteresis_a_straggler_stays_one_until_it_has_been_calm_for_persist_steps(medians: bool) -> None:
    end = 300
    job = Job(8, noisy(noise=0.005, seed=3, slow={5: 0.25}, onset=50, until=end), medians=medians)
    job.advance(end)
    assert job.first(5) is not None and job.history[-1][1][0].rank == 5
    cleared = None
    for _ in range(200):
        job.advance(1)
        if not job.history[-1][1]:
            cleared = job.step
            break
    assert cleared is not None
    assert end + POLICY.persist_steps - 2 <= cleared <= end + POLICY.persist_steps + WINDOW, cleared - end
    job.advance(200)
    assert all(not fs for s, fs in job.history if s > cleared)


def test_a_straggler_hovering_around_the_threshold_does_not_flap() -> None:
    rng = random.Random(4)

    def busy(rank: int, step: int) -> float:   # rank 1 is 8..12% slower, changing every 10 steps
        return 0.1 * (1.0 + (0.08 + 0.04 * random.Random(step // 10).random() if rank == 1 and step > 50 else 0)
                      + rng.uniform(-0.005, 0.005))
    job = Job(6, busy)
    job.advance(600)
    found = job.first(1)
    assert found is not None
    assert all(any(f.rank == 1 for f in fs) for s, fs in job.history if s >= found)


# --- windowed medians (workers that send busy_median_s) -------------------------------------------

MARGIN = sg.MEDIAN_MARGIN


def spiky(base: float = 0.1, noise: float = 0.05, seed: int = 0, spike_every: int = 150,
          load: float = 0.2) -> Busy:
    """Healthy busy times: a load common to every rank (a slow wave of +-``load``), uniform
    relative noise of +-``noise`` per rank and step, and on each rank single outlying steps
    (3x to 30x) at random, at least ``spike_every`` steps apart."""
    rng = random.Random(seed)
    cache: dict[tuple[int, int], float] = {}
    next_spike: dict[int, int] = {}

    def busy(rank: int, step: int) -> float:
        if (rank, step) not in cache:
            value = base * (1.0 + load * math.sin(step / 40.0)) * (1.0 + rng.uniform(-noise, noise))
            due = next_spike.setdefault(rank, rng.randint(1, spike_every))
            if step >= due:
                value *= rng.uniform(3.0, 30.0)
                next_spike[rank] = step + spike_every + rng.randint(0, spike_every)
            cache[rank, step] = value
        return cache[rank, step]
    return busy


def test_score_from_medians_uses_them_and_needs_every_rank_to_have_one() -> None:
    plain = {r: timing(r, 0.1) for r in range(4)}
    with_medians = {r: sg.replace(t, busy_median_s=0.2 if r == 3 else 0.1, median_window=16)
                    for r, t in plain.items()}
    assert sg.uses_medians(with_medians.values()) and not sg.uses_medians(plain.values())
    scores = score(with_medians, medians=True)
    assert scores[3].slowdown == pytest.approx(1.0) and scores[3].busy_s == 0.2 and scores[0].z == 0.0
    assert score(with_medians)[3].slowdown == pytest.approx(0.0)   # the means: all alike
    assert score({**with_medians, 0: plain[0]}, medians=True) == {}   # one without: no median scores


@FAST
@given(st.floats(0.1, 20.0), st.integers(30, 100), st.floats(0.0, 0.02), st.integers(1, 3), st.integers(0, 2**16),
       st.data())
def test_medians_a_burst_shorter_than_persist_steps_is_never_a_straggler(level: float, persist: int, noise: float,
                                                                         every: int, seed: int,
                                                                         data: st.DataObject) -> None:
    # healthy steps stay below the evidence level: the medians' bound is exact, up to persistSteps - 1
    length = data.draw(st.integers(1, persist - 1), label="burst length")
    policy = StragglerPolicy(persist_steps=persist)
    job = Job(6, noisy(noise=noise, seed=seed, slow={2: level}, onset=60, until=60 + length), policy=policy,
              every=every, medians=True)
    job.advance(60 + length + 2 * WINDOW + persist)
    assert job.first(2) is None


@pytest.mark.parametrize("level", [0.1, 0.15, 0.3, 1.0, 5.0])
@pytest.mark.parametrize("persist", [16, 30, 50])
def test_medians_without_noise_find_a_slowdown_half_a_window_plus_persist_steps_after_it_starts(
        level: float, persist: int) -> None:
    onset = 60
    job = Job(6, noisy(noise=0.0, slow={1: level}, onset=onset), policy=StragglerPolicy(persist_steps=persist),
              medians=True)
    job.advance(onset + persist + 2 * WINDOW)
    found = job.first(1)
    assert found is not None
    # evidence once half the window is slow (one step later at exactly 2 x the evidence level,
    # where rounding decides), confirmed persistSteps + the margin later
    assert persist + MARGIN + MEDIAN_WINDOW // 2 <= found - onset <= persist + MARGIN + MEDIAN_WINDOW // 2 + 1


@FAST
@given(st.sampled_from([0.15, 0.25, 0.5, 1.0, 3.0]), st.floats(0.0, 0.03), st.integers(4, 16),
       st.integers(1, 2), st.integers(0, 2**16))
def test_medians_find_a_persistent_slowdown_within_50_steps_over_noise(level: float, noise: float, n: int,
                                                                       every: int, seed: int) -> None:
    # the defaults (persistSteps 30): about MEDIAN_WINDOW / 2 + 30 + the margin = 42 steps, for a
    # slowdown whose medians stay clear of minSlowdown over the noise (near it: the means, below)
    onset = 80
    job = Job(n, noisy(noise=noise, seed=seed, slow={n - 1: level}, onset=onset), every=every, medians=True)
    job.advance(onset + 60)
    found = job.first(n - 1)
    assert found is not None and POLICY.persist_steps <= found - onset <= 50, found and found - onset
    assert all(f.rank == n - 1 for _, fs in job.history for f in fs)
    (finding,) = job.history[-1][1]
    assert finding.cause == "compute"


def test_family_z_threshold_is_bonferroni_corrected_for_the_ranks_judged() -> None:
    # the z whose one-sided normal tail is zThreshold's divided by the ranks; never below zThreshold
    assert sg.family_z_threshold(POLICY, 1) == POLICY.z_threshold
    assert sg.family_z_threshold(POLICY, 8) == pytest.approx(3.59, abs=0.01)
    assert sg.family_z_threshold(POLICY, 64) == pytest.approx(4.10, abs=0.01)
    values = [sg.family_z_threshold(POLICY, n) for n in (1, 2, 3, 8, 64, 1024, 100_000)]
    assert values == sorted(values) and values[0] == POLICY.z_threshold
    tail = 1.0 - statistics.NormalDist().cdf(POLICY.z_threshold)
    for n in (2, 8, 64, 1024):
        assert 1.0 - statistics.NormalDist().cdf(sg.family_z_threshold(POLICY, n)) == pytest.approx(tail / n)
    strict = StragglerPolicy(z_threshold=10.0)   # a tail too small to divide further: zThreshold
    assert sg.family_z_threshold(strict, 64) >= strict.z_threshold


@pytest.mark.parametrize("level", [0.06, 0.09])
def test_medians_show_no_evidence_below_min_slowdown_the_means_judge_it(level: float) -> None:
    # a rank 6% or 9% slower on every step: no median is evidence (below minSlowdown), so whatever
    # happens is the means' doing, at the means' pace (after persistSteps, within one more window)
    onset = 60
    job = Job(8, noisy(noise=0.0, slow={3: level}, onset=onset), medians=True)
    for _ in range(200):
        job.advance(1)
        assert all(t.median_since is None for t in job.state.tracks.values())
    found = job.first(3)
    if found is not None:
        assert POLICY.persist_steps + MEDIAN_WINDOW // 2 + MARGIN < found - onset <= POLICY.persist_steps + WINDOW


def test_medians_confirm_only_with_evidence_from_the_means(monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 2: 12% slower on 9 of every 16 steps and 30% faster on the other 7: every 16-step median
    # is 12% slower (evidence), the mean 6% faster (none): never a straggler; without the rule it is one
    onset = 40

    def busy(rank: int, step: int) -> float:
        if rank == 2 and step > onset:
            return 0.1 * (1.12 if (step - onset) % 16 < 9 else 0.7)
        return 0.1
    job = Job(8, busy, medians=True)
    job.advance(onset + 300)
    assert job.state.tracks[2].median_since is not None and job.first(2) is None
    monkeypatch.setattr(sg, "MEDIAN_NEEDS_MEANS", False)
    job = Job(8, busy, medians=True)
    job.advance(onset + 300)
    assert job.first(2) is not None


@pytest.mark.parametrize("size", [2.0, 10.0, 1000.0])
def test_medians_a_single_outlying_step_never_makes_a_straggler(size: float) -> None:
    def busy(rank: int, step: int) -> float:
        return 0.1 * size if (step == 100 + 17 * rank) else 0.1   # one outlier on every rank, at its own step
    job = Job(6, busy, medians=True)
    job.advance(400)
    assert all(not fs for _, fs in job.history)
    assert all(t.median_since is None and t.straggler_since is None for t in job.state.tracks.values())


@pytest.mark.parametrize("seed", range(3))
def test_medians_healthy_noisy_ranks_are_never_flagged_in_long_runs(seed: int) -> None:
    # +-5% per step, a common load swinging +-20%, and an outlying step (3x..30x) on every rank
    # every 150..300 steps: 16 ranks, 1,000 steps, observed every 2 steps, never a finding
    job = Job(16, spiky(seed=seed), every=2, medians=True, policy=EVICT)
    job.advance(1000)
    assert all(not fs for _, fs in job.history)
    assert job.state.recent == ()   # not even an episode towards imbalance


def test_a_slowdown_in_fewer_than_half_the_steps_is_found_from_the_means_beside_the_medians() -> None:
    # every 4th step 40% longer: 10% slower on average, and no median moves
    onset = 100

    def busy(rank: int, step: int) -> float:
        return 0.1 * (1.4 if rank == 3 and step > onset and step % 4 == 0 else 1.0)
    job = Job(8, busy, medians=True, every=2)
    job.advance(onset + 200)
    found = job.first(3)
    assert found is not None and all(t.median_since is None for t in job.state.tracks.values())
    # as the means alone find it: after persistSteps, within one more window
    assert POLICY.persist_steps <= found - onset <= POLICY.persist_steps + WINDOW, found - onset
    assert job.history[-1][1][0].cause == "compute"


@FAST
@given(st.floats(0.1, 20.0), st.integers(30, 100), st.integers(1, 3), st.data())
def test_beside_medians_a_sparse_burst_shorter_than_persist_steps_is_never_a_straggler(
        level: float, persist: int, every: int, data: st.DataObject) -> None:
    length = data.draw(st.integers(1, persist - 1), label="burst length")
    period = data.draw(st.integers(2, 8), label="one slow step in")

    def busy(rank: int, step: int) -> float:
        slow = rank == 2 and 60 < step <= 60 + length and (step - 61) % period == 0
        return 0.1 * (1.0 + level * period if slow else 1.0)
    job = Job(6, busy, policy=StragglerPolicy(persist_steps=persist), every=every, medians=True)
    job.advance(60 + length + 2 * WINDOW + persist)
    assert job.first(2) is None


def test_medians_causes_data_compute_and_node() -> None:
    busy = noisy(noise=0.005, slow={2: 0.3}, onset=20)
    job = Job(6, busy, data=lambda r, s: busy(r, s) - 0.1 * (1 - 0.005) if r == 2 and s > 20 else 0.01, medians=True)
    (finding,) = job.advance(200)
    assert finding.rank == 2 and finding.cause == "data"
    job = Job(6, noisy(noise=0.005, slow={2: 0.3}, onset=20), data=lambda r, s: 0.01, medians=True)
    (finding,) = job.advance(200)
    assert finding.cause == "compute"
    nodes = {r: f"node-{r // 4}" for r in range(16)}
    job = Job(16, noisy(noise=0.005, slow={4: 0.2, 5: 0.2, 6: 0.2, 7: 0.2}, onset=20), nodes=nodes, medians=True)
    findings = job.advance(200)
    assert {f.rank for f in findings} == {4, 5, 6, 7} and {f.cause for f in findings} == {"node"}


def test_medians_a_slow_rank_that_moves_around_is_imbalance() -> None:
    def busy(rank: int, step: int) -> float:  # the heavy shard moves to another rank every 24 steps
        return 0.1 * (1.4 if rank == (step // 24) % 8 else 1.0)
    job = Job(8, busy, medians=True)
    job.advance(400)
    assert {f.cause for _, fs in job.history for f in fs} == {"imbalance"}
    assert job.state.stragglers() == []


def test_old_timings_without_a_median_still_work_beside_new_ones() -> None:
    # one rank of an old worker: no medians for anyone, the means decide as before
    onset = 100
    job = Job(8, noisy(noise=0.01, seed=2, slow={3: 0.10}, onset=onset), medians=True)
    real = job.timings

    def mixed() -> dict[int, RankTiming]:
        out = real()
        out[0] = sg.replace(out[0], busy_median_s=None, median_window=0)
        return out
    job.timings = mixed  # type: ignore[method-assign]
    job.advance(400)
    found = job.first(3)
    assert found is not None and onset + POLICY.persist_steps <= found <= onset + POLICY.persist_steps + WINDOW
    assert all(t.median_since is None for t in job.state.tracks.values())
    # and a state saved before the median fields existed still reads
    raw = json.loads(job.state.encode())
    for t in raw["tracks"]:
        for name in ("median_since", "lead"):
            del t[name]
    assert DetectorState.decode(json.dumps(raw)) == job.state


def test_a_switch_between_medians_and_means_starts_the_run_of_evidence_over() -> None:
    onset = 40
    job = Job(6, noisy(noise=0.0, slow={1: 0.5}, onset=onset), medians=True)
    job.advance(onset + 30)
    assert job.state.tracks[1].median_since is not None and job.first(1) is None
    job.medians = False   # an old worker took over (same steps): the medians' run cannot go on
    job.advance(1)
    assert job.state.tracks[1].median_since is None


# --- robustness: missing, disappearing and restarted ranks ------------------------------------------

def test_a_missing_rank_keeps_its_track_and_a_vanished_one_is_forgotten() -> None:
    job = Job(6, noisy(noise=0.0, slow={4: 0.5}, onset=10))
    job.advance(100)
    assert 4 in job.state.stragglers()
    timings = job.timings()
    del timings[4]
    state, findings = observe(job.state, timings, job.nodes, POLICY, at(101))
    assert 4 in state.tracks and all(f.rank != 4 for f in findings)
    later = {r: RankTiming(r, t.step + 200, t.window, t.step_s, t.wait_s, dict(t.sections))
             for r, t in timings.items()}
    state, findings = observe(state, later, job.nodes, POLICY, at(300))
    assert 4 not in state.tracks and findings == ()


def test_a_restarted_or_moved_rank_starts_over() -> None:
    job = Job(6, noisy(noise=0.0, slow={4: 0.5}, onset=10))
    job.advance(100)
    assert 4 in job.state.stragglers()
    timings = job.timings()
    restarted = dict(timings)
    restarted[4] = RankTiming(4, 20, 16, timings[4].step_s, timings[4].wait_s, dict(timings[4].sections))
    state, findings = observe(job.state, restarted, job.nodes, POLICY, at(101))
    assert 4 not in state.stragglers() and all(f.rank != 4 for f in findings)
    moved = {**job.nodes, 4: "elsewhere"}
    state, _ = observe(job.state, {r: RankTiming(r, t.step + 1, t.window, t.step_s, t.wait_s, dict(t.sections))
                                   for r, t in timings.items()}, moved, POLICY, at(102))
    assert 4 not in state.stragglers() and state.tracks[4].node == "elsewhere"


def test_empty_stale_and_short_window_observations_judge_nothing() -> None:
    state = DetectorState()
    assert observe(state, {}, {}, POLICY, T0) == (state, ())
    short = {r: timing(r, 0.1 if r else 0.3, window=MIN_WINDOW - 1) for r in range(4)}
    state, findings = observe(state, short, {}, POLICY, T0)
    assert findings == () and all(t.evidence_since is None for t in state.tracks.values())
    stale = {r: timing(r, 0.1, step=1000) for r in range(1, 4)} | {0: timing(0, 0.3, step=100)}
    state, _ = observe(DetectorState(), stale, {}, POLICY, T0)
    assert state.tracks[0].evidence_since is None


timing_values = st.builds(
    lambda rank, step, window, busy, wait: RankTiming(rank, step, window, busy + wait, wait,
                                                      {"forward": busy, "communication": wait}),
    st.integers(0, 9), st.integers(0, 500), st.integers(1, 40), st.floats(0.0, 1.0), st.floats(0.0, 1.0))


def _with_steps(t: RankTiming, back: int, values: list[float]) -> RankTiming:
    """``t`` with per-step busy times ``values`` ending ``back`` steps before its step."""
    values = values[:max(0, t.step - back + 1)]
    if not values:
        return t
    return sg.replace(t, busy_first_step=t.step - back - len(values) + 1, busy_steps=tuple(values))


timing_with_steps = st.builds(_with_steps, timing_values, st.integers(0, 3),
                              st.lists(st.floats(0.0, 2.0), max_size=70))


@QUICK
@given(st.lists(st.lists(timing_values | timing_with_steps, max_size=10), min_size=1, max_size=12),
       st.dictionaries(st.integers(0, 9), st.sampled_from(["a", "b", "c", ""])))
def test_any_sequence_of_valid_observations_never_crashes(batches: list[list[RankTiming]],
                                                          nodes: dict[int, str]) -> None:
    state = DetectorState()
    for i, batch in enumerate(batches):
        timings = {t.rank: t for t in batch}
        state, findings = observe(state, timings, nodes, EVICT, at(i))
        assert {f.rank for f in findings} <= set(timings)
        assert all(f.cause in sg.CAUSES for f in findings)
        actions = decide(state, findings, EVICT, Workers(3, 1, {"a": 0, "b": 1, "c": 2}), at(i))
        state = applied(state, [a for a in actions if not isinstance(a, Report)], at(i))
        assert DetectorState.decode(state.encode()) == state


@QUICK
@given(st.integers(4, 10), st.integers(0, 2**32 - 1), st.randoms(use_true_random=False))
def test_findings_do_not_depend_on_how_ranks_are_numbered(n: int, seed: int, rnd: random.Random) -> None:
    busy = noisy(noise=0.02, seed=seed, slow={1: 0.3}, onset=20)
    labels = list(range(n))
    rnd.shuffle(labels)
    plain = Job(n, busy, every=2)
    relabelled = Job(n, lambda r, s: busy(labels.index(r), s), every=2)
    for _ in range(5):
        a, b = plain.advance(30), relabelled.advance(30)
        assert sorted((labels[f.rank], f.cause, round(f.slowdown, 9)) for f in a) == \
            sorted((f.rank, f.cause, round(f.slowdown, 9)) for f in b)


# --- causes --------------------------------------------------------------------------------------

def test_excess_in_the_data_section_is_data() -> None:
    busy = noisy(noise=0.005, slow={2: 0.3}, onset=20)
    job = Job(6, busy, data=lambda r, s: busy(r, s) - 0.1 * (1 - 0.005) if r == 2 and s > 20 else 0.01)
    (finding,) = job.advance(200)
    assert finding.rank == 2 and finding.cause == "data"


def test_excess_in_compute_is_compute() -> None:
    job = Job(6, noisy(noise=0.005, slow={2: 0.3}, onset=20), data=lambda r, s: 0.01)
    (finding,) = job.advance(200)
    assert finding.cause == "compute"


def test_every_rank_of_a_node_slow_is_the_node() -> None:
    nodes = {r: f"node-{r // 4}" for r in range(16)}
    job = Job(16, noisy(noise=0.005, slow={4: 0.2, 5: 0.2, 6: 0.2, 7: 0.2}, onset=20), nodes=nodes)
    findings = job.advance(200)
    assert {f.rank for f in findings} == {4, 5, 6, 7} and {f.cause for f in findings} == {"node"}
    # one slow rank of four on a node is its own compute
    job = Job(16, noisy(noise=0.005, slow={4: 0.2}, onset=20), nodes=nodes)
    (finding,) = job.advance(200)
    assert finding.cause == "compute"


def test_a_slow_rank_that_moves_around_is_imbalance() -> None:
    def busy(rank: int, step: int) -> float:  # the heavy shard moves to another rank every 24 steps
        return 0.1 * (1.4 if rank == (step // 24) % 8 else 1.0)
    job = Job(8, busy)
    job.advance(400)
    causes = {f.cause for _, fs in job.history for f in fs}
    assert causes == {"imbalance"}
    assert job.state.stragglers() == []
    actions = decide(job.state, job.history[-1][1], EVICT, Workers(8, 1, {f"node-{r}": r for r in range(8)}), at(400))
    assert actions and all(isinstance(a, Report) for a in actions)


def test_a_longer_step_in_a_ranks_own_communication_is_communication() -> None:
    state = DetectorState()
    findings: tuple[Finding, ...] = ()
    for step in range(40, 140, 2):
        timings = {r: timing(r, 0.1, step=step, comm_extra=0.05 if r == 3 else 0.0) for r in range(6)}
        state, findings = observe(state, timings, {r: f"n{r}" for r in range(6)}, POLICY, at(step))
    (finding,) = findings
    assert finding.rank == 3 and finding.cause == "communication"
    actions = decide(state, findings, EVICT, Workers(6, 1, {f"n{r}": r for r in range(6)}), at(140))
    assert not any(isinstance(a, Evict) for a in actions)


def test_waiting_longer_because_of_computing_less_is_no_straggler() -> None:
    # rank 0 computes 20% less and so waits 20% longer: same step, more communication
    state = DetectorState()
    for step in range(40, 140, 2):
        timings = {r: RankTiming(r, step, 32, 0.2, 0.2 - b, {"forward": b, "communication": 0.2 - b})
                   for r, b in enumerate([0.08, 0.1, 0.1, 0.1, 0.1])}
        state, findings = observe(state, timings, {}, POLICY, at(step))
        assert findings == ()


# --- the decision ----------------------------------------------------------------------------------

def straggling(n: int = 6, slow: dict[int, float] | None = None, policy: StragglerPolicy = EVICT,
               nodes: dict[int, str] | None = None) -> Job:
    job = Job(n, noisy(noise=0.0, slow=slow or {2: 0.3}, onset=10), policy=policy, nodes=nodes)
    job.advance(100)
    return job


def workers(n: int = 6, ready: int | None = None, minimum: int = 1) -> Workers:
    return Workers(ready=n if ready is None else ready, minimum=minimum,
                   worker_of_node={f"node-{r}": r for r in range(n)})


def test_report_mode_reports_and_never_evicts() -> None:
    job = straggling(policy=POLICY)
    findings = job.history[-1][1]
    actions = decide(job.state, findings, POLICY, workers(), at(100))
    assert actions == [Report(2, "node-2", 2, findings[0].slowdown, findings[0].z, "compute", findings[0].since)]


def test_evict_mode_evicts_the_slowest_evictable_straggler_once() -> None:
    job = straggling(slow={2: 0.3, 4: 0.6})
    findings = job.history[-1][1]
    actions = decide(job.state, findings, EVICT, workers(), at(100))
    assert [a.rank for a in actions if isinstance(a, Report)] == [4, 2]
    evicts = [a for a in actions if isinstance(a, Evict)]
    assert evicts == [Evict("node-4", 4, 4, "compute", findings[0].slowdown)]
    assert decide(job.state, findings, EVICT, workers(), at(100)) == actions  # idempotent until applied
    state = applied(job.state, evicts, at(100))
    assert state.evictions[0].pre_step_s == pytest.approx(0.1 * 1.6 + 0.02)
    # under evaluation: no second eviction
    assert not any(isinstance(a, Evict) for a in decide(state, findings, EVICT, workers(), at(101)))


def test_the_hourly_cap_and_zero_cap() -> None:
    job = straggling()
    findings = job.history[-1][1]
    evict = next(a for a in decide(job.state, findings, EVICT, workers(), at(100)) if isinstance(a, Evict))
    done = sg.replace(job.state.evictions[0], verdict="helped") if job.state.evictions else None
    assert done is None
    state = applied(job.state, [evict], at(100))
    state = sg.replace(state, evictions=tuple(sg.replace(e, verdict="helped", node="gone") for e in state.evictions))
    assert not any(isinstance(a, Evict) for a in decide(state, findings, EVICT, workers(), at(100 + 3599)))
    assert any(isinstance(a, Evict) for a in decide(state, findings, EVICT, workers(), at(100 + 3601)))
    two = StragglerPolicy(action=StragglerAction.EVICT, max_evictions_per_hour=2)
    assert any(isinstance(a, Evict) for a in decide(state, findings, two, workers(), at(200)))
    never = StragglerPolicy(action=StragglerAction.EVICT, max_evictions_per_hour=0)
    assert not any(isinstance(a, Evict) for a in decide(job.state, findings, never, workers(), at(100)))


def test_never_below_min_workers() -> None:
    job = straggling()
    findings = job.history[-1][1]
    assert not any(isinstance(a, Evict) for a in decide(job.state, findings, EVICT, workers(ready=3, minimum=3),
                                                        at(100)))
    assert any(isinstance(a, Evict) for a in decide(job.state, findings, EVICT, workers(ready=4, minimum=3),
                                                    at(100)))


def test_unknown_nodes_data_on_several_nodes_and_imbalance_are_not_evicted() -> None:
    f = lambda rank, node, cause: Finding(rank, node, 0.3, 10.0, cause, T0)  # noqa: E731
    state = DetectorState(job_step=100, job_step_s=0.2, job_window=32)
    for findings in ([f(1, "", "compute")], [f(1, "node-9", "compute")], [f(1, "node-1", "imbalance")],
                     [f(1, "node-1", "communication")], [f(1, "node-1", "data"), f(2, "node-2", "data")]):
        assert not any(isinstance(a, Evict) for a in decide(state, findings, EVICT, workers(), T0)), findings
    one_node = [f(1, "node-1", "data"), f(2, "node-1", "data")]
    assert [a for a in decide(state, one_node, EVICT, workers(), T0) if isinstance(a, Evict)] == \
        [Evict("node-1", 1, 1, "data", 0.3)]
    assert [a.node for a in decide(state, [f(3, "node-3", "node")], EVICT, workers(), T0) if isinstance(a, Evict)] \
        == ["node-3"]


def evicted(improvement: float) -> tuple[Job, DetectorState, float]:
    """A job whose straggler on node-2 was evicted; afterwards its step time is ``improvement``
    better (the replacement's speed is chosen to give it)."""
    job = straggling(slow={2: 0.3})
    findings = job.history[-1][1]
    evict = next(a for a in decide(job.state, findings, EVICT, workers(), at(100)) if isinstance(a, Evict))
    job.state = applied(job.state, [evict], at(100))
    before = job.state.evictions[0].pre_step_s
    # the worker is replaced: every rank restarts on the same step count, rank 2 on a new node
    job.nodes = {**job.nodes, 2: "node-new"}
    target = before * (1 - improvement) - job.comm
    job.busy = lambda r, s: target if r == 2 else min(0.1, target)
    job.windows = {r: deque(maxlen=WINDOW) for r in range(job.n)}
    return job, job.state, before


def test_an_eviction_that_did_not_help_is_undone_once() -> None:
    job, _, before = evicted(improvement=0.02)
    job.advance(WINDOW + EVICT.evaluate_steps + 5)
    (record,) = job.state.evictions
    assert record.verdict == "no_improvement"
    findings = job.history[-1][1]
    actions = decide(job.state, findings, EVICT, workers(), at(300))
    undos = [a for a in actions if isinstance(a, Undo)]
    assert len(undos) == 1 and undos[0].node == "node-2" and undos[0].worker == 2 and "5%" in undos[0].why
    state = applied(job.state, undos, at(300))
    assert state.evictions[0].undone
    assert not any(isinstance(a, Undo) for a in decide(state, findings, EVICT, workers(), at(301)))


def test_an_eviction_that_helped_is_kept_and_judged_only_after_the_evaluation_span() -> None:
    job, _, _ = evicted(improvement=0.2)
    job.advance(WINDOW + 10)
    assert job.state.evictions[0].verdict == "pending"
    job.advance(EVICT.evaluate_steps)
    assert job.state.evictions[0].verdict == "helped"
    assert not any(isinstance(a, Undo) for a in decide(job.state, (), EVICT, workers(), at(400)))


def test_an_eviction_whose_node_never_leaves_expires() -> None:
    job = straggling()
    evict = next(a for a in decide(job.state, job.history[-1][1], EVICT, workers(), at(100)) if isinstance(a, Evict))
    state = applied(job.state, [evict], at(100))
    later = {r: RankTiming(r, t.step + 1, t.window, t.step_s, t.wait_s, dict(t.sections))
             for r, t in job.timings().items()}
    state, _ = observe(state, later, job.nodes, EVICT, at(100 + sg.EVALUATION_TIMEOUT_S + 1))
    assert state.evictions[0].verdict == "expired"


def test_the_same_rank_slow_again_on_a_new_node_is_imbalance() -> None:
    job, _, _ = evicted(improvement=0.0)
    job.busy = noisy(noise=0.0, slow={2: 0.3}, onset=0)   # the slowness followed rank 2's data
    job.advance(150)
    (finding,) = job.history[-1][1]
    assert finding.rank == 2 and finding.node == "node-new" and finding.cause == "imbalance"


# --- the sequential test on per-step busy times --------------------------------------------------

def wavy(base: float = 0.1, noise: float = 0.05, seed: int = 0, slow: dict[int, float] | None = None,
         onset: int = 0, until: int | None = None, stretch: float = 0.0) -> Busy:
    """Heavy-tailed, autocorrelated healthy noise: ``spiky``'s (a common load, +-``noise`` per
    step, outlying steps of 3x..30x) and, with ``stretch``, each rank ``stretch`` slower for 40
    steps of every 200 at its own phase (contention on its core); ranks in ``slow`` slower by
    their factor from ``onset`` (until ``until``)."""
    healthy = spiky(base=base, noise=noise, seed=seed)

    def busy(rank: int, step: int) -> float:
        value = healthy(rank, step)
        if stretch and (step + 37 * rank) % 200 < 40:
            value *= 1.0 + stretch
        if slow and rank in slow and step > onset and (until is None or step <= until):
            value *= 1.0 + slow[rank]
        return value
    return busy


@pytest.mark.parametrize("seed", range(4))
def test_sequential_finds_a_10_percent_step_change_within_50_steps(seed: int) -> None:
    # 8 ranks, +-5% per step, outliers, a common load; rank 3 is 10% slower from step 300; the
    # operator observes every 2 steps. Per-step busy times find it after persistSteps and
    # within 50 steps; the windowed forms alone (the same job without them) take longer.
    onset = 300
    fast = Job(8, wavy(seed=seed, slow={3: 0.10}, onset=onset), every=2, medians=True, per_step=True)
    fast.advance(onset + 120)
    found = fast.first(3)
    assert found is not None and onset + 20 <= found <= onset + 50, found
    assert {r for _, fs in fast.history for f in fs for r in [f.rank]} == {3}
    assert next(f for _, fs in fast.history for f in fs).cause == "compute"
    slow = Job(8, wavy(seed=seed, slow={3: 0.10}, onset=onset), every=2, medians=True)
    slow.advance(onset + 120)
    assert slow.state.seq_step is None and (slow.first(3) is None or slow.first(3) > found)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stretch", [0.0, 0.06])
def test_sequential_healthy_heavy_tailed_noise_adds_no_finding_in_long_runs(seed: int, stretch: float) -> None:
    # 16 ranks, 1,000 steps: outliers of 3x..30x and, with ``stretch``, every rank 6% slower for
    # 40 of every 200 steps. The sequential test (armed: it ran) adds no finding to what the
    # windowed forms make of the same job: none without the stretches; with them, the means'
    # imbalance rule (episodes that move from rank to rank) reports the same as without it
    def run(per_step: bool) -> Job:
        job = Job(16, wavy(seed=seed, stretch=stretch), every=2, medians=True, per_step=per_step, policy=EVICT)
        job.advance(1000)
        return job
    job = run(True)
    assert job.state.seq_step == 1000 and job.state.seq_var is not None
    assert job.state.seq_var_steps >= sg.SEQ_WARMUP_STEPS
    assert all(t.straggler_since is None for t in job.state.tracks.values())
    assert all(f.cause == "imbalance" for _, fs in job.history for f in fs)
    assert job.history == run(False).history
    if not stretch:
        assert all(not fs for _, fs in job.history)


@pytest.mark.parametrize("size", [0.5, 3.0])
def test_sequential_a_burst_shorter_than_half_persist_steps_is_never_a_straggler(size: float) -> None:
    # rank 2 is (1 + size)x slower for 14 steps, ranks around it +-2%: S crosses h, but the
    # median of its newest persistSteps log-ratios never reaches k
    job = Job(6, noisy(noise=0.02, slow={2: size}, onset=200, until=214), every=2, medians=True, per_step=True)
    job.advance(216)
    k = sg.seq_drift(POLICY)
    assert job.state.tracks[2].seq_s > sg.sequential_threshold(job.state.seq_var, k, 6)  # it saw the burst
    job.advance(200)
    assert all(not fs for _, fs in job.history)


def test_sequential_never_confirms_before_persist_steps_whatever_the_slowdown() -> None:
    job = Job(6, noisy(noise=0.02, slow={1: 1.0}, onset=100), every=1, per_step=True)
    job.advance(200)
    assert job.first(1) is not None and job.first(1) >= 100 + POLICY.persist_steps


def test_sequential_a_slow_node_is_node_and_sparse_data_is_data() -> None:
    nodes = {r: f"node-{r // 2}" for r in range(8)}
    job = Job(8, wavy(seed=1, slow={4: 0.12, 5: 0.12}, onset=200), nodes=nodes, every=2, per_step=True)
    job.advance(260)
    assert {f.rank: f.cause for f in job.history[-1][1]} == {4: "node", 5: "node"}
    busy = noisy(noise=0.02, slow={6: 0.15}, onset=200)
    job = Job(8, busy, every=2, per_step=True,
              data=lambda r, step: 0.02 + (busy(r, step) - 0.1 if r == 6 and step > 200 else 0.0))
    job.advance(260)
    assert {f.rank: f.cause for f in job.history[-1][1]} == {6: "data"}


def test_without_per_step_times_from_every_rank_the_windowed_forms_judge_alone() -> None:
    # one rank of an older worker (no busy_steps): the sequential test stays off, as on main
    job = Job(6, noisy(noise=0.02, slow={1: 0.3}, onset=100), every=2, medians=True, per_step=True)
    old_timings = job.timings

    def mixed() -> dict[int, RankTiming]:
        out = old_timings()
        return {r: sg.replace(t, busy_first_step=0, busy_steps=()) if r == 5 else t for r, t in out.items()}
    job.timings = mixed  # type: ignore[method-assign]
    job.advance(250)
    assert job.state.seq_step is None and all(t.seq_s == 0.0 for t in job.state.tracks.values())
    assert job.first(1) is not None   # found by the medians and means, as before
    reference = Job(6, noisy(noise=0.02, slow={1: 0.3}, onset=100), every=2, medians=True)
    reference.advance(250)
    assert reference.history == job.history


def _seq_timings(busy: dict[int, list[float]], last: dict[int, int], keep: int = BUSY_STEPS
                 ) -> dict[int, RankTiming]:
    """Rank -> a timing at step ``last[rank]`` carrying its newest ``keep`` steps of ``busy``
    (step ``n`` is ``busy[rank][n - 1]``)."""
    out = {}
    for r, values in busy.items():
        kept = tuple(values[max(0, last[r] - keep):last[r]])
        out[r] = RankTiming(rank=r, step=last[r], window=WINDOW, step_s=0.12, wait_s=0.02, sections={"forward": 0.1},
                            busy_first_step=last[r] - len(kept) + 1, busy_steps=kept)
    return out


def test_fold_steps_lines_ranks_up_by_step_and_folds_each_step_once() -> None:
    rng = random.Random(5)
    busy = {r: [0.1 * (1.0 + rng.uniform(-0.05, 0.05)) * (1.3 if r == 2 else 1.0) for _ in range(100)]
            for r in range(5)}
    ranks: dict[int, sg.SeqRank] = {}
    # rank 4 is ahead: steps past the frontier (the others' newest, 60) wait for them
    first = _seq_timings(busy, {0: 60, 1: 60, 2: 60, 3: 60, 4: 64})
    ranks, folded = sg.fold_steps(ranks, first, None, POLICY)
    assert folded == 60 and len(ranks[4].recent) == POLICY.persist_steps
    again, folded_again = sg.fold_steps(ranks, first, folded, POLICY)   # the same timings: nothing new
    assert (again, folded_again) == (ranks, folded)
    second = _seq_timings(busy, {r: 90 for r in range(5)})
    later, folded = sg.fold_steps(ranks, second, folded, POLICY)
    assert folded == 90 and later[2].s > ranks[2].s > 0.0 and later[0].s < 0.1
    # all at once gives the same result as in two observations
    whole, _ = sg.fold_steps({}, _seq_timings(busy, {r: 90 for r in range(5)}, keep=90), None, POLICY)
    assert whole[2].s == pytest.approx(later[2].s) and whole[2].recent == pytest.approx(later[2].recent)
    # relabelled ranks: relabelled statistics
    swapped = {4 - r: sg.replace(t, rank=4 - r) for r, t in _seq_timings(busy, {r: 90 for r in range(5)}, 90).items()}
    mirror, _ = sg.fold_steps({}, swapped, None, POLICY)
    assert mirror[2 - 0] == whole[2] and mirror[4] == whole[0]
    # steps went back (a restart): every rank starts over
    restarted, folded = sg.fold_steps(later, _seq_timings(busy, {r: 40 for r in range(5)}), 90, POLICY)
    assert folded == 40 and restarted[2] == whole_at(busy, 40)[2]


def whole_at(busy: dict[int, list[float]], last: int) -> dict[int, sg.SeqRank]:
    return sg.fold_steps({}, _seq_timings(busy, {r: last for r in busy}), None, POLICY)[0]


def test_sequential_threshold_is_a_bonferroni_split_that_grows_with_the_noise() -> None:
    k = sg.seq_drift(POLICY)
    assert k == pytest.approx(0.5 * math.log(1.1))
    h8, h64 = sg.sequential_threshold(0.01, k, 8), sg.sequential_threshold(0.01, k, 64)
    assert 0 < h8 < h64 < sg.sequential_threshold(0.04, k, 64)
    assert h64 - h8 == pytest.approx(0.01 / (2 * k) * math.log(8))
    assert sg.sequential_threshold(0.01, k, 8, arl_steps=10 * sg.SEQ_ARL_STEPS) > h8
    assert sg.sequential_threshold(1e9, k, 8) == pytest.approx(1e9 / (2 * k))  # never below v / 2k
    with pytest.raises(ValueError):
        sg.sequential_threshold(0.0, k, 8)
    flat = [sg.SeqRank(recent=(0.0,) * 30) for _ in range(4)]
    assert sg.long_run_variance(flat[:2], 30) is None and sg.long_run_variance(flat, 31) is None
    assert sg.long_run_variance(flat, 30) == pytest.approx(30 * sg.MAD_FLOOR ** 2)  # equal ranks: the floor
    spread = flat[:3] + [sg.SeqRank(recent=(0.1,) * 30)]
    assert sg.long_run_variance(spread, 30) == pytest.approx(30 * 0.1 ** 2 / 4)  # a mean square, not a MAD


def test_long_run_variance_leaves_suspects_out() -> None:
    rng = random.Random(3)
    healthy = [sg.SeqRank(s=rng.uniform(0.0, 0.4), recent=tuple(rng.gauss(0.0, 0.05) for _ in range(30)))
               for _ in range(7)]
    slow = sg.SeqRank(s=0.9, recent=tuple(0.095 + rng.gauss(0.0, 0.05) for _ in range(30)))
    alone = sg.long_run_variance(healthy, 30)
    assert alone is not None
    # every rank counts by default: the slow one inflates the estimate
    assert sg.long_run_variance(healthy + [slow], 30) > 1.5 * alone
    # above the bound it is left out, median included: exactly the estimate without it
    assert sg.long_run_variance(healthy + [slow], 30, suspect_above=0.5) == alone
    assert sg.long_run_variance([slow] + healthy[::-1], 30, suspect_above=0.5) == pytest.approx(alone)  # any order
    # ranks below the bound (healthy ones) count as before
    assert sg.long_run_variance(healthy, 30, suspect_above=0.5) == alone
    # too few ranks left: no estimate (the running one is kept)
    assert sg.long_run_variance(healthy[:2] + [slow], 30, suspect_above=0.5) is None
    flat = [sg.SeqRank(s=1.0, recent=(0.0,) * 30) for _ in range(4)]
    assert sg.long_run_variance(flat, 30, suspect_above=0.5) is None


def _h_after(busy: Busy, steps: int, n: int = 8) -> list[float]:
    """``h`` after every observation of an ``n``-rank job (every 2 steps, per-step times)."""
    job = Job(n, busy, every=2, medians=True, per_step=True)
    k, out = sg.seq_drift(POLICY), []
    for _ in range(steps // 2):
        job.advance(2)
        if job.state.seq_var is not None and job.state.seq_var_steps >= sg.SEQ_WARMUP_STEPS:
            out.append(sg.sequential_threshold(job.state.seq_var, k, n))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_sequential_a_slow_rank_does_not_raise_the_threshold_it_has_to_cross(seed: int,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 ranks, heavy-tailed noise; rank 3 is 10% slower from step 300. Until it is confirmed
    # (about 40 steps), the job's h stays that of the same job without the slow rank; with
    # every rank counted (as before), the slow rank alone raises it by a fifth or more
    onset, until = 300, 340
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_FRACTION", 0.5)
    healthy = _h_after(wavy(seed=seed, noise=0.1), until)
    slowed = _h_after(wavy(seed=seed, noise=0.1, slow={3: 0.10}, onset=onset), until)
    assert len(healthy) == len(slowed) > 100
    assert max(abs(a / b - 1.0) for a, b in zip(slowed, healthy)) < 0.05
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_FRACTION", None)   # the default: every rank counts
    before = _h_after(wavy(seed=seed, noise=0.1, slow={3: 0.10}, onset=onset), until)
    assert before[-1] / healthy[-1] > 1.2


@pytest.mark.parametrize("seed", range(3))
def test_sequential_leaving_suspects_out_keeps_a_healthy_jobs_threshold(seed: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # no slow rank: leaving suspects out changes h by little (healthy ranks are rarely above
    # half of it)
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_FRACTION", 0.5)
    now = _h_after(wavy(seed=seed, noise=0.1, stretch=0.06), 1000)
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_FRACTION", None)
    before = _h_after(wavy(seed=seed, noise=0.1, stretch=0.06), 1000)
    assert len(now) == len(before) and max(abs(a / b - 1.0) for a, b in zip(now, before)) < 0.05


def _h_and_span_after(busy: Busy, steps: int, n: int = 8) -> list[tuple[float, int]]:
    """``h`` and the steps the variance estimate spans after every armed observation (as
    :func:`_h_after`)."""
    job = Job(n, busy, every=2, medians=True, per_step=True)
    k, out = sg.seq_drift(POLICY), []
    for _ in range(steps // 2):
        job.advance(2)
        if job.state.seq_var is not None and job.state.seq_var_steps >= sg.SEQ_WARMUP_STEPS:
            out.append((sg.sequential_threshold(job.state.seq_var, k, n), job.state.seq_var_steps))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_sequential_leaves_suspects_out_only_once_the_estimate_spans_min_steps(seed: int,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # the same slowed job as above (rank 3 10% slower from step 300). While the estimate spans
    # fewer than SEQ_VAR_SUSPECT_MIN_STEPS steps, every rank counts: h is exactly that of the
    # default (fraction None); once it spans them, suspects are left out as before
    onset, until = 300, 340
    slowed = wavy(seed=seed, noise=0.1, slow={3: 0.10}, onset=onset)
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_FRACTION", None)
    every = _h_and_span_after(slowed, until)
    assert 200 <= every[len(every) - (until - onset) // 2][1] and every[-1][1] < sg.SEQ_VAR_STEPS
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_FRACTION", 0.5)
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_MIN_STEPS", sg.SEQ_VAR_STEPS)   # not reached by step 340
    assert _h_and_span_after(slowed, until) == every
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_MIN_STEPS", 200)                # reached before the onset
    healthy = _h_after(wavy(seed=seed, noise=0.1), until)
    mature = _h_after(slowed, until)
    assert len(healthy) == len(mature) == len(every)
    assert max(abs(a / b - 1.0) for a, b in zip(mature, healthy)) < 0.05
    assert every[-1][0] / healthy[-1] > 1.2
    # until the estimate spans the steps, the threshold is the default's, step for step
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_MIN_STEPS", 200)
    early = wavy(seed=seed, noise=0.1, slow={3: 0.10}, onset=100)
    young = _h_and_span_after(early, 240)
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_FRACTION", None)
    default = _h_and_span_after(early, 240)
    assert len(young) == len(default)
    assert [x for x in young if x[1] <= 200] == [x for x in default if x[1] <= 200]
    assert young != default   # and past them, suspects are left out


def test_suspect_min_steps_changes_nothing_while_every_rank_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # the defaults: fraction None (every rank counts) and min steps 0; min steps alone is inert
    assert sg.SEQ_VAR_SUSPECT_FRACTION is None and sg.SEQ_VAR_SUSPECT_MIN_STEPS == 0
    slowed = wavy(seed=1, noise=0.1, slow={3: 0.10}, onset=300)
    before = _h_and_span_after(slowed, 340)
    monkeypatch.setattr(sg, "SEQ_VAR_SUSPECT_MIN_STEPS", 200)
    assert _h_and_span_after(slowed, 340) == before


def test_the_state_with_sequential_statistics_round_trips_through_json() -> None:
    job = Job(6, noisy(noise=0.02, slow={1: 0.2}, onset=100), every=2, per_step=True)
    job.advance(160)
    assert job.state.seq_step == 160 and job.state.tracks[1].seq_recent
    assert DetectorState.decode(job.state.encode()) == job.state


# --- state and status ------------------------------------------------------------------------------

def test_the_state_round_trips_through_json() -> None:
    job, _, _ = evicted(improvement=0.2)
    job.advance(60)
    assert job.state.evictions and job.state.tracks
    assert DetectorState.decode(job.state.encode()) == job.state


def test_status_records_say_what_was_done() -> None:
    job = straggling()
    findings = job.history[-1][1]
    actions = decide(job.state, findings, EVICT, workers(), at(100))
    (record,) = sg.status_records(job.state, actions)
    assert isinstance(record, StragglerRecord)
    assert (record.rank, record.worker, record.node, record.cause, record.action) == (2, 2, "node-2", "compute",
                                                                                      "Reported")
    state = applied(job.state, [a for a in actions if isinstance(a, Evict)], at(100))
    assert sg.status_records(state, actions)[0].action == "Evicted"
    dumped = record.model_dump(mode="json", by_alias=True)
    assert set(dumped) == {"rank", "worker", "node", "slowdown", "score", "cause", "since", "action"}


# --- the spec -------------------------------------------------------------------------------------

def test_policy_defaults_and_camel_case() -> None:
    spec = parse_spec(VALID_SPEC)
    assert isinstance(spec, TrainingJobSpec)
    p = spec.stragglers
    assert (p.action, p.min_slowdown, p.z_threshold, p.persist_steps) == (StragglerAction.REPORT, 0.1, 3.0, 30)
    assert (p.max_evictions_per_hour, p.quarantine_seconds, p.evaluate_steps, p.min_improvement) == (1, 3600, 50, 0.05)
    custom = parse_spec({**VALID_SPEC, "stragglers": {"action": "Evict", "minSlowdown": 0.25, "persistSteps": 64,
                                                      "maxEvictionsPerHour": 3, "minImprovement": 0.1}})
    assert custom.stragglers.action == StragglerAction.EVICT and custom.stragglers.persist_steps == 64
    assert custom.model_dump(by_alias=True, mode="json")["stragglers"]["maxEvictionsPerHour"] == 3


@pytest.mark.parametrize("bad, field", [
    ({"action": "Kill"}, "action"), ({"minSlowdown": 0.0}, "minSlowdown"), ({"minSlowdown": 11}, "minSlowdown"),
    ({"persistSteps": 0}, "persistSteps"), ({"maxEvictionsPerHour": -1}, "maxEvictionsPerHour"),
    ({"zThreshold": 0.5}, "zThreshold"), ({"minImprovement": 1.5}, "minImprovement"),
    ({"evaluateSteps": 0}, "evaluateSteps"), ({"persistSteps": "30"}, "persistSteps"), ({"typo": 1}, "typo"),
])
def test_policy_validation_names_the_field(bad: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_spec({**VALID_SPEC, "stragglers": bad})
    assert f"stragglers.{field}" in str(info.value)


def test_fractions_are_consistent() -> None:
    assert 0 < EVIDENCE_FRACTION < CONFIRM_FRACTION <= 1


def test_eviction_records_stay_bounded_but_keep_what_the_decision_needs() -> None:
    state = DetectorState(job_step=100, job_step_s=0.2, job_window=32)
    for i in range(100):
        state = applied(state, [Evict(f"n{i}", i, i, "compute", 0.3)], at(3600.0 * i))
        state = sg.replace(state, evictions=tuple(sg.replace(e, verdict="helped") for e in state.evictions))
    assert len(state.evictions) == sg.MAX_RECORDS
    busy = DetectorState(job_step=100, job_step_s=0.2, job_window=32)
    busy = applied(busy, [Evict(f"n{i}", i, i, "compute", 0.3) for i in range(50)], at(0))
    assert len(busy.evictions) == 50   # all within the hour: the cap counts them
