"""A double-buffered, checksummed snapshot file in shared memory.

One :class:`SlotFile` holds two slots of ``capacity`` bytes each, a record per slot, and a
``current`` word naming the newest committed slot. It lives in the node's shared-memory
directory (tmpfs, ``/dev/shm``), which the Salamander agent creates and removes, so it outlives
the training process that writes it and dies with the node (pod) that holds it.

File layout::

    0       magic "SALSLOT1", version u32, slots u32, capacity u64, current u64
    4096    record area: per slot [u32 length][u32 crc32][JSON record]   (8 KiB each)
    65536   slot 0 payload, then slot 1 payload (capacity bytes each)

Commit protocol (the invariant: a crash at any instant leaves every previously committed
snapshot readable, except the one being overwritten, which is never the newest):

1. :meth:`begin` picks the slot that ``current`` does *not* name and wipes its record;
2. the caller fills the payload;
3. :meth:`commit` writes the record (with the payload's crc32 and ``seq = current seq + 1``),
   then stores ``current = seq << 1 | slot`` as one aligned 8-byte write: the commit marker.

The magic is written last, once the whole file is allocated: a file without it (a process
died while creating it) is never reused.

A record counts only if its own crc32 matches and its ``seq`` is at most ``current``'s, so a
record written by a process that died before step 3 is ignored. :meth:`verify` checks the
payload against the record's crc32 before anyone reads it; corrupt memory is reported, never
restored from.

The checksum is CRC-32 (zlib's polynomial), computed by ISA-L when the ``isal`` package is
installed (PCLMULQDQ folding: ~80 GB/s from cache on this project's x86 VM, against ~22 GB/s
for the ``crc32c`` package's CRC-32C) and by zlib otherwise: the same values either way.
Version 1 files were checksummed with CRC-32C and are refused.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from salamander_worker.snapshot import pool

try:
    from isal.isal_zlib import crc32 as _crc32
except ImportError:   # pragma: no cover - the same function, slower
    from zlib import crc32 as _crc32

MAGIC = b"SALSLOT1"
VERSION = 2
#: The name of the checksum every record, exchange and persistent copy carries.
ALGORITHM = "crc32"
SLOTS = 2
RECORD_AREA = 4096
RECORD_SIZE = 8192
DATA_START = 65536
PAGE = 4096
_HEAD = struct.Struct("<8sIIQQ")   # magic, version, slots, capacity, current
_CURRENT_AT = 24
_REC = struct.Struct("<II")
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)   # Linux 5.14+

Buffer = Union[memoryview, bytes, bytearray, np.ndarray]


class RegionError(RuntimeError):
    """A snapshot file cannot be created, mapped or read; the message names the file."""


def _allocate(fd: int, path: Path, start: int, length: int) -> None:
    """Allocate ``length`` bytes of the file from ``start`` (so a full /dev/shm is an error
    here, not a SIGBUS on a later write)."""
    try:
        os.posix_fallocate(fd, start, length)
    except OSError as exc:
        raise RegionError(f"cannot allocate {length} bytes of {path} (is /dev/shm large enough?): {exc}") from None


@dataclass(frozen=True)
class Committed:
    """A committed slot: which one, and its record (always has ``seq``, ``length``, ``checksum``)."""

    slot: int
    record: dict[str, Any]

    @property
    def seq(self) -> int:
        return int(self.record["seq"])


#: Buffers at least this large are checksummed in pieces of ``PIECE`` bytes on the bulk pool
#: (:mod:`.pool`), and the pieces' crcs combined; the result is the same crc32.
PIECE = 16 << 20
PARALLEL_MIN = 2 * PIECE


def checksum(data: Buffer) -> int:
    """The CRC-32 of ``data`` (bytes, a memoryview, a contiguous numpy array: any contiguous
    buffer), hardware-accelerated. Buffers of at least ``PARALLEL_MIN`` bytes are checksummed
    in ``PIECE``-byte pieces on several threads (the crc releases the GIL) and the pieces'
    crcs joined by :func:`crc32_combine`: always exactly ``zlib.crc32(data)``."""
    view = _byte_view(data)
    if view is None or view.nbytes < PARALLEL_MIN or pool.threads() < 2:
        return _crc32(data)
    pieces = [view[start:start + PIECE] for start in range(0, view.nbytes, PIECE)]
    crcs = pool.run(_crc32, pieces)
    crc = crcs[0]
    for piece, piece_crc in zip(pieces[1:], crcs[1:]):
        crc = crc32_combine(crc, piece_crc, piece.nbytes)
    return crc


def checksum_update(data: Buffer, crc: int) -> int:
    """The CRC-32 of the bytes checksummed so far (``crc``) followed by ``data``."""
    view = _byte_view(data)
    if view is None or view.nbytes < PARALLEL_MIN or pool.threads() < 2:
        return _crc32(data, crc)
    return crc32_combine(crc, checksum(view), view.nbytes)


def _byte_view(data: Buffer) -> memoryview | None:
    """``data`` as a flat memoryview of bytes, or None when it is not one contiguous buffer
    (then the crc function itself decides)."""
    try:
        view = memoryview(data)
    except TypeError:
        return None
    if not view.c_contiguous:
        return None
    if view.ndim != 1 or view.itemsize != 1 or view.format != "B":
        try:
            view = view.cast("B")
        except TypeError:
            return None
    return view


# -- crc32_combine: zlib's crc32_combine --------------------------------------------------------
#
# A crc is a polynomial over GF(2) in reflected bit order (bit 31 is x^0). Appending ``n`` bytes
# multiplies the crc of the first part by x^(8n) modulo the polynomial, so
# crc(A + B) = crc(A) * x^(8 len(B)) mod P  xor  crc(B), with the pre- and post-conditioning
# (~0) cancelling. x^(2^k) mod P are precomputed by repeated squaring; x^(8n) is their product
# over the bits of 8n: O(log n) multiplications of 32 steps each.

POLYNOMIAL = 0xEDB88320   # CRC-32 (zlib, gzip, Ethernet), reflected
_X0 = 1 << 31             # the polynomial 1 (x^0), reflected


def _multmodp(a: int, b: int) -> int:
    """``a(x) * b(x) mod P``, both reflected 32-bit polynomials."""
    product = 0
    bit = _X0
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ POLYNOMIAL if b & 1 else b >> 1
    return product


def _x2n_table() -> tuple[int, ...]:
    table = [_X0 >> 1]   # x^1
    for _ in range(66):
        table.append(_multmodp(table[-1], table[-1]))
    return tuple(table)


_X2N = _x2n_table()   # _X2N[k] = x^(2^k) mod P, for every k a length below 2^64 needs


@functools.lru_cache(maxsize=64)
def _shift_operator(length: int) -> int:
    """x^(8 * length) mod P: what appending ``length`` bytes multiplies a crc by."""
    result, k, n = _X0, 3, length
    while n:
        if n & 1:
            result = _multmodp(_X2N[k], result)
        n >>= 1
        k += 1
    return result


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and
    ``length2 = len(B)`` (zlib's ``crc32_combine``, which Python's zlib does not expose)."""
    if not 0 <= length2 < 1 << 64:
        raise ValueError(f"length2 must be in 0..2^64-1, got {length2}")
    if length2 == 0:
        return crc1 & 0xFFFFFFFF
    return (_multmodp(_shift_operator(length2), crc1 & 0xFFFFFFFF) ^ crc2) & 0xFFFFFFFF


class SlotFile:
    """A mapped snapshot file. Not thread-safe: one writer (the training process's snapshot
    thread) at a time; readers are the same process at restore time."""

    def __init__(self, path: Path, capacity: int, fd: int, mapping: mmap.mmap) -> None:
        self.path = path
        self.capacity = capacity
        self._fd = fd
        self._map = mapping
        self.view = memoryview(mapping)
        self._allocating: threading.Thread | None = None   # allocating slot 1 (allocate_later)
        self._allocation_error: BaseException | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], capacity: int, *, create: bool = True,
             allocate_later: bool = False) -> SlotFile:
        """Map ``path``, reusing it (and the snapshots in it) if it is a valid slot file with at
        least ``capacity`` per slot; otherwise (re)create it with ``capacity`` rounded up to a
        page, allocated with ``posix_fallocate`` and pre-faulted (``MAP_POPULATE``) once.

        With ``allocate_later``, a new file has only its head and slot 0 allocated (and
        pre-faulted) before this returns; slot 1 is allocated on a background thread, which
        :meth:`begin` waits for before handing slot 1 out. A file's magic is written only once
        all of it is allocated, so a file left half-allocated (its process died) is never
        reused: it is recreated."""
        path = Path(path)
        capacity = max(PAGE, -(-capacity // PAGE) * PAGE)
        existing = cls._existing_capacity(path)
        if existing is not None and existing >= capacity:
            capacity = existing
            fresh = False
        elif not create:
            raise RegionError(f"{path} is not a snapshot file of at least {capacity} bytes per slot")
        else:
            fresh = True
        size = DATA_START + SLOTS * capacity
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RegionError(f"cannot open snapshot file {path}: {exc}") from None
        try:
            later = fresh and allocate_later
            if fresh:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                _allocate(fd, path, 0, DATA_START + capacity if later else size)
            flags = mmap.MAP_SHARED | (0 if later else getattr(mmap, "MAP_POPULATE", 0))
            mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        region = cls(path, capacity, fd, mapping)
        if fresh:
            _HEAD.pack_into(region.view, 0, bytes(len(MAGIC)), VERSION, SLOTS, capacity, 0)
            for slot in range(SLOTS):
                region._wipe_record(slot)
            if later:
                region._populate(0, DATA_START + capacity)
                region._allocating = threading.Thread(target=region._allocate_slot_1, daemon=True,
                                                      name=f"salamander-allocate-{path.name}")
                region._allocating.start()
            else:
                region.view[:len(MAGIC)] = MAGIC
        return region

    def _populate(self, start: int, length: int) -> None:
        """Pre-fault ``length`` bytes of the mapping from ``start`` (page-aligned), best effort
        (``MADV_POPULATE_WRITE``; nothing where the kernel lacks it)."""
        try:
            self._map.madvise(_MADV_POPULATE_WRITE, start, length)
        except (OSError, ValueError):
            pass

    def _allocate_slot_1(self) -> None:
        """The background half of ``allocate_later``: allocate and pre-fault slot 1, then write
        the magic (the file is whole)."""
        try:
            start = DATA_START + self.capacity
            _allocate(self._fd, self.path, start, self.capacity)
            self._populate(start, self.capacity)
            self.view[:len(MAGIC)] = MAGIC
        except BaseException as exc:  # noqa: BLE001 - reported by settle()/begin()
            self._allocation_error = exc

    def settle(self) -> None:
        """Wait for a background allocation (``allocate_later``) to finish; raise
        :class:`RegionError` if it failed. Returns at once for a whole file."""
        if self._allocating is not None:
            self._allocating.join()
            self._allocating = None
        if self._allocation_error is not None:
            raise RegionError(f"cannot allocate slot 1 of {self.path}: {self._allocation_error}")

    @staticmethod
    def _existing_capacity(path: Path) -> int | None:
        try:
            with open(path, "rb") as handle:
                head = handle.read(_HEAD.size)
                size = os.fstat(handle.fileno()).st_size
        except OSError:
            return None
        if len(head) < _HEAD.size:
            return None
        magic, version, slots, capacity, _ = _HEAD.unpack(head)
        if magic != MAGIC or version != VERSION or slots != SLOTS or capacity % PAGE:
            return None
        return capacity if size == DATA_START + SLOTS * capacity else None

    def close(self) -> None:
        """Unmap and close (after any background allocation). If arrays still view the mapping,
        it stays mapped until they are garbage-collected (closing it under them would crash the
        process)."""
        if self._allocating is not None:
            self._allocating.join()
            self._allocating = None
        try:
            self.view.release()
            self._map.close()
        except BufferError:
            pass
        os.close(self._fd)

    # -- the commit marker ---------------------------------------------------------------------

    @property
    def current(self) -> tuple[int, int] | None:
        """(seq, slot) of the newest commit, or None if nothing was ever committed."""
        word = struct.unpack_from("<Q", self.view, _CURRENT_AT)[0]
        return None if word == 0 else (word >> 1, word & 1)

    def payload(self, slot: int) -> memoryview:
        start = DATA_START + slot * self.capacity
        return self.view[start:start + self.capacity]

    def next_slot(self) -> int:
        """The slot :meth:`begin` would pick (never the newest committed one); changes nothing."""
        current = self.current
        return 0 if current is None else 1 - current[1]

    def begin(self) -> int:
        """The slot to write next (never the newest committed one), its record wiped; waits
        until it is allocated (``allocate_later``), raising :class:`RegionError` if that failed."""
        slot = self.next_slot()
        if slot != 0:
            self.settle()
        self._wipe_record(slot)
        return slot

    def commit(self, slot: int, length: int, record: dict[str, Any], crc: int | None = None) -> Committed:
        """Commit ``slot`` holding ``length`` payload bytes, with ``record`` (JSON-able) stored
        beside it. ``crc`` is the payload's CRC-32 if the caller computed it already."""
        if not 0 <= length <= self.capacity:
            raise RegionError(f"{self.path}: payload of {length} bytes exceeds the slot's {self.capacity}")
        current = self.current
        seq = 1 if current is None else current[0] + 1
        full = dict(record, seq=seq, length=length,
                    checksum=checksum(self.payload(slot)[:length]) if crc is None else crc)
        self._write_record(slot, full)
        struct.pack_into("<Q", self.view, _CURRENT_AT, seq << 1 | slot)
        return Committed(slot, full)

    # -- reading -------------------------------------------------------------------------------

    def committed(self) -> list[Committed]:
        """Every committed slot whose record is intact, newest first. Payloads are not checked
        here: call :meth:`verify` before reading one."""
        current = self.current
        if current is None:
            return []
        found = []
        for slot in range(SLOTS):
            record = self._read_record(slot)
            if record is not None and record["seq"] <= current[0] and (
                    record["seq"] != current[0] or slot == current[1]):
                found.append(Committed(slot, record))
        return sorted(found, key=lambda c: -c.seq)

    def verify(self, entry: Committed) -> bool:
        """Whether the slot's payload still matches its record's checksum."""
        return checksum(self.payload(entry.slot)[:entry.record["length"]]) == entry.record["checksum"]

    # -- records -------------------------------------------------------------------------------

    def _record_at(self, slot: int) -> int:
        return RECORD_AREA + slot * RECORD_SIZE

    def _wipe_record(self, slot: int) -> None:
        _REC.pack_into(self.view, self._record_at(slot), 0, 0)

    def _write_record(self, slot: int, record: dict[str, Any]) -> None:
        raw = json.dumps(record, separators=(",", ":")).encode()
        if len(raw) > RECORD_SIZE - _REC.size:
            raise RegionError(f"{self.path}: snapshot record of {len(raw)} bytes is too large")
        at = self._record_at(slot)
        self.view[at + _REC.size:at + _REC.size + len(raw)] = raw
        _REC.pack_into(self.view, at, len(raw), checksum(raw))

    def _read_record(self, slot: int) -> dict[str, Any] | None:
        at = self._record_at(slot)
        length, crc = _REC.unpack_from(self.view, at)
        if length == 0 or length > RECORD_SIZE - _REC.size:
            return None
        raw = bytes(self.view[at + _REC.size:at + _REC.size + length])
        if checksum(raw) != crc:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(record, dict) or not all(
                isinstance(record.get(key), int) and not isinstance(record.get(key), bool) and record[key] >= 0
                for key in ("seq", "length", "checksum")) or record["length"] > self.capacity:
            return None
        return record
