"""The ``salamander`` command line (in-process) and the worker agent's argument validation."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml

from salamander import cli, wire
from salamander.api.crd import CRD_FILE, build_crd, render_crd
from salamander_worker import agent
from tests.unit._support import EXAMPLE, one_line

GOOD = EXAMPLE.read_text()


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.endswith("\n") and one_line(err.removesuffix("\n")), repr(err)
    return err


# --- salamander validate / run / crd --------------------------------------------------------------

def test_validate_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(EXAMPLE)]) == 0
    captured = capsys.readouterr()
    assert "TrainingJob gpt is valid" in captured.out
    assert "2..2 workers x 1 processes" in captured.out
    assert captured.err == ""


BAD_MANIFESTS = {
    "malformed": ("apiVersion: [unclosed\n", "malformed YAML"),
    "min-above-max": (GOOD.replace("min: 2", "min: 3"), "spec.replicas"),
    "unknown-field": (GOOD.replace("replicas:", "replicaz:"), "spec.replicaz"),
    "two-documents": (GOOD + "---\n" + GOOD, "exactly one YAML document"),
    "wrong-kind": (GOOD.replace("kind: TrainingJob", "kind: Job"), "kind"),
    "bad-name": (GOOD.replace("name: gpt", "name: GPT"), "metadata.name"),
    "missing-image": (GOOD.replace("    image: ghcr.io/salamander-dev/salamander-worker:0.1.0\n", ""),
                      "spec.worker.image"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("text, needle", list(BAD_MANIFESTS.values()), ids=list(BAD_MANIFESTS))
def test_bad_manifest_exits_2_with_one_line(command: str, text: str, needle: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, text)
    argv = [command, path] + (["--runs-dir", str(tmp_path / "runs")] if command == "run" else [])
    assert cli.main(argv) == 2
    err = stderr_line(capsys)
    assert needle in err
    assert path in err
    assert err.startswith("salamander: invalid manifest ")
    assert not (tmp_path / "runs").exists(), "nothing may run for an invalid manifest"


@pytest.mark.parametrize("command", ["validate", "run"])
def test_missing_file_exits_2(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert cli.main([command, missing]) == 2
    err = stderr_line(capsys)
    assert "cannot read" in err and missing in err


def test_a_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(tmp_path)]) == 2
    assert "cannot read" in stderr_line(capsys)


def test_non_utf8_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.encode() + "# caf\xe9\n".encode("latin-1"))
    assert cli.main(["validate", str(path)]) == 2
    assert "not UTF-8" in stderr_line(capsys)


def test_a_manifest_with_an_unreadable_scalar_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("procsPerNode: 1", "procsPerNode: !!int eight"))
    assert cli.main(["validate", path]) == 2
    assert one_line(capsys.readouterr().err.strip())


def test_crd_prints_the_generated_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    out = capsys.readouterr().out
    assert out == render_crd()
    doc = yaml.safe_load(out)
    assert doc["kind"] == "CustomResourceDefinition"
    assert doc == build_crd()


def test_crd_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd", "--write", str(tmp_path)]) == 0
    written = tmp_path / CRD_FILE
    assert capsys.readouterr().out.strip() == str(written)
    assert written.read_text() == render_crd()


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# --- salamander-worker argument validation ------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("1", (1, 1)), ("4", (4, 4)), ("2:4", (2, 4)), ("3:3", (3, 3)),
                                            (" 2 : 5 ", (2, 5)), ("1:4096", (1, 4096))])
def test_parse_nnodes(text: str, expected: tuple[int, int]) -> None:
    assert agent.parse_nnodes(text) == expected


@pytest.mark.parametrize("text", ["", "x", "0", "-1", "3:2", "0:2", "1:2:3", ":", "2:", ":3", "1.5", "a:b",
                                  "0:0", "-2:-1"])
def test_parse_nnodes_rejects(text: str) -> None:
    with pytest.raises(agent.AgentUsageError) as info:
        agent.parse_nnodes(text)
    assert "--nnodes" in str(info.value)
    assert repr(text) in str(info.value)


@pytest.fixture
def no_rdzv_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(wire.ENV_RDZV_ENDPOINT, raising=False)
    monkeypatch.delenv(wire.ENV_RUN_ID, raising=False)


AGENT_ERRORS = {
    "nnodes-reversed": (["--nnodes", "3:2", "--", "python", "train.py"], "--nnodes"),
    "nnodes-word": (["--nnodes", "x", "--", "python", "train.py"], "--nnodes"),
    "nnodes-zero": (["--nnodes", "0", "--", "python", "train.py"], "--nnodes"),
    "no-command": (["--nnodes", "1"], "no training command"),
    "only-separator": (["--"], "no training command"),
    "nproc-zero": (["--nproc-per-node", "0", "--", "python", "train.py"], "--nproc-per-node"),
    "restarts-negative": (["--max-restarts", "-1", "--", "python", "train.py"], "--max-restarts"),
    "multi-node-without-endpoint": (["--nnodes", "2:4", "--", "python", "train.py"], "--rdzv-endpoint"),
    "command-not-found": (["--", "definitely-not-a-command-3f9a", "x"], "not found on PATH"),
}


@pytest.mark.parametrize("argv, needle", list(AGENT_ERRORS.values()), ids=list(AGENT_ERRORS))
def test_agent_usage_errors_exit_2_with_one_line(argv: list[str], needle: str, no_rdzv_env: None,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        agent.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.endswith("\n") and one_line(err.removesuffix("\n")), repr(err)
    assert err.startswith("salamander-worker: error: ")
    assert needle in err


def test_agent_reads_the_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(wire.ENV_RDZV_ENDPOINT, "op:29400")
    monkeypatch.setenv(wire.ENV_RUN_ID, "run-7")
    args = agent.build_parser().parse_args(["--nnodes", "2:4", "--", "python", "train.py", "--lr", "1"])
    assert args.rdzv_endpoint == "op:29400" and args.run_id == "run-7"
    assert args.command == ["--", "python", "train.py", "--lr", "1"]


def test_agent_parser_defaults(no_rdzv_env: None) -> None:
    args = agent.build_parser().parse_args(["python", "x.py"])
    assert (args.nnodes, args.nproc_per_node, args.max_restarts) == ("1", 1, 3)
    assert args.rdzv_endpoint == "" and args.run_id == ""
    assert args.command == ["python", "x.py"]


def test_the_operator_s_agent_command_passes_validation() -> None:
    """The command line desired.agent_command builds is one the agent's parser accepts."""
    from salamander.api import parse_spec
    from salamander_operator.desired import agent_command

    spec = parse_spec({"replicas": {"min": 2, "max": 4}, "procsPerNode": 8, "restartBudget": 5,
                       "worker": {"image": "i", "command": ["python", "train.py"], "args": ["--steps", "3"]}})
    cmd = agent_command(spec)
    args = agent.build_parser().parse_args(cmd[1:])
    assert agent.parse_nnodes(args.nnodes) == (2, 4)
    assert (args.nproc_per_node, args.max_restarts) == (8, 5)
    assert args.command == ["--", "python", "train.py", "--steps", "3"]


def test_agent_usage_errors_do_not_need_torch(monkeypatch: pytest.MonkeyPatch, no_rdzv_env: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Make torch unimportable, and the worker package importable afresh (both restored afterwards).
    monkeypatch.setitem(sys.modules, "torch", None)
    for name in [m for m in sys.modules if m == "salamander_worker" or m.startswith("salamander_worker.")]:
        monkeypatch.delitem(sys.modules, name)
    fresh_agent = importlib.import_module("salamander_worker.agent")
    with pytest.raises(SystemExit) as info:
        fresh_agent.main(["--nnodes", "x", "--", "python", "train.py"])
    assert info.value.code == 2
    assert "--nnodes" in capsys.readouterr().err
