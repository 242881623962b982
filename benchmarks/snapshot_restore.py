"""Restore after one lost node: in-memory snapshot (rebuilt from the group's parity) vs a
torch.distributed.checkpoint reload of the same state from disk (issue 4).

Four "nodes" (processes, gloo over loopback, each with its own /dev/shm directory) train a
~102M-parameter model (10 x Linear(3200, 3200)) with ZeroRedundancyOptimizer(AdamW): every rank
holds the parameters and a unique quarter of the Adam state. After a snapshot (k=4, m=1) and a
DCP save of the same state to local disk, every process exits; node 1 loses its shared memory.
Then, per repeat, four fresh processes restore: from snapshots (three ranks from local memory,
rank 1 rebuilt from the others' data and parity) and from the DCP checkpoint, in alternating
order. Both restore the whole state, Adam moments included: before ``dcp.load`` the fresh
optimizer's state is created as torch's ``set_state_dict`` does (without it DCP finds no
moments to load into and restores only the parameters). The time is the slowest rank's, from the call to a model ready to train. Before each
repeat the DCP files are synced and dropped from the page cache (``posix_fadvise
DONTNEED``), so DCP reads them from disk; ``--warm`` keeps them cached (which flatters DCP).

    python benchmarks/snapshot_restore.py --repeats 3
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
import torch.distributed.checkpoint as dcp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker/src"))
sys.path.insert(0, str(ROOT / "src"))

from bench_stats import free_port, machine  # noqa: E402

WORLD = 4


def rank_main(args: argparse.Namespace) -> int:
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from salamander import wire
    from salamander_worker.snapshot.snapshotter import Snapshotter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args.rank, world_size=WORLD)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4)
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1, group_size=4, parity=1),
                       memory_dir=Path(args.memory) / f"node-{args.rank}")
    ckpt = Path(args.memory).parent / "dcp"

    def dcp_state() -> dict:
        return {"model": model.state_dict(), f"optim-rank{args.rank}": optimizer.optim.state_dict()}

    if args.phase == "train":
        x = torch.randn(8, args.width)
        model(x).pow(2).mean().backward()
        optimizer.step()
        snap.snapshot(1)
        snap.wait()
        dcp.save(dcp_state(), checkpoint_id=ckpt)
        dist.barrier()
        os._exit(0)

    timings = {}
    for what in (("dcp", "snapshot") if args.order == 0 else ("snapshot", "dcp")):
        dist.barrier()
        started = time.perf_counter()
        if what == "snapshot":
            step, _ = snap.restore()
            assert step == 1, step
            tier = snap.stats.restore_tier
            timings["phases"] = dict(snap.stats.restore_phases)
        else:
            # As torch's set_state_dict does before a load: a fresh optimizer has no Adam state
            # for DCP to load into, so create it (zeros, lr 0) first; otherwise DCP would skip
            # the moments and restore less than the snapshot does.
            _init_optim_state(optimizer.optim)
            state = dcp_state()
            dcp.load(state, checkpoint_id=ckpt)
            optimizer.optim.load_state_dict(state[f"optim-rank{args.rank}"])
            assert len(optimizer.optim.state) == sum(len(g["params"]) for g in optimizer.optim.param_groups)
        timings[what] = time.perf_counter() - started
        snap.wait()   # the post-restore snapshot that re-protects the state: not timed, and done
        #               before DCP is timed so the two never overlap
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, timings)
    if args.rank == 0:
        print(json.dumps({"phases": {r: t["phases"] for r, t in enumerate(gathered)},
                          "snapshot_s": max(t["snapshot"] for t in gathered),
                          "dcp_s": max(t["dcp"] for t in gathered), "tier": tier}), flush=True)
    dist.barrier()
    os._exit(0)


def launch(phase: str, memory: Path, args: argparse.Namespace, order: int = 0) -> str:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--phase", phase, "--port", str(port),
                               "--memory", str(memory), "--order", str(order), "--width", str(args.width),
                               "--layers", str(args.layers)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"{phase} rank failed ({p.returncode}):\n{out[-3000:]}")
    return outs[0]


def drop_cache(directory: Path) -> None:
    """Write back and evict ``directory``'s files from the page cache (no root needed)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=3200)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--phase", default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--memory", default="")
    parser.add_argument("--order", type=int, default=0)
    parser.add_argument("--warm", action="store_true", help="leave the DCP files in the page cache")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/snapshot_restore.json"))
    args = parser.parse_args()
    if args.rank is not None:
        return rank_main(args)

    work = Path(tempfile.mkdtemp(prefix="snaprestore-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="snaprestore-dcp-"))
    memory = work / "mem"
    memory.mkdir()
    (memory.parent / "dcp").symlink_to(disk)   # DCP files on disk, not in /dev/shm
    runs = []
    try:
        print("training 1 step with 4 ranks, snapshot + DCP save ...", flush=True)
        launch("train", memory, args)
        for i in range(args.repeats):
            for case in ("node-lost", "process-restart"):
                if case == "node-lost":
                    shutil.rmtree(memory / "node-1", ignore_errors=True)   # node 1 is lost with its memory
                if not args.warm:
                    drop_cache(disk)
                out = launch("restore", memory, args, order=i % 2)
                line = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
                line["case"] = case
                runs.append(line)
                print(f"repeat {i + 1}/{args.repeats} {case}: snapshot {line['snapshot_s']:.2f} s ({line['tier']}), "
                      f"DCP {line['dcp_s']:.2f} s, ratio {line['dcp_s'] / line['snapshot_s']:.2f}x", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    summary = {}
    for case in ("node-lost", "process-restart"):
        picked = [r for r in runs if r["case"] == case]
        ratios = [r["dcp_s"] / r["snapshot_s"] for r in picked]
        summary[case] = {"snapshot_median_s": statistics.median(r["snapshot_s"] for r in picked),
                         "dcp_median_s": statistics.median(r["dcp_s"] for r in picked),
                         "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios), "tiers": sorted({r["tier"] for r in picked})}
    result = {"machine": machine(), "world": WORLD, "dcp_page_cache": "warm" if args.warm else "dropped", "params": args.width * (args.width + 1) * args.layers,
              "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
