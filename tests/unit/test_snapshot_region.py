"""The double-buffered snapshot file: commits alternate slots and are listed newest first; a slot
being written, or a record written without the commit marker, never shows up nor hides the last
commit; corruption is detected; the file is reused when it fits and recreated (or refused) when
it does not. Files live under pytest's tmp_path, not /dev/shm."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zlib
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from salamander_worker.snapshot import region as region_mod
from salamander_worker.snapshot.region import (
    DATA_START,
    MAGIC,
    PAGE,
    RECORD_AREA,
    RECORD_SIZE,
    SLOTS,
    Committed,
    RegionError,
    SlotFile,
    checksum,
    checksum_update,
)

from tests.unit._support import QUICK


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "rank0.slots"


@pytest.fixture
def slots(path: Path) -> Iterator[SlotFile]:
    region = SlotFile.open(path, PAGE)
    yield region
    region.close()


def put(region: SlotFile, data: bytes, step: int) -> Committed:
    """The whole commit protocol: begin, fill, commit."""
    slot = region.begin()
    region.payload(slot)[:len(data)] = data
    return region.commit(slot, len(data), {"step": step})


def steps(region: SlotFile) -> list[int]:
    return [c.record["step"] for c in region.committed()]


def read_back(region: SlotFile, entry: Committed) -> bytes:
    return bytes(region.payload(entry.slot)[:entry.record["length"]])


# -- creating and committing ---------------------------------------------------------------------


def test_a_fresh_file_has_nothing_committed(slots: SlotFile, path: Path) -> None:
    assert slots.current is None and slots.committed() == []
    assert slots.capacity == PAGE
    assert path.stat().st_size == DATA_START + SLOTS * PAGE
    assert path.read_bytes()[:8] == MAGIC


@pytest.mark.parametrize(("asked", "got"), [
    (0, PAGE), (1, PAGE), (PAGE, PAGE), (PAGE + 1, 2 * PAGE), (10_000, 3 * PAGE)])
def test_capacity_is_rounded_up_to_a_page(tmp_path: Path, asked: int, got: int) -> None:
    region = SlotFile.open(tmp_path / "f", asked)
    try:
        assert region.capacity == got and len(region.payload(1)) == got
    finally:
        region.close()


def test_begin_and_commit_alternate_slots(slots: SlotFile) -> None:
    seen = []
    for step in range(1, 7):
        entry = put(slots, f"payload of step {step}".encode(), step)
        seen.append(entry.slot)
        assert slots.current == (step, entry.slot)
        assert entry.seq == step and entry.record["seq"] == step
        assert entry.record["length"] == len(f"payload of step {step}")
        assert entry.record["checksum"] == checksum(f"payload of step {step}".encode())
    assert seen == [0, 1, 0, 1, 0, 1]


def test_committed_lists_both_slots_newest_first_and_verified(slots: SlotFile) -> None:
    put(slots, b"one", 10)
    assert steps(slots) == [10]
    put(slots, b"two!", 20)
    entries = slots.committed()
    assert [c.record["step"] for c in entries] == [20, 10]
    assert [c.seq for c in entries] == [2, 1]
    assert [read_back(slots, c) for c in entries] == [b"two!", b"one"]
    assert all(slots.verify(c) for c in entries)
    put(slots, b"three", 30)
    assert steps(slots) == [30, 20]
    assert [read_back(slots, c) for c in slots.committed()] == [b"three", b"two!"]


def test_commit_accepts_a_precomputed_checksum_and_an_empty_payload(slots: SlotFile) -> None:
    slot = slots.begin()
    slots.payload(slot)[:5] = b"hello"
    entry = slots.commit(slot, 5, {"step": 1}, crc=checksum(b"hello"))
    assert slots.verify(entry)
    empty = put(slots, b"", 2)
    assert empty.record["length"] == 0 and slots.verify(empty)
    assert steps(slots) == [2, 1]


def test_a_begun_but_uncommitted_slot_never_shows_nor_hides_the_last_commit(slots: SlotFile) -> None:
    put(slots, b"first", 1)
    put(slots, b"second", 2)
    older = slots.committed()[-1]
    slot = slots.begin()                              # overwrites the older commit's slot...
    assert slot == older.slot
    slots.payload(slot)[:8] = b"partial!"             # ...and the writer dies before commit
    assert steps(slots) == [2]                        # the newest commit is intact and verifies
    [entry] = slots.committed()
    assert read_back(slots, entry) == b"second" and slots.verify(entry)
    assert slots.current == (2, 1 - slot)
    # A restarted writer begins the same slot again, never the newest.
    assert slots.begin() == slot
    assert put(slots, b"third", 3).slot == slot
    assert steps(slots) == [3, 2]


def test_begin_on_a_fresh_file_then_nothing(slots: SlotFile) -> None:
    assert slots.begin() == 0
    slots.payload(0)[:3] = b"abc"
    assert slots.committed() == [] and slots.current is None


def test_a_record_written_without_the_commit_marker_is_ignored(slots: SlotFile) -> None:
    put(slots, b"first", 1)
    put(slots, b"second", 2)
    seq, newest = slots.current
    slot = slots.begin()
    slots.payload(slot)[:6] = b"ghost!"
    # Step 3 of the protocol never happened: the record is there, the marker is not.
    slots._write_record(slot, {"step": 3, "seq": seq + 1, "length": 6, "checksum": checksum(b"ghost!")})
    assert slots.current == (seq, newest)
    assert steps(slots) == [2]
    # A stale record with the same seq as current in the other slot is no commit either.
    slots._write_record(slot, {"step": 3, "seq": seq, "length": 6, "checksum": checksum(b"ghost!")})
    assert steps(slots) == [2]
    # The next real commit supersedes the ghost.
    put(slots, b"third", 3)
    assert steps(slots) == [3, 2]


def test_the_commit_marker_is_one_aligned_word(slots: SlotFile, path: Path) -> None:
    entry = put(slots, b"x", 1)
    entry = put(slots, b"y", 2)
    word = struct.unpack_from("<Q", path.read_bytes(), region_mod._CURRENT_AT)[0]
    assert region_mod._CURRENT_AT % 8 == 0
    assert word == 2 << 1 | entry.slot


# -- corruption ------------------------------------------------------------------------------------


def test_corrupt_payload_bytes_fail_verify(slots: SlotFile) -> None:
    older = put(slots, b"older payload", 1)
    newer = put(slots, b"newer payload", 2)
    slots.payload(newer.slot)[3] ^= 0x01
    assert [c.seq for c in slots.committed()] == [2, 1]   # records intact: still listed...
    assert not slots.verify(slots.committed()[0])         # ...but the payload is reported corrupt
    assert slots.verify(slots.committed()[1]) and slots.verify(older)
    # Bytes past the committed length do not matter.
    slots.payload(older.slot)[len(b"older payload")] ^= 0xFF
    assert slots.verify(older)


@pytest.mark.parametrize("where", ["length", "crc", "json"])
def test_a_corrupt_record_makes_its_slot_vanish(slots: SlotFile, where: str) -> None:
    put(slots, b"one", 1)
    newest = put(slots, b"two", 2)
    at = RECORD_AREA + newest.slot * RECORD_SIZE
    offset = {"length": 0, "crc": 4, "json": 8 + 5}[where]
    slots.view[at + offset] ^= 0x40
    assert steps(slots) == [1]


def test_a_record_length_beyond_its_area_makes_it_vanish(slots: SlotFile) -> None:
    entry = put(slots, b"one", 1)
    struct.pack_into("<I", slots.view, RECORD_AREA + entry.slot * RECORD_SIZE, RECORD_SIZE)
    assert slots.committed() == []


@pytest.mark.parametrize("record", [
    [1, 2, 3],
    {"seq": 1, "length": 3},                                   # no checksum
    {"seq": True, "length": 3, "checksum": 1},                 # bool is no int here
    {"seq": 1, "length": -1, "checksum": 1},
    {"seq": 1, "length": 3, "checksum": "1"},
    {"seq": 1, "length": PAGE + 1, "checksum": 1},             # longer than the slot
    {"seq": 1.0, "length": 3, "checksum": 1},
])
def test_a_well_checksummed_but_invalid_record_is_ignored(slots: SlotFile, record: object) -> None:
    slots.commit(slots.begin(), 3, {"step": 1})
    slot = slots.current[1]
    raw = json.dumps(record).encode()
    at = RECORD_AREA + slot * RECORD_SIZE
    slots.view[at + 8:at + 8 + len(raw)] = raw
    struct.pack_into("<II", slots.view, at, len(raw), checksum(raw))
    assert slots.committed() == []


@QUICK
@given(st.integers(RECORD_AREA, DATA_START - 1), st.integers(1, 255))
def test_a_flipped_byte_in_the_record_area_never_yields_a_wrong_record(tmp_path_factory: pytest.TempPathFactory,
                                                                      at: int, flip: int) -> None:
    path = tmp_path_factory.mktemp("flip") / "f"
    region = SlotFile.open(path, PAGE)
    try:
        put(region, b"one", 1)
        put(region, b"two", 2)
        before = {c.slot: c.record for c in region.committed()}
        region.view[at] ^= flip
        for entry in region.committed():
            assert entry.record == before[entry.slot]
    finally:
        region.close()


# -- commit errors -----------------------------------------------------------------------------------


def test_a_payload_larger_than_the_capacity_is_refused(slots: SlotFile) -> None:
    put(slots, b"kept", 1)
    slot = slots.begin()
    with pytest.raises(RegionError, match="exceeds"):
        slots.commit(slot, slots.capacity + 1, {"step": 2})
    with pytest.raises(RegionError):
        slots.commit(slot, -1, {"step": 2})
    assert slots.current == (1, 1 - slot) and steps(slots) == [1]
    entry = slots.commit(slot, slots.capacity, {"step": 2})   # exactly full is fine
    assert slots.verify(entry)


def test_a_record_too_large_is_refused(slots: SlotFile) -> None:
    put(slots, b"kept", 1)
    with pytest.raises(RegionError, match="too large"):
        slots.commit(slots.begin(), 1, {"step": 2, "junk": "x" * RECORD_SIZE})
    assert steps(slots) == [1]


# -- reopening ------------------------------------------------------------------------------------------


def test_reopening_with_the_same_or_a_smaller_capacity_keeps_the_snapshots(path: Path) -> None:
    region = SlotFile.open(path, 3 * PAGE)
    put(region, b"a" * 5000, 1)
    put(region, b"b" * 7000, 2)
    region.close()
    for capacity in (3 * PAGE, PAGE, 1):
        region = SlotFile.open(path, capacity, create=False)
        try:
            assert region.capacity == 3 * PAGE
            assert steps(region) == [2, 1]
            assert [read_back(region, c) for c in region.committed()] == [b"b" * 7000, b"a" * 5000]
            assert all(region.verify(c) for c in region.committed())
        finally:
            region.close()
    # ...and the writer carries on where it was.
    region = SlotFile.open(path, PAGE)
    try:
        assert put(region, b"c", 3).seq == 3
        assert steps(region) == [3, 2]
    finally:
        region.close()


def test_reopening_with_a_larger_capacity_recreates_the_file(path: Path) -> None:
    region = SlotFile.open(path, PAGE)
    put(region, b"old", 1)
    region.close()
    with pytest.raises(RegionError):
        SlotFile.open(path, 2 * PAGE, create=False)
    region = SlotFile.open(path, 2 * PAGE)
    try:
        assert region.capacity == 2 * PAGE and region.current is None and region.committed() == []
        assert path.stat().st_size == DATA_START + SLOTS * 2 * PAGE
    finally:
        region.close()


def _damage(path: Path, how: str) -> None:
    if how == "magic":
        with open(path, "r+b") as handle:
            handle.write(b"NOTASLOT")
    elif how in ("version", "version-1"):   # version 1 files were checksummed with CRC-32C
        with open(path, "r+b") as handle:
            handle.seek(8)
            handle.write(struct.pack("<I", 99 if how == "version" else 1))
    elif how == "capacity":
        with open(path, "r+b") as handle:
            handle.seek(16)
            handle.write(struct.pack("<Q", PAGE + 1))
    elif how == "short":
        os.truncate(path, DATA_START + PAGE)
    elif how == "long":
        os.truncate(path, DATA_START + SLOTS * PAGE + PAGE)
    elif how == "tiny":
        os.truncate(path, 10)
    elif how == "empty":
        os.truncate(path, 0)


@pytest.mark.parametrize("how", ["magic", "version", "version-1", "capacity", "short", "long", "tiny", "empty"])
def test_a_damaged_file_is_refused_or_recreated(path: Path, how: str) -> None:
    region = SlotFile.open(path, PAGE)
    put(region, b"old", 1)
    region.close()
    _damage(path, how)
    with pytest.raises(RegionError, match=str(path.name)):
        SlotFile.open(path, PAGE, create=False)
    region = SlotFile.open(path, PAGE)
    try:
        assert region.committed() == [] and region.current is None
        assert path.stat().st_size == DATA_START + SLOTS * PAGE
        assert put(region, b"new", 1).seq == 1
    finally:
        region.close()
    region = SlotFile.open(path, PAGE, create=False)   # now valid again
    try:
        assert steps(region) == [1]
    finally:
        region.close()


def test_a_missing_file_is_refused_without_create(path: Path) -> None:
    with pytest.raises(RegionError):
        SlotFile.open(path, PAGE, create=False)
    assert not path.exists()


def test_an_unopenable_path_raises_region_error(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="cannot open"):
        SlotFile.open(tmp_path / "no" / "such" / "dir" / "f", PAGE)


def test_two_mappings_of_one_file_see_each_others_commits(path: Path) -> None:
    writer = SlotFile.open(path, PAGE)
    reader = SlotFile.open(path, PAGE, create=False)
    try:
        put(writer, b"shared", 5)
        [entry] = reader.committed()
        assert entry.record["step"] == 5 and reader.verify(entry) and read_back(reader, entry) == b"shared"
    finally:
        reader.close()
        writer.close()


# -- the parallel crc32 ---------------------------------------------------------------------------


def _small_pieces(piece: int):  # noqa: ANN202 - a context manager
    """Checksum in ``piece``-byte pieces on 4 threads, so small buffers take the parallel path."""
    from contextlib import ExitStack
    from unittest import mock

    stack = ExitStack()
    stack.enter_context(mock.patch.object(region_mod, "PIECE", piece))
    stack.enter_context(mock.patch.object(region_mod, "PARALLEL_MIN", 2 * piece))
    stack.enter_context(mock.patch.object(region_mod.pool, "threads", lambda: 4))
    return stack


@QUICK
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32_combine_joins_two_crcs(a: bytes, b: bytes) -> None:
    assert region_mod.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@QUICK
@given(st.data())
def test_the_parallel_checksum_equals_zlibs_crc32(data: st.DataObject) -> None:
    """Lengths 0, 1, around every piece boundary and anywhere else; bytes, memoryviews and
    numpy arrays of any item size and shape."""
    piece = data.draw(st.sampled_from([64, 100, 4096]))
    near = [n * piece + d for n in range(4) for d in (-1, 0, 1) if n * piece + d >= 0]
    length = data.draw(st.one_of(st.sampled_from([0, 1, *near]), st.integers(0, 5 * piece)))
    raw = data.draw(st.binary(min_size=length, max_size=length))
    expected = zlib.crc32(raw)
    as_array = np.frombuffer(raw, dtype=np.uint8)
    forms: list[Any] = [raw, memoryview(raw), bytearray(raw), as_array]
    if length % 4 == 0:
        forms += [as_array.view(np.float32), as_array.view(np.int32).reshape(-1, 1)]
    with _small_pieces(piece):
        for form in forms:
            assert checksum(form) == expected, type(form)
        cut = data.draw(st.integers(0, length))
        assert checksum_update(raw[cut:], checksum(raw[:cut])) == expected


@QUICK
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_combining_any_split_gives_the_whole_crc(raw: bytes, cuts: list[int]) -> None:
    points = sorted({0, len(raw), *(c for c in cuts if c <= len(raw))})
    crc = 0
    for a, e in zip(points, points[1:]):
        crc = region_mod.crc32_combine(crc, zlib.crc32(raw[a:e]), e - a)
    assert crc == zlib.crc32(raw)


def test_a_large_buffer_takes_the_parallel_path_and_gives_zlibs_crc32() -> None:
    data = np.random.default_rng(5).integers(0, 256, size=3 * region_mod.PIECE + 12345, dtype=np.uint8)
    assert data.nbytes >= region_mod.PARALLEL_MIN
    assert checksum(data) == zlib.crc32(data)
    assert checksum(memoryview(data)[1:]) == zlib.crc32(data[1:])
    assert checksum_update(data, 77) == zlib.crc32(data, 77)


def test_a_strided_array_is_left_to_the_crc_function() -> None:
    """Not one contiguous buffer: the crc function decides (it refuses it), as zlib does."""
    strided = np.arange(4 * region_mod.PARALLEL_MIN // 8, dtype=np.uint8)[::2]
    with pytest.raises((BufferError, TypeError, ValueError)):
        zlib.crc32(strided)
    with pytest.raises((BufferError, TypeError, ValueError)):
        checksum(strided)


@pytest.mark.parametrize("length", [-1, 1 << 64])
def test_crc32_combine_refuses_an_impossible_length(length: int) -> None:
    with pytest.raises(ValueError, match="length2"):
        region_mod.crc32_combine(1, 2, length)


# -- allocating slot 1 in the background ---------------------------------------------------------


def test_allocate_later_hands_out_slot_0_at_once_and_slot_1_once_allocated(path: Path) -> None:
    region = SlotFile.open(path, 3 * PAGE, allocate_later=True)
    try:
        first = put(region, b"a" * 5000, step=1)          # slot 0: allocated before open returned
        assert first.slot == 0
        second = put(region, b"b" * 7000, step=2)         # slot 1: begin() waited for it
        assert second.slot == 1
        assert steps(region) == [2, 1]
    finally:
        region.close()
    reopened = SlotFile.open(path, 0, create=False)        # whole: its magic is written
    try:
        assert steps(reopened) == [2, 1] and reopened.capacity == 3 * PAGE
        assert all(reopened.verify(e) for e in reopened.committed())
        assert os.stat(path).st_blocks * 512 >= DATA_START + SLOTS * 3 * PAGE   # all allocated
    finally:
        reopened.close()


def test_a_file_whose_background_allocation_never_finished_is_not_reused(path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SlotFile, "_allocate_slot_1", lambda self: None)   # the process "died" first
    region = SlotFile.open(path, PAGE, allocate_later=True)
    put(region, b"x" * 100, step=1)
    region.close()
    with pytest.raises(RegionError):
        SlotFile.open(path, 0, create=False)
    fresh = SlotFile.open(path, PAGE)
    try:
        assert fresh.committed() == []
    finally:
        fresh.close()


def test_a_failed_background_allocation_is_reported_when_slot_1_is_wanted(path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, where: Path, start: int, length: int) -> None:
        if start > 0:
            raise RegionError(f"cannot allocate {length} bytes of {where}: no space")
        os.posix_fallocate(fd, start, length)

    monkeypatch.setattr(region_mod, "_allocate", full)
    region = SlotFile.open(path, PAGE, allocate_later=True)
    try:
        put(region, b"x" * 100, step=1)
        with pytest.raises(RegionError, match="slot 1"):
            region.begin()
        with pytest.raises(RegionError, match="no space"):
            region.settle()
        assert steps(region) == [1]
    finally:
        region.close()
