"""Declaring faults: the ``--fault KIND:key=value,...`` syntax, the CLI, and the workers' environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander import cli, wire
from salamander.api import Fault, FaultKind, InvalidSpec, parse_spec
from salamander.api.faults import PROCESS_FAULT_KINDS, format_fault, parse_fault
from salamander_operator.desired import JobRef, build_worker_pod, fault_env
from tests.unit._support import EXAMPLE, FAST, one_line


@pytest.mark.parametrize(("text", "expected"), [
    ("kill-process:step=30,rank=1", Fault(kind=FaultKind.KILL_PROCESS, at_step=30, rank=1)),
    ("kill-worker:step=60,worker=2", Fault(kind=FaultKind.KILL_WORKER, at_step=60, worker=2)),
    ("hang-rank:step=90,rank=0", Fault(kind=FaultKind.HANG_RANK, at_step=90)),
    ("hang-rank:step=90,rank=3,seconds=2", Fault(kind=FaultKind.HANG_RANK, at_step=90, rank=3, seconds=2.0)),
    ("slow-rank:step=10,rank=1,seconds=0.5,steps=20",
     Fault(kind=FaultKind.SLOW_RANK, at_step=10, rank=1, seconds=0.5, steps=20)),
    ("raise:step=5,rank=0", Fault(kind=FaultKind.RAISE_EXCEPTION, at_step=5)),
    ("raise-exception:step=5", Fault(kind=FaultKind.RAISE_EXCEPTION, at_step=5)),
    ("KillProcess:atStep=7,rank=2", Fault(kind=FaultKind.KILL_PROCESS, at_step=7, rank=2)),
    (" Slow-Rank : step = 3 , seconds = 1e-3 ,", Fault(kind=FaultKind.SLOW_RANK, at_step=3, seconds=0.001)),
    ("kill:rank=+1,step=1", Fault(kind=FaultKind.KILL_PROCESS, at_step=1, rank=1)),
])
def test_parse_good_faults(text: str, expected: Fault) -> None:
    assert parse_fault(text) == expected


@pytest.mark.parametrize(("text", "field", "needle"), [
    ("", "", "needs a kind"),
    (":step=1", "", "needs a kind"),
    ("explode:step=1", "kind", "unknown fault kind 'explode'"),
    ("kill-process", "step", "is required"),
    ("kill-process:rank=1", "step", "is required"),
    ("kill-process:step=0", "step", "greater than or equal to 1"),
    ("kill-process:step=-3", "step", "greater than or equal to 1"),
    ("kill-process:step=ten", "step", "whole number"),
    ("kill-process:step=1.5", "step", "whole number"),
    ("kill-process:step=1,rank=-1", "rank", "greater than or equal to 0"),
    ("kill-process:step=1,step=2", "step", "given twice"),
    ("kill-process:step=1,atStep=2", "step", "given twice"),
    ("kill-process:step=1,color=red", "color", "unknown key"),
    ("kill-process:step=1,rank", "", "'rank' is not key=value"),
    ("kill-process:step=1,=3", "", "is not key=value"),
    ("kill-process:step=1,worker=2", "worker", "does not apply to kill-process"),
    ("kill-worker:step=1,rank=2", "rank", "does not apply to kill-worker"),
    ("kill-worker:step=1,worker=4096", "worker", "less than 4096"),
    ("raise:step=1,seconds=2", "seconds", "does not apply to raise"),
    ("hang-rank:step=1,steps=2", "steps", "does not apply to hang-rank"),
    ("slow-rank:step=1,seconds=fast", "seconds", "number of seconds"),
    ("slow-rank:step=1,seconds=nan", "seconds", "number of seconds"),
    ("slow-rank:step=1,seconds=inf", "seconds", "number of seconds"),
    ("slow-rank:step=1,seconds=-1", "seconds", "greater than or equal to 0"),
    ("slow-rank:step=1,seconds=1e9", "seconds", "less than or equal to 86400"),
    ("kill-process:step=" + "9" * 40, "step", "whole number"),
])
def test_parse_bad_faults_name_the_bad_part(text: str, field: str, needle: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_fault(text)
    assert info.value.field == field
    assert needle in str(info.value)
    assert one_line(str(info.value))


_fault_texts = st.one_of(
    st.text(max_size=60),
    st.builds(lambda kind, items: f"{kind}:{','.join(items)}",
              st.sampled_from(["kill-process", "raise", "kill-worker", "hang-rank", "slow-rank", "KillWorker", "x"]),
              st.lists(st.builds(lambda k, v: f"{k}={v}",
                                 st.sampled_from(["step", "rank", "worker", "seconds", "steps", "atStep", "", "z"]),
                                 st.one_of(st.integers(-5, 10**20).map(str), st.floats().map(str),
                                           st.text(max_size=8))),
                       max_size=6)),
)


@FAST
@given(_fault_texts)
def test_parse_fault_only_ever_raises_invalid_spec(text: str) -> None:
    try:
        fault = parse_fault(text)
    except InvalidSpec as exc:
        assert one_line(str(exc))
    else:
        assert isinstance(fault, Fault)


@FAST
@given(st.builds(lambda **fields: Fault(**fields), kind=st.sampled_from(list(FaultKind)), at_step=st.integers(1, 10**9),
                 rank=st.integers(0, 10**6), worker=st.integers(0, 4095),
                 seconds=st.floats(0.0, 86_400.0), steps=st.integers(0, 10**9)))
def test_format_then_parse_round_trips_the_keys_that_apply(fault: Fault) -> None:
    parsed = parse_fault(format_fault(fault))
    assert parsed.kind == fault.kind and parsed.at_step == fault.at_step
    if fault.kind is FaultKind.KILL_WORKER:
        assert parsed.worker == fault.worker
    else:
        assert parsed.rank == fault.rank
    if fault.kind in (FaultKind.HANG_RANK, FaultKind.SLOW_RANK):
        assert parsed.seconds == fault.seconds
    if fault.kind is FaultKind.SLOW_RANK:
        assert parsed.steps == fault.steps


# --- the CLI -------------------------------------------------------------------------------------

def test_run_appends_the_faults_to_the_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import salamander_operator.local as local

    seen = []

    class Outcome:
        exit_code = 0

    def fake_run(job, runs_dir, timeout_s=None, metrics_port=None):
        seen.append(job)
        return Outcome()

    monkeypatch.setattr(local, "run_manifest", fake_run)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(EXAMPLE.read_text().replace("  worker:\n", "  faults:\n  - {kind: HangRank, atStep: 2}\n"
                                                                  "  worker:\n", 1))
    argv = ["run", str(manifest), "--runs-dir", str(tmp_path / "runs"),
            "--fault", "kill-process:step=30,rank=1", "--fault=kill-worker:step=60,worker=2"]
    assert cli.main(argv) == 0
    (job,) = seen
    assert job.spec.faults == [Fault(kind=FaultKind.HANG_RANK, at_step=2),
                               Fault(kind=FaultKind.KILL_PROCESS, at_step=30, rank=1),
                               Fault(kind=FaultKind.KILL_WORKER, at_step=60, worker=2)]


def test_a_bad_fault_exits_2_with_one_line_before_running(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import salamander_operator.local as local

    monkeypatch.setattr(local, "run_manifest", lambda *a, **k: pytest.fail("ran despite a bad --fault"))
    assert cli.main(["run", str(EXAMPLE), "--fault", "kill-process:step=0"]) == 2
    err = capsys.readouterr().err
    assert one_line(err.rstrip("\n"))
    assert "--fault kill-process:step=0" in err and "step:" in err


def test_validate_accepts_faults_in_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(EXAMPLE.read_text().replace(
        "  worker:\n", "  faults:\n  - {kind: KillProcess, atStep: 30, rank: 1}\n"
                       "  - {kind: SlowRank, atStep: 10, seconds: 0.5, steps: 20}\n  worker:\n", 1))
    assert cli.main(["validate", str(manifest)]) == 0
    assert "is valid" in capsys.readouterr().out


# --- the workers' environment --------------------------------------------------------------------

JOB = JobRef(name="llm", namespace="team-a", uid="uid-1")
WORKER = {"image": "img:1", "command": ["python", "train.py"]}


def test_fault_env_is_empty_without_process_faults() -> None:
    assert fault_env(parse_spec({"worker": WORKER})) == {}
    assert fault_env(parse_spec({"worker": WORKER, "faults": [{"kind": "KillWorker", "atStep": 3}]})) == {}


def test_fault_env_keeps_the_spec_indices() -> None:
    faults = [{"kind": "KillWorker", "atStep": 3, "worker": 1}, {"kind": "SlowRank", "atStep": 2, "seconds": 0.5}]
    spec = parse_spec({"worker": WORKER, "faults": faults})
    env = fault_env(spec)
    decoded = [Fault.model_validate(f) for f in json.loads(env[wire.ENV_FAULTS])]
    assert decoded == spec.faults  # index i is fault_key(run_id, i) wherever it is executed
    assert any(f.kind in PROCESS_FAULT_KINDS for f in decoded)
    assert "atStep" in env[wire.ENV_FAULTS]


def test_the_worker_pod_carries_the_faults() -> None:
    spec = parse_spec({"worker": WORKER, "faults": [{"kind": "RaiseException", "atStep": 5}]})
    pod = build_worker_pod(JOB, spec, 0, "op:29400")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env[wire.ENV_FAULTS] == fault_env(spec)[wire.ENV_FAULTS]
    plain = build_worker_pod(JOB, parse_spec({"worker": WORKER}), 0, "op:29400")
    assert wire.ENV_FAULTS not in {e["name"] for e in plain["spec"]["containers"][0]["env"]}
