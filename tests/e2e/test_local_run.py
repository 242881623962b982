"""The local runtime end to end: real agents, real gloo process groups, the GPT example."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from salamander.api import Phase, TrainingJob, parse_manifest
from salamander_operator.local import LocalRun
from salamander_operator.local.view import RunView

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def gpt_manifest(name: str, steps: int, replicas: tuple[int, int] = (2, 2), budget: int = 3) -> dict:
    return {
        "apiVersion": "salamander.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {
            "replicas": {"min": replicas[0], "max": replicas[1]}, "procsPerNode": 1, "restartBudget": budget,
            "worker": {"image": "local", "command": ["python", "examples/gpt/train.py"],
                       "args": ["--steps", str(steps), "--log-every", "10"], "workingDir": str(REPO)},
        },
    }


def local_run(job: TrainingJob, tmp_path: Path) -> tuple[LocalRun, io.StringIO]:
    out = io.StringIO()
    view = RunView(job.metadata.name, console=Console(file=out, width=200), line_every_s=1.0)
    return LocalRun(job, tmp_path / "logs", view=view, poll_s=0.2), out


def test_two_workers_train_and_the_loss_falls(tmp_path: Path) -> None:
    run, out = local_run(parse_manifest(gpt_manifest("learn", steps=120)), tmp_path)
    outcome = run.run(timeout_s=300)
    assert outcome.status.phase is Phase.SUCCEEDED, out.getvalue()
    assert outcome.exit_code == 0
    assert outcome.status.step == 120
    assert outcome.status.world_size == 2
    assert outcome.first_loss is not None and outcome.status.loss is not None
    assert outcome.status.loss < 0.75 * outcome.first_loss, (outcome.first_loss, outcome.status.loss)
    assert "Succeeded" in out.getvalue() and "samples/s" in out.getvalue()
    assert outcome.status.completion_time is not None and outcome.status.start_time is not None


def test_losing_worker_zero_is_survived(tmp_path: Path) -> None:
    """Worker 0 is where Kubeflow hosts the rendezvous; here losing it is just one more failure:
    the operator-hosted store keeps membership, the replacement joins, training completes."""
    run, out = local_run(parse_manifest(gpt_manifest("survive", steps=80)), tmp_path)
    killed_at = None
    deadline = time.monotonic() + 300
    try:
        while not run.finished() and time.monotonic() < deadline:
            run.step()
            if killed_at is None and run.status.step >= 15:
                killed_at = run.status.step
                run.workers.kill(0)
            time.sleep(0.2)
    finally:
        run.workers.shutdown()
    log = out.getvalue()
    assert killed_at is not None, log
    assert run.status.phase is Phase.SUCCEEDED, log
    assert run.status.restarts == 1
    assert run.status.step == 80
    assert "FailureDetected" in log and "worker 0 (" in log
    failure = run.status.last_failure
    assert failure is not None and failure.worker == 0 and failure.recovered_at is not None


def test_restart_budget_zero_fails_on_first_loss(tmp_path: Path) -> None:
    run, out = local_run(parse_manifest(gpt_manifest("fragile", steps=400, budget=0)), tmp_path)
    deadline = time.monotonic() + 300
    try:
        while not run.finished() and time.monotonic() < deadline:
            run.step()
            if run.status.step >= 5 and run.status.phase is Phase.RUNNING:
                run.workers.kill(1)
            time.sleep(0.2)
    finally:
        run.workers.shutdown()
    assert run.status.phase is Phase.FAILED, out.getvalue()
    failed = run.status.condition("Failed")
    assert failed is not None and failed.reason == "RestartBudgetExhausted"
    assert run.workers.observe() == [] or all(w.phase.value in ("Succeeded", "Failed")
                                              for w in run.workers.observe())


def test_salamander_run_command(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(gpt_manifest("cli", steps=30)))
    proc = subprocess.run([sys.executable, "-m", "salamander.cli", "run", str(manifest), "--runs-dir",
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Succeeded" in proc.stderr and "loss" in proc.stderr
    assert list((tmp_path / "runs").glob("cli-*/worker-0.log"))


def test_ctrl_c_stops_training_at_a_step_and_leaves_no_process(tmp_path: Path) -> None:
    import signal

    import psutil

    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(gpt_manifest("stop", steps=100_000)))
    proc = subprocess.Popen([sys.executable, "-m", "salamander.cli", "run", str(manifest), "--runs-dir",
                             str(tmp_path / "runs")], stderr=subprocess.PIPE, text=True, cwd=REPO)
    me = psutil.Process(proc.pid)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait until training is under way
            if "Running | step" in line and "step 0 " not in line:
                break
        descendants = me.children(recursive=True)
        assert descendants
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest[-2000:]
    assert "stopping at the next step" in rest
    assert not [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    logs = "".join(p.read_text() for p in (tmp_path / "runs").glob("stop-*/worker-0.log"))
    assert "final loss" in logs  # the script saw should_stop() and ended its loop cleanly
