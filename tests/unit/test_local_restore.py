"""The local runtime records restores: the progress record in its own store becomes
``status.lastRestore``, a ``SnapshotRestored`` event, a line of ``incidents.jsonl`` and a row of
the summary. The workers are faked: no process is started."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from salamander import wire
from salamander.api import Reason, parse_manifest
from salamander_operator.local import LocalRun
from salamander_operator.local import runner as local_runner
from salamander_operator.local.view import RunView
from salamander_operator.observed import ObservedWorker, WorkerPhase


class FakeWorkers:
    """Two workers that are always running and ready."""

    def __init__(self, job: object, spec: object, endpoint: str, log_dir: Path, extra_env: object = None) -> None:
        self.created: list[int] = []
        log_dir.mkdir(parents=True, exist_ok=True)  # as LocalWorkers does

    def create(self, index: int, avoid: object = frozenset()) -> None:
        self.created.append(index)

    def delete(self, index: int) -> None:
        pass

    def kill(self, index: int) -> None:
        pass

    def observe(self) -> list[ObservedWorker]:
        return [ObservedWorker(index=i, phase=WorkerPhase.RUNNING, ready=True) for i in range(2)]

    def shutdown(self, grace_s: float = 0.0) -> None:
        pass


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(local_runner, "LocalWorkers", FakeWorkers)
    job = parse_manifest({"apiVersion": "salamander.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "snap"},
                          "spec": {"replicas": {"min": 2, "max": 2}, "snapshot": {"intervalSteps": 5},
                                   "worker": {"image": "local", "command": ["python", "train.py"]}}})
    out = io.StringIO()
    run = LocalRun(job, tmp_path / "logs", view=RunView("snap", console=Console(file=out, width=200)))
    try:
        yield run, out
    finally:
        run.plane.stop()


def publish(run: LocalRun, **fields: object) -> None:
    progress = wire.Progress(step=30, samples=30, world_size=2, time=time.time(), **fields)  # type: ignore[arg-type]
    run.host._store.set(wire.progress_key(run.ref.uid), progress.encode())


def journal(run: LocalRun) -> list[dict]:
    path = run.log_dir / "incidents.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_restore_reaches_status_events_journal_and_summary(local) -> None:
    run, out = local
    publish(run, restart_count=1, restore_tier="peers", restore_step=25)
    plan = run.step()
    assert [e.message for e in plan.events if e.reason == Reason.SNAPSHOT_RESTORED] == ["restored step 25 from peers"]
    record = run.status.last_restore
    assert record is not None and (record.tier, record.step, record.restart_count) == ("peers", 25, 1)
    assert "SnapshotRestored" in out.getvalue() and "restored step 25 from peers" in out.getvalue()
    (line,) = [r for r in journal(run) if r["type"] == "restore"]
    assert line == {"type": "restore", "tier": "peers", "step": 25, "restart_count": 1,
                    "seen_at": record.at.timestamp()}

    again = run.step()  # the same record read again: nothing new
    assert not [e for e in again.events if e.reason == Reason.SNAPSHOT_RESTORED]
    assert len([r for r in journal(run) if r["type"] == "restore"]) == 1

    run.view.summary(run.status, 1.0, str(run.log_dir))
    assert "step 25 from peers (restart 1)" in out.getvalue()
