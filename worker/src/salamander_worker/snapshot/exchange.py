"""Moving erasure-coded blocks between the members of a group: the parity exchange of a
snapshot, pipelined with its copy, and the point-to-point XOR reduction both it and a rebuild
run on.

**Encode** (:func:`encode_parity`): parity row ``r`` of stripe ``s`` is the XOR of the stripe's
data members' blocks (times the row's coefficient, :mod:`.erasure`), reduced onto its holder
by :func:`xor_reduce`. The work is cut into windows of :data:`ENCODE_WINDOW` bytes of the
block and run in the order of :func:`encode_schedule`, which every member computes alike:
window by window in the order the copy lands the bytes they need. A member waits on its
:class:`Landing` before it sends a window, so the exchange trails the snapshot's copy instead
of starting after it: the snapshot is protected about one window after its copy ends.

**Reduce** (:func:`xor_reduce`): contributor ``i`` reduces share ``i`` of the bytes and sends
it to the root; messages between two ranks go in one order on each tag, which both follow.
Consecutive reductions are serial on every rank (each waits for all its requests), and every
rank runs them in the same order, so a sequence of them cannot deadlock either.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from salamander_worker.snapshot import erasure

#: Bytes of a block per step of the pipelined parity exchange: a few reduction messages
#: (:data:`REDUCE_CHUNK`), small against a block so the exchange follows the copy closely.
ENCODE_WINDOW = 64 << 20


class ExchangeError(RuntimeError):
    """A parity exchange could not go on; the message says why."""


class Landing:
    """How far a snapshot's copy into its slot has got. Every byte below :attr:`reached` is
    final. One writer (the copy) calls :meth:`advance` with growing offsets, then
    :meth:`finish` with the payload's crc32 or :meth:`fail`; readers block in
    :meth:`wait_for` or :meth:`checksum` until what they need has landed, and get an
    :class:`ExchangeError` if the copy failed instead."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.reached = 0
        self._crc: int | None = None
        self._failure: str | None = None
        self._changed = threading.Condition()

    @classmethod
    def landed(cls, length: int, crc: int) -> Landing:
        """A landing whose copy is already done."""
        landing = cls(length)
        landing.finish(crc)
        return landing

    def advance(self, offset: int) -> None:
        with self._changed:
            if offset > self.reached:
                self.reached = min(offset, self.length)
                self._changed.notify_all()

    def finish(self, crc: int) -> None:
        with self._changed:
            self.reached, self._crc = self.length, crc
            self._changed.notify_all()

    def fail(self, why: str) -> None:
        with self._changed:
            self._failure = why
            self._changed.notify_all()

    def wait_for(self, offset: int) -> None:
        """Block until every byte below ``offset`` (at most the payload's length) has landed."""
        offset = min(offset, self.length)
        with self._changed:
            self._changed.wait_for(lambda: self.reached >= offset or self._failure is not None)
            if self.reached < offset:
                raise ExchangeError(f"the snapshot's copy failed at byte {self.reached}: {self._failure}")

    def checksum(self) -> int:
        """The payload's crc32, once the copy has finished."""
        with self._changed:
            self._changed.wait_for(lambda: self._crc is not None or self._failure is not None)
            if self._crc is None:
                raise ExchangeError(f"the snapshot's copy failed at byte {self.reached}: {self._failure}")
            return self._crc


@dataclass(frozen=True)
class Window:
    """Bytes ``start:end`` of the blocks of parity row ``row`` of stripe ``stripe``."""

    stripe: int
    row: int
    start: int
    end: int


@functools.lru_cache(maxsize=64)
def encode_schedule(k: int, m: int, block_len: int, window: int = ENCODE_WINDOW) -> tuple[Window, ...]:
    """The order of the parity exchange of a group of ``k`` members with ``m`` parity rows.

    Invariants: every byte of every stripe's every row is in exactly one window; windows are
    at most ``window`` bytes and, but for a block's last, multiples of 64; they are sorted by
    when a linear copy lands the last byte any member needs for them (the stripe's highest
    data block, then the window's end), so a member that has copied up to a point never waits
    on a window that needs less. Depends on nothing but its arguments: every member computes
    the same schedule."""
    erasure.check_group(k, m)
    if block_len < 1 or window < 64:
        raise ExchangeError(f"block length {block_len} and window {window} must be positive, the window >= 64")
    window -= window % 64
    layout = erasure.roles(k, m)
    last_block = [max(role.block for role in stripe if role.kind == "data") for stripe in layout]
    windows = [Window(s, r, a, min(block_len, a + window))
               for s in range(k) for r in range(m) for a in range(0, block_len, window)]
    return tuple(sorted(windows, key=lambda w: (last_block[w.stripe], w.end, w.stripe, w.row)))


def needed(role: erasure.StripeRole, window: Window, block_len: int) -> int:
    """How far into its payload a member's copy must have landed before it can send its part
    of ``window`` (0 for a stripe's parity holders, which send nothing)."""
    return 0 if role.kind != "data" else role.block * block_len + window.end


def encode_parity(pg: Any, group: list[int], m: int, data: np.ndarray, landing: Landing, block_len: int,
                  out: np.ndarray, window: int = ENCODE_WINDOW, on_window: Callable[[], None] | None = None) -> None:
    """Compute this member's parity blocks (``out``: ``m`` blocks of ``block_len`` bytes, row
    by row) from the group's payloads, each member's ``data`` landing as its copy goes on.

    Collective over ``group`` (global ranks, this rank among them), which all call it with the
    same ``m``, ``block_len`` and ``window``. ``data`` is this member's payload buffer (at
    least ``landing.length`` bytes, of which only landed bytes are read); bytes past the
    payload count as zeros."""
    rank = dist.get_rank()
    k, j = len(group), group.index(rank)
    roles = erasure.roles(k, m)
    scaled: np.ndarray | None = None
    for w in encode_schedule(k, m, block_len, window):
        holder = group[(w.stripe + w.row) % k]
        contributors = [group[i] for i in range(k) if roles[w.stripe][i].kind == "data"]
        part = None
        role = roles[w.stripe][j]
        if role.kind == "data":
            landing.wait_for(needed(role, w, block_len))
            base = role.block * block_len
            piece = data[min(landing.length, base + w.start):min(landing.length, base + w.end)]
            coefficient = erasure.coefficient(w.row, role.index)
            if coefficient != 1 and piece.size:
                if scaled is None or scaled.size < piece.size:
                    scaled = np.empty(min(window, block_len), dtype=np.uint8)
                piece = erasure.gf_scale(piece, coefficient, out=scaled[:piece.size])
            part = Part([piece])
        target = out[w.row * block_len + w.start:w.row * block_len + w.end] if rank == holder else None
        xor_reduce(pg, part, contributors, holder, target, w.end - w.start)
        if on_window is not None:
            on_window()


# -- the point-to-point XOR reduction ------------------------------------------------------

#: Bytes per message of :func:`xor_reduce`: big enough for the transport's speed, small enough
#: that the reducers' receive buffers stay few and reused.
REDUCE_CHUNK = 8 << 20
_TAG_PART, _TAG_RESULT = 71, 72


@dataclass(frozen=True)
class Part:
    """One rank's contribution to a syndrome: the XOR of ``arrays``, each a uint8 array of at
    most the block's length and zeros past its end (so a payload's last, short block is a view,
    not a zero-padded copy)."""

    arrays: list[np.ndarray]

    def chunk(self, start: int, end: int) -> np.ndarray:
        """Bytes ``start:end`` of the contribution: a view when one array covers them, else a
        new array."""
        if len(self.arrays) == 1 and self.arrays[0].size >= end:
            return self.arrays[0][start:end]
        out = np.zeros(end - start, dtype=np.uint8)
        for array in self.arrays:
            piece = array[start:min(end, array.size)]
            if piece.size:
                erasure.xor_into(out[:piece.size], piece)
        return out


def contributed(role: erasure.StripeRole, row: int, data: np.ndarray, parity: np.ndarray,
                block_len: int) -> np.ndarray:
    """What a member adds to parity row ``row`` of a stripe, possibly shorter than the block
    (zeros past its end): its data block times the row's coefficient, or its parity block."""
    if role.kind != "data":
        return parity[row * block_len:(row + 1) * block_len]
    block = data[role.block * block_len:min((role.block + 1) * block_len, data.size)]
    coefficient = erasure.coefficient(row, role.index)
    return block if coefficient == 1 else erasure.gf_scale(block, coefficient)


def _shares(length: int, parts: int) -> list[tuple[int, int]]:
    """``[0, length)`` cut into ``parts`` consecutive shares, multiples of 64 bytes but the last."""
    size = -(-length // parts)
    size = -(-size // 64) * 64
    return [(min(length, i * size), min(length, (i + 1) * size)) for i in range(parts)]


def _chunks(start: int, end: int) -> list[tuple[int, int]]:
    return [(a, min(end, a + REDUCE_CHUNK)) for a in range(start, end, REDUCE_CHUNK)]


def xor_reduce(pg: Any, part: Part | None, contributors: list[int], root: int, out: np.ndarray | None,
                length: int) -> None:
    """XOR the ``contributors``' parts (``length`` bytes each) into ``out`` on ``root``.

    Collective over the contributors and the root, who call it with the same ``contributors``,
    ``root`` and ``length`` (``part`` on a contributor, ``out`` on the root). Contributor ``i``
    reduces share ``i`` of the bytes: it receives that share of every other contributor's part
    (in ``REDUCE_CHUNK`` messages, two chunks in flight), XORs its own in and sends the result
    to the root. So every contributor sends ``length`` bytes and the root receives ``length``:
    the least the destination's network can carry, with the XOR work spread evenly. Messages
    between two ranks go in one order on each tag, which both sides follow, so nothing can
    deadlock; every request is waited for before returning."""
    rank = dist.get_rank()
    n = len(contributors)
    shares = _shares(length, n)
    pending: list[Any] = []     # requests with the buffers they use, waited for at the end
    try:
        if rank == root and rank not in contributors:
            assert out is not None
            for i, (a, e) in enumerate(shares):
                for x, y in _chunks(a, e):
                    pending.append((dist.irecv(torch.from_numpy(out[x:y]), src=contributors[i], group=pg,
                                               tag=_TAG_RESULT), None))
        elif rank in contributors:
            assert part is not None
            me = contributors.index(rank)
            if rank == root:
                assert out is not None
                for i, (a, e) in enumerate(shares):
                    if i != me:
                        for x, y in _chunks(a, e):
                            pending.append((dist.irecv(torch.from_numpy(out[x:y]), src=contributors[i], group=pg,
                                                       tag=_TAG_RESULT), None))
            for i, (a, e) in enumerate(shares):
                if i != me:
                    for x, y in _chunks(a, e):
                        piece = part.chunk(x, y)
                        pending.append((dist.isend(torch.from_numpy(piece), dst=contributors[i], group=pg,
                                                   tag=_TAG_PART), piece))
            _reduce_share(pg, part, [c for c in contributors if c != rank], shares[me], root, out, pending)
    finally:
        for request, _ in pending:
            request.wait()


def _reduce_share(pg: Any, part: Part, others: list[int], share: tuple[int, int], root: int,
                  out: np.ndarray | None, pending: list[Any]) -> None:
    """This contributor's share of :func:`xor_reduce`: chunk by chunk, receive the others'
    bytes into one of two reused buffer sets (the next chunk's receives are posted before this
    one's XOR), XOR its own in, and send the result to the root (or write it into ``out`` when
    this rank is the root)."""
    rank = dist.get_rank()
    chunks = _chunks(*share)
    if not chunks:
        return
    if not others:   # the only contributor: its part is the result
        for x, y in chunks:
            piece = part.chunk(x, y)
            if rank == root:
                assert out is not None
                out[x:y] = piece
            else:
                pending.append((dist.isend(torch.from_numpy(piece), dst=root, group=pg, tag=_TAG_RESULT), piece))
        return
    size = min(REDUCE_CHUNK, share[1] - share[0])
    sets = [[np.empty(size, dtype=np.uint8) for _ in others] for _ in range(2)]
    sent: list[Any] = [None, None]    # the result send still reading each buffer set

    def post(c: int) -> list[Any]:
        x, y = chunks[c]
        buffers = sets[c % 2]
        if sent[c % 2] is not None:
            sent[c % 2].wait()
            sent[c % 2] = None
        return [dist.irecv(torch.from_numpy(buffers[o][:y - x]), src=src, group=pg, tag=_TAG_PART)
                for o, src in enumerate(others)]

    posted = post(0)
    for c, (x, y) in enumerate(chunks):
        following = post(c + 1) if c + 1 < len(chunks) else []
        for request in posted:
            request.wait()
        received = [b[:y - x] for b in sets[c % 2]]
        mine = part.chunk(x, y)
        target = out[x:y] if rank == root else received[0]
        assert target is not None
        np.bitwise_xor(received[0], mine, out=target)
        for extra in received[1:]:
            erasure.xor_into(target, extra)
        if rank != root:
            sent[c % 2] = dist.isend(torch.from_numpy(target), dst=root, group=pg, tag=_TAG_RESULT)
        posted = following
    for request in sent:
        if request is not None:
            request.wait()
