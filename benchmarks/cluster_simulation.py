"""Cluster simulation (issue 8 part 3): Salamander's behaviour at scale, argued in simulation.

The default scenario of ``salamander simulate`` (1,024 nodes x 8 GPUs = 8,192 GPUs, 28 days,
jobs filling 90% of the nodes on average, the failure trace from Llama 3's published rate and
Unicron's mix) is run over several seeds through the four policies: whole-job restart from disk
checkpoints (the baseline), elastic per job, Salamander without its planner, and Salamander's
full stack. Each seed is also run with the failure rate scaled: x0 (no failures at all: what the
allocation and the checkpoint overhead alone give), x1 (published), x4 and x16.

Reported per scale and policy, over seeds: the median and p10/p90 (``bench_stats.spread``) of
the cluster goodput and of the WAF ratio over the restart baseline; and the share of the ratio
that failures account for: the ratio at that scale over the same seed's ratio without failures.

    python benchmarks/cluster_simulation.py

writes ``benchmarks/results/cluster_simulation.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _sub in ("src", "worker/src", "operator/src", "benchmarks"):
    if str(ROOT / _sub) not in sys.path:
        sys.path.insert(0, str(ROOT / _sub))

from bench_stats import spread  # noqa: E402
from salamander_operator.simulator import ClusterConfig, run_scenario, standard_policies  # noqa: E402
from salamander_operator.simulator.report import daily_waf  # noqa: E402

CAUSES = ("detection", "queueing", "recovery", "resize", "recompute", "checkpoint", "idle", "down")


def one(task: tuple[dict[str, Any], float, int]) -> dict[str, Any]:
    """One seed at one failure-rate scale: every policy's summary (and daily WAF)."""
    base, scale, seed = task
    config = ClusterConfig(**{**base, "failure_rate_scale": scale, "seed": seed})
    started = time.perf_counter()
    scenario = run_scenario(config)
    return {"scale": scale, "seed": seed, "jobs": len(scenario.jobs), "failures": len(scenario.trace),
            "seconds": time.perf_counter() - started,
            "summaries": [asdict(s) for s in scenario.summaries()],
            "daily_waf": {r.policy.name: daily_waf(r)[1].tolist() for r in scenario.runs}}


def aggregate(results: list[dict[str, Any]], scales: list[float], names: list[str]) -> dict[str, Any]:
    """Per scale and policy: spreads of goodput, WAF ratio, and the ratio over the no-failure ratio."""
    by = {(r["scale"], r["seed"]): {s["name"]: s for s in r["summaries"]} for r in results}
    seeds = sorted({r["seed"] for r in results})
    out: dict[str, Any] = {}
    for scale in scales:
        rows = {}
        for name in names:
            cells = [by[(scale, seed)][name] for seed in seeds]
            row = {"goodput": spread([c["goodput"] for c in cells]),
                   "allocated_goodput": spread([c["allocated_goodput"] for c in cells]),
                   "waf_ratio": spread([c["waf_ratio"] for c in cells]),
                   "job_goodput_median": spread([c["job_goodput_median"] for c in cells]),
                   "lost_gpu_h": {k: spread([c["lost_gpu_h"][k] for c in cells])["median"] for k in CAUSES},
                   "restarts": spread([float(c["restarts"]) for c in cells])["median"],
                   "resizes": spread([float(c["resizes"]) for c in cells])["median"],
                   "plans": spread([float(c["plans"]) for c in cells])["median"]}
            if 0.0 in scales and scale != 0.0:
                row["ratio_from_failures"] = spread([by[(scale, seed)][name]["waf_ratio"]
                                                     / by[(0.0, seed)][name]["waf_ratio"] for seed in seeds])
            rows[name] = row
        out[f"{scale:g}"] = {"failures": spread([float(r["failures"]) for r in results if r["scale"] == scale]),
                             "policies": rows}
    return out


def print_table(summary: dict[str, Any], names: list[str]) -> None:
    print(f"{'scale':>5} {'policy':<22} {'goodput p50 [p10-p90]':<24} {'WAF ratio p50 [p10-p90]':<26} "
          f"{'from failures':<14}")
    for scale, cell in summary.items():
        for name in names:
            row = cell["policies"][name]
            g, w = row["goodput"], row["waf_ratio"]
            f = row.get("ratio_from_failures")
            print(f"{scale:>5} {name:<22} {g['median']:.3f} [{g['p10']:.3f}-{g['p90']:.3f}]      "
                  f"{w['median']:.3f} [{w['p10']:.3f}-{w['p90']:.3f}]        "
                  + (f"{f['median']:.3f}" if f else "-"))


def plot(summary: dict[str, Any], results: list[dict[str, Any]], names: list[str], labels: dict[str, str],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [float(s) for s in summary]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for name in names:
        w = [summary[f"{s:g}"]["policies"][name]["waf_ratio"] for s in scales]
        med = np.array([c["median"] for c in w])
        err = np.array([[c["median"] - c["p10"] for c in w], [c["p90"] - c["median"] for c in w]])
        ax.errorbar(range(len(scales)), med, yerr=err, marker="o", capsize=3, label=labels[name])
    ax.set_xticks(range(len(scales)), [f"x{s:g}" for s in scales])
    ax.set_xlabel("failure rate (x the published 1 per 264 node-days)")
    ax.set_ylabel("cluster WAF / restart baseline")
    ax.set_title("WAF ratio (median, p10-p90 over seeds)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        g = [summary[f"{s:g}"]["policies"][name]["goodput"] for s in scales]
        med = np.array([c["median"] for c in g])
        err = np.array([[c["median"] - c["p10"] for c in g], [c["p90"] - c["median"] for c in g]])
        ax.bar(np.arange(len(scales)) + i * width, med, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(np.arange(len(scales)) + 0.4 - width / 2, [f"x{s:g}" for s in scales])
    ax.set_ylim(0.6, 1.0)
    ax.set_ylabel("cluster goodput (productive / all GPU-hours)")
    ax.set_title("Cluster goodput (median, p10-p90)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    published = summary["1"]["policies"] if "1" in summary else next(iter(summary.values()))["policies"]
    colours = {"detection": "#d62728", "queueing": "#ff7f0e", "recovery": "#9467bd", "resize": "#8c564b",
               "recompute": "#e377c2", "checkpoint": "#bcbd22"}
    stacked = np.zeros(len(names))
    for cause, colour in colours.items():
        values = np.array([published[n]["lost_gpu_h"][cause] for n in names]) / 1e3
        ax.bar(names, values, bottom=stacked, color=colour, label=cause)
        stacked += values
    ax.set_ylabel("thousand GPU-hours (median over seeds)")
    ax.set_title("Lost GPU-hours on held nodes by cause, published rate")
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    first = next(r for r in results if r["scale"] == 1.0 and r["seed"] == min(x["seed"] for x in results))
    for name in names:
        waf = np.array(first["daily_waf"][name])
        ax.stairs(waf, np.arange(len(waf) + 1), baseline=None, label=labels[name])
    ax.set_xlabel("day")
    ax.set_ylabel("WAF, PFLOP/s (daily mean)")
    ax.set_title(f"WAF over time, published rate, seed {first['seed']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--scales", default="0,1,4,16", help="failure-rate scales, comma-separated")
    parser.add_argument("--nodes", type=int, default=1024)
    parser.add_argument("--days", type=float, default=28.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cluster_simulation.json"))
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    base = {"nodes": args.nodes, "days": args.days}
    policies = standard_policies()
    names, labels = [p.name for p in policies], {p.name: p.label for p in policies}
    tasks = [(base, scale, seed) for seed in range(args.seeds) for scale in scales]
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = []
        for result in pool.map(one, tasks):
            results.append(result)
            print(f"  x{result['scale']:g} seed {result['seed']}: {result['jobs']} jobs, "
                  f"{result['failures']} failures, {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    summary = aggregate(results, scales, names)
    print_table(summary, names)
    command = "python benchmarks/cluster_simulation.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != parser.get_default(k) and k not in ("out", "workers"))
    report = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.workers} worker processes, no GPU",
        "config": asdict(ClusterConfig(**base)),  # type: ignore[arg-type]
        "policies": [p.describe() for p in policies],
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "daily_waf"} for r in results],
        "seconds": time.monotonic() - started,
        "seconds_per_scenario": spread([r["seconds"] for r in results]),
    }
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(summary, results, names, labels, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
