"""Fault injection inside training processes: real processes that call ``report()`` every step,
with the job's rendezvous store on loopback; plus the injector's bookkeeping with a fake store.

The time checks here are lower bounds a sleep guarantees, never upper bounds on speed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from salamander import wire
from salamander.api import Fault, FaultKind
from salamander_worker import faults as faults_mod
from salamander_worker.faults import FaultInjector, InjectedFault, load_faults, parse_faults

RUN_ID = "run-faults"
TRAIN = textwrap.dedent("""
    import sys, time
    import salamander_worker as sw

    sw.init_distributed()
    for step in range(1, int(sys.argv[1]) + 1):
        sw.report(step)
        print(f"step {step}", flush=True)
    print(f"done {time.time()!r}", flush=True)
""")


@pytest.fixture
def store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=30))


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(TRAIN)
    return path


def _env(store: dist.TCPStore | None, faults: list[dict] | str, rank: int = 0, run_id: str = RUN_ID,
         **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SALAMANDER_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({wire.ENV_RUN_ID: run_id, "RANK": str(rank), "WORLD_SIZE": "4", "PYTHONUNBUFFERED": "1",
                wire.ENV_FAULTS: faults if isinstance(faults, str) else json.dumps(faults)})
    if store is not None:
        env[wire.ENV_RDZV_ENDPOINT] = f"127.0.0.1:{store.port}"
    env.update(extra)
    return env


def _run(script: Path, env: dict[str, str], steps: int = 5) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), str(steps)], env=env, capture_output=True, text=True,
                          timeout=60)


def _steps(out: str) -> list[int]:
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("step ")]


def _fired_at(store: dist.TCPStore, index: int) -> float:
    return float(store.get(wire.fault_fired_key(RUN_ID, index)).decode())


def test_kill_process_fires_at_its_step_on_its_rank_once_per_run(store: dist.TCPStore, script: Path) -> None:
    faults = [{"kind": "KillWorker", "atStep": 1, "worker": 0},  # not a process fault: skipped here
              {"kind": "KillProcess", "atStep": 3, "rank": 1}]

    other_rank = _run(script, _env(store, faults, rank=0))
    assert other_rank.returncode == 0, other_rank.stderr
    assert not store.check([wire.fault_key(RUN_ID, 0)]) and not store.check([wire.fault_key(RUN_ID, 1)])

    before = time.time()
    killed = _run(script, _env(store, faults, rank=1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _steps(killed.stdout) == [1, 2]  # killed inside report(3)
    assert "injecting fault KillProcess at step 3 on rank 1" in killed.stderr
    assert before <= _fired_at(store, 1) <= time.time()
    assert not store.check([wire.fault_key(RUN_ID, 0)])  # KillWorker is for whoever runs the workers

    restarted = _run(script, _env(store, faults, rank=1))  # replays step 3: the claim is taken
    assert restarted.returncode == 0, restarted.stderr
    assert _steps(restarted.stdout) == [1, 2, 3, 4, 5]
    assert "injecting" not in restarted.stderr


def test_raise_exception_propagates_and_reaches_the_error_file(store: dist.TCPStore, script: Path,
                                                               tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    done = _run(script, _env(store, [{"kind": "RaiseException", "atStep": 2}],
                             TORCHELASTIC_ERROR_FILE=str(error_file)))
    assert done.returncode == 1
    assert _steps(done.stdout) == [1]
    message = "injected fault RaiseException (faults[0]) at step 2 on rank 0"
    assert f"salamander_worker.faults.InjectedFault: {message}" in done.stderr  # the traceback still prints
    record = json.loads(error_file.read_text())["message"]
    assert record["message"] == f"InjectedFault: {message}"
    assert "train.py" in record["extraInfo"]["py_callstack"]
    assert store.check([wire.fault_fired_key(RUN_ID, 0)])


def test_a_new_run_id_fires_again(store: dist.TCPStore, script: Path) -> None:
    faults = [{"kind": "RaiseException", "atStep": 1}]
    assert _run(script, _env(store, faults, run_id="first")).returncode == 1
    assert _run(script, _env(store, faults, run_id="first")).returncode == 0
    assert _run(script, _env(store, faults, run_id="second")).returncode == 1


@pytest.mark.parametrize("value", ["{not json", '{"kind": "KillProcess"}', '[{"kind": "KillProcess"}]',
                                   '[{"kind": "Explode", "atStep": 1}]'])
def test_a_malformed_value_warns_once_and_injects_nothing(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="salamander_worker.faults"):
        assert load_faults({wire.ENV_FAULTS: value}) == []
    (warning,) = caplog.records
    assert f"ignoring ${wire.ENV_FAULTS}" in warning.getMessage()


def test_a_malformed_value_does_not_stop_training(store: dist.TCPStore, script: Path) -> None:
    done = _run(script, _env(store, '[{"kind": "KillProcess", "atStep": "soon"}]'))
    assert done.returncode == 0, done.stderr
    assert _steps(done.stdout) == [1, 2, 3, 4, 5]
    assert f"ignoring ${wire.ENV_FAULTS}" in done.stderr and "faults[0].atStep" in done.stderr
    assert done.stderr.count("ignoring") == 1


def test_a_hang_with_seconds_returns_late(store: dist.TCPStore, script: Path) -> None:
    done = _run(script, _env(store, [{"kind": "HangRank", "atStep": 2, "seconds": 1.0}]))
    assert done.returncode == 0, done.stderr
    assert _steps(done.stdout) == [1, 2, 3, 4, 5]
    finished = float(done.stdout.splitlines()[-1].split()[1])
    assert finished - _fired_at(store, 0) >= 0.9  # it slept its second before going on


def test_a_hang_without_end_keeps_the_process_alive(store: dist.TCPStore, script: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(script), "5"], env=_env(store, [{"kind": "HangRank", "atStep": 2}]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store.wait([wire.fault_fired_key(RUN_ID, 0)], datetime.timedelta(seconds=30))
        time.sleep(0.5)
        assert proc.poll() is None  # alive, making no progress
    finally:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
    assert _steps(out) == [1]


def test_standalone_fires_once_per_process(script: Path) -> None:
    done = _run(script, _env(None, [{"kind": "RaiseException", "atStep": 4}]))
    assert done.returncode == 1
    assert _steps(done.stdout) == [1, 2, 3]


# --- the injector's bookkeeping, in process --------------------------------------------------------

class FakeStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def add(self, key: str, n: int) -> int:
        value = int(self.data.get(key, b"0")) + n
        self.data[key] = str(value).encode()
        return value

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode() if isinstance(value, str) else value


def _injector(faults: list[Fault], rank: int = 0, store: object | None = "fake", **kw):
    sleeps: list[float] = []
    fake = FakeStore() if store == "fake" else store
    connect = None if store is None else (lambda: fake)
    injector = FaultInjector(faults, rank=rank, run_id=RUN_ID, connect=connect, sleep=sleeps.append, **kw)
    return injector, sleeps, fake


def test_a_slow_rank_sleeps_on_its_steps_only() -> None:
    injector, sleeps, fake = _injector([Fault(kind=FaultKind.SLOW_RANK, at_step=3, seconds=0.5, steps=2)])
    for step in range(1, 10):
        injector.on_step(step)
    assert sleeps == [0.5, 0.5]  # steps 3 and 4
    assert fake.data[wire.fault_key(RUN_ID, 0)] == b"1"
    assert injector.idle

    again, sleeps, _ = _injector([Fault(kind=FaultKind.SLOW_RANK, at_step=3, seconds=0.5, steps=2)], store=fake)
    for step in range(1, 10):
        again.on_step(step)
    assert sleeps == []  # claimed once: a restarted process starts no second slow period


def test_a_slow_rank_without_steps_lasts_to_the_end() -> None:
    injector, sleeps, _ = _injector([Fault(kind=FaultKind.SLOW_RANK, at_step=2, seconds=0.25)])
    for step in range(1, 101):
        injector.on_step(step)
    assert sleeps == [0.25] * 99
    assert not injector.idle


def test_a_fault_for_another_rank_is_ignored_and_nothing_is_cheap() -> None:
    injector, sleeps, fake = _injector([Fault(kind=FaultKind.RAISE_EXCEPTION, at_step=1, rank=2),
                                        Fault(kind=FaultKind.KILL_WORKER, at_step=1)], rank=0)
    assert injector.idle
    for step in range(1, 5):
        injector.on_step(step)
    assert fake.data == {} and sleeps == []


def test_standalone_raises_once_per_process() -> None:
    injector, _, _ = _injector([Fault(kind=FaultKind.RAISE_EXCEPTION, at_step=2)], store=None)
    injector.on_step(1)
    with pytest.raises(InjectedFault, match=r"faults\[0\] at step 2 on rank 0|\(faults\[0\]\) at step 2"):
        injector.on_step(2)
    injector.on_step(3)  # no second time


def test_a_late_first_step_fires_what_is_past_due() -> None:
    injector, sleeps, fake = _injector([Fault(kind=FaultKind.HANG_RANK, at_step=5, seconds=2.0)])
    injector.on_step(40)  # resumed from a checkpoint past the fault's step
    assert sleeps == [2.0]
    assert float(fake.data[wire.fault_fired_key(RUN_ID, 0)]) > 0


def test_an_unreachable_store_injects_nothing(caplog: pytest.LogCaptureFixture) -> None:
    injector = FaultInjector([Fault(kind=FaultKind.RAISE_EXCEPTION, at_step=1)], rank=0, run_id=RUN_ID,
                             connect=lambda: None)
    with caplog.at_level(logging.WARNING, logger="salamander_worker.faults"):
        injector.on_step(1)
        injector.on_step(2)
    assert [r.getMessage() for r in caplog.records] == [
        "fault 0 (RaiseException) not injected: the rendezvous store is unreachable, so it cannot be claimed "
        "once for the run"]


def test_parse_faults_accepts_the_spec_form() -> None:
    faults = parse_faults('[{"kind": "SlowRank", "atStep": 10, "rank": 1, "seconds": 0.5, "steps": 20}]')
    assert faults == [Fault(kind=FaultKind.SLOW_RANK, at_step=10, rank=1, seconds=0.5, steps=20)]
    assert parse_faults(None) == [] and parse_faults("") == []


def test_report_without_faults_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from salamander_worker import progress

    monkeypatch.delenv(wire.ENV_FAULTS, raising=False)
    monkeypatch.delenv(wire.ENV_RDZV_ENDPOINT, raising=False)
    monkeypatch.setattr(faults_mod, "_injector", None)
    monkeypatch.setattr(progress, "_channel", progress._Channel())
    calls = []
    real = faults_mod.load_faults
    monkeypatch.setattr(faults_mod, "load_faults", lambda *a: calls.append(1) or real(*a))
    for step in range(1, 50):
        progress.report(step)
    assert calls == [1]
    assert faults_mod._injector is not None and faults_mod._injector.idle


def test_losing_this_worker_kills_its_training_processes_and_the_agent(tmp_path: Path) -> None:
    """What an agent does on the operator's KillWorker command: its whole process group (the
    training processes are in it) is killed at once, itself included, with no cleanup."""
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        from salamander_worker.faults import lose_this_worker
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        lose_this_worker("fault 1: a test")
        time.sleep(60)
    """)
    agent = subprocess.run([sys.executable, "-c", code], start_new_session=True, capture_output=True, text=True,
                           timeout=60, env=dict(os.environ))
    assert agent.returncode == -signal.SIGKILL, agent.stderr
    assert "killing this worker" in agent.stderr and "fault 1: a test" in agent.stderr
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break   # killed, not yet reaped by init
        time.sleep(0.05)
    else:
        raise AssertionError(f"the training process {child} outlived its worker")


def test_the_agents_heartbeat_loses_the_worker_on_a_kill_command() -> None:
    from salamander.controlplane import AgentIdentity
    from salamander.controlplane.v1 import controlplane_pb2 as pb
    from salamander_worker.heartbeat import Heartbeat

    beat = Heartbeat("127.0.0.1:1", "t", AgentIdentity("ns", "job", "job-worker-1", "node", 0, 1), lambda: None)
    lost: list[str] = []
    beat.on_kill = lost.append
    beat._on_command(pb.Command(seq=1, restart=pb.RestartProcesses(reason="hang")))
    assert beat.restart_requested.is_set() and lost == []
    beat._on_command(pb.Command(seq=2, kill=pb.KillWorker(reason="fault 2: KillWorker")))
    assert lost == ["fault 2: KillWorker"]
