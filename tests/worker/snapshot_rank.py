"""One rank of the snapshot tests: trains a small model with snapshots, or restores and reports.

Run as ``python snapshot_rank.py --rank R --world W --port P --memory DIR --out DIR [options]``.

``train`` mode trains ``--steps`` steps (snapshot every ``--interval``) and writes, for the
newest snapshot it committed, the state it captured (``expected-R.pt``: model, optimizer shard,
RNG, data position; ``expected-R-S.pt`` for the snapshot of every step S) and exits without cleaning up, like a killed process. With ``--tear-at S``
it dies in the middle of the snapshot of step S (payload half written, never committed).
``restore`` mode restores and writes what it restored (``restored-R.pt``) and the tier.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from salamander import wire
from salamander_worker.snapshot import payload
from salamander_worker.snapshot.capture import capture
from salamander_worker.snapshot.snapshotter import Snapshotter


def build(zero: bool, fsdp: bool = False, width: int = 96) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(48, width), torch.nn.Tanh(), torch.nn.Linear(width, 48),
                                torch.nn.Tanh(), torch.nn.Linear(48, 8))
    if fsdp:  # FSDP2: every rank holds a unique shard of every parameter and of its Adam state
        from torch.distributed.fsdp import fully_shard
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    if zero:
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5, gamma=0.9)   # on ZeRO itself, as users do
    return model, optimizer, scheduler


def flat_state(snap: Snapshotter, step: int, data: object) -> dict:
    """What must come back bitwise: the captured tree, passed through the payload codec (which
    is exact), so tensors are detached copies."""
    tree = capture(snap.trainee, step, data)
    layout = payload.plan(tree)
    buffer = bytearray(layout.length)
    payload.write(tree, layout, memoryview(buffer))
    return payload.read(memoryview(buffer))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "restore"])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--memory", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--zero", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--persist", default=None)
    parser.add_argument("--persist-every", type=int, default=0)
    parser.add_argument("--tear-at", type=int, default=None)
    parser.add_argument("--hang-after", action="store_true", help="after training, wait to be killed")
    parser.add_argument("--mismatch-rank", type=int, default=None,
                        help="in restore mode, this rank builds a wider model than the snapshot's")
    args = parser.parse_args()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    model, optimizer, scheduler = build(args.zero, args.fsdp, width=100 if args.mismatch_rank == args.rank else 96)
    config = wire.SnapshotConfig(interval=args.interval, group_size=args.k, parity=args.m,
                                 persist_every=args.persist_every, persist_directory=args.persist)
    snap = Snapshotter(model, optimizer, scheduler=scheduler, config=config, memory_dir=args.memory)
    out = Path(args.out)
    random.seed(args.rank)
    np.random.seed(args.rank)
    torch.manual_seed(100 + args.rank)

    if args.mode == "restore":
        step, data = snap.restore()
        untouched = None
        if args.mismatch_rank is not None:   # (build seeds torch: keep the restored RNG out of it)
            with torch.random.fork_rng():
                built = build(args.zero, args.fsdp, width=100 if args.mismatch_rank == args.rank else 96)[0]
            untouched = {"optimizer_state": len(optimizer.state), "params_as_built": all(
                torch.equal(a, b) for a, b in zip(model.parameters(), built.parameters()))}
        torch.save({"step": step, "data": data, "state": flat_state(snap, step, data), "untouched": untouched,
                    "tier": snap.stats.restore_tier}, out / f"restored-{args.rank}.pt")
        snap.close()
        dist.destroy_process_group()
        return 0

    start, _ = snap.restore()
    for step in range(start, args.steps):
        x = torch.randn(16, 48)
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        done = step + 1
        data = {"epoch": 0, "index": done * 16, "rank": args.rank}
        if args.tear_at == done:
            region_slot = snap._data.begin() if snap._data is not None else None  # noqa: SLF001 - the test's crash point
            if region_slot is not None:
                view = snap._data.payload(region_slot)  # noqa: SLF001
                view[: len(view) // 2] = b"\xab" * (len(view) // 2)
            os._exit(17)
        if snap.due(done):
            expected = flat_state(snap, done, data)
            snap.step(done, data)
            snap.wait()
            torch.save({"step": done, "data": data, "state": expected}, out / f"expected-{args.rank}.pt")
            torch.save({"step": done, "data": data, "state": expected}, out / f"expected-{args.rank}-{done}.pt")
    (out / f"trained-{args.rank}.json").write_text(json.dumps({"protected": snap.stats.protected_step,
                                                              "persisted": snap.stats.persisted_step}))
    if args.hang_after:
        (out / f"ready-{args.rank}").touch()
        while True:
            time.sleep(0.1)
    sys.stdout.flush()
    os._exit(0)  # like a killed process: no cleanup, the shared memory stays


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
