"""What the runs mean: goodput, WAF and lost time per policy, as a table, plots and JSON.

Definitions (every policy over the same workload and trace):

- **cluster goodput**: productive GPU-hours over the cluster's GPU-hours (``nodes x GPUs x
  horizon``), so idle and broken nodes count against it. Productive means training that is
  kept: time blocked on saves and work redone after a restore are not productive.
- **allocated goodput**: productive GPU-hours over the GPU-hours held by jobs.
- **WAF** (Unicron's weighted achieved FLOP/s): ``sum over jobs of weight * T(x)`` while a job
  trains productively on ``x`` nodes, averaged over the run; in PFLOP/s. The **ratio** is a
  policy's WAF over the first policy's (the restart baseline).
- **lost GPU-hours by cause**: held nodes while their job detects a failure, queues or waits for
  nodes, restarts and restores (recovery), resizes, recomputes lost work or blocks on saves;
  then healthy nodes nobody holds (idle) and nodes under repair (down). With productive they
  add up to the cluster's GPU-hours exactly.
- **job goodput**: a job's productive time over its lifetime (queueing and suspension count).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from salamander_operator.simulator.model import DAY_S, HOUR_S, ClusterConfig
from salamander_operator.simulator.results import GPU_CAUSES, LOST_CAUSES, PolicyRun
from salamander_operator.simulator.trace import FailureTrace

PFLOP = 1e15
#: Plot colours of the lost causes (productive is not drawn).
_COLOURS = {"detection": "#d62728", "queueing": "#ff7f0e", "recovery": "#9467bd", "resize": "#8c564b",
            "recompute": "#e377c2", "checkpoint": "#bcbd22", "idle": "#c7c7c7", "down": "#7f7f7f"}


@dataclass(frozen=True)
class PolicySummary:
    """One policy's figures (see the module docstring)."""

    name: str
    label: str
    goodput: float
    allocated_goodput: float
    waf_pflops: float
    waf_ratio: float
    job_goodput_median: float
    job_goodput_p10: float
    lost_gpu_h: dict[str, float]
    lost_job_h: dict[str, float]
    failures_on_jobs: int
    restarts: int
    resizes: int
    suspensions: int
    plans: int
    fallbacks: int
    wall_s: float


def summarize(runs: Sequence[PolicyRun]) -> list[PolicySummary]:
    """The summaries of ``runs``, ratios over ``runs[0]``."""
    base = runs[0].waf_flop
    out = []
    for run in runs:
        config = run.config
        total = config.gpus * config.horizon_s
        held = total - run.gpu_s["idle"] - run.gpu_s["down"]
        goodputs = sorted(j.goodput for j in run.jobs if j.alive_s > 0)
        out.append(PolicySummary(
            name=run.policy.name, label=run.policy.label,
            goodput=run.gpu_s["productive"] / total,
            allocated_goodput=run.gpu_s["productive"] / held if held > 0 else 0.0,
            waf_pflops=run.waf_flop / config.horizon_s / PFLOP,
            waf_ratio=run.waf_flop / base if base > 0 else float("nan"),
            job_goodput_median=statistics.median(goodputs) if goodputs else 0.0,
            job_goodput_p10=goodputs[len(goodputs) // 10] if goodputs else 0.0,
            lost_gpu_h={c: run.gpu_s[c] / HOUR_S for c in GPU_CAUSES if c != "productive"},
            lost_job_h={c: sum(j.lost_s[c] for j in run.jobs) / HOUR_S for c in LOST_CAUSES},
            failures_on_jobs=sum(j.failures for j in run.jobs), restarts=run.counts.get("restarts", 0),
            resizes=run.counts.get("resizes", 0), suspensions=run.counts.get("suspensions", 0),
            plans=run.counts.get("plans", 0), fallbacks=run.counts.get("fallbacks_to_disk", 0), wall_s=run.wall_s))
    return out


def headline(summaries: Sequence[PolicySummary]) -> str:
    """One sentence: the last policy's WAF over the first's, and the others'."""
    base, last = summaries[0], summaries[-1]
    others = ", ".join(f"{s.name} {s.waf_ratio:.3f}x" for s in summaries[1:-1])
    return (f"{last.label}: cluster WAF {last.waf_ratio:.3f}x the {base.name} baseline's"
            + (f" ({others})" if others else "") + f"; goodput {last.goodput:.1%} vs {base.goodput:.1%}")


def tables(summaries: Sequence[PolicySummary]) -> list[Any]:
    """Two ``rich`` tables: the policies' figures, and their lost GPU-hours by cause."""
    from rich.table import Table

    main = Table(title="Policies", title_justify="left")
    for name, justify in (("policy", "left"), ("cluster goodput", "right"), ("allocated goodput", "right"),
                          ("WAF PFLOP/s", "right"), ("WAF x baseline", "right"), ("job goodput p50 / p10", "right"),
                          ("failures", "right"), ("restarts", "right"), ("resizes", "right"),
                          ("suspended", "right"), ("plans", "right")):
        main.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in summaries:
        main.add_row(s.label, f"{s.goodput:.1%}", f"{s.allocated_goodput:.1%}", f"{s.waf_pflops:,.0f}",
                     f"{s.waf_ratio:.3f}", f"{s.job_goodput_median:.1%} / {s.job_goodput_p10:.1%}",
                     str(s.failures_on_jobs), str(s.restarts), str(s.resizes), str(s.suspensions),
                     str(s.plans) if s.plans else "-")
    lost = Table(title="Lost GPU-hours by cause (held nodes; then idle and down nodes)", title_justify="left")
    lost.add_column("policy")
    causes = [c for c in GPU_CAUSES if c != "productive"]
    for cause in causes:
        lost.add_column(cause, justify="right")
    for s in summaries:
        lost.add_row(s.name, *(f"{s.lost_gpu_h[c]:,.0f}" for c in causes))
    return [main, lost]


def daily_waf(run: PolicyRun) -> tuple[np.ndarray, np.ndarray]:
    """Days (bin ends) and the mean WAF of each day, PFLOP/s."""
    horizon = run.config.horizon_s
    edges = np.append(np.arange(0.0, horizon, DAY_S), horizon)
    cumulative = run.cumulative_waf(edges)
    return edges[1:] / DAY_S, np.diff(cumulative) / np.diff(edges) / PFLOP


def to_json(config: ClusterConfig, trace: FailureTrace, runs: Sequence[PolicyRun],
            summaries: Sequence[PolicySummary]) -> dict[str, Any]:
    """Everything, JSON-ready: the config, the trace's counts, each policy's parameters, summary,
    daily WAF and per-job results."""
    return {
        "config": asdict(config),
        "cluster": {"gpus": config.gpus, "horizon_s": config.horizon_s, "jobs": len(runs[0].jobs) if runs else 0},
        "trace": {"failures": len(trace), "expected": trace.expected,
                  "by_kind": {str(k): v for k, v in trace.counts().items()}},
        "headline": headline(summaries) if summaries else "",
        "policies": [{
            "parameters": run.policy.describe(), "summary": asdict(summary), "counts": run.counts,
            "daily_waf_pflops": daily_waf(run)[1].round(3).tolist(),
            "jobs": [{"key": j.key, "nodes": j.nodes, "weight": j.weight, "alive_h": round(j.alive_s / HOUR_S, 3),
                      "goodput": round(j.goodput, 5), "restarts": j.restarts, "resizes": j.resizes} for j in run.jobs],
        } for run, summary in zip(runs, summaries)],
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def plot(runs: Sequence[PolicyRun], summaries: Sequence[PolicySummary], out_dir: Path) -> list[Path]:
    """Three PNGs in ``out_dir``: WAF over time, lost GPU-hours by cause, per-job goodput CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for run in runs:
        days, waf = daily_waf(run)
        edges = np.concatenate(([0.0], days))
        top.stairs(waf, edges, baseline=None, label=run.policy.label)
        own, base = run.cumulative_waf(days * DAY_S), runs[0].cumulative_waf(days * DAY_S)
        bottom.plot(days, np.divide(own, base, out=np.full_like(own, np.nan), where=base > 0), marker=".",
                    label=run.policy.name)
    top.set_ylabel("WAF, PFLOP/s (daily mean)")
    top.legend(fontsize=8)
    top.set_title("Weighted achieved throughput over time")
    bottom.set_ylabel(f"cumulative WAF / {runs[0].policy.name}")
    bottom.set_xlabel("day")
    bottom.axhline(1.0, color="grey", lw=0.5)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "waf_over_time.png"))

    fig, (held_ax, free_ax) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    names = [s.name for s in summaries]
    for ax, causes, title in ((held_ax, [c for c in _COLOURS if c not in ("idle", "down")],
                               "on nodes held by jobs"), (free_ax, ["idle", "down"], "on nodes no job holds")):
        stacked = np.zeros(len(summaries))
        for cause in causes:
            values = np.array([s.lost_gpu_h[cause] for s in summaries]) / 1e3
            ax.bar(names, values, bottom=stacked, color=_COLOURS[cause], label=cause)
            stacked += values
        ax.set_title(f"Lost GPU-hours {title}")
        ax.set_ylabel("thousand GPU-hours")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "lost_by_cause.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        goodputs = np.sort([j.goodput for j in run.jobs if j.alive_s > 0])
        ax.step(goodputs, np.arange(1, len(goodputs) + 1) / max(1, len(goodputs)), where="post",
                label=run.policy.label)
    ax.set_xlabel("job goodput (productive time / lifetime)")
    ax.set_ylabel("share of jobs at or below")
    ax.set_title("Per-job goodput")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "job_goodput.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
