"""A job that hangs before its first step (issue 3's start-up gap): rank 0's first process sleeps
before training, so no rank ever steps (rank 1 waits in its first collective). The operator
judges it hung ``startupSeconds`` after the processes started, restarts them in place, and the
restarted processes train to the end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from salamander.api import Phase, parse_manifest
from tests.e2e.test_local_run import REPO, gpt_manifest, local_run

pytestmark = pytest.mark.e2e

STEPS = 30
STARTUP_S = 30

HANG_ONCE = '''
import os, pathlib, runpy, sys, time
marker = pathlib.Path(sys.argv[1])
if os.environ.get("RANK") == "0" and not marker.exists():
    marker.write_text("hung before the first step")
    time.sleep(3600)
sys.argv = [sys.argv[2]] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_a_job_that_hangs_before_its_first_step_is_restarted(tmp_path: Path) -> None:
    script = tmp_path / "hang_once.py"
    script.write_text(HANG_ONCE)
    marker = tmp_path / "hung"
    manifest = gpt_manifest("startup", steps=STEPS, budget=3)
    worker = manifest["spec"]["worker"]
    worker["command"] = ["python", str(script), str(marker), str(REPO / "examples/gpt/train.py")]
    manifest["spec"]["failurePolicy"] = {"hang": {"startupSeconds": STARTUP_S}}
    run, out = local_run(parse_manifest(manifest), tmp_path)
    outcome = run.run(timeout_s=240)
    text = out.getvalue()
    assert marker.exists(), "rank 0's first process never ran"
    status = outcome.status
    assert status.phase is Phase.SUCCEEDED, text
    assert status.step == STEPS
    assert status.failure_counts.get("Hang") == 1, (status.failure_counts, text)
    assert re.search(r"no first step [0-9.]+ s after the processes started \(startupSeconds 30\.0 s\)", text), text
    records = [json.loads(line) for line in (run.log_dir / "incidents.jsonl").read_text().splitlines()]
    hangs = [r for r in records if r["type"] == "incident" and r["kind"] == "Hang" and r["charged"]]
    assert len(hangs) == 1 and hangs[0]["action"] == "RestartProcesses", records
    # judged a start-up timeout after the processes started, not counted from pod creation
    assert STARTUP_S - 1 <= hangs[0]["detected_at"] - hangs[0]["occurred_at"] <= STARTUP_S + 10, hangs[0]
