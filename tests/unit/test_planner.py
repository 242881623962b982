"""The cluster planner: feasibility, optimality against brute force, priorities, stability."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salamander_operator.planner import ClusterPlan, JobDemand, PlanError, ThroughputCurve, plan


def _value(d: JobDemand, x: int, horizon: float) -> float:
    return float(d.values(np.array([x]), horizon)[0])


def brute_force(demands: list[JobDemand], capacity: int, horizon: float) -> float:
    """The best summed value of one priority tier, by trying every assignment."""
    best = 0.0
    for counts in itertools.product(*[[0, *range(d.min_workers, d.max_workers + 1)] for d in demands]):
        if sum(counts) <= capacity:
            best = max(best, sum(_value(d, x, horizon) for d, x in zip(demands, counts)))
    return best


curves = st.one_of(
    st.builds(ThroughputCurve, per_worker=st.floats(0.1, 10), exponent=st.floats(0.3, 1.0)),
    st.lists(st.tuples(st.integers(1, 6), st.floats(0.0, 50.0)), min_size=1, max_size=4,
             unique_by=lambda p: p[0]).map(lambda ps: ThroughputCurve(points=tuple(ps), exponent=0.8)),
)


@st.composite
def demand_sets(draw, max_jobs: int = 4, priorities: int = 1) -> list[JobDemand]:
    n = draw(st.integers(1, max_jobs))
    demands = []
    for i in range(n):
        lo = draw(st.integers(1, 4))
        hi = draw(st.integers(lo, 6))
        demands.append(JobDemand(
            key=f"ns/job-{i}", min_workers=lo, max_workers=hi, current=draw(st.integers(0, 7)),
            weight=draw(st.floats(0.1, 5.0)), priority=draw(st.integers(0, priorities - 1)),
            throughput=draw(curves), transition_s=draw(st.sampled_from([0.0, 30.0, 600.0]))))
    return demands


@settings(max_examples=300, deadline=None)
@given(demand_sets(), st.integers(0, 14), st.sampled_from([600.0, 3600.0]))
def test_plan_is_feasible_and_optimal_against_brute_force(demands, capacity, horizon):
    result = plan(demands, capacity, horizon)
    for d in demands:
        x = result.workers[d.key]
        assert x == 0 or d.min_workers <= x <= d.max_workers, "never below min, never above max"
    assert result.used <= capacity, "never above capacity"
    achieved = sum(_value(d, result.workers[d.key], horizon) for d in demands)
    assert achieved == pytest.approx(brute_force(demands, capacity, horizon), rel=1e-6, abs=1e-9)
    assert result.value == pytest.approx(achieved, rel=1e-6, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(demand_sets(max_jobs=4, priorities=2), st.integers(0, 14))
def test_a_higher_priority_is_planned_first(demands, capacity):
    """Priorities are strict: the top tier gets its brute-force best as if alone, and the
    lower tier the best of what the top tier leaves."""
    result = plan(demands, capacity)
    top = [d for d in demands if d.priority == 1]
    rest = [d for d in demands if d.priority == 0]
    top_value = sum(_value(d, result.workers[d.key], 3600.0) for d in top)
    assert top_value == pytest.approx(brute_force(top, capacity, 3600.0), rel=1e-6, abs=1e-9)
    left = capacity - sum(result.workers[d.key] for d in top)
    rest_value = sum(_value(d, result.workers[d.key], 3600.0) for d in rest)
    assert rest_value == pytest.approx(brute_force(rest, left, 3600.0), rel=1e-6, abs=1e-9)
    assert result.used <= capacity


@settings(max_examples=100, deadline=None)
@given(demand_sets(), st.integers(0, 14))
def test_planning_the_plan_again_changes_nothing(demands, capacity):
    """Stable: once jobs run with the planned counts, planning again with the same capacity
    keeps every count (ties keep the current one)."""
    first = plan(demands, capacity)
    settled = [JobDemand(d.key, d.min_workers, d.max_workers, first.workers[d.key], d.weight, d.priority,
                         d.throughput, d.transition_s) for d in demands]
    assert plan(settled, capacity).workers == first.workers


def test_a_node_lost_shrinks_the_elastic_job_rather_than_suspending_one():
    a = JobDemand("ns/a", 2, 4, current=4, transition_s=60)
    b = JobDemand("ns/b", 4, 4, current=4, transition_s=60)
    result = plan([a, b], capacity=7)
    assert result.workers == {"ns/a": 3, "ns/b": 4}
    assert result.changes([a, b]) == {"ns/a": (4, 3)}


def test_the_lower_value_job_is_suspended_when_not_both_fit():
    a = JobDemand("ns/a", 2, 2, current=2, weight=1.0)
    b = JobDemand("ns/b", 2, 2, current=2, weight=2.0)
    assert plan([a, b], capacity=3).workers == {"ns/a": 0, "ns/b": 2}


def test_a_higher_priority_takes_capacity_from_a_heavier_lower_priority_job():
    low = JobDemand("ns/low", 2, 4, current=4, weight=100.0, priority=0)
    high = JobDemand("ns/high", 2, 4, current=0, weight=1.0, priority=1)
    assert plan([low, high], capacity=6).workers == {"ns/low": 2, "ns/high": 4}


def test_transition_cost_keeps_a_job_where_it_is_for_a_small_gain():
    """Concave scaling makes 3+3 slightly better than 4+2, but not by enough to pay for two restarts."""
    curve = ThroughputCurve(exponent=0.95)
    a = JobDemand("ns/a", 1, 4, current=4, throughput=curve, transition_s=600)
    b = JobDemand("ns/b", 1, 4, current=2, throughput=curve, transition_s=600)
    assert plan([a, b], capacity=6, horizon_s=3600).workers == {"ns/a": 4, "ns/b": 2}
    cheap = [JobDemand(d.key, 1, 4, d.current, throughput=curve, transition_s=0) for d in (a, b)]
    assert plan(cheap, capacity=6, horizon_s=3600).workers == {"ns/a": 3, "ns/b": 3}


def test_measured_points_shape_the_curve():
    """A job measured to gain nothing past 2 workers gives its spare capacity to one that scales."""
    flat = ThroughputCurve(points=((2, 10.0), (4, 10.0)))
    assert flat.at(3) == 10.0 and flat.at(1) == pytest.approx(5.0) and flat.at(8) == pytest.approx(20.0)
    a = JobDemand("ns/a", 2, 4, current=0, throughput=ThroughputCurve(points=((2, 10.0), (4, 10.5))))
    b = JobDemand("ns/b", 2, 4, current=0, throughput=ThroughputCurve(per_worker=5.0))
    assert plan([a, b], capacity=6).workers == {"ns/a": 2, "ns/b": 4}


def test_no_capacity_suspends_everyone_and_no_jobs_is_an_empty_plan():
    a = JobDemand("ns/a", 1, 3, current=3)
    assert plan([a], capacity=0).workers == {"ns/a": 0}
    empty = plan([], capacity=10)
    assert isinstance(empty, ClusterPlan) and empty.workers == {} and empty.value == 0.0


@pytest.mark.parametrize("make, message", [
    (lambda: JobDemand("ns/a", 3, 2), "min <= max"),
    (lambda: JobDemand("ns/a", 0, 2), "min <= max"),
    (lambda: JobDemand("ns/a", 1, 2, current=-1), "current workers"),
    (lambda: JobDemand("ns/a", 1, 2, weight=0), "weight"),
    (lambda: JobDemand("ns/a", 1, 2, weight=float("nan")), "weight"),
    (lambda: JobDemand("ns/a", 1, 2, transition_s=-1), "transition"),
    (lambda: ThroughputCurve(exponent=0), "exponent"),
    (lambda: ThroughputCurve(points=((0, 1.0),)), "workers >= 1"),
    (lambda: ThroughputCurve(points=((1, float("inf")),)), "finite"),
    (lambda: ThroughputCurve(points=((1, 1.0), (1, 2.0))), "distinct"),
    (lambda: plan([], -1), "capacity"),
    (lambda: plan([], 1, horizon_s=0), "horizon"),
    (lambda: plan([JobDemand("ns/a", 1, 1), JobDemand("ns/a", 1, 1)], 2), "unique"),
])
def test_bad_input_is_named(make, message):
    with pytest.raises(PlanError, match=message):
        make()
