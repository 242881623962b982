"""Erasure code across a group of nodes: XOR parity (m=1) or RAID-6 P+Q (m=2), rotating placement.

A group holds ``k`` members (nodes), each with a payload (a 1-D numpy ``uint8`` array) whose length
may differ per member. Every payload is cut into ``k - m`` blocks of ``block_len`` bytes
(:func:`block_length`: a multiple of 64 that fits the longest payload); bytes past a payload's end
count as zeros. There are ``k`` stripes. Stripe ``s`` has parity row ``r`` (``0 <= r < m``) held
by member ``(s + r) % k``; its other ``k - m`` members are the stripe's data members, with data index
``i = 0 .. k-m-1`` in increasing member order. A member's blocks go to the stripes in which it is a
data member, in increasing stripe order. So every member holds ``k - m`` data blocks and ``m``
parity blocks (the memory cost is ``m / (k - m)``) and the parity work is spread evenly.

Row 0 is the XOR parity ``P = sum D_i``; row 1 is the RAID-6 syndrome ``Q = sum 2**i * D_i`` over
GF(2^8) with polynomial ``0x11d`` (generator 2). Any ``m`` lost members are rebuilt exactly
(:func:`reconstruct`); :func:`solve_stripe` is the per-stripe core a distributed rebuild runs on
syndromes summed across nodes. For ``m = 1`` the layout is the plain rotating RAID-5 one: stripe
``s``'s parity is on member ``s``, and member ``j`` puts block ``s if s < j else s - 1`` in stripe
``s != j``.

Pure numpy. The work runs in chunks of ``_CHUNK`` bytes so the temporaries stay in the L2 cache.
``Q`` is computed by Horner's rule: one "multiply by 2" per further data block, four numpy passes
(sign test, times 0x1d on 64-bit words, byte add, XOR), then one XOR. A general constant multiply
(:func:`gf_scale`, used by the rebuild) takes the cheapest of a shift-and-add chain over the
constant's bits (after up to a few "divide by 2" steps) and a bit-plane sum: 4 passes for c=2,
up to 30 for most constants >= 128.
Scratch buffers are per thread and reused, so encoding into pre-allocated ``out`` allocates
nothing per call. Bad input raises :class:`ErasureError` naming what is wrong.
"""

from __future__ import annotations

import functools
import itertools
import operator
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: GF(2^8) reduction polynomial x^8 + x^4 + x^3 + x^2 + 1 (the RAID-6 one) and its low byte.
GF_POLY = 0x11D
_RED = np.uint64(GF_POLY & 0xFF)
#: Largest group: 2 generates GF(2^8)* (order 255), so the Q coefficients 2**i stay distinct.
MAX_K = 255
#: Bytes per chunk of work: a few chunk-sized temporaries stay in the L2 cache.
_CHUNK = 128 << 10
#: Numpy passes of the bit-plane constant multiply (see _scale_chunk).
_PLANE_PASSES = 30


class ErasureError(ValueError):
    """The payloads cannot be encoded or rebuilt as given; the message says why."""


@dataclass(frozen=True)
class StripeRole:
    """What a member does in a stripe: ``kind`` "data" (``index`` = data index, ``block`` = which
    block of its payload) or "parity" (``index`` = parity row, ``block`` = -1)."""

    kind: str
    index: int
    block: int


# --- GF(2^8) scalars ---------------------------------------------------------------------------

def _tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    exp, log = [0] * 510, [0] * 256
    x = 1
    for i in range(255):
        exp[i] = exp[i + 255] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= GF_POLY
    return tuple(exp), tuple(log)


_EXP, _LOG = _tables()


def _gmul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


def gf_mul(a: int, b: int) -> int:
    """``a * b`` in GF(2^8) (polynomial 0x11d)."""
    return _gmul(_byte(a, "a"), _byte(b, "b"))


def gf_inv(a: int) -> int:
    """``1 / a`` in GF(2^8); ``a`` must not be 0."""
    a = _byte(a, "a")
    if a == 0:
        raise ErasureError("0 has no inverse in GF(2^8)")
    return _EXP[255 - _LOG[a]]


def coefficient(row: int, data_index: int) -> int:
    """The coefficient of data index ``data_index`` in parity row ``row``: 1 for row 0 (P),
    ``2**data_index`` in GF(2^8) for row 1 (Q)."""
    row, data_index = _int(row, "row"), _int(data_index, "data_index")
    if row not in (0, 1):
        raise ErasureError(f"parity row must be 0 or 1, got {row}")
    if not 0 <= data_index < MAX_K - 1:
        raise ErasureError(f"data index must be in 0..{MAX_K - 2}, got {data_index}")
    return 1 if row == 0 else _EXP[data_index]


# --- layout --------------------------------------------------------------------------------------

def check_group(k: int, m: int) -> None:
    """Raise :class:`ErasureError` unless ``m`` is 1 or 2 and ``m + 1 <= k <= 255``."""
    k, m = _int(k, "k"), _int(m, "m")
    if m not in (1, 2):
        raise ErasureError(f"m (parity blocks per stripe) must be 1 or 2, got {m}")
    if not m + 1 <= k <= MAX_K:
        raise ErasureError(f"a group with m={m} needs {m + 1} to {MAX_K} members, got k={k}")


@functools.lru_cache(maxsize=64)
def _layout(k: int, m: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``layout[s]``: (member, block) of each data index of stripe ``s``."""
    next_block = [0] * k
    layout = []
    for s in range(k):
        holders = {(s + r) % k for r in range(m)}
        members = []
        for j in range(k):
            if j not in holders:
                members.append((j, next_block[j]))
                next_block[j] += 1
        layout.append(tuple(members))
    return tuple(layout)


def roles(k: int, m: int) -> list[list[StripeRole]]:
    """``roles(k, m)[s][j]``: member ``j``'s role in stripe ``s``."""
    check_group(k, m)
    table = []
    for s, members in enumerate(_layout(k, m)):
        row: list[StripeRole | None] = [None] * k
        for r in range(m):
            row[(s + r) % k] = StripeRole("parity", r, -1)
        for i, (j, b) in enumerate(members):
            row[j] = StripeRole("data", i, b)
        table.append(row)
    return table  # type: ignore[return-value]


def block_length(payload_lengths: Sequence[int], k: int, m: int) -> int:
    """The block size for payloads of these lengths (one per member): the smallest multiple of 64,
    at least 64, such that ``k - m`` blocks hold the longest payload."""
    check_group(k, m)
    lengths = _lengths(payload_lengths, k, "payload_lengths")
    unit = 64 * (k - m)
    return max(64, -(-max(lengths) // unit) * 64)


def block_view(payload: np.ndarray, block: int, block_len: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """Block ``block`` of ``payload`` (``block_len`` bytes): a view when it lies inside the payload,
    otherwise a copy zero-extended past the payload's end (into ``scratch`` when given)."""
    _payload(payload, "payload")
    block, block_len = _int(block, "block"), _block_len(block_len)
    if block < 0:
        raise ErasureError(f"block must be >= 0, got {block}")
    start = block * block_len
    if start + block_len <= payload.size:
        return payload[start:start + block_len]
    if scratch is None:
        scratch = np.empty(block_len, dtype=np.uint8)
    else:
        _array(scratch, "scratch", block_len, writeable=True)
        if np.may_share_memory(scratch, payload):
            raise ErasureError("scratch overlaps the payload")
    tail = payload[start:]
    scratch[:tail.size] = tail
    scratch[tail.size:] = 0
    return scratch


# --- bulk kernels --------------------------------------------------------------------------------

class _Scratch(threading.local):
    """Per-thread, reused chunk-sized buffers (aligned, so their 64-bit views are cheap)."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` bytes of buffer ``name``, and a uint64 view covering them (rounded up)."""
        buf = self.buffers.get(name)
        words = -(-n // 8) * 8
        if buf is None or buf.size < words:
            buf = self.buffers[name] = np.empty(max(words, _CHUNK), dtype=np.uint8)
        return buf[:n], buf[:words].view(np.uint64)


_scratch = _Scratch()


def _mul2(src: np.ndarray, out: np.ndarray, h8: np.ndarray, h64: np.ndarray) -> None:
    """``out = 2 * src`` in GF(2^8), bytewise; ``out`` may be ``src``; ``h8``/``h64`` scratch."""
    np.less(src.view(np.int8), 0, out=h8.view(np.bool_))  # 1 where the top bit is set
    np.multiply(h64, _RED, out=h64)  # 0 or 0x1d per byte (no carries between bytes)
    np.add(src, src, out=out)  # shift left within each byte
    np.bitwise_xor(out, h8, out=out)


def _xor_chain(items: Sequence[np.ndarray], out: np.ndarray) -> None:
    """``out`` = XOR of ``items`` (zeros when there are none)."""
    if not items:
        out.fill(0)
    elif len(items) == 1:
        np.copyto(out, items[0])
    else:
        np.bitwise_xor(items[0], items[1], out=out)
        for d in items[2:]:
            np.bitwise_xor(out, d, out=out)


def _horner(data: Sequence[np.ndarray | None], out: np.ndarray, h8: np.ndarray, h64: np.ndarray) -> None:
    """``out = sum 2**i * data[i]`` in GF(2^8) (None counts as zeros), by Horner's rule."""
    cur: np.ndarray | None = None
    for d in reversed(data):
        if cur is not None:
            _mul2(cur, out, h8, h64)
            cur = out
        if d is not None:
            if cur is None:
                cur = d
            else:
                np.bitwise_xor(out, d, out=out)
    if cur is None:
        out.fill(0)
    elif cur is not out:
        np.copyto(out, cur)


@functools.lru_cache(maxsize=256)
def _plan(c: int) -> tuple[int, int]:
    """How _scale_chunk multiplies by ``c`` (2 <= c <= 255): ``(t, d)`` = halve ``t`` times, then
    multiply by ``d = c * 2**t`` over the bits of ``d``; ``t = -1`` for bit planes. The cheapest in
    numpy passes: 4 per doubling, 1 per further set bit, 5 per halving, 30 for bit planes."""
    best, plan = _PLANE_PASSES, (-1, c)
    for t in range(8):
        d = _gmul(c, 1 << t)
        cost = 5 * t + (1 if d == 1 else 4 * (d.bit_length() - 1) + d.bit_count() - 1 + (t == 0))
        if cost < best:
            best, plan = cost, (t, d)
    return plan


@functools.lru_cache(maxsize=256)
def _plane_consts(c: int) -> tuple[np.uint64, ...]:
    return tuple(np.uint64(_gmul(c, 1 << b)) for b in range(8))


_HALF = np.uint64(_EXP[254])  # 2**-1 = 0x8e
_ONE = np.uint64(1)


def _scale_chunk(src: np.ndarray, c: int, out: np.ndarray) -> None:
    """``out = c * src`` in GF(2^8) for one 1-D chunk (best at most _CHUNK bytes, so the scratch
    stays in cache); ``out`` may be ``src``."""
    if c == 0:
        out.fill(0)
        return
    if c == 1:
        if out is not src:
            np.copyto(out, src)
        return
    n = src.size
    h8, h64 = _scratch.get("h", n)
    t, d = _plan(c)
    if t >= 0:
        x = src
        if t > 0:  # x = src * 2**-t, in scratch: (x >> 1) ^ (0x8e where the low bit was set), t times
            x, x64 = _scratch.get("x", n)
            if n % 8:
                x64[-1] = 0  # the padding bytes past n must not shift into byte n - 1
            np.bitwise_and(src, 1, out=h8)
            np.bitwise_xor(src, h8, out=x)
            for step in range(t):
                if step:
                    np.bitwise_and(x, 1, out=h8)
                    np.bitwise_xor(x, h8, out=x)
                np.right_shift(x64, _ONE, out=x64)
                np.multiply(h64, _HALF, out=h64)
                np.bitwise_xor(x, h8, out=x)
        elif d.bit_count() > 1 and np.may_share_memory(src, out):
            x, _ = _scratch.get("x", n)
            np.copyto(x, src)
        if d == 1:
            np.copyto(out, x)
            return
        cur = x  # shift-and-add over the bits of d, top down
        for b in range(d.bit_length() - 2, -1, -1):
            _mul2(cur, out, h8, h64)
            cur = out
            if d >> b & 1:
                np.bitwise_xor(out, x, out=out)
        return
    # bit planes: c * x = sum over bits b of x of bit_b(x) * (c * 2**b); out is written last
    consts = _plane_consts(c)
    acc8, acc64 = _scratch.get("acc", n)
    y8, _ = _scratch.get("y", n)
    np.less(src.view(np.int8), 0, out=h8.view(np.bool_))
    np.multiply(h64, consts[7], out=acc64)
    np.add(src, src, out=y8)
    for b in range(6, 0, -1):
        np.less(y8.view(np.int8), 0, out=h8.view(np.bool_))
        np.multiply(h64, consts[b], out=h64)
        np.bitwise_xor(acc8, h8, out=acc8)
        if b > 1:
            np.add(y8, y8, out=y8)
    np.bitwise_and(src, 1, out=h8)
    np.multiply(h64, consts[0], out=h64)
    np.bitwise_xor(acc8, h8, out=acc8)
    np.copyto(out, acc8)


def gf_scale(src: np.ndarray, c: int, out: np.ndarray | None = None) -> np.ndarray:
    """``out = c * src`` in GF(2^8), bytewise, for uint8 arrays (``out`` may be ``src``; a new
    array when None). ``c = 0`` gives zeros, ``c = 1`` a copy. Returns ``out``."""
    _array(src, "src")
    c = _byte(c, "c")
    if out is None:
        out = np.empty(src.shape, dtype=np.uint8)
    else:
        _array(out, "out", writeable=True)
        if out.shape != src.shape:
            raise ErasureError(f"out has shape {out.shape}, src {src.shape}")
        if out is not src and np.may_share_memory(out, src) and not _same_memory(out, src):
            raise ErasureError("out partly overlaps src; pass out=src or a separate array")
    flat_src = src.reshape(-1)
    target = out if out.flags.c_contiguous else np.empty(src.shape, dtype=np.uint8)
    flat_out = target.reshape(-1)
    if out is src and target is out:
        flat_src = flat_out
    for o in range(0, flat_src.size, _CHUNK):
        _scale_chunk(flat_src[o:o + _CHUNK], c, flat_out[o:o + _CHUNK])
    if target is not out:
        np.copyto(out, target)
    return out


def xor_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst ^= src`` for uint8 arrays of the same shape (on 8-byte words when they allow)."""
    _array(dst, "dst", writeable=True)
    _array(src, "src")
    if dst.shape != src.shape:
        raise ErasureError(f"dst has shape {dst.shape}, src {src.shape}")
    if (dst.size % 8 == 0 and dst.flags.c_contiguous and src.flags.c_contiguous
            and dst.ctypes.data % 8 == 0 and src.ctypes.data % 8 == 0):
        dst, src = dst.reshape(-1).view(np.uint64), src.reshape(-1).view(np.uint64)
    np.bitwise_xor(dst, src, out=dst)


# --- encode, reconstruct, solve ------------------------------------------------------------------

def _cuts(block_len: int, ends: Sequence[int]) -> list[tuple[int, int]]:
    """Chunks of ``[0, block_len)``: at most _CHUNK bytes, also cut at each of ``ends`` (payload
    ends inside the block), so every chunk lies wholly inside or wholly past each payload."""
    points = set(range(0, block_len, _CHUNK)) | {e for e in ends if 0 < e < block_len}
    points.add(block_len)
    ordered = sorted(points)
    return list(itertools.pairwise(ordered))


def encode(payloads: Sequence[np.ndarray], m: int, block_len: int | None = None,
           out: Sequence[Sequence[np.ndarray]] | None = None) -> list[list[np.ndarray]]:
    """The parity blocks of a group: ``result[j][r]`` is parity row ``r`` of stripe ``(j - r) % k``,
    held by member ``j``. ``block_len`` defaults to :func:`block_length` of the payloads. With
    ``out`` (``k`` lists of ``m`` pre-allocated uint8 arrays of ``block_len`` bytes) the result is
    written there and nothing is allocated."""
    payloads = _payloads(payloads, "payloads")
    k = len(payloads)
    check_group(k, m)
    sizes = [p.size for p in payloads]
    block_len = block_length(sizes, k, m) if block_len is None else _block_len(block_len)
    _fits(sizes, k, m, block_len, "payload")
    if out is None:
        result = [[np.empty(block_len, dtype=np.uint8) for _ in range(m)] for _ in range(k)]
    else:
        result = _parities(out, k, m, block_len, "out", writeable=True)
        for j, blocks in enumerate(result):
            for r, block in enumerate(blocks):
                for i, p in enumerate(payloads):
                    if np.may_share_memory(block, p):
                        raise ErasureError(f"out[{j}][{r}] overlaps the payload of member {i}")
    for s, members in enumerate(_layout(k, m)):
        targets = [result[(s + r) % k][r] for r in range(m)]
        _encode_stripe(payloads, members, block_len, targets)
    return result


def _encode_stripe(payloads: Sequence[np.ndarray], members: Sequence[tuple[int, int]], block_len: int,
                   targets: Sequence[np.ndarray | None]) -> None:
    """Write the parity rows of one stripe whose ``targets`` are not None, from its data blocks."""
    starts = [b * block_len for _, b in members]
    for a, e in _cuts(block_len, [payloads[j].size - st for (j, _), st in zip(members, starts)]):
        data = [payloads[j][st + a:st + e] if st + e <= payloads[j].size else None
                for (j, _), st in zip(members, starts)]
        _parity_chunk(data, targets, a, e)


def _parity_chunk(data: Sequence[np.ndarray | None], targets: Sequence[np.ndarray | None], a: int, e: int) -> None:
    if targets[0] is not None:
        _xor_chain([d for d in data if d is not None], targets[0][a:e])
    if len(targets) > 1 and targets[1] is not None:
        h8, h64 = _scratch.get("h", e - a)
        _horner(data, targets[1][a:e], h8, h64)


def reconstruct(payloads: Sequence[np.ndarray | None], parities: Sequence[Sequence[np.ndarray] | None],
                m: int, lengths: Sequence[int], block_len: int, *,
                out: Mapping[int, tuple[np.ndarray, Sequence[np.ndarray]]] | None = None,
                ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Rebuild up to ``m`` lost members (None for both their payload and their parities) from the
    survivors. Returns (every payload, truncated to ``lengths[j]``; every member's parities), the
    survivors' as given (views) and the lost ones rebuilt exactly. With ``out``, lost member ``j``
    is rebuilt into ``out[j]`` = (a uint8 array of ``(k - m) * block_len`` bytes for its payload,
    ``m`` uint8 arrays of ``block_len`` bytes for its parities), pre-allocated (nothing is); lost
    members without an entry get new arrays."""
    if not isinstance(payloads, Sequence) or not isinstance(parities, Sequence):
        raise ErasureError("payloads and parities must be sequences (None for a lost member)")
    k = len(payloads)
    check_group(k, m)
    if len(parities) != k:
        raise ErasureError(f"{k} payloads but {len(parities)} parity lists")
    lengths = _lengths(lengths, k, "lengths")
    block_len = _block_len(block_len)
    _fits(lengths, k, m, block_len, "length")
    lost = [j for j in range(k) if payloads[j] is None or parities[j] is None]
    for j in lost:
        if payloads[j] is not None or parities[j] is not None:
            raise ErasureError(f"member {j}: give both its payload and its parities, or None for both (lost)")
    if len(lost) > m:
        raise ErasureError(f"{len(lost)} members lost (members {lost}), but m={m} rebuilds at most {m}")
    full: list[np.ndarray] = list(payloads)  # type: ignore[arg-type]
    blocks: list[list[np.ndarray]] = [[] for _ in range(k)]
    for j in range(k):
        if j in lost:
            continue
        _payload(full[j], f"payload of member {j}")
        if not lengths[j] <= full[j].size <= (k - m) * block_len:
            raise ErasureError(f"payload of member {j} has {full[j].size} bytes; expected {lengths[j]} "
                               f"(lengths[{j}]) to {(k - m) * block_len} (k - m blocks)")
        blocks[j] = _parities([parities[j]], 1, m, block_len, f"parities of member {j}")[0]  # type: ignore[list-item]
    out = _rebuild_out(out, lost, full, blocks, k, m, block_len)
    for j in lost:
        full[j], blocks[j] = out[j] if j in out else (np.empty((k - m) * block_len, dtype=np.uint8),
                                                      [np.empty(block_len, dtype=np.uint8) for _ in range(m)])
    for s, members in enumerate(_layout(k, m)):
        holders = [(s + r) % k for r in range(m)]
        lost_idx = [i for i, (j, _) in enumerate(members) if j in lost]
        lost_rows = [r for r in range(m) if holders[r] in lost]
        if lost_idx:
            rows = [0, 1] if len(lost_idx) == 2 else [1 if 0 in lost_rows else 0]
            _rebuild_stripe(full, members, lost_idx, {r: blocks[holders[r]][r] for r in rows}, block_len)
        if lost_rows:
            _encode_stripe(full, members, block_len, [blocks[h][r] if r in lost_rows else None
                                                      for r, h in enumerate(holders)])
    return [p[:n] for p, n in zip(full, lengths)], blocks


def _rebuild_out(out: object, lost: Sequence[int], full: Sequence[np.ndarray | None],
                 blocks: Sequence[Sequence[np.ndarray]], k: int, m: int,
                 block_len: int) -> dict[int, tuple[np.ndarray, list[np.ndarray]]]:
    """Check reconstruct's ``out``: pre-allocated arrays for lost members only, writeable, of the
    right sizes, overlapping no survivor's arrays nor each other."""
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise ErasureError("out must map a lost member to (payload array, list of parity arrays)")
    checked: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
    for j, entry in out.items():
        if j not in lost:
            raise ErasureError(f"out has an entry for member {j!r}, which is not lost (lost: {list(lost)})")
        if not isinstance(entry, Sequence) or len(entry) != 2:
            raise ErasureError(f"out[{j}] must be (payload array, list of {m} parity arrays)")
        _array(entry[0], f"out[{j}] payload", (k - m) * block_len, writeable=True)
        checked[j] = (entry[0], _parities([entry[1]], 1, m, block_len, f"out[{j}] parities", writeable=True)[0])
    given = [p for p in full if p is not None] + [b for bs in blocks for b in bs]
    mine = [(j, a) for j, (p, bs) in checked.items() for a in [p, *bs]]
    for n, (j, a) in enumerate(mine):
        if any(np.may_share_memory(a, b) for b in given) or any(np.may_share_memory(a, b) for _, b in mine[n + 1:]):
            raise ErasureError(f"out[{j}] overlaps a survivor's array or another output")
    return checked


def _rebuild_stripe(full: Sequence[np.ndarray], members: Sequence[tuple[int, int]], lost_idx: Sequence[int],
                    parity: Mapping[int, np.ndarray], block_len: int) -> None:
    """Rebuild the lost data blocks of one stripe into ``full`` from the surviving ones and the
    given parity rows."""
    starts = [b * block_len for _, b in members]
    ends = [full[j].size - st for i, ((j, _), st) in enumerate(zip(members, starts)) if i not in lost_idx]
    for a, e in _cuts(block_len, ends):
        data = [None if i in lost_idx or st + e > full[j].size else full[j][st + a:st + e]
                for i, ((j, _), st) in enumerate(zip(members, starts))]
        syndromes = {}
        for r, block in parity.items():
            syn, _ = _scratch.get(f"s{r}", e - a)
            if r == 0:
                _xor_chain([block[a:e]] + [d for d in data if d is not None], syn)
            else:
                h8, h64 = _scratch.get("h", e - a)
                _horner(data, syn, h8, h64)
                np.bitwise_xor(syn, block[a:e], out=syn)
            syndromes[r] = syn
        outs = [full[members[i][0]][starts[i] + a:starts[i] + e] for i in lost_idx]
        _solve_into(lost_idx, syndromes, outs)


def _solve_into(lost: Sequence[int], syndromes: Mapping[int, np.ndarray], outs: Sequence[np.ndarray]) -> None:
    """Chunk-sized core of solve_stripe: write the lost data blocks into ``outs``."""
    if len(lost) == 1:
        if 0 in syndromes:
            np.copyto(outs[0], syndromes[0])
        else:
            _scale_chunk(syndromes[1], _EXP[255 - lost[0]], outs[0])
        return
    (x, out_x), (y, out_y) = sorted(zip(lost, outs), key=operator.itemgetter(0))
    # S0 = Dx + Dy, S1 = 2^x Dx + 2^y Dy  =>  Dx = (S1 + 2^y S0) / (2^x + 2^y), Dy = S0 + Dx
    _scale_chunk(syndromes[0], _EXP[y], out_x)
    np.bitwise_xor(out_x, syndromes[1], out=out_x)
    _scale_chunk(out_x, gf_inv(_EXP[x] ^ _EXP[y]), out_x)
    np.bitwise_xor(syndromes[0], out_x, out=out_y)


def solve_stripe(k: int, m: int, stripe: int, lost_data_indices: Sequence[int],
                 syndromes: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Rebuild the lost data blocks of one stripe from its syndromes: ``syndromes[r]`` is parity row
    ``r`` XOR the sum over the stripe's surviving data blocks of ``coefficient(r, i) * D_i``.
    Returns ``{data index: block}``. One lost index: row 0's syndrome is the block (returned as
    is), else row 1's divided by ``2**i``; two lost: rows 0 and 1 are both needed."""
    check_group(k, m)
    stripe = _int(stripe, "stripe")
    if not 0 <= stripe < k:
        raise ErasureError(f"stripe must be in 0..{k - 1}, got {stripe}")
    if not isinstance(lost_data_indices, Sequence):
        raise ErasureError("lost_data_indices must be a sequence of data indices")
    lost = [_int(i, "lost data index") for i in lost_data_indices]
    if len(set(lost)) != len(lost) or any(not 0 <= i < k - m for i in lost):
        raise ErasureError(f"lost data indices must be distinct, in 0..{k - m - 1}, got {lost}")
    if len(lost) > m:
        raise ErasureError(f"{len(lost)} lost data blocks, but m={m} rebuilds at most {m}")
    if not isinstance(syndromes, Mapping):
        raise ErasureError("syndromes must map parity row -> array")
    for r in syndromes:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r < m:
            raise ErasureError(f"syndrome rows must be in 0..{m - 1}, got {r!r}")
    if not lost:
        return {}
    if len(lost) == 2 and set(syndromes) != {0, 1}:
        raise ErasureError("two lost data blocks need the syndromes of rows 0 and 1")
    if not syndromes:
        raise ErasureError("one lost data block needs the syndrome of row 0 or row 1")
    size = None
    for r, syn in syndromes.items():
        _array(syn, f"syndrome of row {r}")
        if syn.ndim != 1 or (size is not None and syn.size != size):
            raise ErasureError("syndromes must be 1-D arrays of the same length")
        size = syn.size
    if len(lost) == 1 and 0 in syndromes:
        return {lost[0]: syndromes[0]}
    outs = [np.empty(size, dtype=np.uint8) for _ in lost]
    for o in range(0, size or 0, _CHUNK):
        _solve_into(lost, {r: syn[o:o + _CHUNK] for r, syn in syndromes.items()}, [x[o:o + _CHUNK] for x in outs])
    return dict(zip(lost, outs))


# --- validation ----------------------------------------------------------------------------------

def _int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ErasureError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ErasureError(f"{name} must be an integer, got {value!r}") from None


def _byte(value: object, name: str) -> int:
    value = _int(value, name)
    if not 0 <= value <= 255:
        raise ErasureError(f"{name} must be a GF(2^8) element in 0..255, got {value}")
    return value


def _block_len(block_len: object) -> int:
    block_len = _int(block_len, "block_len")
    if block_len < 64 or block_len % 64:
        raise ErasureError(f"block_len must be a positive multiple of 64, got {block_len}")
    return block_len


def _array(a: object, name: str, size: int | None = None, writeable: bool = False) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
        kind = f"{a.dtype} array" if isinstance(a, np.ndarray) else type(a).__name__
        raise ErasureError(f"{name} must be a numpy uint8 array, got {kind}")
    if size is not None and (a.ndim != 1 or a.size != size):
        raise ErasureError(f"{name} must be a 1-D array of {size} bytes, got shape {a.shape}")
    if writeable and not a.flags.writeable:
        raise ErasureError(f"{name} is read-only")


def _payload(p: object, name: str) -> None:
    _array(p, name)
    if p.ndim != 1:  # type: ignore[union-attr]
        raise ErasureError(f"{name} must be 1-D, got shape {p.shape}")  # type: ignore[union-attr]


def _payloads(payloads: object, name: str) -> list[np.ndarray]:
    if not isinstance(payloads, Sequence) or isinstance(payloads, (str, bytes)):
        raise ErasureError(f"{name} must be a sequence of uint8 arrays, one per member")
    for j, p in enumerate(payloads):
        _payload(p, f"payload of member {j}")
    return list(payloads)


def _lengths(lengths: object, k: int, name: str) -> list[int]:
    if isinstance(lengths, np.ndarray) and lengths.ndim == 1:
        lengths = lengths.tolist()
    if not isinstance(lengths, Sequence) or isinstance(lengths, (str, bytes)):
        raise ErasureError(f"{name} must be a sequence of {k} integers")
    if len(lengths) != k:
        raise ErasureError(f"{name} has {len(lengths)} entries for {k} members")
    values = [_int(n, f"{name}[{j}]") for j, n in enumerate(lengths)]
    if any(n < 0 for n in values):
        raise ErasureError(f"{name} must be >= 0, got {values}")
    return values


def _fits(sizes: Sequence[int], k: int, m: int, block_len: int, what: str) -> None:
    capacity = (k - m) * block_len
    for j, n in enumerate(sizes):
        if n > capacity:
            raise ErasureError(f"{what} of member {j} is {n} bytes, more than k - m = {k - m} blocks "
                               f"of {block_len} hold ({capacity})")


def _parities(parities: object, k: int, m: int, block_len: int, name: str,
              writeable: bool = False) -> list[list[np.ndarray]]:
    if not isinstance(parities, Sequence) or len(parities) != k:
        raise ErasureError(f"{name} must be {k} lists of {m} uint8 arrays of {block_len} bytes")
    result = []
    for j, blocks in enumerate(parities):
        if not isinstance(blocks, Sequence) or len(blocks) != m:
            raise ErasureError(f"{name}{f'[{j}]' if k > 1 else ''} must be a list of {m} uint8 arrays "
                               f"of {block_len} bytes (one per parity row)")
        for r, block in enumerate(blocks):
            _array(block, f"{name}{f'[{j}]' if k > 1 else ''}[{r}]", block_len, writeable)
        result.append(list(blocks))
    return result


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape)
