"""The cluster simulator: trace statistics, workload, the engine's invariants and cost model, the
policies' order, the planner's part, the report, and ``salamander simulate``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander import cli
from salamander_operator.failures import Severity
from salamander_operator.simulator import (DEFAULT_MIX, GPU_CAUSES, ClusterConfig, FailureEvent, FailureKind,
                                           FailureTrace, JobSpec, PolicyRun, SimulationError, elastic_per_job,
                                           generate_jobs, generate_trace, restart_baseline, run_scenario,
                                           salamander_full, salamander_no_planner, simulate, standard_policies,
                                           summarize)
from salamander_operator.simulator import engine
from salamander_operator.simulator.trace import FAILURES_PER_GPU_DAY
from tests.unit._support import FAST, one_line

H = 3600.0
SMALL = dict(nodes=64, days=14.0, load=0.6, failure_rate_scale=20.0)


def job(key: str, size: int, least: int, weight: float = 1.0, arrive_h: float = 0.0, depart_h: float = 24.0,
        config: ClusterConfig = ClusterConfig(nodes=8, days=1)) -> JobSpec:
    return JobSpec(key, size, least, weight, 1.0, config.node_flops, arrive_h * H, depart_h * H)


def trace_of(config: ClusterConfig, *events: tuple[float, int, FailureKind, float]) -> FailureTrace:
    """Failures as (hour, node, kind, repair hours)."""
    return FailureTrace.of([FailureEvent(t * H, n, k, r * H) for t, n, k, r in events], config.nodes,
                           config.horizon_s)


def assert_books(run: PolicyRun) -> None:
    """Every job's time adds up; the cluster's GPU-seconds add up; never more held than healthy."""
    for result in run.jobs:
        assert result.productive_s >= -1e-6
        assert math.isclose(result.productive_s + sum(result.lost_s.values()), result.alive_s,
                            rel_tol=1e-9, abs_tol=1e-6), result
    total = run.config.gpus * run.config.horizon_s
    assert math.isclose(sum(run.gpu_s.values()), total, rel_tol=1e-9)
    assert all(run.gpu_s[c] >= -1e-6 * total for c in GPU_CAUSES)
    assert run.overcommitted_events == 0


# --- the trace ----------------------------------------------------------------------------------

def test_trace_count_and_mix_follow_the_rate() -> None:
    config = ClusterConfig(nodes=2048, days=30, failure_rate_scale=10, seed=3)
    trace = generate_trace(config)
    expected = FAILURES_PER_GPU_DAY * config.gpus * config.days * 10
    assert math.isclose(trace.expected, expected)
    assert abs(len(trace) - expected) < 4 * math.sqrt(expected)
    counts = trace.counts()
    for kind, share in DEFAULT_MIX.items():
        assert abs(counts[kind] / len(trace) - share) < 0.03, kind
    assert np.all(np.diff(trace.times) >= 0) and trace.times[0] >= 0 and trace.times[-1] < config.horizon_s
    assert trace.nodes.min() >= 0 and trace.nodes.max() < config.nodes
    is_node = trace.kinds == list(FailureKind).index(FailureKind.NODE)
    assert np.all(trace.repair_s[is_node] > 0) and np.all(trace.repair_s[~is_node] == 0)
    assert 2.5 * H < np.median(trace.repair_s[is_node]) < 6 * H  # log-normal, median 4 h


def test_published_rate_is_one_failure_per_264_node_days() -> None:
    assert 1 / (FAILURES_PER_GPU_DAY * 8) == pytest.approx(264, rel=0.01)
    assert {k: k.severity for k in FailureKind} == {
        FailureKind.NODE: Severity.SEV1, FailureKind.CRASH: Severity.SEV2, FailureKind.HANG: Severity.SEV2,
        FailureKind.LINK: Severity.SEV3}


def test_trace_and_jobs_are_deterministic_per_seed() -> None:
    one, same, other = (ClusterConfig(nodes=256, seed=s) for s in (5, 5, 6))
    a, b, c = generate_trace(one), generate_trace(same), generate_trace(other)
    assert np.array_equal(a.times, b.times) and np.array_equal(a.kinds, b.kinds)
    assert len(a) != len(c) or not np.array_equal(a.times, c.times)
    assert generate_jobs(one) == generate_jobs(same) != generate_jobs(other)
    assert generate_trace(ClusterConfig(nodes=256, failure_rate_scale=0)).counts() == dict.fromkeys(FailureKind, 0)


def test_a_hand_written_trace_is_checked() -> None:
    config = ClusterConfig(nodes=8, days=1)
    with pytest.raises(SimulationError, match="outside"):
        trace_of(config, (1, 8, FailureKind.CRASH, 0))
    with pytest.raises(SimulationError, match="repair time"):
        trace_of(config, (1, 0, FailureKind.NODE, 0))


# --- the workload -------------------------------------------------------------------------------

def test_jobs_fill_the_cluster_to_the_load() -> None:
    config = ClusterConfig(nodes=1024, days=28, seed=1)
    jobs = generate_jobs(config)
    assert all(1 <= j.min_nodes == math.ceil(j.nodes / 2) and j.nodes <= 256 for j in jobs)
    assert all(0 <= j.arrive_s < j.depart_s <= config.horizon_s for j in jobs)
    assert any(j.nodes <= 8 for j in jobs) and any(j.nodes >= 32 for j in jobs)
    grid = np.linspace(0, config.horizon_s, 500, endpoint=False)
    demand = [sum(j.nodes for j in jobs if j.arrive_s <= t < j.depart_s) for t in grid]
    assert np.mean(demand) == pytest.approx(config.load * config.nodes, rel=0.03)  # the realized mean


@pytest.mark.parametrize("change, needle", [
    (dict(nodes=0), "nodes"), (dict(days=-1.0), "days"), (dict(gpus_per_node=0), "gpus_per_node"),
    (dict(failure_rate_scale=-0.5), "failure_rate_scale"), (dict(seed=-1), "seed"), (dict(load=0.0), "load"),
    (dict(jobs=0), "jobs"), (dict(days=math.nan), "days"), (dict(nodes=2.5), "nodes"),
])
def test_bad_config_is_named(change: dict[str, float], needle: str) -> None:
    with pytest.raises(SimulationError, match=needle):
        ClusterConfig(**change)  # type: ignore[arg-type]


def test_too_few_jobs_is_named() -> None:
    with pytest.raises(SimulationError, match="too few"):
        generate_jobs(ClusterConfig(nodes=1024, jobs=3))


# --- the engine: invariants ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_every_policy_keeps_its_books(seed: int) -> None:
    config = ClusterConfig(nodes=48, days=10, seed=seed, load=0.9, failure_rate_scale=40)
    jobs, trace = generate_jobs(config), generate_trace(config)
    assert len(trace) > 50
    for policy in standard_policies():
        run = simulate(config, jobs, trace, policy, check=True)  # check: the node books after every event
        assert_books(run)


@st.composite
def small_cases(draw: st.DrawFn) -> tuple[ClusterConfig, list[JobSpec], FailureTrace]:
    nodes = draw(st.integers(2, 10))
    config = ClusterConfig(nodes=nodes, days=1)
    jobs = []
    for i in range(draw(st.integers(1, 5))):
        size = draw(st.integers(1, nodes))
        arrive = draw(st.floats(0, 20))
        jobs.append(job(f"j{i}", size, draw(st.integers(1, size)), draw(st.sampled_from([1.0, 2.0, 3.0])),
                        arrive, draw(st.floats(arrive + 0.1, 24)), config))
    failures = draw(st.lists(st.tuples(st.floats(0, 23.9), st.integers(0, nodes - 1),
                                       st.sampled_from(list(FailureKind)), st.floats(0.01, 10)), max_size=12))
    return config, jobs, trace_of(config, *((t, n, k, r if k is FailureKind.NODE else 0) for t, n, k, r in failures))


@FAST
@given(small_cases())
def test_books_hold_on_any_small_case(case: tuple[ClusterConfig, list[JobSpec], FailureTrace]) -> None:
    config, jobs, trace = case
    for policy in standard_policies():
        assert_books(simulate(config, jobs, trace, policy, check=True))


def test_runs_are_deterministic() -> None:
    config = ClusterConfig(**SMALL)  # type: ignore[arg-type]
    first, second = ([dataclasses.replace(s, wall_s=0.0) for s in run_scenario(config).summaries()] for _ in "12")
    assert first == second


# --- the cost model -----------------------------------------------------------------------------

def test_without_failures_policies_differ_only_by_checkpoint_overhead() -> None:
    config = ClusterConfig(nodes=32, days=5, failure_rate_scale=0)
    rng = np.random.default_rng(0)
    jobs = []
    for i, size in enumerate((8, 8, 6, 4, 4, 2)):  # 32 nodes: they always fit together
        arrive = float(rng.uniform(0, 48))
        jobs.append(JobSpec(f"j{i}", size, (size + 1) // 2, float(rng.integers(1, 4)), float(rng.uniform(0.85, 1)),
                            config.node_flops, arrive * H, float(rng.uniform(arrive + 1, 120)) * H))
    trace = generate_trace(config)
    runs = [simulate(config, jobs, trace, p, check=True) for p in standard_policies()]
    for run in runs:
        for result in run.jobs:
            lost = {c: v for c, v in result.lost_s.items() if v > 1e-9}
            assert set(lost) == {"checkpoint"}, (run.policy.name, lost)
            assert result.productive_s == pytest.approx(result.alive_s * (1 - run.policy.overhead))
    base = runs[0]
    for run in runs[1:]:
        assert run.waf_flop / base.waf_flop == pytest.approx((1 - run.policy.overhead) / (1 - base.policy.overhead))
        assert run.counts.get("resizes", 0) == 0 and run.counts.get("suspensions", 0) == 0
    assert runs[-1].counts["plans"] >= len(jobs)  # the planner still ran on every arrival and departure


def lost_of(run: PolicyRun, key: str) -> dict[str, float]:
    return next(j.lost_s for j in run.jobs if j.key == key)


def test_a_lost_node_costs_what_each_policy_says() -> None:
    """Two jobs of 4 (min 2) fill 8 nodes; job a loses a node at 1 h, repaired 10 h later."""
    config = ClusterConfig(nodes=8, days=1)
    jobs = [job("a", 4, 2), job("b", 4, 2)]
    trace = trace_of(config, (1, 0, FailureKind.NODE, 10))
    restart, elastic, bare, full = (simulate(config, jobs, trace, p, check=True) for p in standard_policies())
    trained = H * (1 - restart.policy.overhead)
    a = lost_of(restart, "a")  # 30 min timeout, 9 min queue, then no free node: waits for the repair, 14 min setup
    assert a["detection"] == pytest.approx(1800) and a["recovery"] == pytest.approx(840)
    assert a["queueing"] == pytest.approx(11 * H - (H + 1800))
    assert a["recompute"] == pytest.approx(trained % 1800)
    a = lost_of(elastic, "a")  # 5 min, then 5 min restart on its 3 survivors; grows back at the repair
    assert a["detection"] == pytest.approx(300) and a["recovery"] == pytest.approx(300)
    assert a["queueing"] == 0 and a["resize"] == pytest.approx(300)
    a = lost_of(full, "a")  # 10 s, 120 s rebuild, recompute under one snapshot interval
    assert a["detection"] == pytest.approx(10) and a["recovery"] == pytest.approx(120)
    assert 0 < a["recompute"] < 60
    assert lost_of(bare, "a") == pytest.approx(a)
    assert full.waf_flop > bare.waf_flop * 0.999 > elastic.waf_flop > restart.waf_flop
    for run in (restart, elastic, bare, full):
        assert sum(lost_of(run, "b")[c] for c in ("detection", "recovery", "queueing", "recompute")) == 0


@pytest.mark.parametrize("kind, detect, recover", [(FailureKind.CRASH, 5, 60), (FailureKind.HANG, 30, 60),
                                                   (FailureKind.LINK, 5, 10)])
def test_salamander_restarts_in_place(kind: FailureKind, detect: float, recover: float) -> None:
    config = ClusterConfig(nodes=8, days=1)
    run = simulate(config, [job("a", 4, 2)], trace_of(config, (1, 0, kind, 0)), salamander_full(), check=True)
    a = lost_of(run, "a")
    assert a["detection"] == pytest.approx(detect) and a["recovery"] == pytest.approx(recover)
    assert (a["recompute"] == 0) == (kind is FailureKind.LINK)  # a link error is retried: nothing recomputed
    assert run.counts["plans"] == 1  # its arrival: a restart in place changes no capacity


def test_a_second_node_lost_during_the_rebuild_falls_back_to_disk() -> None:
    config = ClusterConfig(nodes=8, days=1)
    jobs = [job("a", 4, 2)]
    once = simulate(config, jobs, trace_of(config, (5, 0, FailureKind.NODE, 1)), salamander_full(), check=True)
    twice = simulate(config, jobs, trace_of(config, (5, 0, FailureKind.NODE, 1), (5 + 60 / H, 1, FailureKind.NODE, 1)),
                     salamander_full(), check=True)
    assert "fallbacks_to_disk" not in once.counts and twice.counts["fallbacks_to_disk"] == 1
    assert lost_of(once, "a")["recompute"] < 60 < lost_of(twice, "a")["recompute"]
    assert lost_of(twice, "a")["recovery"] >= 300


def test_a_fallback_to_disk_takes_back_what_the_lost_work_earned_at_its_node_counts() -> None:
    """b (1 node) departs at 1 h; a (2 nodes, min 1) trained on 1 node until then and grows to 2.
    At 4,290 s a loses a node, at 4,350 s (rebuilding) the other: it falls back to disk. The disk
    tier was saved once, at 3,000 s of training, all on 1 node; what followed spans the resize
    (582 s on 1 node, then 540 s on 2 after the in-memory recompute), and all of it is lost. What
    a keeps is those 3,000 s on 1 node: its GPU-seconds and WAF, not the recompute priced at 2."""
    config = ClusterConfig(nodes=2, days=1)
    jobs = [job("b", 1, 1, depart_h=1), job("a", 2, 1, depart_h=2)]
    trace = trace_of(config, (4290 / H, 0, FailureKind.NODE, 10), (4350 / H, 1, FailureKind.NODE, 10))
    run = simulate(config, jobs, trace, salamander_no_planner(), check=True)
    assert_books(run)
    assert run.counts["grows"] == 1 and run.counts["fallbacks_to_disk"] == 1
    a, b = (next(j for j in run.jobs if j.key == k) for k in "ab")
    assert a.productive_s == pytest.approx(3000)
    assert a.lost_s["recompute"] == pytest.approx(57 + 1122)  # the in-memory snapshot's 57 s, then the disk's
    assert a.waf_flop == pytest.approx(jobs[1].throughput(1) * 3000)
    g = config.gpus_per_node
    assert run.gpu_s["productive"] == pytest.approx(g * (3000 + b.productive_s))  # both on 1 node
    assert run.gpu_s["recompute"] == pytest.approx(g * (57 * 2 + 582 * 1 + 540 * 2))


# --- the planner's part -------------------------------------------------------------------------

def test_the_planner_runs_on_every_capacity_change_and_reallocates(monkeypatch: pytest.MonkeyPatch) -> None:
    """a (4 nodes, needs all 4, weight 3) and b (4, min 2) fill 8 nodes; a loses a node at 1 h.
    The planner takes a node from b for a; elastic and restart make a wait for the repair."""
    config = ClusterConfig(nodes=8, days=1)
    jobs = [job("a", 4, 4, weight=3.0), job("b", 4, 2)]
    trace = trace_of(config, (1, 0, FailureKind.NODE, 10))
    seen: list[tuple[int, dict[str, int]]] = []
    real = engine.planner.plan

    def spy(demands, capacity, horizon_s):  # type: ignore[no-untyped-def]
        result = real(demands, capacity, horizon_s)
        seen.append((capacity, dict(result.workers)))
        return result

    monkeypatch.setattr(engine.planner, "plan", spy)
    full = simulate(config, jobs, trace, salamander_full(), check=True)
    # a arrives, b arrives, a's lost node is detected, the node is repaired
    assert [c for c, _ in seen] == [8, 8, 7, 8] and full.counts["plans"] == 4
    assert seen[2][1] == {"a": 4, "b": 3} and seen[3][1] == {"a": 4, "b": 4}
    assert full.counts["shrinks"] == 1 and full.counts["grows"] == 1
    assert lost_of(full, "a")["queueing"] == 0
    seen.clear()
    for policy in (restart_baseline(), elastic_per_job(), salamander_no_planner()):
        run = simulate(config, jobs, trace, policy, check=True)
        assert lost_of(run, "a")["queueing"] > 9 * H, policy.name  # no free node: a waits for its repair
        assert run.waf_flop < full.waf_flop
    assert seen == []  # only the full stack plans


def test_the_planner_suspends_the_lighter_job_when_capacity_drops() -> None:
    config = ClusterConfig(nodes=8, days=1)
    jobs = [job("a", 4, 4, weight=3.0), job("b", 4, 4, weight=1.0)]
    run = simulate(config, jobs, trace_of(config, (1, 0, FailureKind.NODE, 10)), salamander_full(), check=True)
    assert run.counts["suspensions"] == 1 and run.counts["resumes"] == 1
    assert lost_of(run, "b")["suspended"] == pytest.approx(10 * H - 10, abs=1)  # from a's detection to the repair
    assert lost_of(run, "a")["queueing"] == 0


def test_a_job_that_lost_every_node_and_gets_none_is_suspended_not_run_on_nothing() -> None:
    """The shrunk case of a rare property-test failure: two 1-node jobs on 2 nodes, j0's node lost
    at once. At the detection the planner keeps j1 on the one healthy node (a tie keeps the current
    count) and gives j0 none: no change of j0's count (0 -> 0), but j0 must be suspended, not left
    restarting and then running on 0 nodes. The repair at 1 h finds both jobs departed."""
    config = ClusterConfig(nodes=2, days=1)
    jobs = [job("j0", 1, 1, depart_h=1), job("j1", 1, 1, depart_h=1)]
    trace = trace_of(config, (0, 0, FailureKind.NODE, 1))
    run = simulate(config, jobs, trace, salamander_full(), check=True)
    assert_books(run)
    assert run.counts["suspensions"] == 1 and "resumes" not in run.counts
    j0 = next(j for j in run.jobs if j.key == "j0")
    assert j0.productive_s == 0 and j0.waf_flop == 0
    assert j0.lost_s["detection"] == pytest.approx(10) and j0.lost_s["suspended"] == pytest.approx(H - 10)
    assert j0.lost_s["recovery"] == 0
    for policy in (restart_baseline(), elastic_per_job(), salamander_no_planner()):  # they wait for a node
        assert_books(simulate(config, jobs, trace, policy, check=True))


def test_a_job_left_below_its_minimum_is_suspended_and_frees_its_survivor() -> None:
    """j0 (2 nodes, needs both) loses one at once; at the detection the planner gives it none and
    its survivor, the one healthy node, to j1, which was pending (j2 and j3 wait)."""
    config = ClusterConfig(nodes=2, days=1)
    jobs = [job("j0", 2, 2, depart_h=1), *(job(f"j{i}", 1, 1, depart_h=1) for i in (1, 2, 3))]
    run = simulate(config, jobs, trace_of(config, (0, 0, FailureKind.NODE, 1)), salamander_full(), check=True)
    assert_books(run)
    assert run.counts["suspensions"] == 1
    assert lost_of(run, "j0")["suspended"] == pytest.approx(H - 10)
    assert lost_of(run, "j1")["queueing"] == pytest.approx(10)  # from the arrivals to j0's detection
    assert [j.key for j in run.jobs if j.productive_s > 0] == ["j1"]  # one healthy node: one job trains


# --- the comparison -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_stack_beats_elastic_beats_restart(seed: int) -> None:
    scenario = run_scenario(ClusterConfig(seed=seed, **SMALL))  # type: ignore[arg-type]
    restart, elastic, bare, full = scenario.summaries()
    assert restart.waf_ratio == 1.0
    assert full.waf_ratio >= bare.waf_ratio > elastic.waf_ratio > 1.0
    assert full.goodput > elastic.goodput > restart.goodput
    assert full.lost_gpu_h["detection"] < elastic.lost_gpu_h["detection"] < restart.lost_gpu_h["detection"]


def test_summary_and_ratio() -> None:
    scenario = run_scenario(ClusterConfig(**SMALL))  # type: ignore[arg-type]
    summaries = summarize(scenario.runs)
    assert [s.name for s in summaries] == ["restart", "elastic", "salamander-no-planner", "salamander"]
    full = summaries[-1]
    assert full.waf_ratio == pytest.approx(scenario.runs[-1].waf_flop / scenario.runs[0].waf_flop)
    assert 0 < full.goodput <= full.allocated_goodput <= 1
    assert full.plans > 0 and summaries[0].plans == 0
    assert scenario.runs[-1].cumulative_waf(np.array([scenario.config.horizon_s]))[0] == pytest.approx(
        scenario.runs[-1].waf_flop, rel=1e-6)


# --- salamander simulate ------------------------------------------------------------------------

TINY = ["simulate", "--nodes", "24", "--days", "3", "--failure-rate-scale", "30", "--seed", "1"]


def test_cli_prints_the_table_and_writes_plots_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    assert cli.main([*TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    for needle in ("Policies", "WAF x baseline", "cluster goodput", "Lost GPU-hours by cause", "recompute",
                   "Whole-job restart", "Elastic per job", "Salamander without the planner", "the restart baseline's"):
        assert needle in captured.out, needle
    names = {"results.json", "waf_over_time.png", "lost_by_cause.png", "job_goodput.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        assert f"wrote {out / name}" in captured.out
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["nodes"] == 24 and len(data["policies"]) == 4
    assert data["policies"][0]["summary"]["waf_ratio"] == 1.0
    assert data["policies"][-1]["parameters"]["allocation"] == "planner"


@pytest.mark.parametrize("flag, value", [
    ("--nodes", "0"), ("--nodes", "ten"), ("--days", "-1"), ("--days", "0"), ("--gpus-per-node", "2.5"),
    ("--failure-rate-scale", "-1"), ("--seed", "x"), ("--jobs", "0"), ("--load", "9"), ("--days", "inf"),
])
def test_cli_bad_argument_is_one_line(flag: str, value: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    assert cli.main(["simulate", flag, value, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and one_line(captured.err.removesuffix("\n"))
    assert captured.err.startswith(f"salamander: simulate: {flag} must be") and repr(value) in captured.err
    assert not out.exists()


def test_cli_too_few_jobs_and_an_unusable_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--jobs", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert one_line(err.removesuffix("\n")) and "too few" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main([*TINY, "--out", str(blocker)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and one_line(captured.err.removesuffix("\n")) and str(blocker) in captured.err
