"""Restore ZeRO state into a world of another size (issue 4): Salamander's persistent copies,
resharded, beside torch's own way, a consolidated ``ZeroRedundancyOptimizer`` state dict.

Four "nodes" (processes, gloo over loopback) train one step of a ~102M-parameter model
(10 x Linear(3200, 3200)) with ZeroRedundancyOptimizer(AdamW), take a snapshot persisted to local
disk (one copy per rank: the parameters and the rank's quarter of the Adam state), and save the
same state as torch offers it for a resize: ``consolidate_state_dict`` on rank 0, ``torch.save``.
Then, per repeat, in alternating order, with the files dropped from the page cache first:

* **reshard**: three fresh processes restore from the four copies (each reads old rank r's copy
  and the copies holding its new partition; :mod:`salamander_worker.snapshot.reshard`);
* **consolidated**: three fresh processes each ``torch.load`` the consolidated file and call
  ``ZeroRedundancyOptimizer.load_state_dict`` (which keeps the rank's partition). Each reads its
  own copy of the file: on a cluster every node reads the whole file from storage, while here
  one file would be read from disk once and then from the page cache the "nodes" share;
* **same size**: four fresh processes restore from the copies without resharding (a reference
  for what resharding adds).

Times are the slowest rank's, from the call to a model ready to train; peak RSS per rank too.
A snapshot restore from a persistent copy ends by taking a snapshot of the restored state into
local memory at once (its copy is in the time; ``protect_s`` says how much); the consolidated
load protects nothing.

    python benchmarks/snapshot_reshard.py --repeats 3
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

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker/src"))
sys.path.insert(0, str(ROOT / "src"))

from bench_stats import free_port, machine, peak_rss_mb  # noqa: E402
from snapshot_restore import drop_cache  # noqa: E402

OLD_WORLD, NEW_WORLD = 4, 3


def rank_main(args: argparse.Namespace) -> int:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from salamander import wire
    from salamander_worker.snapshot.snapshotter import Snapshotter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4)
    disk = Path(args.disk)
    config = wire.SnapshotConfig(interval=1, group_size=args.world, parity=1, persist_every=1,
                                 persist_directory=str(disk / "persist"))
    snap = Snapshotter(model, optimizer, config=config, memory_dir=Path(args.memory) / f"node-{args.rank}")
    consolidated = disk / "consolidated.pt"

    if args.phase == "train":
        model(torch.randn(8, args.width)).pow(2).mean().backward()
        optimizer.step()
        snap.snapshot(1)
        snap.wait()
        optimizer.consolidate_state_dict(to=0)
        if args.rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, consolidated)
            for rank in range(NEW_WORLD):   # a file per reader: on a cluster no node shares another's page cache
                shutil.copyfile(consolidated, consolidated.with_name(f"consolidated-{rank}.pt"))
        dist.barrier()
        os._exit(0)

    dist.barrier()
    started = time.perf_counter()
    if args.phase == "consolidated":
        state = torch.load(consolidated.with_name(f"consolidated-{args.rank}.pt"), weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        del state
        tier = "consolidated"
    else:
        step, _ = snap.restore()
        assert step == 1, step
        tier = snap.stats.restore_tier
    elapsed = time.perf_counter() - started
    held = len(optimizer.optim.state)
    assert held == sum(len(g["params"]) for g in optimizer.optim.param_groups), "Adam state not restored"
    gathered: list = [None] * args.world
    dist.all_gather_object(gathered, {"s": elapsed, "rss_mb": peak_rss_mb(),
                                      "phases": dict(snap.stats.restore_phases)})
    if args.rank == 0:
        print(json.dumps({"s": max(g["s"] for g in gathered), "tier": tier,
                          "protect_s": max(g["phases"].get("protect", 0.0) for g in gathered),
                          "peak_rss_mb": max(g["rss_mb"] for g in gathered),
                          "phases": {r: g["phases"] for r, g in enumerate(gathered)}}), flush=True)
    dist.barrier()
    os._exit(0)


def launch(phase: str, world: int, memory: Path, disk: Path, args: argparse.Namespace) -> str:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), "--phase", phase,
                               "--port", str(port), "--memory", str(memory), "--disk", str(disk),
                               "--width", str(args.width), "--layers", str(args.layers)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"{phase} rank failed ({p.returncode}):\n{out[-3000:]}")
    return outs[0]


CASES = {"reshard": ("snapshot", NEW_WORLD), "consolidated": ("consolidated", NEW_WORLD),
         "same size": ("snapshot", OLD_WORLD)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=3200)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world", type=int, default=OLD_WORLD)
    parser.add_argument("--phase", default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--memory", default="")
    parser.add_argument("--disk", default="")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/snapshot_reshard.json"))
    args = parser.parse_args()
    if args.rank is not None:
        return rank_main(args)

    disk = Path(tempfile.mkdtemp(prefix="snapreshard-"))
    memory_root = Path(tempfile.mkdtemp(prefix="snapreshard-", dir="/dev/shm"))
    runs = []
    try:
        print(f"training 1 step with {OLD_WORLD} ranks, persisted snapshot + consolidated save ...", flush=True)
        launch("train", OLD_WORLD, memory_root / "train", disk, args)
        shutil.rmtree(memory_root / "train")   # every node lost: only the persistent copies remain
        order = list(CASES)
        for i in range(args.repeats):
            for name in (order if i % 2 == 0 else order[::-1]):
                phase, world = CASES[name]
                memory = memory_root / f"{i}-{name.replace(' ', '-')}"
                drop_cache(disk)
                line = json.loads([ln for ln in launch(phase, world, memory, disk, args).splitlines()
                                   if ln.startswith("{")][-1])
                shutil.rmtree(memory, ignore_errors=True)
                line["case"] = name
                runs.append(line)
                print(f"repeat {i + 1}/{args.repeats} {name}: {line['s']:.2f} s ({line['tier']}, "
                      f"{line['protect_s']:.2f} s of it protecting the restored state), "
                      f"peak RSS {line['peak_rss_mb']:.0f} MB per rank", flush=True)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(memory_root, ignore_errors=True)
    summary = {}
    for name in CASES:
        picked = [r["s"] for r in runs if r["case"] == name]
        summary[name] = {"median_s": statistics.median(picked), "min_s": min(picked), "max_s": max(picked),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in runs if r["case"] == name)}
    paired = [c["s"] / r["s"] for c, r in zip((r for r in runs if r["case"] == "consolidated"),
                                                (r for r in runs if r["case"] == "reshard"))]
    summary["consolidated / reshard"] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}
    result = {"machine": machine(), "old_world": OLD_WORLD, "new_world": NEW_WORLD,
              "params": args.width * (args.width + 1) * args.layers, "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
