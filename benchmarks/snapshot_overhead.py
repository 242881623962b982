"""Snapshot overhead on step time, and snapshot throughput beside memcpy (issue 4).

A ~102M-parameter model (10 x Linear(3200, 3200)) with AdamW: the snapshot holds parameters and
both Adam moments, ~1.2 GB. One process; the step time (forward, backward, optimizer step) is
measured without snapshots, with one every 10 steps and with one every step (the copy overlapped
with the next forward/backward, the default), and with one every step copied in the foreground
(``overlap=False``). Modes are interleaved in rounds, so machine noise hits all of them alike;
medians and spread of per-step times are reported, and overhead as a ratio to "none".

Throughput: the copy of the state into its pre-faulted shared-memory slot, with the crc32c fused
into it (1 MiB pieces checksummed while in cache), plus this node's share of XOR parity for a
group of k=4 (a quarter of encoding the whole group locally), beside ``np.copyto`` of the same
number of bytes between pre-faulted buffers.

    python benchmarks/snapshot_overhead.py --rounds 5 --steps 12
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker/src"))
sys.path.insert(0, str(ROOT / "src"))

from bench_stats import machine, spread  # noqa: E402
from salamander import wire  # noqa: E402
from salamander_worker.snapshot import erasure, payload  # noqa: E402
from salamander_worker.snapshot.capture import capture  # noqa: E402
from salamander_worker.snapshot.region import SlotFile, checksum  # noqa: E402
from salamander_worker.snapshot.snapshotter import Snapshotter  # noqa: E402

MODES = ("none", "every-10", "every-step", "every-step-blocking")


def build(width: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=3200)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="steps per mode per round")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/snapshot_overhead.json"))
    parser.add_argument("--throughput-only", action="store_true", help="skip the step-time rounds")
    args = parser.parse_args()

    model, optimizer = build(args.width, args.layers)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, args.width)
    train_step(model, optimizer, x)  # Adam state exists from here on
    memory = Path(tempfile.mkdtemp(prefix="snapbench-", dir="/dev/shm"))
    snappers = {
        "every-10": Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=10),
                                memory_dir=memory / "a"),
        "every-step": Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1),
                                  memory_dir=memory / "b"),
        "every-step-blocking": Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1),
                                           memory_dir=memory / "c", overlap=False),
    }
    # Each snapshotter's hook waits only for its own copies; warm every file up once.
    for snap in snappers.values():
        snap.snapshot(1)
        snap.wait()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    step = 1
    try:
        for rnd in range(0 if args.throughput_only else args.rounds):
            order = MODES if rnd % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                snap = snappers.get(mode)
                for _ in range(args.steps):
                    started = time.perf_counter()
                    train_step(model, optimizer, x)
                    step += 1
                    if snap is not None:
                        snap.step(step)
                    times[mode].append(time.perf_counter() - started)
                if snap is not None:
                    snap.wait()
                print(f"round {rnd + 1}/{args.rounds} {mode:>20}: median step "
                      f"{statistics.median(times[mode][-args.steps:]):.3f} s", flush=True)
        state_bytes = snappers["every-step"]._layout.length  # noqa: SLF001 - benchmark introspection
        through = throughput(model, optimizer, memory / "t", args.rounds)
    finally:
        for snap in snappers.values():
            snap.close()
        shutil.rmtree(memory, ignore_errors=True)

    if args.throughput_only:
        print(json.dumps(through, indent=2))
        return 0
    base = statistics.median(times["none"])
    result = {
        "machine": machine(), "params": params, "state_bytes": state_bytes,
        "batch": args.batch, "step_s": {mode: spread(values) for mode, values in times.items()},
        "overhead": {mode: statistics.median(times[mode]) / base - 1 for mode in MODES if mode != "none"},
        "throughput": through,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"params": params, "state_GB": state_bytes / 1e9, "overhead": result["overhead"],
                      "throughput": through}, indent=2))
    return 0


def throughput(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
               repeats: int) -> dict[str, float]:
    """Blocking copy + crc32c + this node's parity share (k=4) vs memcpy of the same bytes."""
    directory.mkdir(parents=True)
    tree = capture(type("T", (), {"model": model, "optimizer": optimizer, "scheduler": None})(), 0)
    layout = payload.plan(tree)
    region = SlotFile.open(directory / "x.data", layout.length)
    source = np.ones(layout.length, dtype=np.uint8)
    target = np.zeros(layout.length, dtype=np.uint8)
    k = 4
    block = erasure.block_length([layout.length] * k, k, 1)
    group = [np.frombuffer(region.payload(0), dtype=np.uint8, count=layout.length)] + \
        [source] * (k - 1)   # content does not matter for timing; saves memory
    parity_out = [[np.zeros(block, dtype=np.uint8)] for _ in range(k)]
    shm_target = np.frombuffer(region.payload(1), dtype=np.uint8, count=layout.length)
    copy_s, crc_s, parity_s, memcpy_s, shm_s = [], [], [], [], []
    for attempt in range(repeats + 1):   # the first pass faults every buffer in; not counted
        if attempt == 1:
            copy_s, crc_s, parity_s, memcpy_s, shm_s = [], [], [], [], []
        started = time.perf_counter()
        np.copyto(shm_target, source)
        shm_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        payload.copy_tensors(payload.write_skeleton(tree, layout, region.payload(0)), region.payload(0))
        copy_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        pending = payload.write_skeleton(tree, layout, region.payload(0))
        crc = payload.copy_tensors(pending, region.payload(0), layout.length)   # what snapshots do
        crc_s.append(time.perf_counter() - started)
        assert crc == checksum(region.payload(0)[:layout.length])
        started = time.perf_counter()
        erasure.encode(group, 1, block, out=parity_out)
        parity_s.append((time.perf_counter() - started) / k)   # one node's share of the group's work
        started = time.perf_counter()
        np.copyto(target, source)
        memcpy_s.append(time.perf_counter() - started)
    del group, shm_target
    region.close()
    gb = layout.length / 1e9
    copy, fused, parity, memcpy, shm = (statistics.median(v) for v in (copy_s, crc_s, parity_s, memcpy_s, shm_s))
    return {"GB": gb, "memcpy_GBps": gb / memcpy, "memcpy_into_shm_GBps": gb / shm,
            "copy_x_memcpy_into_shm": shm / copy, "snapshot_with_crc_and_parity_x_memcpy_into_shm":
            shm / (fused + parity), "copy_GBps": gb / copy, "copy_x_memcpy": memcpy / copy,
            "copy_with_crc_x_memcpy": memcpy / fused,
            "snapshot_with_crc_and_parity_x_memcpy": memcpy / (fused + parity),
            "copy_s": copy, "copy_with_crc_s": fused, "parity_share_s": parity, "memcpy_s": memcpy}


if __name__ == "__main__":
    sys.exit(main())
