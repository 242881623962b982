"""Snapshots on a GPU (issue 4): step-time overhead, throughput beside plain copies, and restore
after a process restart beside torch.distributed.checkpoint. Needs CUDA; run on a GPU node.

The model is GPT-2 small (12 layers, d_model 768, 124M parameters, vocabulary 50,304, sequence
1,024) from ``examples/gpt``, trained with bf16 autocast and AdamW: a snapshot holds the fp32
parameters and both Adam moments, ~1.5 GB. One process, one GPU.

* **Overhead.** Four modes in interleaved rounds: no snapshots, one every 10 steps, one every
  step (DMA on a copy stream during the next forward and backward, the default) and one every
  step with the copy waited for at once (``overlap=False``). Step times are read from CUDA events
  recorded on the compute stream at every step boundary, so they are the GPU's timeline as
  training sees it, host never synchronised inside a round. ``--configs`` repeats the whole
  comparison for several tokens per step: the shorter the step, the less room to hide the copy.
* **Throughput.** For the state's bytes: a plain device-to-host ``copy_`` of one contiguous
  tensor into page-locked memory, and a host ``memcpy`` (``np.copyto``) between pre-faulted
  buffers, beside the snapshot (DMA of the live tensors into the shared-memory slot), the
  snapshot committed (plus its crc32), and this node's share of XOR parity for a group of k=4.
* **Restore.** A fresh model and optimizer (as after a process restart) restore from shared
  memory, beside ``dcp.load`` of the same state saved to local disk, with the page cache
  dropped first (``/proc/sys/vm/drop_caches`` as root, else ``posix_fadvise``).

    python benchmarks/snapshot_gpu.py --rounds 5 --steps 20 --configs 16x4,8x1
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(ROOT))

from bench_stats import spread  # noqa: E402
from examples.gpt.model import GPT, GPTConfig, lm_loss  # noqa: E402
from salamander import wire  # noqa: E402
from salamander_worker.snapshot import device, erasure  # noqa: E402
from salamander_worker.snapshot.capture import Trainee, capture  # noqa: E402
from salamander_worker.snapshot.snapshotter import Snapshotter  # noqa: E402

MODES = ("none", "every-10", "every-step", "every-step-blocking")


def build(args: argparse.Namespace, seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50304, block_size=args.seq, n_layer=args.layers, d_model=args.d_model,
                    n_head=args.d_model // 64)
    model = GPT(cfg).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, idx: torch.Tensor, accum: int = 1) -> None:
    """One optimizer step over ``accum`` micro-batches of ``idx`` (gradient accumulation)."""
    for _ in range(accum):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(idx[:, :-1]), idx[:, 1:]) / accum
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def overhead(args: argparse.Namespace, config: str, memory: Path) -> dict:
    batch, accum = (int(v) for v in config.split("x"))
    model, optimizer = build(args)
    idx = torch.randint(0, 50304, (batch, args.seq + 1), device="cuda")
    for _ in range(3):
        train_step(model, optimizer, idx, accum)
    snappers = {
        "every-10": Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=10), memory_dir=memory / "a"),
        "every-step": Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=memory / "b"),
        "every-step-blocking": Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1),
                                           memory_dir=memory / "c", overlap=False),
    }
    for snap in snappers.values():   # allocate, pre-fault and page-lock every file once
        snap.snapshot(1)
        snap.wait()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    blocking: dict[str, list[float]] = {mode: [] for mode in MODES}
    step = 1
    try:
        for rnd in range(args.rounds):
            for mode in (MODES if rnd % 2 == 0 else tuple(reversed(MODES))):
                snap = snappers.get(mode)
                events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
                torch.cuda.synchronize()
                events[0].record()
                for i in range(args.steps):
                    train_step(model, optimizer, idx, accum)
                    step += 1
                    if snap is not None:
                        snap.step(step)
                    events[i + 1].record()
                torch.cuda.synchronize()
                if snap is not None:
                    snap.wait()
                got = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(args.steps)]
                times[mode].extend(got)
                print(f"{config} round {rnd + 1}/{args.rounds} {mode:>20}: median step "
                      f"{statistics.median(got) * 1e3:.1f} ms", flush=True)
        dma: dict[str, list[float]] = {}
        background: dict[str, list[float]] = {}
        for mode, snap in snappers.items():
            blocking[mode] = snap.stats.blocking_s[1:]
            dma[mode] = snap.stats.dma_s[1:]
            background[mode] = snap.stats.background_s[1:]
        state_bytes = snappers["every-step"]._layout.length  # noqa: SLF001 - benchmark introspection
    finally:
        for snap in snappers.values():
            snap.close()
        del snappers
    base = statistics.median(times["none"])
    return {"micro_batch": batch, "accumulation": accum, "tokens_per_step": batch * accum * args.seq,
            "state_bytes": state_bytes, "step_s": {mode: spread(v) for mode, v in times.items()},
            "host_blocking_s": {mode: spread(v) for mode, v in blocking.items() if v},
            "dma_s": {mode: spread(v) for mode, v in dma.items() if v},
            "background_s": {mode: spread(v) for mode, v in background.items() if v},
            "overhead": {mode: statistics.median(times[mode]) / base - 1 for mode in MODES if mode != "none"}}


def profile(args: argparse.Namespace, memory: Path) -> None:
    """Where the host's time goes in ``Snapshotter.snapshot`` (cProfile over 10 snapshots)."""
    import cProfile
    import pstats

    model, optimizer = build(args)
    idx = torch.randint(0, 50304, (8, args.seq + 1), device="cuda")
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=memory / "p")
    for step in range(1, 4):
        train_step(model, optimizer, idx)
        snap.step(step)
    snap.wait()
    profiler = cProfile.Profile()
    for step in range(4, 14):
        train_step(model, optimizer, idx)
        snap.wait()
        profiler.enable()
        snap.step(step)
        profiler.disable()
    snap.close()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(22)


def uploads(args: argparse.Namespace, memory: Path) -> dict:
    """Host-to-device copies of 1.65 GB from pageable shared memory: torch's plain ``copy_``,
    page-locking the source first, and :func:`device.upload` with several piece sizes and
    thread counts (medians of 3, after one warm-up that also fills torch's page-locked cache)."""
    import mmap

    size = 1_648_312_064
    path = memory / "upload"
    memory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    source = torch.frombuffer(mapping, dtype=torch.uint8)
    source.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
    target = torch.empty(size, dtype=torch.uint8, device="cuda")
    out: dict = {}

    def run(name: str, fn) -> None:
        times = []
        for _ in range(4):
            target.fill_(0)
            torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        out[name] = {"s": statistics.median(times[1:]), "first_s": times[0],
                     "GBps": size / statistics.median(times[1:]) / 1e9}
        assert torch.equal(target[:4096].cpu(), source[:4096]) and torch.equal(target[-4096:].cpu(), source[-4096:])
        print(f"upload {name:>28}: {out[name]['GBps']:.1f} GB/s (first {times[0]:.3f} s)", flush=True)

    run("plain copy_ (pageable)", lambda: target.copy_(source))
    for piece_mb, threads in ((16, 8), (4, 8), (4, 16), (1, 16), (8, 4)):
        run(f"staged {piece_mb} MiB x {threads} threads",
            lambda p=piece_mb, t=threads: device.upload([(target, source)], piece=p << 20, threads=t))
    started = time.perf_counter()
    pinned = device.PINNED.pin(memoryview(mapping))
    out["register_s"] = time.perf_counter() - started
    if pinned:
        run("page-locked source, copy_", lambda: target.copy_(source))
        device.PINNED.unpin(memoryview(mapping))
    del source
    mapping.close()
    os.close(fd)
    path.unlink()
    return out


def _timed(fn, repeats: int) -> float:
    values = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        fn()
        values.append(time.perf_counter() - started)
    return statistics.median(values[1:])


def throughput(args: argparse.Namespace, memory: Path) -> dict:
    model, optimizer = build(args)
    idx = torch.randint(0, 50304, (2, args.seq + 1), device="cuda")
    train_step(model, optimizer, idx)
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=memory / "t",
                       overlap=False)
    snap.snapshot(1)
    snap.wait()
    length = snap._layout.length  # noqa: SLF001
    gb = length / 1e9
    device = torch.empty(length, dtype=torch.uint8, device="cuda").random_(0, 255)
    pinned = torch.empty(length, dtype=torch.uint8, pin_memory=True)
    host_a = np.random.default_rng(0).integers(0, 255, length, dtype=np.uint8)
    host_b = np.empty_like(host_a)
    host_b[:] = 1

    def d2h() -> None:
        pinned.copy_(device, non_blocking=True)
        torch.cuda.synchronize()

    steps = iter(range(2, 10_000))

    def copy_only() -> None:
        snap.snapshot(next(steps))   # overlap=False: returns once the bytes have landed
        snap_stats_copy.append(snap.stats.blocking_s[-1])
        snap.wait()

    snap_stats_copy: list[float] = []
    committed = _timed(copy_only, args.rounds)
    copy = statistics.median(snap_stats_copy[1:])
    k = 4
    block = erasure.block_length([length] * k, k, 1)
    group = [host_a] * k
    parity_out = [[np.zeros(block, dtype=np.uint8)] for _ in range(k)]
    parity = _timed(lambda: erasure.encode(group, 1, block, out=parity_out), args.rounds) / k
    d2h_s = _timed(d2h, args.rounds)
    memcpy_s = _timed(lambda: np.copyto(host_b, host_a), args.rounds)
    snap.close()
    return {"GB": gb, "d2h_pinned_GBps": gb / d2h_s, "host_memcpy_GBps": gb / memcpy_s,
            "snapshot_copy_GBps": gb / copy, "snapshot_committed_GBps": gb / committed,
            "snapshot_with_parity_GBps": gb / (committed + parity),
            "copy_x_d2h": d2h_s / copy, "committed_x_d2h": d2h_s / committed,
            "with_parity_x_d2h": d2h_s / (committed + parity),
            "with_parity_x_host_memcpy": memcpy_s / (committed + parity),
            "seconds": {"d2h": d2h_s, "memcpy": memcpy_s, "copy": copy, "committed": committed,
                        "parity_share": parity}}


def _drop_cache(directory: Path) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in directory.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


def restore(args: argparse.Namespace, memory: Path, disk: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = build(args)
    idx = torch.randint(0, 50304, (2, args.seq + 1), device="cuda")
    train_step(model, optimizer, idx)
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=memory / "r")
    snap.snapshot(7)
    snap.wait()
    snap.close()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(disk))
    want = [t.detach().cpu().clone() for t in _leaves(capture(Trainee(model, optimizer), 7))]
    del model, optimizer, model_sd, optim_sd
    fresh, fresh_opt = build(args, seed=1)
    train_step(fresh, fresh_opt, idx)
    memory_s, dcp_s, tiers, cache = [], [], set(), ""
    for attempt in range(args.rounds):
        for kind in (("memory", "dcp") if attempt % 2 == 0 else ("dcp", "memory")):
            cache = _drop_cache(disk)
            torch.cuda.synchronize()
            started = time.perf_counter()
            if kind == "memory":
                restored = Snapshotter(fresh, fresh_opt, config=wire.SnapshotConfig(interval=1),
                                       memory_dir=memory / "r")
                step, _ = restored.restore()
                torch.cuda.synchronize()
                memory_s.append(time.perf_counter() - started)
                tiers.add(restored.stats.restore_tier)
                phases = dict(restored.stats.restore_phases)
                restored.close()
                assert step == 7
            else:
                model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
                state = {"model": model_sd, "optim": optim_sd}
                dcp.load(state, checkpoint_id=str(disk))
                set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
                torch.cuda.synchronize()
                dcp_s.append(time.perf_counter() - started)
    if args.profile_restore:   # where one more restore from memory spends its time
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        restored = Snapshotter(fresh, fresh_opt, config=wire.SnapshotConfig(interval=1), memory_dir=memory / "r")
        profiler.enable()
        restored.restore()
        torch.cuda.synchronize()
        profiler.disable()
        restored.close()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(18)
    got = [t.detach().cpu() for t in _leaves(capture(Trainee(fresh, fresh_opt), 7))]
    identical = len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    return {"memory_s": spread(memory_s), "dcp_s": spread(dcp_s), "tiers": sorted(tiers), "cache": cache,
            "dcp_over_memory": statistics.median(dcp_s) / statistics.median(memory_s),
            "last_memory_phases_s": phases, "bitwise_identical_after_last_restore": identical}


def _leaves(tree: object) -> list[torch.Tensor]:
    from salamander_worker.snapshot.payload import leaves
    return [t for t in leaves(tree) if t.dtype != torch.uint8]   # RNG states differ by design


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--configs", default="16x4,8x1",
                        help="overhead runs, comma-separated MICROxACCUM: micro-batch rows of --seq tokens, "
                             "micro-batches per optimizer step (16x4 = 65,536 tokens, nanoGPT's GPT-2 per GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per mode per round")
    parser.add_argument("--only", default="overhead,throughput,restore")
    parser.add_argument("--profile-restore", action="store_true", help="profile one more restore from memory")
    parser.add_argument("--upload-piece-mb", type=int, help="device.UPLOAD_PIECE for the restores, in MiB")
    parser.add_argument("--upload-threads", type=int, help="device.UPLOAD_THREADS for the restores")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/snapshot_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("snapshot_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    parts = set(args.only.split(","))
    if args.upload_piece_mb:
        device.UPLOAD_PIECE = args.upload_piece_mb << 20
    if args.upload_threads:
        device.UPLOAD_THREADS = args.upload_threads
    result_tuning = {"upload_piece": device.UPLOAD_PIECE, "upload_threads": device.UPLOAD_THREADS}
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "layers": args.layers, "d_model": args.d_model, "seq": args.seq,
                    **result_tuning}
    memory = Path(tempfile.mkdtemp(prefix="snapgpu-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="snapgpu-dcp-", dir=os.environ.get("DCP_DIR", "/var/tmp")))
    try:
        if "overhead" in parts:
            result["overhead"] = [overhead(args, c, memory / f"o{c}") for c in args.configs.split(",")]
            for row in result["overhead"]:
                print(json.dumps({"tokens": row["tokens_per_step"], "none_ms": row["step_s"]["none"]["median"] * 1e3,
                                  "overhead": row["overhead"],
                                  "dma_ms": {m: v["median"] * 1e3 for m, v in row["dma_s"].items()},
                                  "background_ms": {m: v["median"] * 1e3 for m, v in row["background_s"].items()},
                                  "host_blocking_ms": {m: v["median"] * 1e3
                                                       for m, v in row["host_blocking_s"].items()}}), flush=True)
        if "upload" in parts:
            result["upload"] = uploads(args, memory)
        if "profile" in parts:
            profile(args, memory)
        if "throughput" in parts:
            result["throughput"] = throughput(args, memory)
            print(json.dumps(result["throughput"], indent=1), flush=True)
        if "restore" in parts:
            result["restore"] = restore(args, memory, disk)
            print(json.dumps(result["restore"], indent=1), flush=True)
    finally:
        shutil.rmtree(memory, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
