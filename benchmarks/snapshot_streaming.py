"""Streaming stores for the snapshot's copies: the agent's glibc threshold on and off (issue 4).

Each round starts two fresh processes, one with ``GLIBC_TUNABLES`` as the agent sets it for
training processes (:mod:`salamander_worker.memcopy`) and one without, in alternating order, so
machine noise hits both alike. Each process builds the ~102M-parameter model of
``snapshot_overhead.py`` (10 x Linear(3200, 3200), AdamW, 1.23 GB of state) and measures:

* throughput: the snapshot's copy of the live tensors; with its crc32 on a thread of its own (as
  now), on the copy's thread, and on the copy's thread with the crc32c used before; and with
  this node's XOR share of the parity exchange (k=4), one after the other and pipelined on one
  more thread; each beside ``np.copyto`` of the same bytes (``snapshot_overhead.throughput``);
* training: the step time without snapshots, so a cost of streaming stores to the rest of
  training would show, and with a snapshot every step (the copy overlapped with the next step).

    python benchmarks/snapshot_streaming.py --rounds 4        # ~9 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker/src"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stats import machine, spread  # noqa: E402
from salamander_worker import memcopy  # noqa: E402

MODES = ("ordinary", "streaming")


def child(args: argparse.Namespace) -> int:
    import torch

    import snapshot_overhead as so
    from salamander import wire
    from salamander_worker.snapshot.snapshotter import Snapshotter

    torch.set_num_threads(args.threads)
    model, optimizer = so.build(args.width, args.layers)
    x = torch.randn(args.batch, args.width)
    so.train_step(model, optimizer, x)
    memory = Path(tempfile.mkdtemp(prefix="snapstream-", dir="/dev/shm"))
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=memory / "s")
    try:
        snap.snapshot(1)
        snap.wait()
        times: dict[str, list[float]] = {"none": [], "every-step": []}
        step = 1
        for mode in ("none", "every-step", "every-step", "none"):   # ABBA within the process
            for _ in range(args.steps // 2):
                started = time.perf_counter()
                so.train_step(model, optimizer, x)
                step += 1
                if mode == "every-step":
                    snap.step(step)
                times[mode].append(time.perf_counter() - started)
            snap.wait()
        through = so.throughput(model, optimizer, memory / "t", args.repeats)
    finally:
        snap.close()
        shutil.rmtree(memory, ignore_errors=True)
    print(json.dumps({"tunables": os.environ.get(memcopy.ENV_TUNABLES, ""), "step_s": times,
                      "throughput": through}))
    return 0


def run_child(mode: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.pop(memcopy.ENV_TUNABLES, None)
    if mode == "streaming":
        value = memcopy.tunables(env)
        if value is None:
            raise SystemExit("streaming stores do not apply on this machine (x86-64 glibc only)")
        env[memcopy.ENV_TUNABLES] = value
    command = [sys.executable, __file__, "--child", "--width", str(args.width), "--layers", str(args.layers),
               "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


KEYS = ("memcpy_GBps", "copy_GBps", "copy_x_memcpy", "copy_with_crc_x_memcpy", "copy_with_crc_one_thread_x_memcpy",
        "copy_with_crc32c_x_memcpy", "copy_with_crc_one_thread_s",
        "snapshot_with_crc_and_parity_x_memcpy", "snapshot_pipelined_x_memcpy", "copy_s", "copy_with_crc_s",
        "copy_with_crc32c_s", "parity_share_s", "pipelined_s", "memcpy_s")


def summarize(runs: dict[str, list[dict]]) -> tuple[dict[str, dict], dict[str, float]]:
    """Median and spread of every figure per mode, and streaming's time over ordinary's."""
    summary: dict[str, dict] = {}
    for mode in MODES:
        summary[mode] = {key: spread([r["throughput"][key] for r in runs[mode]]) for key in KEYS}
        for kind in ("none", "every-step"):
            summary[mode][f"step_{kind}_s"] = spread([s for r in runs[mode] for s in r["step_s"][kind]])
    ratio = {key: summary["streaming"][key]["median"] / summary["ordinary"][key]["median"]
             for key in ("copy_s", "copy_with_crc_s", "memcpy_s", "step_none_s", "step_every-step_s")}
    return summary, ratio


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--width", type=int, default=3200)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="training steps per mode per process")
    p.add_argument("--repeats", type=int, default=3, help="throughput repeats per process")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/snapshot_streaming.json"))
    args = p.parse_args()
    if args.child:
        return child(args)

    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    started = time.perf_counter()
    for rnd in range(args.rounds):
        for mode in (MODES if rnd % 2 == 0 else tuple(reversed(MODES))):
            result = run_child(mode, args)
            runs[mode].append(result)
            t = result["throughput"]
            print(f"[{time.perf_counter() - started:5.0f} s] round {rnd + 1}/{args.rounds} {mode:>9}: "
                  f"copy {t['copy_x_memcpy']:.2f}x, +crc {t['copy_with_crc_x_memcpy']:.2f}x, "
                  f"+parity {t['snapshot_with_crc_and_parity_x_memcpy']:.2f}x, pipelined "
                  f"{t['snapshot_pipelined_x_memcpy']:.2f}x memcpy; step "
                  f"{statistics.median(result['step_s']['none']):.3f} s", flush=True)

    summary, ratio = summarize(runs)
    result = {"machine": machine(), "command": " ".join(sys.argv), "rounds": args.rounds,
              "tunables": runs["streaming"][0]["tunables"], "summary": summary,
              "streaming_over_ordinary": ratio, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'':34}{'ordinary':>12}{'streaming':>12}")
    for key, label in (("copy_x_memcpy", "copy, x memcpy"), ("copy_with_crc_x_memcpy", "copy + crc32, x memcpy"),
                       ("copy_with_crc_one_thread_x_memcpy", "the same, crc on the copy's thread"),
                       ("copy_with_crc32c_x_memcpy", "copy + crc32c (before), x memcpy"),
                       ("snapshot_with_crc_and_parity_x_memcpy", "+ parity share (k=4), x memcpy"),
                       ("snapshot_pipelined_x_memcpy", "the same, pipelined, x memcpy"),
                       ("memcpy_GBps", "memcpy GB/s"), ("step_none_s", "step, no snapshot (s)"),
                       ("step_every-step_s", "step, snapshot every step (s)")):
        a, b = summary["ordinary"][key], summary["streaming"][key]
        print(f"{label:34}{a['median']:12.3f}{b['median']:12.3f}")
    print("streaming / ordinary (time):", {k: round(v, 3) for k, v in ratio.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
