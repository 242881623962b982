"""The agent's failure evidence: the exception from torch elastic's error file, the log tail, the
root cause among several failed ranks."""

from __future__ import annotations

import json
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from salamander_worker.elastic_agent import exception_of, root_cause, tail


def failure(tmp_path: Path, name: str, data: object | None, exitcode: int = 1, pid: int = 1) -> ProcessFailure:
    path = tmp_path / f"{name}.json"
    if data is not None:
        path.write_text(json.dumps(data))
    return ProcessFailure(local_rank=0, pid=pid, exitcode=exitcode, error_file=str(path))


def test_the_exception_comes_from_the_error_file(tmp_path: Path) -> None:
    recorded = {"message": {"message": "ValueError: bad batch 7",
                            "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "1"}}}
    assert exception_of(failure(tmp_path, "a", recorded)) == ("ValueError", "bad batch 7", "Traceback ...")
    assert exception_of(failure(tmp_path, "b", {"message": "RuntimeError: x"})) == ("RuntimeError", "x", "")
    assert exception_of(failure(tmp_path, "c", {"message": "no type here"})) == ("Exception", "no type here", "")


def test_a_signal_or_a_missing_error_file_is_no_exception(tmp_path: Path) -> None:
    assert exception_of(failure(tmp_path, "d", None, exitcode=-9)) is None
    assert exception_of(failure(tmp_path, "e", {"message": "<NONE>"})) is None


def test_the_tail_is_bounded_and_tolerates_bad_bytes_and_missing_files(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    log.write_bytes(b"\n".join(f"line {n}".encode() for n in range(500)) + b"\n\xff\xfe bad\n")
    lines = tail(log, lines=3)
    assert lines[:2] == ["line 498", "line 499"] and lines[2].endswith(" bad")
    assert tail(tmp_path / "missing.log") == [] and tail(None) == []


def test_the_root_cause_is_the_earliest_failure(tmp_path: Path) -> None:
    early, late = failure(tmp_path, "f", None, pid=1), failure(tmp_path, "g", None, pid=2)
    early.timestamp, late.timestamp = 100, 105
    assert root_cause({3: late, 7: early}) == (7, early)
