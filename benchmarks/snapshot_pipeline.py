"""Time to protection of a snapshot: parity exchange after the copy vs. pipelined with it (issue 4).

``--nodes`` processes (one "node" each, gloo over loopback, one erasure-coding group of k =
nodes, m = 1) each hold ``--params`` parameters with AdamW state. Each process keeps two
:class:`Snapshotter` s, ``pipeline=False`` (the exchange starts once the copy is committed) and
``pipeline=True`` (the exchange follows the copy window by window), and takes snapshots with
them in alternating order (ABBA), so machine noise hits both alike. One measurement is the
time from ``snapshot()`` to ``wait()`` returning on the group's slowest member: the data is in
memory, committed, and protected by parity. Beside it, every member copies the same bytes with
``np.copyto`` at the same time (the memcpy baseline on this machine, under the same load).
Each round also times the parity exchange alone on the newest snapshot, by gloo's
``reduce_scatter`` (the encoding before this benchmark's change) and by the point-to-point
windows, in alternating order.

    python benchmarks/snapshot_pipeline.py --params 15e6 --rounds 6    # ~3 min on 2 cores

On one machine the members' exchange is TCP over loopback, which costs far more CPU than the
copy; on real nodes each has its own NIC and cores, and the copy is a larger share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker/src"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stats import machine, spread  # noqa: E402

MODES = ("after-copy", "pipelined")
#: The exchange alone, on a committed snapshot: gloo's reduce_scatter with BXOR (what encoding used
#: before the pipelined exchange) and :func:`exchange.encode_parity` on bytes that have all landed.
EXCHANGES = ("exchange:reduce_scatter", "exchange:point-to-point")


_SCRATCH: dict[int, object] = {}


def exchange_only(mode: str, snap: object, length: int) -> None:
    """One parity exchange of ``snap``'s newest committed payload (``length`` bytes) by ``mode``,
    into a scratch buffer, with no copy before it."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from salamander_worker.snapshot import erasure, exchange

    group, pg, m = snap._ec_group, snap._ec_pg, snap.config.parity   # type: ignore[attr-defined]  # noqa: SLF001
    k, j = len(group), group.index(dist.get_rank())
    newest = snap._data.committed()[0]   # type: ignore[attr-defined]  # noqa: SLF001
    data = np.frombuffer(snap._data.payload(newest.slot), dtype=np.uint8, count=length)   # type: ignore[attr-defined]  # noqa: SLF001
    block_len = erasure.block_length([length] * k, k, m)
    out = _SCRATCH.get(m * block_len)
    if out is None:   # the receive buffer, faulted in once (as a parity slot is)
        out = _SCRATCH[m * block_len] = np.zeros(m * block_len, dtype=np.uint8)
    if mode == "exchange:point-to-point":
        exchange.encode_parity(pg, group, m, data, exchange.Landing.landed(length, 0), block_len, out)
        return
    roles = erasure.roles(k, m)
    zeros = torch.zeros(block_len, dtype=torch.uint8)
    inputs = []
    for receiver in range(k):
        role = roles[receiver][j]
        block = zeros if role.kind != "data" else torch.from_numpy(
            np.ascontiguousarray(erasure.block_view(data, role.block, block_len)))
        inputs.append(block.view(torch.int64))
    dist.reduce_scatter(torch.from_numpy(out).view(torch.int64), inputs, op=dist.ReduceOp.BXOR, group=pg)


def _member(rank: int, args: argparse.Namespace, port: int, memory: str, out: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from salamander import wire
    from salamander_worker.snapshot.snapshotter import Snapshotter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=rank, world_size=args.nodes)
    torch.set_num_threads(1)
    width = 2048
    layers = max(1, round(float(args.params) / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).square().mean().backward()
    optimizer.step()
    config = wire.SnapshotConfig(interval=1, group_size=args.nodes, parity=1)
    snaps = {mode: Snapshotter(model, optimizer, config=config, pipeline=mode == "pipelined",
                               memory_dir=Path(memory) / mode / f"node-{rank}") for mode in MODES}

    def group_seconds(action: object) -> float:
        dist.barrier()
        started = time.perf_counter()
        action()   # type: ignore[operator]
        mine = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        return float(mine)

    times: dict[str, list[float]] = {mode: [] for mode in (*MODES, *EXCHANGES, "memcpy")}
    tails: dict[str, list[float]] = {mode: [] for mode in MODES}
    length = 0
    step = 0
    for round_ in range(args.rounds + 1):   # round 0 allocates and faults in every buffer: not counted
        order = MODES if round_ % 2 else MODES[::-1]
        for mode in (*order, *order[::-1]):
            snap = snaps[mode]
            step += 1

            def take(snap: Snapshotter = snap, step: int = step) -> None:
                snap.snapshot(step)
                snap.wait()

            seconds = group_seconds(take)
            if round_:
                times[mode].append(seconds)
                tails[mode].append(snap.stats.encode_s[-1])
        assert snaps["pipelined"]._data is not None   # noqa: SLF001 - the payload's size
        length = snaps["pipelined"]._data.committed()[0].record["length"]   # noqa: SLF001
        for exchange_mode in (EXCHANGES if round_ % 2 else EXCHANGES[::-1]):
            seconds = group_seconds(lambda: exchange_only(exchange_mode, snaps["pipelined"], length))  # noqa: B023
            if round_:
                times[exchange_mode].append(seconds)
        source = np.ones(length, dtype=np.uint8)
        target = np.zeros(length, dtype=np.uint8)
        np.copyto(target, source)
        for _ in range(2):
            seconds = group_seconds(lambda: np.copyto(target, source))   # noqa: B023 - called at once
            if round_:
                times["memcpy"].append(seconds)
        if rank == 0:
            print(f"round {round_}/{args.rounds}: " + ", ".join(
                f"{mode} {statistics.median(v):.3f}s" for mode, v in times.items() if v), file=sys.stderr, flush=True)
    for snap in snaps.values():
        snap.close()
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "tails": tails, "bytes_per_node": length}))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4, help="processes, one erasure-coding group (k)")
    parser.add_argument("--params", type=float, default=15e6, help="parameters per node (AdamW: x12 bytes)")
    parser.add_argument("--rounds", type=int, default=6, help="ABBA rounds (4 snapshots + 2 memcpys each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/snapshot_pipeline.json")
    args = parser.parse_args()
    if args.nodes < 2 or args.rounds < 1 or args.params < 1e4:
        parser.error("--nodes must be >= 2, --rounds >= 1, --params >= 1e4")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    memory = tempfile.mkdtemp(prefix="snappipe-", dir="/dev/shm")
    raw = Path(tempfile.mkdtemp(prefix="snappipe-out-")) / "raw.json"
    try:
        mp.spawn(_member, args=(args, port, memory, str(raw)), nprocs=args.nodes)
        result = json.loads(raw.read_text())
    finally:
        shutil.rmtree(memory, ignore_errors=True)
        shutil.rmtree(raw.parent, ignore_errors=True)
    times, gb = result["times"], result["bytes_per_node"] / 1e9
    memcpy = statistics.median(times["memcpy"])
    summary = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "nodes": args.nodes,
               "GB_per_node": gb, "memcpy_s": spread(times["memcpy"])}
    for mode in MODES:
        protect = statistics.median(times[mode])
        summary[mode] = {"to_protection_s": spread(times[mode]), "beyond_copy_commit_s": spread(result["tails"][mode]),
                         "x_memcpy": memcpy / protect}
    paired = [a / p for a, p in zip(times["after-copy"], times["pipelined"])]
    summary["pipelined_speedup"] = spread(paired)
    for mode in EXCHANGES:
        summary[mode] = spread(times[mode])
    summary["point_to_point_speedup"] = spread([a / p for a, p in zip(*(times[mode] for mode in EXCHANGES))])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "raw": result}, indent=1))
    print(f"{args.nodes} nodes x {gb:.2f} GB on {summary['machine']}; memcpy {memcpy:.3f}s (all nodes at once)")
    for mode in MODES:
        s = summary[mode]
        print(f"  {mode:10s} to protection {s['to_protection_s']['median']:.3f}s "
              f"(p10-p90 {s['to_protection_s']['p10']:.3f}-{s['to_protection_s']['p90']:.3f}), "
              f"beyond the copy's commit {s['beyond_copy_commit_s']['median']:.3f}s, {s['x_memcpy']:.3f}x memcpy")
    for mode in EXCHANGES:
        print(f"  {mode:24s} {summary[mode]['median']:.3f}s (p10-p90 {summary[mode]['p10']:.3f}-{summary[mode]['p90']:.3f})")
    sp = summary["point_to_point_speedup"]
    print(f"  point-to-point exchange speed-up over reduce_scatter, paired: median {sp['median']:.2f}x "
          f"(p10-p90 {sp['p10']:.2f}-{sp['p90']:.2f})")
    sp = summary["pipelined_speedup"]
    print(f"  pipelined speed-up, paired: median {sp['median']:.2f}x (p10-p90 {sp['p10']:.2f}-{sp['p90']:.2f}, n={sp['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
