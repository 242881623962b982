"""Issue 4 end to end on the local runtime: a 3-worker GPT job with in-memory snapshots (every 5
steps, groups of 3, XOR parity) and no checkpoint directory at all. A killed training process
resumes from its node's memory; a killed worker (agent, processes and shared memory gone) is
survived from the others' memory. Each time at most one snapshot interval of work is lost, and
the restores are in the run's journal and status."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from salamander.api import Phase, parse_manifest
from tests.e2e.test_local_run import gpt_manifest, local_run

pytestmark = pytest.mark.e2e

INTERVAL = 5
KILL_PROCESS_AT = 17
KILL_WORKER_AT = 38


def test_restarts_resume_from_memory_snapshots_losing_at_most_one_interval(tmp_path: Path) -> None:
    # Long enough that the replacement worker joins before the end (it starts ~15 s after the loss).
    manifest = gpt_manifest("snapshots", steps=300, replicas=(2, 3), budget=10)
    manifest["spec"].update({
        "snapshot": {"intervalSteps": INTERVAL, "groupSize": 3, "parity": 1},
        "faults": [
            {"kind": "KillProcess", "atStep": KILL_PROCESS_AT, "rank": 1},
            {"kind": "KillWorker", "atStep": KILL_WORKER_AT, "worker": 2},
        ],
    })
    run, out = local_run(parse_manifest(manifest), tmp_path)
    outcome = run.run(timeout_s=600)
    log = out.getvalue()
    assert outcome.status.phase is Phase.SUCCEEDED, log[-5000:]

    journal = [json.loads(line) for line in (run.log_dir / "incidents.jsonl").read_text().splitlines()]
    restores = [r for r in journal if r["type"] == "restore" and r["tier"] != "none"]
    assert restores, journal
    # The first restore after each fault resumes no more than one interval before the fault's
    # step (the kill itself lands at that step or a little later, never earlier).
    fired = {r["at_step"]: r["fired_at"] for r in journal if r["type"] == "fault"}
    for fault_step in (KILL_PROCESS_AT, KILL_WORKER_AT):
        after = [r for r in restores if r["seen_at"] >= fired[fault_step]]
        assert after and after[0]["step"] >= fault_step - INTERVAL, (fault_step, restores)
    assert {r["tier"] for r in restores} <= {"memory", "peers"}   # never disk, never from scratch
    # No resume ever went back to step 0.
    worker_logs = "".join(path.read_text() for path in sorted(run.log_dir.glob("worker-*.log")))
    resumed = [int(m) for m in re.findall(r"resumed from step (\d+) \(snapshot", worker_logs)]
    assert resumed and min(resumed) >= KILL_PROCESS_AT - INTERVAL, resumed
    assert outcome.status.last_restore is not None and outcome.status.last_restore.tier in ("memory", "peers")
