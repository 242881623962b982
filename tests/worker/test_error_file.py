"""An uncaught exception in any training script reaches torch elastic's agent with its type and
message: ``init_distributed()`` installs an excepthook that writes the agent's error file, so
scripts need no ``@record`` decorator. Run under torch's own ``start_processes``, as the agent
runs the training processes."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes

SCRIPT = textwrap.dedent("""
    import salamander_worker as sw

    if {init}:
        sw.init_distributed()

    def train():
        raise ValueError("boom at step 42")

    train()
""")


def _run(tmp_path: Path, *, init: bool):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(init=init))
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "excepthook"}
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "TORCHELASTIC_ERROR_FILE")}
    context = start_processes(name="trainer", entrypoint=sys.executable, args={0: (str(script),)},
                              envs={0: {**clean, **env}}, logs_specs=DefaultLogsSpecs(log_dir=str(tmp_path / "logs")))
    try:
        result = context.wait(timeout=60, period=0.1)
    finally:
        context.close()
    assert result is not None and result.is_failed()
    return result.failures[0]


def test_the_agent_sees_the_exception_type_and_message(tmp_path: Path) -> None:
    failure = _run(tmp_path, init=True)
    assert failure.exitcode == 1
    data = failure.error_file_data["message"]  # torch's @record format; failure.message is this dict
    assert data["message"] == "ValueError: boom at step 42"
    callstack = data["extraInfo"]["py_callstack"]
    assert "train.py" in callstack and "in train" in callstack and callstack.rstrip().endswith(
        "ValueError: boom at step 42")
    assert "salamander_worker" not in callstack  # the script's own traceback, not the hook's frames


def test_without_the_hook_torch_records_nothing(tmp_path: Path) -> None:
    """Why the hook exists: a plain script's exception never reaches the error file."""
    failure = _run(tmp_path, init=False)
    assert failure.exitcode == 1
    assert "boom" not in failure.message
    assert not Path(failure.error_file).exists()


def test_the_hook_keeps_a_record_written_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``@record`` writes the file nearer the cause; the hook does not overwrite it."""
    from salamander_worker.topology import _record_exception

    error_file = tmp_path / "error.json"
    error_file.write_text('{"message": "first"}')
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    _record_exception(ValueError("second"), None)
    assert error_file.read_text() == '{"message": "first"}'
