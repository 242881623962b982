"""One rank of the trace test: trains a few steps in sections, then stalls, and stays stalled.

Run as ``python trace_rank.py --hang-rank H --steps N --out DIR`` with the environment of a
training process (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` for gloo, and the
Salamander rendezvous endpoint and run id). After ``N`` steps of ``data``/``forward``/``backward``
(an all-reduce) rank ``H`` sleeps inside ``forward`` while every other rank waits inside
``allreduce`` for it, in a barrier: a hung collective. Each rank touches ``DIR/stalled-<rank>``
just before it stalls. The test kills the processes.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch
import torch.distributed as dist

from salamander_worker import sections, timeline
from salamander_worker.topology import context


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hang-rank", type=int, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ctx = context()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    timeline.ensure_started(ctx)  # what the first sw.report does
    weights = torch.ones(64)
    for step in range(1, args.steps + 1):
        with sections.section("data"):
            batch = torch.randn(64)
        with sections.section("forward"):
            loss = (weights * batch).sum()
        with sections.section("backward"):
            grad = batch.clone() * loss
            dist.all_reduce(grad)
        sections.recorder.end_step(step)
    (args.out / f"stalled-{ctx.rank}").touch()
    if ctx.rank == args.hang_rank:
        with sections.section("forward"):
            time.sleep(3600)
    else:
        with sections.section("allreduce"):
            dist.barrier()


if __name__ == "__main__":
    main()
