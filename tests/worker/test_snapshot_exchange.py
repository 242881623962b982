"""The pipelined parity exchange across real processes (gloo over loopback, one "node" each):
every member's parity equals the reference encoder's, bitwise, while the members' copies land
piece by piece at different paces."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from salamander_worker.snapshot import erasure, exchange

pytestmark = pytest.mark.timeout(180)

K = 4
LENGTHS = [5000, 4093, 5000, 1234]   # one short payload: blocks past its end count as zeros


def _payload(j: int) -> np.ndarray:
    return np.random.default_rng(j).integers(0, 256, LENGTHS[j], dtype=np.uint8)


def _member(rank: int, port: int, m: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=K)
    exchange.REDUCE_CHUNK = 128   # several messages per share, several shares per window
    try:
        source = _payload(rank)
        data = np.zeros(LENGTHS[rank] + 512, dtype=np.uint8)   # a slot, longer than the payload
        landing = exchange.Landing(LENGTHS[rank])
        block_len = erasure.block_length(LENGTHS, K, m)
        out = np.full(m * block_len, 0xAA, dtype=np.uint8)

        def copy() -> None:   # lands in uneven pieces, member 3 the slowest
            rng = np.random.default_rng(100 + rank)
            done = 0
            while done < source.size:
                end = min(source.size, done + int(rng.integers(1, 700)))
                data[done:end] = source[done:end]
                landing.advance(end)
                done = end
                time.sleep(0.001 * (1 + rank))
            landing.finish(0)

        copier = threading.Thread(target=copy)
        copier.start()
        exchange.encode_parity(dist.group.WORLD, list(range(K)), m, data, landing, block_len, out, window=512)
        copier.join()
        np.save(Path(out_dir) / f"parity-{rank}.npy", out)
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("m", [1, 2])
def test_pipelined_parity_is_the_reference_encoders_bitwise(tmp_path: Path, m: int) -> None:
    mp.spawn(_member, args=(_port(), m, str(tmp_path)), nprocs=K)
    payloads = [_payload(j) for j in range(K)]
    block_len = erasure.block_length(LENGTHS, K, m)
    want = erasure.encode(payloads, m, block_len)
    for j in range(K):
        got = np.load(tmp_path / f"parity-{j}.npy")
        for row in range(m):
            assert np.array_equal(got[row * block_len:(row + 1) * block_len], want[j][row]), (j, row)
    lost = erasure.reconstruct([None] + payloads[1:], [None] + [[np.load(tmp_path / f"parity-{j}.npy")[
        r * block_len:(r + 1) * block_len] for r in range(m)] for j in range(1, K)], m, LENGTHS, block_len)
    assert np.array_equal(lost[0][0][:LENGTHS[0]], payloads[0])
