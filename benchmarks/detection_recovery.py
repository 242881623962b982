"""Detection latency per channel, and time to the first resumed step, on the local runtime;
beside plain torchrun with a restart and a checkpoint reload, measured in the same run.

Three local jobs (the GPT example, 2 workers x 1 process, a checkpoint every 5 steps) each
get a series of injected faults, one channel per job:

* ``crash``: a training process SIGKILLed (the agent notices the exit, reports it, the
  operator decides RestartProcesses);
* ``exception``: a training process raises (torch elastic's error file carries it);
* ``hang``: a rank stops making progress (the operator's hang detector, default policy:
  3x the median step time, floor 10 s).

Detection latency runs from the fault (the time the faulty process wrote just before acting)
to the operator's decision (``detected_at`` of the incident). Time to resume runs from the fault
to the first training step completed after it (the progress record's own time).

The baseline is ``torchrun --standalone --nproc-per-node 2 --max-restarts N`` running the same
script with the same checkpoints and the same crash faults: torch's agent restarts the group by
itself, with no operator. Its time to resume is measured the same way.

    python benchmarks/detection_recovery.py --repeats 8
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
STEP_GAP = 10  # steps between faults
TORCHRUN_TIMEOUT_S = 300.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": statistics.median(values), "p99": _pct(values, 0.99),
            "min": min(values), "max": max(values)}


def manifest(name: str, kind: str, repeats: int, ckpt: Path) -> dict[str, Any]:
    steps = STEP_GAP * (repeats + 2)
    faults = [{"kind": kind, "atStep": STEP_GAP * (n + 1), "rank": n % 2} for n in range(repeats)]
    return {
        "apiVersion": "salamander.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {
            "replicas": {"min": 2, "max": 2}, "restartBudget": 1000,
            "worker": {"image": "local", "command": ["python", "examples/gpt/train.py"],
                       "args": ["--steps", str(steps), "--log-every", "1000"], "workingDir": str(REPO)},
            "checkpoint": {"directory": str(ckpt), "intervalSteps": 5},
            "failurePolicy": {"maxRestartsPerWindow": 1000},
            "faults": faults,
        },
    }


def run_local(kind: str, repeats: int, workdir: Path) -> dict[str, Any]:
    from rich.console import Console

    from salamander.api import Phase, parse_manifest
    from salamander_operator.local import LocalRun
    from salamander_operator.local.view import RunView

    job = parse_manifest(manifest(f"bench-{kind.lower()}", kind, repeats, workdir / f"ckpt-{kind}"))
    view = RunView(job.metadata.name, console=Console(file=io.StringIO(), width=200))
    run = LocalRun(job, workdir / f"logs-{kind}", view=view, poll_s=0.1)
    started = time.monotonic()
    outcome = run.run(timeout_s=900)
    records = [json.loads(line) for line in (run.log_dir / "incidents.jsonl").read_text().splitlines()]
    fired = sorted(r["fired_at"] for r in records if r["type"] == "fault")
    decided = sorted(r["detected_at"] for r in records if r["type"] == "incident" and r["charged"])
    resumed = sorted(r["recovered_at"] for r in records if r["type"] == "recovered")
    detection = [d - f for f, d in _pairs(fired, decided)]
    to_resume = [r - f for f, r in _pairs(fired, resumed)]
    print(f"  salamander {kind}: {outcome.status.phase.value} in {time.monotonic() - started:.0f} s, "
          f"{len(fired)} faults, {len(detection)} detections, {len(to_resume)} resumes", flush=True)
    return {"phase": outcome.status.phase.value, "ok": outcome.status.phase is Phase.SUCCEEDED,
            "faults": len(fired), "detection_s": detection, "fault_to_resumed_step_s": to_resume,
            "restarts": outcome.status.restarts}


def _pairs(starts: list[float], ends: list[float]) -> list[tuple[float, float]]:
    """Each start with the first end after it (and before the next start)."""
    out = []
    for n, start in enumerate(starts):
        limit = starts[n + 1] if n + 1 < len(starts) else float("inf")
        end = next((e for e in ends if start <= e < limit), None)
        if end is not None:
            out.append((start, end))
    return out


def run_torchrun(repeats: int, workdir: Path, share_store_off: bool = True) -> dict[str, Any]:
    """torchrun with the same faults; the progress record in a store of our own tells when
    training resumed."""
    import torch.distributed as dist

    from salamander import wire

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    run_id = "torchrun-baseline"
    spec = manifest("torchrun", "KillProcess", repeats, workdir / "ckpt-torchrun")["spec"]
    env = {**os.environ, wire.ENV_RDZV_ENDPOINT: f"127.0.0.1:{store.port}", wire.ENV_RUN_ID: run_id,
           wire.ENV_FAULTS: json.dumps(spec["faults"]), wire.ENV_CHECKPOINT_DIR: spec["checkpoint"]["directory"],
           wire.ENV_CHECKPOINT_INTERVAL: "5", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    if share_store_off:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # as salamander-worker sets it
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(3 * repeats), "--monitor-interval", "0.1",
               "examples/gpt/train.py", *spec["worker"]["args"]]
    started = time.monotonic()
    with open(workdir / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        progress: list[tuple[float, int]] = []  # (time, restart count) of each new record
        while proc.poll() is None and time.monotonic() - started < TORCHRUN_TIMEOUT_S:
            record = wire.read_progress(store, run_id)
            if record is not None and (not progress or progress[-1] != (record.time, record.restart_count)):
                progress.append((record.time, record.restart_count))
            time.sleep(0.05)
        if proc.poll() is None:  # stuck: see BENCHMARKS.md
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    fired = []
    for n in range(repeats):
        key = wire.fault_fired_key(run_id, n)
        if store.check([key]):
            fired.append(float(store.get(key)))
    fired.sort()
    # the first step of a new round (a higher restart count) after each fault
    firsts = [t for n, (t, count) in enumerate(progress) if n > 0 and count > progress[n - 1][1]]
    to_resume = [r - f for f, r in _pairs(fired, firsts)]
    shutil.copy(workdir / "torchrun.log", REPO / "benchmarks/results/detection_recovery_torchrun.log")
    print(f"  torchrun crash: exit {proc.returncode} in {time.monotonic() - started:.0f} s, {len(fired)} faults, "
          f"{len(to_resume)} resumes", flush=True)
    return {"exit_code": proc.returncode, "faults": len(fired), "fault_to_resumed_step_s": to_resume}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8, help="faults per channel")
    parser.add_argument("--hang-repeats", type=int, default=4, help="hangs (each takes >= 10 s)")
    parser.add_argument("--torchrun-as-shipped", action="store_true",
                        help="leave torch's shared rendezvous store on in the baseline (its restarts may not re-form)")
    parser.add_argument("--only-torchrun", action="store_true", help="run only the torchrun baseline")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/detection_recovery.json"))
    args = parser.parse_args()
    if args.repeats < 1 or args.hang_repeats < 1:
        parser.error("--repeats and --hang-repeats must be >= 1")
    out = Path(args.out)
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "repeats": args.repeats,
                               "hang_repeats": args.hang_repeats}
    if args.only_torchrun and out.exists():
        results = json.loads(out.read_text())  # keep the local runtime's figures, redo the baseline
    with tempfile.TemporaryDirectory(prefix="salamander-bench-") as tmp:
        workdir = Path(tmp)
        if not args.only_torchrun:
            print("[1/4] crash (KillProcess) on the local runtime", flush=True)
            results["crash"] = run_local("KillProcess", args.repeats, workdir)
            print("[2/4] exception (RaiseException) on the local runtime", flush=True)
            results["exception"] = run_local("RaiseException", args.repeats, workdir)
            print("[3/4] hang (HangRank) on the local runtime", flush=True)
            results["hang"] = run_local("HangRank", args.hang_repeats, workdir)
        print("[4/4] the same crashes under plain torchrun", flush=True)
        results["torchrun_crash"] = run_torchrun(args.repeats, workdir, share_store_off=not args.torchrun_as_shipped)
        results["torchrun_crash"]["shared_store"] = "as shipped" if args.torchrun_as_shipped else "off"
    table = [("crash: detection", results["crash"]["detection_s"]),
             ("exception: detection", results["exception"]["detection_s"]),
             ("hang: detection", results["hang"]["detection_s"]),
             ("crash: fault to resumed step (Salamander)", results["crash"]["fault_to_resumed_step_s"]),
             ("crash: fault to resumed step (torchrun)", results["torchrun_crash"]["fault_to_resumed_step_s"]),
             ("exception: fault to resumed step (Salamander)", results["exception"]["fault_to_resumed_step_s"]),
             ("hang: fault to resumed step (Salamander)", results["hang"]["fault_to_resumed_step_s"])]
    results["summary"] = {name: summarize(values) for name, values in table}
    print(f"\n| measure | n | median s | p99 s | min-max s |\n|---|---|---|---|---|")
    for name, values in table:
        s = summarize(values)
        if s["n"]:
            print(f"| {name} | {s['n']} | {s['median']:.2f} | {s['p99']:.2f} | {s['min']:.2f}-{s['max']:.2f} |")
        else:
            print(f"| {name} | 0 | - | - | - |")
    ours, theirs = results["summary"]["crash: fault to resumed step (Salamander)"], \
        results["summary"]["crash: fault to resumed step (torchrun)"]
    if ours.get("n") and theirs.get("n"):
        print(f"\nfault to resumed step, median: Salamander / torchrun = {ours['median'] / theirs['median']:.2f}x")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
