"""Erasure-code throughput (issue 4): XOR parity (m=1) and RAID-6 P+Q (m=2) beside a memcpy.

A group of k members, each with a payload of the given size, all in this process. Encoding reads
every payload once and writes the parities (m/(k-m) of the bytes) into pre-allocated, pre-faulted
buffers; the baseline copies the same payloads once with ``np.copyto`` into pre-allocated,
pre-faulted buffers. Rebuild: member 0 lost (m=1) or members 0 and 1 lost (m=2), rebuilt with
``reconstruct`` into pre-allocated, pre-faulted buffers (``out=``); ``--allocating`` also times it
allocating its output, as a restore into fresh memory would. ``gf_scale`` is timed on one payload for c=2 (the
Horner step of Q) and c=0xa7 (a constant that needs the slowest, bit-plane, path). Medians and
spread over repeats, every measure interleaved within each repeat.

    python benchmarks/parity_throughput.py --mib 256 --k 4 --repeats 7          # m=1 and m=2
    python benchmarks/parity_throughput.py --mib 256 --k 4 --m 2 --repeats 7    # m=2 only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker/src"))

from salamander_worker.snapshot.erasure import (
    block_length,
    encode,
    gf_scale,
    reconstruct,
)

SCALE_CONSTANTS = (2, 0xA7)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(seconds: list[float], gib: float, memcpy: list[float] | None = None) -> dict[str, object]:
    med = statistics.median(seconds)
    result: dict[str, object] = {"median_s": med, "gib_s": gib / med, "range_s": [min(seconds), max(seconds)]}
    if memcpy is not None:
        result["over_memcpy"] = statistics.median(memcpy) / med
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="payload size per member, MiB")
    parser.add_argument("--k", type=int, default=4, help="members in the group")
    parser.add_argument("--m", type=int, nargs="+", choices=(1, 2), default=[1, 2],
                        help="parity blocks per stripe: 1 (XOR), 2 (P+Q), or both (default)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--allocating", action="store_true", help="also time reconstruct without out=")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/parity_throughput.json"))
    args = parser.parse_args()
    ms = sorted(set(args.m))
    if args.mib < 1 or args.k < max(ms) + 1 or args.repeats < 1:
        parser.error("--mib >= 1, --k >= m + 1 and --repeats >= 1 are required")
    size = args.mib << 20
    k = args.k
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(k)]
    copies = [np.ones_like(p) for p in payloads]  # allocated and faulted once, as snapshot buffers are
    lengths = [size] * k
    block_len = {m: block_length(lengths, k, m) for m in ms}
    parity_out = {m: [[np.ones(block_len[m], np.uint8) for _ in range(m)] for _ in range(k)] for m in ms}
    rebuild_out = {m: {j: (np.ones((k - m) * block_len[m], np.uint8), [np.ones(block_len[m], np.uint8)
                                                                        for _ in range(m)]) for j in range(m)}
                   for m in ms}
    scale_out = np.ones(size, np.uint8)
    gib = k * size / 2**30
    memcpy_s: list[float] = []
    encode_s: dict[int, list[float]] = {m: [] for m in ms}
    rebuild_s: dict[int, list[float]] = {m: [] for m in ms}
    allocating_s: dict[int, list[float]] = {m: [] for m in ms}
    scale_s: dict[int, list[float]] = {c: [] for c in SCALE_CONSTANTS}
    for n in range(args.repeats):
        memcpy_s.append(timed(lambda: [np.copyto(dst, src) for src, dst in zip(payloads, copies)]))
        for m in ms:
            encode_s[m].append(timed(lambda m=m: encode(payloads, m, block_len[m], out=parity_out[m])))
        for m in ms:
            lost = range(m)
            kept = [None if j in lost else p for j, p in enumerate(payloads)]
            kept_parities = [None if j in lost else p for j, p in enumerate(parity_out[m])]
            rebuild_s[m].append(timed(lambda m=m, a=kept, b=kept_parities: reconstruct(
                a, b, m, lengths, block_len[m], out=rebuild_out[m])))
            if args.allocating:
                allocating_s[m].append(timed(lambda m=m, a=kept, b=kept_parities: reconstruct(
                    a, b, m, lengths, block_len[m])))
        for c in SCALE_CONSTANTS:
            scale_s[c].append(timed(lambda c=c: gf_scale(payloads[0], c, out=scale_out)))
        line = [f"memcpy {gib / memcpy_s[-1]:.2f} GiB/s"]
        line += [f"encode m={m} {gib / encode_s[m][-1]:.2f} GiB/s" for m in ms]
        line += [f"rebuild {m} lost {rebuild_s[m][-1] * 1e3:.0f} ms" for m in ms]
        line += [f"allocating {allocating_s[m][-1] * 1e3:.0f} ms" for m in ms if args.allocating]
        line += [f"gf_scale c={c:#x} {size / 2**30 / scale_s[c][-1]:.2f} GiB/s" for c in SCALE_CONSTANTS]
        print(f"  repeat {n + 1}/{args.repeats}: " + ", ".join(line), flush=True)
    result = {
        "mib_per_member": args.mib, "k": k, "repeats": args.repeats, "gib_per_pass": gib,
        "memcpy": summary(memcpy_s, gib),
        "encode": {f"m={m}": {"block_len": block_len[m], **summary(encode_s[m], gib, memcpy_s)} for m in ms},
        "rebuild_into_out": {f"m={m}": {"lost_members": list(range(m)), **summary(rebuild_s[m], gib)} for m in ms},
        **({"rebuild_allocating": {f"m={m}": summary(allocating_s[m], gib) for m in ms}} if args.allocating else {}),
        "gf_scale_one_payload": {f"c={c:#x}": summary(scale_s[c], size / 2**30) for c in SCALE_CONSTANTS},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
