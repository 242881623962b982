"""Reading one persistent snapshot copy (issue 4): straight from DCP's file vs ``dcp.load``.

A 615 MB payload (one rank's ZeRO snapshot of the ~102M-parameter benchmark model) is written
as a persistent copy; then, alternately, ``Persister.load`` reads it through
:func:`salamander_worker.snapshot.dcp_bytes.read_uint8` (one read into a new array) and through
``dcp.load`` (which reads the item's bytes, ``torch.load``s them and copies the result). Both
end with the payload's CRC-32 check. The file is dropped from the page cache before every read
(``posix_fadvise``), so both read from disk as far as this VM lets them; peak RSS growth is
measured in a fresh process per read.

    python benchmarks/persist_read.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
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

from bench_stats import machine, peak_rss_mb  # noqa: E402
from snapshot_restore import drop_cache  # noqa: E402


def read_once(directory: Path, way: str) -> dict:
    from salamander_worker.snapshot import dcp_bytes
    from salamander_worker.snapshot.persist import Persister
    if way == "dcp.load":
        dcp_bytes.read_uint8 = lambda *a: None   # the fallback path
    before = peak_rss_mb()
    started = time.perf_counter()
    data = Persister(directory).load(1, 0)
    elapsed = time.perf_counter() - started
    return {"s": elapsed, "bytes": int(data.nbytes),
            "rss_growth_mb": peak_rss_mb() - before}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mb", type=int, default=615)
    parser.add_argument("--read", nargs=2, metavar=("DIR", "WAY"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/persist_read.json"))
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read_once(Path(args.read[0]), args.read[1])))
        return 0

    import numpy as np

    from salamander_worker.snapshot import region
    from salamander_worker.snapshot.persist import Persister
    directory = Path(tempfile.mkdtemp(prefix="persistread-"))
    runs: dict[str, list[dict]] = {"dcp_bytes": [], "dcp.load": []}
    try:
        data = np.random.default_rng(0).integers(0, 256, size=args.mb << 20, dtype=np.uint8)
        Persister(directory).save(1, 0, 4, memoryview(data), region.checksum(data), sharded=True)
        del data
        for i in range(args.repeats):
            for way in (("dcp_bytes", "dcp.load") if i % 2 == 0 else ("dcp.load", "dcp_bytes")):
                drop_cache(directory)
                out = subprocess.run([sys.executable, __file__, "--read", str(directory), way],
                                     capture_output=True, text=True, check=True).stdout
                runs[way].append(json.loads(out.splitlines()[-1]))
                print(f"repeat {i + 1}/{args.repeats} {way}: {runs[way][-1]['s']:.2f} s, "
                      f"RSS +{runs[way][-1]['rss_growth_mb']:.0f} MB", flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ratios = [b["s"] / a["s"] for a, b in zip(runs["dcp_bytes"], runs["dcp.load"])]
    summary = {way: {"median_s": statistics.median(r["s"] for r in picked), "min_s": min(r["s"] for r in picked),
                     "max_s": max(r["s"] for r in picked),
                     "rss_growth_mb": statistics.median(r["rss_growth_mb"] for r in picked)}
               for way, picked in runs.items()}
    summary["dcp.load / dcp_bytes"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    Path(args.out).write_text(json.dumps({"machine": machine(), "payload_mb": args.mb, "summary": summary,
                                          "runs": runs}, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
