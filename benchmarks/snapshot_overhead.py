"""Snapshot overhead on step time, and snapshot throughput beside memcpy (issue 4).

A ~102M-parameter model (10 x Linear(3200, 3200)) with AdamW: the snapshot holds parameters and
both Adam moments, ~1.2 GB. One process; the step time (forward, backward, optimizer step) is
measured without snapshots, with one every 10 steps and with one every step (the copy overlapped
with the next forward/backward, the default; and the same with the copy's crc forced onto a
thread of its own, ``crc_thread=True``, which by default it gets in the background only when
torch's threads leave a core free), and with one every step copied in the foreground
(``overlap=False``, where the crc gets its thread). Run it with
``GLIBC_TUNABLES`` as the agent sets it for training processes (:mod:`salamander_worker.memcopy`). Modes are interleaved in rounds, so machine noise hits all of them alike;
medians and spread of per-step times are reported, and overhead as a ratio to "none".

Throughput: the copy of the state into its pre-faulted shared-memory slot, with the crc32 fused
into it (1 MiB pieces checksummed just before their copy, on a thread of their own; also on
the copying thread, and on it with the CRC-32C used before), plus this node's XOR work in the point-to-point parity exchange for a group of k=4 (:func:`share`), one
after the other and pipelined (the share on a second thread trailing the copy, as the
Snapshotter's exchange thread does), beside ``np.copyto`` of the same number of bytes between
pre-faulted buffers. Every figure is the median of ``--rounds`` repeats, taken in alternating
order.

    python benchmarks/snapshot_overhead.py --rounds 5 --steps 12
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import crc32c
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker/src"))
sys.path.insert(0, str(ROOT / "src"))

from bench_stats import machine, spread  # noqa: E402
from salamander import wire  # noqa: E402
from salamander_worker.snapshot import erasure, exchange, payload, pool  # noqa: E402
from salamander_worker.snapshot import region as region_mod  # noqa: E402
from salamander_worker.snapshot.capture import Trainee, capture  # noqa: E402
from salamander_worker.snapshot.region import SlotFile, checksum  # noqa: E402
from salamander_worker.snapshot.snapshotter import Snapshotter  # noqa: E402

MODES = ("none", "every-10", "every-step", "every-step-crc-thread", "every-step-blocking")


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
        "every-step-crc-thread": Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1),
                                             memory_dir=memory / "d", crc_thread=True),
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
    """The snapshot's copy of ``model``/``optimizer`` into a shared-memory slot, with its crc32
    and with this node's parity share (k=4), beside memcpy of the same bytes; see :func:`share`."""
    directory.mkdir(parents=True)
    tree = capture(Trainee(model, optimizer), 0)
    layout = payload.plan(tree)
    length = layout.length
    region = SlotFile.open(directory / "x.data", length)
    slot = np.frombuffer(region.payload(0), dtype=np.uint8, count=length)
    source = np.ones(length, dtype=np.uint8)
    target = np.zeros(length, dtype=np.uint8)
    k = 4
    block = erasure.block_length([length] * k, k, 1)
    received = [np.ones(block, dtype=np.uint8) for _ in range(k - 2)]   # what the others send
    shm_target = np.frombuffer(region.payload(1), dtype=np.uint8, count=length)

    def copy(crc: bool, landed: Any = None) -> int | None:
        pending = payload.write_skeleton(tree, layout, region.payload(0))
        return payload.copy_tensors(pending, region.payload(0), length if crc else None, landed=landed)

    def copy_one_thread() -> None:   # the crc on the copying thread, as before the running crc
        with mock.patch.object(pool, "threads", lambda: 1):
            copy(True)

    def copy_crc32c() -> None:   # and with the checksum before this one, the crc32c package's CRC-32C
        with mock.patch.object(region_mod, "checksum_update", lambda data, crc: crc32c.crc32c(data, crc)):
            copy_one_thread()

    def pipelined() -> None:     # the Snapshotter's way: the exchange thread trails the copy
        landing = exchange.Landing(length)
        worker = threading.Thread(target=share, args=(slot, block, k, received, landing.wait_for))
        worker.start()
        landing.finish(copy(True, landed=landing.advance))
        worker.join()

    runs = {"memcpy": lambda: np.copyto(target, source), "memcpy_into_shm": lambda: np.copyto(shm_target, source),
            "copy": lambda: copy(False), "copy_with_crc": lambda: copy(True), "copy_with_crc_one_thread": copy_one_thread,
            "copy_with_crc32c": copy_crc32c,
            "parity_share": lambda: share(slot, block, k, received), "pipelined": pipelined}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for attempt in range(repeats + 1):   # the first pass faults every buffer in; not counted
        for name, run in (runs.items() if attempt % 2 else reversed(runs.items())):
            started = time.perf_counter()
            run()
            if attempt:
                times[name].append(time.perf_counter() - started)
    assert copy(True) == checksum(region.payload(0)[:length])
    region.close()
    gb = length / 1e9
    t = {name: statistics.median(values) for name, values in times.items()}
    return {"GB": gb, "memcpy_GBps": gb / t["memcpy"], "memcpy_into_shm_GBps": gb / t["memcpy_into_shm"],
            "copy_x_memcpy_into_shm": t["memcpy_into_shm"] / t["copy"],
            "snapshot_with_crc_and_parity_x_memcpy_into_shm": t["memcpy_into_shm"] / (t["copy_with_crc"] + t["parity_share"]),
            "copy_GBps": gb / t["copy"], "copy_x_memcpy": t["memcpy"] / t["copy"],
            "copy_with_crc_x_memcpy": t["memcpy"] / t["copy_with_crc"],
            "copy_with_crc_one_thread_x_memcpy": t["memcpy"] / t["copy_with_crc_one_thread"],
            "copy_with_crc32c_x_memcpy": t["memcpy"] / t["copy_with_crc32c"],
            "snapshot_with_crc_and_parity_x_memcpy": t["memcpy"] / (t["copy_with_crc"] + t["parity_share"]),
            "snapshot_pipelined_x_memcpy": t["memcpy"] / t["pipelined"],
            **{f"{name}_s": value for name, value in t.items()},
            "spread_s": {name: spread(values) for name, values in times.items()}}


def share(slot: np.ndarray, block: int, k: int, received: list[np.ndarray],
          wait: Callable[[int], None] | None = None) -> None:
    """This node's XOR work in the point-to-point parity exchange (:func:`exchange.xor_reduce`)
    of a group of ``k`` with m=1: in each of the ``k - 1`` stripes its payload's blocks belong
    to, it XORs its share (1/(k-1)) of its block with the same share of the ``k - 2`` other
    members' blocks, received into memory (stand-ins here; the network's part is not in this
    figure), in ``REDUCE_CHUNK`` pieces as the exchange does. With ``wait``, each piece first
    waits until the copy has landed the bytes it reads (``Landing.wait_for``)."""
    for b, (a, e) in enumerate(exchange._shares(block, k - 1)):   # noqa: SLF001 - the real cut
        for x in range(a, e, exchange.REDUCE_CHUNK):
            y = min(x + exchange.REDUCE_CHUNK, e)
            lo, hi = b * block + x, min(b * block + y, slot.size)
            if hi <= lo:
                break
            if wait is not None:
                wait(hi)
            target = received[0][x:x + hi - lo]
            np.bitwise_xor(target, slot[lo:hi], out=target)
            for extra in received[1:]:
                erasure.xor_into(target, extra[x:x + hi - lo])


if __name__ == "__main__":
    sys.exit(main())
