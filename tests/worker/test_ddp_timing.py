"""A straggler under DDP shows in the section timings its rank writes for the agent's heartbeat.

Two real training processes (gloo over loopback) train a small model with
``DistributedDataParallel`` and ``watch_ddp``; rank 1 sleeps 50 ms inside ``forward`` every
step. Both ranks' step times are then about equal (synchronous training), but rank 0 spends
those 50 ms waiting for rank 1 at the end of ``backward`` (DDP's all-reduce), which
``watch_ddp`` moves to ``communication``: rank 1's busy time (step - wait) is the larger by
about the sleep, rank 0's wait is the larger. The timings are read back as the agent does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from salamander import wire
from salamander_worker.heartbeat import timings_reader

pytestmark = pytest.mark.timeout(60)
SLOW_RANK, SLEEP_S, STEPS = 1, 0.05, 20

RANK = textwrap.dedent(f"""
    import datetime, time
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    import salamander_worker as sw

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                                        torch.nn.Linear(256, 64)))
    sw.watch_ddp(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, {STEPS} + 1):
        with sw.section("data"):
            x = torch.randn(32, 64)
        with sw.section("forward"):
            loss = model(x).pow(2).mean()
            if rank == {SLOW_RANK}:
                time.sleep({SLEEP_S})
        with sw.section("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with sw.section("optimizer"):
            optimizer.step()
        sw.report(step, loss=loss.item())
    sw.flush()  # writes the timing file now, whatever the throttle
    # Free DDP's reducer (and the gloo work it holds) while the interpreter is fully alive:
    # gloo threads left holding tensors at finalization can abort the process (SIGABRT,
    # "terminate called without an active exception"; pytorch/pytorch#179291), as seen once in CI.
    del model, optimizer, loss
    dist.destroy_process_group()
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_slow_rank_is_busier_and_its_peer_waits(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items()
            if k not in (wire.ENV_RDZV_ENDPOINT, wire.ENV_RUN_ID, "PROMETHEUS_MULTIPROC_DIR", wire.ENV_FAULTS)}
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=base | {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                          wire.ENV_TIMINGS_DIR: str(tmp_path)})
             for r in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=45)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)

    timings = {t.rank: t for t in timings_reader(tmp_path)()}
    assert sorted(timings) == [0, 1], sorted(p.name for p in tmp_path.iterdir())
    fast, slow = timings[1 - SLOW_RANK], timings[SLOW_RANK]
    report = f"fast {fast}\nslow {slow}"
    assert fast.step == slow.step == STEPS and fast.window == STEPS - 1, report
    assert slow.busy_s - fast.busy_s >= 0.03, report
    assert fast.wait_s > slow.wait_s, report
    assert fast.sections["communication"] >= 0.03 and fast.sections["forward"] < slow.sections["forward"], report
    # Synchronous: the fast rank steps at the slow rank's pace, not its own. Its step time is far
    # nearer the slow rank's than the busy-time gap (the two differ only by where each window's
    # first and last steps fall, which a loaded machine can move by a few ms).
    assert abs(fast.step_s - slow.step_s) < 0.5 * (slow.busy_s - fast.busy_s), report
