"""The parity exchange's schedule and the copy-progress tracker it waits on (pure, one process)."""

from __future__ import annotations

import threading

import pytest

from salamander_worker.snapshot import erasure
from salamander_worker.snapshot.exchange import ExchangeError, Landing, encode_schedule, needed


@pytest.mark.parametrize(("k", "m", "block_len", "window"),
                         [(4, 1, 1000, 64), (4, 2, 4096, 1024), (2, 1, 63, 64), (5, 2, 200_000, 65_536),
                          (8, 1, 129, 100)])
def test_the_schedule_covers_every_byte_of_every_parity_row_once(k: int, m: int, block_len: int, window: int) -> None:
    covered: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for w in encode_schedule(k, m, block_len, window):
        assert 0 <= w.start < w.end <= block_len
        assert w.end - w.start <= window
        assert w.start % 64 == 0 and (w.end % 64 == 0 or w.end == block_len)
        covered.setdefault((w.stripe, w.row), []).append((w.start, w.end))
    assert set(covered) == {(s, r) for s in range(k) for r in range(m)}
    for spans in covered.values():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == block_len
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize(("k", "m"), [(4, 1), (4, 2), (6, 2), (3, 1)])
def test_a_copy_landed_up_to_a_point_can_do_every_window_before_the_first_that_needs_more(k: int, m: int) -> None:
    """Each window is ready once every member's copy has passed the window's end in the
    stripe's highest data block; that point never goes down along the schedule, and no member
    needs more than it. So members that copy at the same pace never wait on each other."""
    block_len = 4096
    roles = erasure.roles(k, m)
    ready = []
    for w in encode_schedule(k, m, block_len, 1024):
        point = max(needed(roles[w.stripe][j], w, block_len) for j in range(k))
        last = max(role.block for role in roles[w.stripe] if role.kind == "data")
        assert point == last * block_len + w.end
        ready.append(point)
    assert ready == sorted(ready)


def test_windows_of_blocks_the_copy_lands_together_alternate_between_their_stripes() -> None:
    """k=4, m=1: stripes 2 and 3 both end in block 2, so their windows interleave, and only the
    last window or two of the exchange trail the copy's end."""
    schedule = encode_schedule(4, 1, 4096, 1024)
    tail = [(w.stripe, w.start) for w in schedule[-8:]]
    assert tail == [(2, 0), (3, 0), (2, 1024), (3, 1024), (2, 2048), (3, 2048), (2, 3072), (3, 3072)]


def test_bad_schedules_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(ExchangeError, match="window"):
        encode_schedule(4, 1, 4096, 32)
    with pytest.raises(erasure.ErasureError, match="m"):
        encode_schedule(4, 3, 4096, 1024)


def test_a_reader_waits_until_the_bytes_it_needs_have_landed() -> None:
    landing = Landing(1000)
    woke = threading.Event()

    def reader() -> None:
        landing.wait_for(600)
        woke.set()

    thread = threading.Thread(target=reader)
    thread.start()
    landing.advance(300)
    assert not woke.wait(0.05)
    landing.advance(700)
    assert woke.wait(5)
    landing.advance(500)   # never goes back
    assert landing.reached == 700
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(landing.checksum()))
    waiter.start()
    landing.finish(0xBEEF)
    waiter.join(timeout=5)
    thread.join(timeout=5)
    assert got == [0xBEEF] and landing.reached == 1000
    landing.wait_for(5000)   # past the payload: capped at its length


def test_a_failed_copy_releases_its_readers_with_an_error() -> None:
    landing = Landing(1000)
    errors: list[str] = []

    def reader() -> None:
        try:
            landing.wait_for(900)
        except ExchangeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    landing.advance(400)
    landing.fail("OSError: no space")
    thread.join(timeout=5)
    assert errors and "byte 400" in errors[0] and "no space" in errors[0]
    landing.wait_for(300)   # bytes that did land stay readable
    with pytest.raises(ExchangeError, match="failed"):
        landing.checksum()


def test_a_landing_made_landed_needs_no_waiting() -> None:
    landing = Landing.landed(100, 7)
    landing.wait_for(100)
    assert landing.checksum() == 7 and landing.reached == 100


def test_the_exchange_thread_runs_calls_in_order_and_never_holds_up_exit() -> None:
    from salamander_worker.snapshot.snapshotter import _Worker

    worker = _Worker("test-exchange")
    assert worker._thread.daemon   # a stuck exchange must not keep a dying process alive
    done: list[int] = []
    first = worker.submit(done.append, 1)
    failing = worker.submit(lambda: 1 / 0)
    last = worker.submit(lambda x: done.append(x) or x, 3)
    assert last.result(timeout=5) == 3 and first.result() is None and done == [1, 3]
    with pytest.raises(ZeroDivisionError):
        failing.result()
    worker.stop()
    worker._thread.join(timeout=5)
    assert not worker._thread.is_alive()
