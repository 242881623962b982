"""How fast the cluster planner decides, and how good its plans are (issue 8: 200 jobs on 2,000
nodes in under a second).

Scenarios, each planned ``--repeats`` times (median and spread reported):

- **realistic**: 200 jobs on 2,000 nodes. Sizes are log-normal (median 7 nodes, a few of
  hundreds), each elastic from half to twice its size, three priority levels, weights 0.5-2,
  scaling exponents 0.7-1, a third with measured throughput points, transition costs 30-600 s,
  and every job currently running at its size (so transitions matter).
- **replan after failures**: the realistic cluster re-planned after each of 20 node failures
  in turn, as the operator does (each plan starts from the previous plan's counts).
- **wide** (the worst case for the dynamic program): 200 jobs that may each take 1 to 2,000
  workers, so every job has 2,000 choices at every capacity.

Baselines in the same run, on the realistic input:

- the same exact dynamic program written as plain Python loops (the textbook form of Unicron's
  knapsack), for the speed ratio; its plan value must equal ours;
- a greedy first-fit (priority, then weight: each job gets its max while it fits, else what
  is left if that reaches its min), for the plan-quality ratio.

    python benchmarks/planner_speed.py --repeats 20
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench_stats import spread

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator" / "src"), str(ROOT / "src")]

from salamander_operator.planner import JobDemand, ThroughputCurve, plan  # noqa: E402

HORIZON_S = 3600.0


def realistic_jobs(n: int, capacity: int, seed: int) -> list[JobDemand]:
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        size = int(min(capacity // 4, max(1, round(rng.lognormal(np.log(7), 1.0)))))
        lo, hi = max(1, size // 2), min(capacity, size * 2)
        exponent = float(rng.uniform(0.7, 1.0))
        curve = ThroughputCurve(exponent=exponent)
        if rng.random() < 1 / 3:  # measured at its size and at half of it, a little worse than the law
            points = ((size, size ** exponent),) if lo == size else (
                (lo, lo ** exponent * 1.05), (size, size ** exponent))
            curve = ThroughputCurve(points=points, exponent=exponent)
        jobs.append(JobDemand(f"ns/job-{i}", lo, hi, current=size, weight=float(rng.uniform(0.5, 2.0)),
                              priority=int(rng.integers(0, 3)), throughput=curve,
                              transition_s=float(rng.uniform(30, 600))))
    return jobs


def wide_jobs(n: int, capacity: int, seed: int) -> list[JobDemand]:
    rng = np.random.default_rng(seed)
    return [JobDemand(f"ns/job-{i}", 1, capacity, current=capacity // n, weight=float(rng.uniform(0.5, 2.0)),
                      throughput=ThroughputCurve(exponent=float(rng.uniform(0.7, 1.0))),
                      transition_s=float(rng.uniform(30, 600))) for i in range(n)]


def value(job: JobDemand, x: int) -> float:
    return float(job.values(np.array([x]), HORIZON_S)[0])


def python_dp(jobs: list[JobDemand], capacity: int) -> float:
    """The exact same objective (one priority at a time, the least capacity reaching the best
    value), as plain Python loops: the speed baseline."""
    total, left = 0.0, capacity
    for priority in sorted({j.priority for j in jobs}, reverse=True):
        best = [0.0] * (left + 1)
        for job in (j for j in jobs if j.priority == priority):
            choices = [(0, value(job, 0))] + [(x, value(job, x)) for x in range(job.min_workers,
                                                                               min(job.max_workers, left) + 1)]
            new = [0.0] * (left + 1)
            for c in range(left + 1):
                new[c] = max(best[c - x] + v for x, v in choices if x <= c)
            best = new
        top = best[-1]
        used = next(c for c in range(left + 1) if best[c] >= top - 1e-9 * max(abs(top), 1.0))
        total += top
        left -= used
    return total


def greedy(jobs: list[JobDemand], capacity: int) -> dict[str, int]:
    """First fit by priority, then weight: a job gets its max if it fits, else what is left if
    that reaches its min, else nothing."""
    left, counts = capacity, {}
    for job in sorted(jobs, key=lambda j: (-j.priority, -j.weight, j.key)):
        x = min(job.max_workers, left)
        counts[job.key] = x if x >= job.min_workers else 0
        left -= counts[job.key]
    return counts


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planner_speed.json")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": f"{platform.machine()}, {platform.python_version()}",
                                  "jobs": args.jobs, "nodes": args.nodes, "repeats": args.repeats}

    jobs = realistic_jobs(args.jobs, args.nodes, args.seed)
    print(f"realistic: {args.jobs} jobs, {sum(j.max_workers - j.min_workers + 2 for j in jobs)} choices, "
          f"{args.nodes} nodes", flush=True)
    times, ours = timed(lambda: plan(jobs, args.nodes, HORIZON_S), args.repeats)
    results["realistic_s"] = spread(times)
    print(f"  planner: median {results['realistic_s']['median'] * 1e3:.1f} ms", flush=True)

    py_times, py_value = timed(lambda: python_dp(jobs, args.nodes), max(1, min(3, args.repeats)))
    results["python_dp_s"] = spread(py_times)
    results["speedup_over_python_dp"] = results["python_dp_s"]["median"] / results["realistic_s"]["median"]
    assert abs(py_value - ours.value) <= 1e-6 * max(1.0, abs(py_value)), (py_value, ours.value)
    print(f"  plain-Python DP: median {results['python_dp_s']['median']:.2f} s "
          f"({results['speedup_over_python_dp']:.0f}x slower), same value", flush=True)

    counts = greedy(jobs, args.nodes)
    greedy_value = sum(value(j, counts[j.key]) for j in jobs)
    greedy_waf = sum(j.weight * j.throughput.at(counts[j.key]) for j in jobs)
    results["greedy_value_ratio"] = ours.value / greedy_value
    results["greedy_waf_ratio"] = ours.waf / greedy_waf
    print(f"  plan value {ours.value:.4g} vs greedy {greedy_value:.4g} ({results['greedy_value_ratio']:.3f}x); "
          f"WAF {results['greedy_waf_ratio']:.3f}x", flush=True)

    # re-plans after node failures, each from the previous plan's counts
    rng = np.random.default_rng(args.seed + 1)
    replan_times = []
    current = {j.key: ours.workers[j.key] for j in jobs}
    capacity = args.nodes
    for _ in range(20):
        capacity -= int(rng.integers(1, 9))  # a node, or a rack of up to 8
        step = [JobDemand(j.key, j.min_workers, j.max_workers, current[j.key], j.weight, j.priority,
                          j.throughput, j.transition_s) for j in jobs]
        started = time.perf_counter()
        result = plan(step, capacity, HORIZON_S)
        replan_times.append(time.perf_counter() - started)
        changed = sum(1 for j in step if result.workers[j.key] != j.current)
        current = dict(result.workers)
    results["replan_s"] = spread(replan_times)
    results["replan_last_changed_jobs"] = changed
    print(f"  re-plan after a failure: median {results['replan_s']['median'] * 1e3:.1f} ms "
          f"(last one changed {changed} jobs)", flush=True)

    wide = wide_jobs(args.jobs, args.nodes, args.seed)
    wide_times, _ = timed(lambda: plan(wide, args.nodes, HORIZON_S), max(1, args.repeats // 4))
    results["wide_s"] = spread(wide_times)
    print(f"wide (every job 1..{args.nodes}): median {results['wide_s']['median']:.2f} s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
