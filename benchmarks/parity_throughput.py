"""XOR parity throughput (issue 4's erasure code) beside a plain memcpy of the same bytes.

A group of k nodes, each with a snapshot buffer of the given size, all in this process: encoding
reads every buffer once and writes the parities (1/(k-1) of the bytes) into pre-allocated,
pre-faulted buffers; the baseline copies the same buffers once with ``np.copyto`` into
pre-allocated, pre-faulted buffers. Medians and spread over repeats, interleaved.

    python benchmarks/parity_throughput.py --mib 256 --k 4 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker/src"))

from salamander_worker.snapshot.erasure import encode, padded_length, rebuild  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="snapshot size per node, MiB")
    parser.add_argument("--k", type=int, default=4, help="nodes in the parity group")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/parity_throughput.json"))
    args = parser.parse_args()
    if args.mib < 1 or args.k < 2 or args.repeats < 1:
        parser.error("--mib >= 1, --k >= 2 and --repeats >= 1 are required")
    size = padded_length(args.mib << 20, args.k)
    rng = np.random.default_rng(0)
    buffers = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(args.k)]
    copies = [np.ones_like(b) for b in buffers]  # allocated and faulted once, as snapshot buffers are
    parity_out = [np.ones(size // (args.k - 1), dtype=np.uint8) for _ in range(args.k)]
    gib = args.k * size / 2**30
    encode_s, copy_s, rebuild_s = [], [], []
    for n in range(args.repeats):
        t = time.perf_counter()
        for src, dst in zip(buffers, copies):
            np.copyto(dst, src)
        copy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        parities = encode(buffers, out=parity_out)
        encode_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        rebuild([None, *buffers[1:]], [None, *parities[1:]])
        rebuild_s.append(time.perf_counter() - t)
        print(f"  repeat {n + 1}/{args.repeats}: memcpy {gib / copy_s[-1]:.2f} GiB/s, "
              f"parity {gib / encode_s[-1]:.2f} GiB/s, rebuild one node {rebuild_s[-1] * 1e3:.0f} ms", flush=True)
    med = {name: statistics.median(v) for name, v in (("memcpy", copy_s), ("encode", encode_s),
                                                          ("rebuild", rebuild_s))}
    result = {"mib_per_node": args.mib, "k": args.k, "repeats": args.repeats,
              "memcpy_gib_s": gib / med["memcpy"], "encode_gib_s": gib / med["encode"],
              "encode_over_memcpy": med["memcpy"] / med["encode"],
              "rebuild_one_node_s": med["rebuild"],
              "spread": {"memcpy_s": [min(copy_s), max(copy_s)], "encode_s": [min(encode_s), max(encode_s)],
                         "rebuild_s": [min(rebuild_s), max(rebuild_s)]}}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
