"""Throughput after a straggler is evicted, beside a healthy run of the same job (issue 7).

Real jobs on the local runtime (``salamander run``'s engine): three workers of the GPT example,
one process each, gloo. A straggler run injects a SlowRank fault (rank 2 sleeps ``--sleep``
seconds on every step from step ``--slow-at``) under ``stragglers.action: Evict``; the healthy
run is the same job without the fault. Runs alternate (healthy, straggler, healthy, ...).

From the progress the job's leader publishes (step and the reporter's clock), each run gives its
step rate over stretches of steps at a fixed world size:

* healthy: steps ``[--from-step, end)``;
* straggler, slow: from ``--slow-at`` + 5 to the eviction;
* straggler, mitigated: from 20 steps after the evicted worker's replacement has joined (three
  workers again) to the end.

The goal is the mitigated rate within 5% of the healthy rate over the same steps. With
``--control`` each pair also has a second healthy run, compared with the first over the same
steps: how far two healthy runs differ on this machine.

    python benchmarks/straggler_mitigation.py --pairs 2     # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("src", "worker/src", "operator/src"):
    sys.path.insert(0, str(ROOT / sub))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stats import machine  # noqa: E402


def manifest(name: str, steps: int, slow: dict | None) -> dict:
    spec: dict = {
        "replicas": {"min": 2, "max": 3}, "procsPerNode": 1, "restartBudget": 3,
        "worker": {"image": "local", "command": ["python", "examples/gpt/train.py"],
                   "args": ["--steps", str(steps), "--log-every", "50"], "workingDir": str(ROOT)},
        "stragglers": {"action": "Evict", "persistSteps": 16, "evaluateSteps": 30},
    }
    if slow is not None:
        spec["faults"] = [slow]
    return {"apiVersion": "salamander.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name}, "spec": spec}


def run_job(body: dict, logs: Path) -> dict:
    """Run one job to the end; its progress records (one per step seen) and when it evicted."""
    from rich.console import Console

    from salamander.api import Phase, Reason, parse_manifest
    from salamander_operator.local import LocalRun
    from salamander_operator.local.view import RunView

    job = parse_manifest(body)
    view = RunView(job.metadata.name, console=Console(file=io.StringIO(), width=200), line_every_s=5.0)
    run = LocalRun(job, logs, view=view, poll_s=0.1)
    records: list[tuple[float, int, int]] = []   # (reporter's time, step, world size), in order
    evicted: list[float] = []
    original_step, original_event = run.step, run.view.event

    def step():   # type: ignore[no-untyped-def]
        plan = original_step()
        progress = run.host.read_progress(run.ref.uid)
        if progress is not None and (not records or progress.time != records[-1][0]):
            records.append((progress.time, progress.step, progress.world_size))
        return plan

    def event(e):   # type: ignore[no-untyped-def]
        if e.reason == Reason.STRAGGLER_EVICTED:
            evicted.append(time.time())
        return original_event(e)

    run.step = step   # type: ignore[method-assign]
    run.view.event = event   # type: ignore[method-assign]
    outcome = run.run(timeout_s=900)
    if outcome.status.phase is not Phase.SUCCEEDED:
        raise RuntimeError(f"job {job.metadata.name} ended {outcome.status.phase.value}")
    return {"records": records, "evicted_at": evicted[:1]}


def rate(records: list[tuple[float, int, int]], first: int, last: int, world: int,
         after: float = 0.0, before: float = float("inf")) -> float | None:
    """Steps per second over consecutive records of ``world`` workers with steps in
    ``[first, last]`` reported between ``after`` and ``before`` (a restart's replayed steps and
    its gap are left out: only pairs whose step went up count)."""
    steps = seconds = 0.0
    for (t0, s0, w0), (t1, s1, w1) in zip(records, records[1:]):
        if (w0 == w1 == world and first <= s0 < s1 <= last and after <= t0 and t1 <= before
                and s1 - s0 <= 50):
            steps += s1 - s0
            seconds += t1 - t0
    return steps / seconds if seconds > 0 else None


def regrown(records: list[tuple[float, int, int]], evicted: float, world: int) -> tuple[float, int] | None:
    """When (time, step) the job trained with ``world`` workers again after the eviction at
    ``evicted``: the first such record after the round changed (the step went back, on a
    restore, or the world size changed)."""
    changed = False
    for (_, s0, w0), (t, step, w) in zip(records, records[1:]):
        if t < evicted:
            continue
        changed = changed or step < s0 or w != w0
        if changed and w == world:
            return t, step
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="healthy + straggler runs, alternating")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--slow-at", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.08, help="seconds rank 2 sleeps per step")
    parser.add_argument("--control", action="store_true",
                        help="a second healthy run per pair, compared with the first over the same steps (the noise)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/straggler_mitigation.json")
    args = parser.parse_args()
    if args.pairs < 1 or args.steps < 200 or not 0 <= args.slow_at < args.steps // 4 or args.sleep <= 0:
        parser.error("--pairs >= 1, --steps >= 200, 0 <= --slow-at < steps/4, --sleep > 0")
    slow = {"kind": "SlowRank", "atStep": args.slow_at, "rank": 2, "seconds": args.sleep}
    pairs = []
    with tempfile.TemporaryDirectory(prefix="straggler-mitigation-") as tmp:
        for n in range(args.pairs):
            pair = {}
            kinds = ("healthy", "straggler", "control") if args.control else ("healthy", "straggler")
            for kind in kinds if n % 2 == 0 else kinds[::-1]:
                started = time.monotonic()
                print(f"pair {n + 1}/{args.pairs}: {kind} run ...", end=" ", flush=True)
                pair[kind] = run_job(manifest(f"{kind}-{n}", args.steps, slow if kind == "straggler" else None),
                                     Path(tmp) / f"{kind}-{n}")
                print(f"{time.monotonic() - started:.0f} s", flush=True)
            pairs.append(pair)
    rows = []
    for pair in pairs:
        healthy = [tuple(r) for r in pair["healthy"]["records"]]
        straggler = [tuple(r) for r in pair["straggler"]["records"]]
        full = max(w for _, _, w in straggler)
        row: dict = {"evicted": bool(pair["straggler"]["evicted_at"])}
        back = regrown(straggler, pair["straggler"]["evicted_at"][0], full) if row["evicted"] else None
        if back is not None:
            evicted_t = pair["straggler"]["evicted_at"][0]
            evicted_step = max((s for t, s, _ in straggler if t <= evicted_t), default=args.slow_at)
            row.update(evicted_at=evicted_step, rejoined_at=back[1])
            start = back[1] + 20
            row["mitigated"] = rate(straggler, start, args.steps, full, after=back[0])
            row["healthy_same_steps"] = rate(healthy, start, args.steps, full)
            row["slow"] = rate(straggler, args.slow_at + 5, evicted_step, full, before=evicted_t)
            row["healthy_slow_steps"] = rate(healthy, args.slow_at + 5, evicted_step, full)
            if row["healthy_same_steps"] and row["mitigated"]:
                row["mitigated_x_healthy"] = row["mitigated"] / row["healthy_same_steps"]
            if "control" in pair and row["healthy_same_steps"]:
                control = rate([tuple(r) for r in pair["control"]["records"]], start, args.steps, full)
                row["control_x_healthy"] = control / row["healthy_same_steps"] if control else None
            if row["healthy_slow_steps"] and row["slow"]:
                row["slow_x_healthy"] = row["slow"] / row["healthy_slow_steps"]
        rows.append(row)
    ratios = [r["mitigated_x_healthy"] for r in rows if "mitigated_x_healthy" in r]
    summary = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "rows": rows,
               "mitigated_x_healthy_median": statistics.median(ratios) if ratios else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "raw": pairs}, indent=1))
    for n, r in enumerate(rows, start=1):
        if not r.get("mitigated") or not r.get("slow"):
            print(f"pair {n}: no eviction and rejoin seen ({r})")
            continue
        print(f"pair {n}: evicted at step {r['evicted_at']}, 3 workers again from step {r['rejoined_at']}; "
              f"slow {r['slow']:.2f} vs healthy {r['healthy_slow_steps'] or float('nan'):.2f} steps/s "
              f"({r.get('slow_x_healthy', float('nan')):.3f}x); after mitigation {r['mitigated']:.2f} vs "
              f"{r['healthy_same_steps'] or float('nan'):.2f} ({r.get('mitigated_x_healthy', float('nan')):.3f}x)"
              + (f"; a second healthy run {r['control_x_healthy']:.3f}x" if r.get("control_x_healthy") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
