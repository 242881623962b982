"""The failure rehearsal of issue 3, in one run on the local runtime: a 3-worker job survives a
killed process (restarted in place), a killed worker (the job shrinks, then grows back) and a
hung rank (detected from its own step times, not from a collective timeout), and finishes with
the loss continuing from its checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from salamander.api import Phase, Reason, parse_manifest
from salamander_operator.local.workers import loopback_address
from tests.e2e.test_local_run import gpt_manifest, local_run

pytestmark = pytest.mark.e2e

STEPS = 200


def rehearsal(tmp_path: Path) -> dict:
    manifest = gpt_manifest("rehearse", steps=STEPS, replicas=(2, 3), budget=10)
    manifest["spec"].update({
        "checkpoint": {"directory": str(tmp_path / "checkpoints"), "intervalSteps": 5},
        "failurePolicy": {"hang": {"floorSeconds": 4}},
        "faults": [
            {"kind": "KillProcess", "atStep": 15, "rank": 1},
            {"kind": "HangRank", "atStep": 30, "rank": 0},
            {"kind": "KillWorker", "atStep": 45, "worker": 2},
        ],
    })
    return manifest


def resumed_losses(log: str) -> list[tuple[int, float, float]]:
    """(resumed step, the last loss logged before, the first loss logged after) per resume."""
    out = []
    last: float | None = None
    lines = log.splitlines()
    for n, line in enumerate(lines):
        if (m := re.search(r"step \d+/\d+ loss ([0-9.]+)", line)) is not None:
            last = float(m.group(1))
        elif (r := re.search(r"resumed from step (\d+)", line)) is not None and last is not None:
            after = next((float(m2.group(1)) for later in lines[n + 1:]
                          if (m2 := re.search(r"step \d+/\d+ loss ([0-9.]+)", later))), None)
            if after is not None:
                out.append((int(r.group(1)), last, after))
    return out


def test_a_three_worker_job_survives_a_killed_process_a_killed_worker_and_a_hang(tmp_path: Path) -> None:
    run, out = local_run(parse_manifest(rehearsal(tmp_path)), tmp_path)
    run.poll_s = 0.5
    first_pid = {}

    original_step = run.step

    def step():  # remember each worker's first agent, to tell a restart in place from a replacement
        plan = original_step()
        for index, proc in run.workers._procs.items():
            first_pid.setdefault(index, proc.popen.pid)
        return plan
    run.step = step  # type: ignore[method-assign]
    pids_at_end: dict[int, int] = {}
    original_shutdown = run.workers.shutdown

    def shutdown(grace_s: float = 10.0) -> None:
        pids_at_end.update({i: p.popen.pid for i, p in run.workers._procs.items()})
        original_shutdown(grace_s)
    run.workers.shutdown = shutdown  # type: ignore[method-assign]

    outcome = run.run(timeout_s=240)
    text = out.getvalue()
    status = outcome.status
    assert status.phase is Phase.SUCCEEDED, text
    assert status.step == STEPS

    # Each failure was detected by its channel, classified, and healed by its action.
    # (A peer's broken connection while the group re-forms can also show up as a cheap SEV3 retry.)
    assert status.failure_counts.get("Killed") == 1, status.failure_counts
    assert status.failure_counts.get("NodeLost") == 1, status.failure_counts
    assert status.failure_counts.get("Hang") == 1, status.failure_counts
    assert set(status.failure_counts) <= {"Killed", "NodeLost", "Hang", "ConnectionError"}, status.failure_counts
    assert status.restarts == 3 + status.failure_counts.get("ConnectionError", 0), text

    # The killed process was restarted in place: worker 1's agent (its "pod") is the one it started with.
    assert pids_at_end[1] == first_pid[1]
    # The killed worker was replaced on another node, and its own node quarantined.
    assert pids_at_end[2] != first_pid[2]
    assert [q.node for q in status.quarantined_nodes] == [loopback_address(2)]

    for reason in (Reason.PROCESSES_RESTARTED, Reason.WORKER_REPLACED, Reason.NODE_QUARANTINED,
                   Reason.SHRUNK, Reason.GREW, Reason.FAULT_INJECTED):
        assert f"{reason.value}:" in text, (reason, text)
    assert re.search(r"Hang \(SEV2, Hang\) in the job: no progress for [0-9.]+ s \(threshold 4\.0 s\)", text), text

    # Every incident is journaled with its latency; every fault fired once.
    records = [json.loads(line) for line in (run.log_dir / "incidents.jsonl").read_text().splitlines()]
    faults = [r for r in records if r["type"] == "fault"]
    assert sorted(r["kind"] for r in faults) == ["HangRank", "KillProcess", "KillWorker"]
    incidents = {r["kind"]: r for r in records
                 if r["type"] == "incident" and r["charged"] and r["kind"] != "ConnectionError"}
    assert set(incidents) == {"Killed", "NodeLost", "Hang"}
    assert incidents["Killed"]["action"] == "RestartProcesses"
    assert incidents["NodeLost"]["action"] == "ReplaceNode"
    assert incidents["Hang"]["action"] == "RestartProcesses"
    for record in incidents.values():
        assert record["occurred_at"] is not None and record["detected_at"] >= record["occurred_at"] - 1.0

    # The loss continued from the checkpoints rather than starting over.
    resumes = resumed_losses((run.log_dir / "worker-0.log").read_text())
    assert len(resumes) >= 2, resumes
    for step, before, after in resumes:
        assert step > 0 and after < before + 0.3, resumes
    assert status.loss is not None and outcome.first_loss is not None and status.loss < 0.75 * outcome.first_loss
