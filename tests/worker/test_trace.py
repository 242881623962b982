"""Per-rank timelines across real processes, and ``salamander trace``.

Three training processes (gloo over loopback) run a few steps in sections, then one stalls in
``forward`` while the others wait for it in a barrier: a hung collective. Their responder
threads must still answer, and the merged trace must show each rank's open span: where it is
stuck. The command line is tested against the same processes and against fakes for its errors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from salamander import cli, wire
from salamander_operator import trace
from salamander_operator.rendezvous import RendezvousHost
from salamander_worker import sections, timeline
from salamander_worker.store import connect_store

RANK_SCRIPT = Path(__file__).with_name("trace_rank.py")
WORLD, HUNG = 3, 1
pytestmark = pytest.mark.timeout(120)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StalledJob:
    host: RendezvousHost
    run_id: str
    out: Path
    procs: list[subprocess.Popen]


@pytest.fixture(scope="module")
def stalled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StalledJob]:
    """Three ranks of one job, stalled: rank 1 in ``forward``, the others in a barrier."""
    out = tmp_path_factory.mktemp("stalled")
    host = RendezvousHost("127.0.0.1", port=0, bind_host="127.0.0.1")
    run_id = uuid.uuid4().hex
    master = _port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(master), PYTHONUNBUFFERED="1",
                   **{wire.ENV_RDZV_ENDPOINT: host.endpoint, wire.ENV_RUN_ID: run_id})
        procs.append(subprocess.Popen([sys.executable, str(RANK_SCRIPT), "--hang-rank", str(HUNG), "--out", str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 90
        while not all((out / f"stalled-{r}").exists() for r in range(WORLD)):
            for p in procs:
                if p.poll() is not None:
                    pytest.fail(f"a rank exited {p.returncode}:\n{p.communicate()[0][-3000:]}")
            assert time.monotonic() < deadline, "the ranks did not reach their stall"
            time.sleep(0.05)
        yield StalledJob(host, run_id, out, procs)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate(timeout=30)
        host.close()


def _valid_chrome_trace(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert set(data) == {"traceEvents", "displayTimeUnit", "otherData"} and data["displayTimeUnit"] == "ms"
    for event in data["traceEvents"]:
        assert event["ph"] in ("M", "X", "i") and isinstance(event["name"], str)
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int)
        if event["ph"] == "X":
            assert event["dur"] >= 0 and isinstance(event["ts"], (int, float))
    timed = [e["ts"] for e in data["traceEvents"] if e["ph"] != "M"]
    assert timed == sorted(timed)
    return data


def _open_sections(data: dict[str, Any], rank: int) -> list[str]:
    return [e["args"]["section"] for e in data["traceEvents"]
            if e["pid"] == rank and e["ph"] == "X" and e.get("args", {}).get("open")]


def test_every_rank_of_a_hung_collective_answers_with_where_it_is(stalled: StalledJob, tmp_path: Path) -> None:
    request = trace.request_trace(stalled.host, stalled.run_id, limit=50)
    started = time.monotonic()
    result = trace.collect_trace(stalled.host, stalled.run_id, request, WORLD, timeout_s=10)
    assert time.monotonic() - started < 5, "responders poll about once a second"
    assert result.answered == [0, 1, 2] and not result.missing and not result.malformed
    data = _valid_chrome_trace(trace.write_trace(tmp_path / "trace.json", result.trace))

    assert _open_sections(data, HUNG) == ["step", "forward"]
    for rank in set(range(WORLD)) - {HUNG}:
        assert _open_sections(data, rank) == ["step", "allreduce"]
    for rank in range(WORLD):
        names = {e["args"]["name"] for e in data["traceEvents"] if e["pid"] == rank and e["name"] == "process_name"}
        assert names == {f"rank {rank}"}
        finished = [e for e in data["traceEvents"] if e["pid"] == rank and e["ph"] == "X" and not e["args"].get("open")]
        assert {e["name"] for e in finished} == {"data", "forward", "backward", "step"}
        assert sorted({e["args"]["step"] for e in finished if e["name"] == "step"}) == [1, 2, 3]
        marker = [e for e in data["traceEvents"] if e["pid"] == rank and e["name"] == "collected"]
        assert len(marker) == 1 and marker[0]["args"]["step"] == 4
    assert data["otherData"]["answered"] == [0, 1, 2] and data["otherData"]["missing"] == []
    # the answers were taken out of the store
    assert not any(stalled.host.check([wire.trace_rank_key(stalled.run_id, request, r)]) for r in range(WORLD))


def test_salamander_trace_on_a_stalled_run(stalled: StalledJob, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tmp_path, stalled.host.endpoint, stalled.run_id, WORLD)
    assert cli.main(["trace", str(run_dir), "--timeout", "10", "--spans", "5"]) == 0
    out = capsys.readouterr().out
    written = sorted(run_dir.glob("trace-*.json"))
    assert len(written) == 1 and f"wrote {written[0]}: 3/3 ranks answered" in out
    assert f"rank {HUNG} (step 4): in step > forward" in out and "rank 0 (step 4): in step > allreduce" in out
    data = _valid_chrome_trace(written[0])
    for rank in range(WORLD):  # --spans 5: the newest 5 finished spans, and the open ones
        spans = [e for e in data["traceEvents"] if e["pid"] == rank and e["ph"] == "X"]
        assert len(spans) == 5 + 2
        assert data["otherData"]["dropped_spans"][str(rank)] == 4 * 3 + 3 - 5


# --- the command line: errors ---------------------------------------------------------------------

def _run_dir(tmp_path: Path, endpoint: str, run_id: str, world: int | None = None, **extra: Any) -> Path:
    run_dir = tmp_path / "runs" / "job-20260101-000000"
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"endpoint": endpoint, "run_id": run_id, "namespace": "default", "name": "job", **extra}
    if world is not None:
        record["world_size"] = world
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith("salamander:")]
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture()
def host() -> Iterator[RendezvousHost]:
    store = RendezvousHost("127.0.0.1", port=0, bind_host="127.0.0.1")
    yield store
    store.close()


@pytest.mark.parametrize("content, needle", [
    ("{not json", "cannot read"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"endpoint": "127.0.0.1:1", "name": "job"}), "lacks a 'run_id'"),
    (json.dumps({"endpoint": "nowhere", "run_id": "r", "name": "job"}), "HOST:PORT"),
    (json.dumps({"endpoint": "127.0.0.1:1", "run_id": "r", "name": "job", "world_size": 0}), "world_size"),
    (json.dumps({"endpoint": "127.0.0.1:1", "run_id": "r", "name": "job", "world_size": True}), "world_size"),
])
def test_a_malformed_run_json_is_a_usage_error(content: str, needle: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.json").write_text(content)
    assert cli.main(["trace", str(tmp_path)]) == 2
    assert needle in _error(capsys)


@pytest.mark.parametrize("flags, needle", [
    (["--spans", "0"], "--spans must be a whole number from 1 to 100000, got '0'"),
    (["--spans", "2.5"], "--spans"),
    (["--spans", "100001"], "--spans"),
    (["--timeout", "0"], "--timeout must be a number above 0 and at most 600, got '0'"),
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "-1"], "--timeout"),
    (["--timeout", "soon"], "--timeout"),
])
def test_bad_flags_are_usage_errors(flags: list[str], needle: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tmp_path, "127.0.0.1:1", "r", 2)
    assert cli.main(["trace", str(run_dir), *flags]) == 2
    assert needle in _error(capsys)


def test_a_target_that_is_not_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trace", str(tmp_path / "missing")]) == 2
    assert "is neither a run directory of `salamander run` nor a TrainingJob name" in _error(capsys)
    assert cli.main(["trace", str(tmp_path)]) == 2
    assert "has no run.json" in _error(capsys)


def test_a_run_that_has_ended_is_not_reachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tmp_path, f"127.0.0.1:{_port()}", "r", 2)
    started = time.monotonic()
    assert cli.main(["trace", str(run_dir / "run.json")]) == 1
    assert time.monotonic() - started < 3
    assert "run job is not reachable at 127.0.0.1:" in _error(capsys)


def test_no_rank_answering_exits_1(host: RendezvousHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tmp_path, host.endpoint, "r", 2)
    assert cli.main(["trace", str(run_dir), "--timeout", "0.3"]) == 1
    assert "no rank of run job answered within 0.3 s (0/2 ranks answered; no answer from: 0, 1)" in _error(capsys)
    assert not list(run_dir.glob("trace-*.json"))


def test_an_unknown_world_size_exits_1(host: RendezvousHost, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tmp_path, host.endpoint, "r")
    assert cli.main(["trace", str(run_dir), "--timeout", "0.3"]) == 1
    assert "has not reported its world size yet" in _error(capsys)


class _Garbage(threading.Thread):
    """A 'rank' that answers every request with bytes that are not an answer."""

    def __init__(self, store: RendezvousHost, run_id: str, rank: int) -> None:
        super().__init__(daemon=True)
        self.store, self.run_id, self.rank, self.stop = store, run_id, rank, threading.Event()

    def run(self) -> None:
        key = wire.trace_request_key(self.run_id)
        while not self.stop.wait(0.05):
            if self.store.check([key]):
                request = timeline.TraceRequest.decode(self.store.get(key))
                self.store.set(wire.trace_rank_key(self.run_id, request.id, self.rank), b"not zlib")
                return


def test_progress_gives_the_world_and_a_malformed_answer_is_named(host: RendezvousHost, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The world size comes from the leader's progress (3, not run.json's 4): rank 2 answers
    garbage, rank 1 not at all; rank 0's answer is written."""
    run_id = "run-" + uuid.uuid4().hex[:8]
    host.set(wire.progress_key(run_id), wire.Progress(step=7, samples=0, world_size=3, time=time.time()).encode())
    source = sections.Recorder()
    with source.section("data"):
        pass
    good = timeline.Responder(lambda: connect_store(host.endpoint), run_id, 0, source=source)
    stop = threading.Event()
    threads = [threading.Thread(target=good.run, args=(stop,), daemon=True), _Garbage(host, run_id, 2)]
    for t in threads:
        t.start()
    try:
        run_dir = _run_dir(tmp_path, host.endpoint, run_id, 4)
        out = tmp_path / "elsewhere" / "t.json"
        assert cli.main(["trace", str(run_dir), "--timeout", "1.5", "--out", str(out)]) == 0
    finally:
        stop.set()
    printed = capsys.readouterr().out
    assert f"wrote {out}: 1/3 ranks answered; malformed: 2; no answer from: 1" in printed
    assert "rank 2: malformed answer (rank 2's answer is not zlib data" in printed and "rank 1: no answer" in printed
    data = _valid_chrome_trace(out)
    assert data["otherData"]["missing"] == [1] and list(data["otherData"]["malformed"]) == ["2"]


def test_the_local_runtime_leaves_run_json_for_salamander_trace(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from salamander.api import parse_manifest
    from salamander_operator.local import LocalRun
    from tests.unit._support import EXAMPLE

    job = parse_manifest(EXAMPLE.read_text())
    run = LocalRun(job, tmp_path / "run")
    try:
        record = json.loads((tmp_path / "run" / "run.json").read_text())
        assert record == {"endpoint": run.host.endpoint, "run_id": run.ref.uid, "namespace": run.ref.namespace,
                          "name": job.metadata.name,
                          "world_size": job.spec.replicas.max * job.spec.procs_per_node}
        assert cli.main(["trace", str(tmp_path / "run"), "--timeout", "0.2"]) == 1  # no worker started
        assert "no rank of run gpt answered" in _error(capsys)
    finally:
        run.plane.stop()
        run.host.close()
