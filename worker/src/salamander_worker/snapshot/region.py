"""A double-buffered, checksummed snapshot file in shared memory.

One :class:`SlotFile` holds two slots of ``capacity`` bytes each, a record per slot, and a
``current`` word naming the newest committed slot. It lives in the node's shared-memory
directory (tmpfs, ``/dev/shm``), which the Salamander agent creates and removes, so it outlives
the training process that writes it and dies with the node (pod) that holds it.

File layout::

    0       magic "SALSLOT1", version u32, slots u32, capacity u64, current u64
    4096    record area: per slot [u32 length][u32 crc32c][JSON record]   (8 KiB each)
    65536   slot 0 payload, then slot 1 payload (capacity bytes each)

Commit protocol (the invariant: a crash at any instant leaves every previously committed
snapshot readable, except the one being overwritten, which is never the newest):

1. :meth:`begin` picks the slot that ``current`` does *not* name and wipes its record;
2. the caller fills the payload;
3. :meth:`commit` writes the record (with the payload's crc32c and ``seq = current seq + 1``),
   then stores ``current = seq << 1 | slot`` as one aligned 8-byte write: the commit marker.

A record counts only if its own crc32c matches and its ``seq`` is at most ``current``'s, so a
record written by a process that died before step 3 is ignored. :meth:`verify` checks the
payload against the record's crc32c before anyone reads it; corrupt memory is reported, never
restored from.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c

MAGIC = b"SALSLOT1"
VERSION = 1
SLOTS = 2
RECORD_AREA = 4096
RECORD_SIZE = 8192
DATA_START = 65536
PAGE = 4096
_HEAD = struct.Struct("<8sIIQQ")   # magic, version, slots, capacity, current
_CURRENT_AT = 24
_REC = struct.Struct("<II")


class RegionError(RuntimeError):
    """A snapshot file cannot be created, mapped or read; the message names the file."""


@dataclass(frozen=True)
class Committed:
    """A committed slot: which one, and its record (always has ``seq``, ``length``, ``checksum``)."""

    slot: int
    record: dict[str, Any]

    @property
    def seq(self) -> int:
        return int(self.record["seq"])


def checksum(data: memoryview | bytes) -> int:
    """crc32c, hardware-accelerated (~memcpy speed)."""
    return crc32c.crc32c(data)


def checksum_update(data: memoryview | bytes, crc: int) -> int:
    """The crc32c of the bytes checksummed so far (``crc``) followed by ``data``."""
    return crc32c.crc32c(data, crc)


class SlotFile:
    """A mapped snapshot file. Not thread-safe: one writer (the training process's snapshot
    thread) at a time; readers are the same process at restore time."""

    def __init__(self, path: Path, capacity: int, fd: int, mapping: mmap.mmap) -> None:
        self.path = path
        self.capacity = capacity
        self._fd = fd
        self._map = mapping
        self.view = memoryview(mapping)

    @classmethod
    def open(cls, path: str | os.PathLike[str], capacity: int, *, create: bool = True) -> SlotFile:
        """Map ``path``, reusing it (and the snapshots in it) if it is a valid slot file with at
        least ``capacity`` per slot; otherwise (re)create it with ``capacity`` rounded up to a
        page, allocated with ``posix_fallocate`` and pre-faulted (``MAP_POPULATE``) once."""
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
            if fresh:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    raise RegionError(f"cannot allocate {size} bytes for {path} (is /dev/shm large "
                                      f"enough?): {exc}") from None
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        region = cls(path, capacity, fd, mapping)
        if fresh:
            _HEAD.pack_into(region.view, 0, MAGIC, VERSION, SLOTS, capacity, 0)
            for slot in range(SLOTS):
                region._wipe_record(slot)
        return region

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
        """Unmap and close. If arrays still view the mapping, it stays mapped until they are
        garbage-collected (closing it under them would crash the process)."""
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

    def begin(self) -> int:
        """The slot to write next (never the newest committed one), its record wiped."""
        current = self.current
        slot = 0 if current is None else 1 - current[1]
        self._wipe_record(slot)
        return slot

    def commit(self, slot: int, length: int, record: dict[str, Any], crc: int | None = None) -> Committed:
        """Commit ``slot`` holding ``length`` payload bytes, with ``record`` (JSON-able) stored
        beside it. ``crc`` is the payload's crc32c if the caller computed it already."""
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
