"""The snapshot copy's checksum on a thread of its own, ahead of the copy."""

from __future__ import annotations

import time
import zlib
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from salamander_worker.snapshot import payload, pool, running_crc
from salamander_worker.snapshot.running_crc import RunningChecksum

from tests.unit._support import QUICK


def _parts(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]


@QUICK
@given(st.lists(st.integers(0, 5000), max_size=20), st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_the_result_is_the_crc_of_the_parts_in_order(sizes: list[int], start: int, ahead: int) -> None:
    parts = _parts(sizes)
    running = RunningChecksum(parts, crc=start, ahead=ahead)
    for i in range(len(parts)):
        running.wait_for(i)
        running.consumed(i + 1)
    assert running.result() == zlib.crc32(b"".join(p.tobytes() for p in parts), start)


def test_the_thread_stays_at_most_ahead_parts_in_front_of_the_reader() -> None:
    seen: list[int] = []
    real = running_crc.checksum_update

    def counting(part: Any, crc: int) -> int:
        seen.append(len(seen))
        return real(part, crc)

    with mock.patch.object(running_crc, "checksum_update", counting):
        running = RunningChecksum(_parts([64] * 10), ahead=3)
        running.wait_for(2)
        time.sleep(0.2)                  # room to run further, if it would
        assert len(seen) == 3
        running.consumed(4)
        running.wait_for(6)
        time.sleep(0.2)
        assert len(seen) == 7
        running.result()
        assert len(seen) == 10


def test_a_failing_part_reaches_the_reader() -> None:
    parts = _parts([64, 64])
    parts.insert(1, np.arange(64, dtype=np.uint8)[::2])   # not contiguous: the crc refuses it
    running = RunningChecksum(parts)
    running.wait_for(0)
    with pytest.raises((BufferError, ValueError, TypeError)):
        running.wait_for(1)
    with pytest.raises((BufferError, ValueError, TypeError)):
        running.result()


def test_close_stops_the_thread_early() -> None:
    running = RunningChecksum(_parts([64] * 50), ahead=1)
    running.wait_for(0)
    running.close()
    assert not running._thread.is_alive()  # noqa: SLF001 - the thread it owns


def test_after_close_nothing_waits_and_there_is_no_result() -> None:
    running = RunningChecksum(_parts([64] * 50), ahead=1)
    running.close()
    with pytest.raises(RuntimeError, match="closed"):
        running.wait_for(49)
    with pytest.raises(RuntimeError, match="closed"):
        running.result()


def test_a_reader_that_skips_parts_still_gets_the_ones_it_waits_for() -> None:
    """The copy never waits on the parts it does not copy (the skeleton, gaps, the tail); it
    declares them consumed before waiting on the next one, even with ``ahead=1``."""
    parts = _parts([64, 100, 64, 64, 100, 64])
    running = RunningChecksum(parts, ahead=1)
    for i in (1, 4):
        running.consumed(i)
        running.wait_for(i)
    assert running.result() == zlib.crc32(b"".join(p.tobytes() for p in parts))


def test_ahead_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="ahead"):
        RunningChecksum([], ahead=0)


@QUICK
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=6), st.integers(0, 3))
def test_the_copy_gives_the_same_bytes_and_crc_on_one_thread_and_with_the_crc_ahead(
        sizes: list[int], chunk_shift: int) -> None:
    """Tensors of any sizes, cut into pieces of several sizes: both ways of copying write the
    same payload and return its crc, which is the crc of the bytes written."""
    tree = {"step": 3, "tensors": [torch.from_numpy(p) for p in _parts(sizes, seed=len(sizes))]}
    layout = payload.plan(tree)
    results = []
    for threads in (1, 2):
        buffer = bytearray(layout.length)
        pending = payload.write_skeleton(tree, layout, memoryview(buffer))
        landed: list[int] = []
        started: list[RunningChecksum] = []

        def one_ahead(parts: Any) -> RunningChecksum:   # the tightest coupling: one part ahead
            started.append(RunningChecksum(parts, ahead=1))
            return started[-1]

        with mock.patch.object(pool, "threads", lambda threads=threads: threads), \
                mock.patch.object(payload, "CHUNK", 256 << chunk_shift), \
                mock.patch.object(running_crc, "RunningChecksum", one_ahead):
            crc = payload.copy_tensors(pending, memoryview(buffer), layout.length, landed=landed.append)
        assert len(started) == (threads - 1)     # the crc thread only with a second core
        assert crc == zlib.crc32(bytes(buffer[:layout.length]))
        assert landed == sorted(landed) and landed[-1] == max(r.offset + r.nbytes for r in layout.refs)
        results.append((bytes(buffer), crc, landed))
    assert results[0] == results[1]


def test_a_failing_copy_stops_the_crc_thread() -> None:
    tree = {"w": torch.ones(4096, dtype=torch.uint8)}
    layout = payload.plan(tree)
    buffer = bytearray(layout.length)
    pending = payload.write_skeleton(tree, layout, memoryview(buffer))

    def landed(_offset: int) -> None:
        raise RuntimeError("the exchange went away")

    started: list[RunningChecksum] = []

    def tracked(parts: Any) -> RunningChecksum:
        started.append(RunningChecksum(parts))
        return started[-1]

    with mock.patch.object(pool, "threads", lambda: 2), mock.patch.object(payload, "CHUNK", 256), \
            mock.patch.object(running_crc, "RunningChecksum", tracked), pytest.raises(RuntimeError, match="went away"):
        payload.copy_tensors(pending, memoryview(buffer), layout.length, landed=landed)
    assert len(started) == 1 and not started[0]._thread.is_alive()  # noqa: SLF001 - the thread it owns
