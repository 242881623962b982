"""The bulk thread pool: results in order, errors propagate once everything is done, nesting
runs inline (no deadlock), and a forked child gets a pool of its own."""

from __future__ import annotations

import os
import threading
from unittest import mock

import pytest
from salamander_worker.snapshot import pool


@pytest.fixture(autouse=True)
def four_threads():
    with mock.patch.object(pool, "threads", lambda: 4):
        yield


def test_results_come_back_in_order() -> None:
    assert pool.run(lambda x: x * x, range(50)) == [x * x for x in range(50)]
    assert pool.run(lambda x: x, []) == []


def test_the_first_error_propagates_after_every_item_ran() -> None:
    ran: list[int] = []
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            ran.append(x)
        if x in (3, 7):
            raise ValueError(f"bad {x}")
        return x

    with pytest.raises(ValueError, match="bad"):
        pool.run(work, range(10))
    assert sorted(ran) == list(range(10))


def test_work_submitted_from_a_pool_thread_runs_inline() -> None:
    assert pool.run(lambda x: sum(pool.run(lambda y: y, range(x))), range(20)) == [sum(range(x)) for x in range(20)]


def test_a_forked_child_gets_its_own_pool() -> None:
    assert pool.run(lambda x: x + 1, [1, 2]) == [2, 3]
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool threads do not exist here
        ok = False
        try:
            ok = pool.run(lambda x: x + 1, [1, 2, 3]) == [2, 3, 4]
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_one_thread_runs_inline() -> None:
    with mock.patch.object(pool, "threads", lambda: 1):
        assert pool.run(lambda _: threading.current_thread().name, range(3)) == [threading.current_thread().name] * 3
