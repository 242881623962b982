"""XOR parity across a group of nodes, with rotating parity placement (RAID-5 across nodes).

A group holds ``k >= 2`` nodes, each with a snapshot buffer of the same padded length ``L``,
a multiple of ``k - 1``. Every buffer is cut into ``k - 1`` equal blocks. Stripe ``s`` (one per
node) is made of one block from every node but ``s``, and node ``s`` stores the stripe's parity,
the XOR of those blocks. So every node stores ``L / (k - 1)`` bytes of parity (the memory cost is
``1 / (k - 1)``), and the parity work is spread evenly. The state of any one lost node is rebuilt
from the survivors: each of its blocks from a stripe's parity and the other blocks, and its own
parity from the blocks of its stripe.

Node ``j`` contributes block ``s if s < j else s - 1`` to stripe ``s != j``.

Pure functions on numpy ``uint8`` buffers; XOR runs on 8-byte words where the length allows, at
memory speed. Bad input raises :class:`ErasureError` naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ErasureError(ValueError):
    """The buffers cannot be encoded or rebuilt as given; the message says why."""


def padded_length(length: int, k: int) -> int:
    """The smallest length ``>= length`` that ``k - 1`` blocks of whole 8-byte words divide."""
    _check_k(k)
    unit = 8 * (k - 1)
    return max(unit, -(-length // unit) * unit)


def block_of(node: int, stripe: int) -> int:
    """Which block of ``node``'s buffer belongs to ``stripe`` (never its own stripe)."""
    if node == stripe:
        raise ErasureError(f"node {node} holds the parity of stripe {stripe}, not a block of it")
    return stripe if stripe < node else stripe - 1


def encode(buffers: Sequence[np.ndarray], out: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """The parity each node stores: ``result[s]`` is the XOR of stripe ``s``'s blocks. With
    ``out`` (one pre-allocated uint8 array of the block size per node) nothing is allocated."""
    k = len(buffers)
    blocks = _blocks(buffers, k)
    size = blocks[0][0].size
    if out is not None and (len(out) != k or any(o.dtype != np.uint8 or o.size != size for o in out)):
        raise ErasureError(f"out must be {k} uint8 arrays of {size} bytes")
    parities = []
    for stripe in range(k):
        members = [blocks[node][block_of(node, stripe)] for node in range(k) if node != stripe]
        target = out[stripe] if out is not None else np.empty(size, dtype=np.uint8)
        parities.append(_xor(members, target))
    return parities


def rebuild(buffers: Sequence[np.ndarray | None], parities: Sequence[np.ndarray | None]) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """The lost node's (buffer, parity), from the survivors'. Exactly one node may be lost: its
    buffer and parity are None; every other entry is present."""
    k = len(buffers)
    if len(parities) != k:
        raise ErasureError(f"{k} buffers but {len(parities)} parities")
    lost = [n for n in range(k) if buffers[n] is None or parities[n] is None]
    if len(lost) != 1:
        raise ErasureError(f"XOR parity rebuilds exactly one lost node, {len(lost)} are missing")
    (x,) = lost
    survivors = [n for n in range(k) if n != x]
    blocks = {n: _blocks_one(buffers[n], k, n) for n in survivors}  # type: ignore[arg-type]
    size = next(iter(blocks.values()))[0].size
    for n in survivors:
        parity = parities[n]
        assert parity is not None
        if parity.dtype != np.uint8 or parity.size != size:
            raise ErasureError(f"parity of node {n} has {parity.size} bytes, expected {size}")
    buffer = np.empty(size * (k - 1), dtype=np.uint8)
    for stripe in survivors:  # each of the lost node's blocks, from that stripe's parity and the rest
        members = [parities[stripe]] + [blocks[n][block_of(n, stripe)] for n in survivors if n != stripe]
        out = buffer[block_of(x, stripe) * size:(block_of(x, stripe) + 1) * size]
        _xor(members, out)  # type: ignore[arg-type]
    parity = _xor([blocks[n][block_of(n, x)] for n in survivors], np.empty(size, dtype=np.uint8))
    return buffer, parity


def _check_k(k: int) -> None:
    if k < 2:
        raise ErasureError(f"a parity group needs at least 2 nodes, got {k}")


def _blocks_one(buffer: np.ndarray, k: int, node: int) -> list[np.ndarray]:
    if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ErasureError(f"buffer of node {node} must be a 1-D uint8 array")
    if buffer.size == 0 or buffer.size % (k - 1):
        raise ErasureError(f"buffer of node {node} has {buffer.size} bytes, not a positive multiple of "
                           f"k - 1 = {k - 1} (pad it to padded_length())")
    return np.split(buffer, k - 1)


def _blocks(buffers: Sequence[np.ndarray], k: int) -> list[list[np.ndarray]]:
    _check_k(k)
    blocks = [_blocks_one(b, k, n) for n, b in enumerate(buffers)]
    sizes = {b[0].size for b in blocks}
    if len(sizes) != 1:
        raise ErasureError(f"buffers differ in length ({sorted(s * (k - 1) for s in sizes)}); pad them alike")
    return blocks


def _xor(members: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """XOR of equal-length uint8 arrays into ``out`` (8 bytes at a time when aligned)."""
    views = members
    target = out
    if out.size % 8 == 0 and all(m.size % 8 == 0 for m in members):
        try:
            views = [m.view(np.uint64) for m in members]
            target = out.view(np.uint64)
        except ValueError:  # not contiguous or misaligned: bytes it is
            views, target = members, out
    np.bitwise_xor(views[0], views[1], out=target) if len(views) > 1 else np.copyto(target, views[0])
    for m in views[2:]:
        np.bitwise_xor(target, m, out=target)
    return out
