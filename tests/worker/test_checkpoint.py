"""Checkpoints with torch.distributed.checkpoint: save, commit, resume, fall back, prune.

The two-rank test runs real processes over gloo on loopback; the rest run in this process
as a world of one (no process group). Nothing here depends on wall-clock time.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import salamander_worker
from salamander import wire
from salamander_worker import checkpoint
from salamander_worker.checkpoint import CheckpointError, Checkpointer, ModelState

STEPS_BEFORE, STEPS_AFTER = 3, 2


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Generator) -> None:
    """One step on a batch drawn from ``data``: the generator's state is the data position."""
    x = torch.randn(4, 6, generator=data)
    loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _plain_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Generator,
           rank: int, epoch: int) -> dict:
    """Model and optimizer, the data position of this rank (its own key: it differs per rank),
    and plain Python values."""
    return {"train": ModelState(model, optimizer), f"data.rank{rank}": data.get_state(),
            "meta": {"epoch": epoch, "note": "" if epoch < 0 else "run"}}


def _two_ranks(rank: int, port: int, directory: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        ckpt = Checkpointer(directory, interval=STEPS_BEFORE)
        # First life: train, save at the due step, then go on (the reference continuation).
        model = DistributedDataParallel(_model(seed=0))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)  # each rank reads its own data
        for step in range(STEPS_BEFORE):
            _train_step(model, optimizer, data)
            assert ckpt.due(step + 1) == (step + 1 == STEPS_BEFORE)
        saved_data = data.get_state()
        path = ckpt.save(STEPS_BEFORE, _state(model, optimizer, data, rank, epoch=7))
        saved_params = _plain_params(model)
        for _ in range(STEPS_AFTER):
            _train_step(model, optimizer, data)
        reference = _plain_params(model)

        # Second life: fresh objects with other weights and data position, resumed.
        model2 = DistributedDataParallel(_model(seed=1))
        optimizer2 = torch.optim.AdamW(model2.parameters(), lr=0.05)
        data2 = torch.Generator().manual_seed(999)
        state = _state(model2, optimizer2, data2, rank, epoch=-1)
        assert ckpt.load(state) == STEPS_BEFORE
        data2.set_state(state[f"data.rank{rank}"])
        assert state["meta"] == {"epoch": 7, "note": "run"}
        assert torch.equal(data2.get_state(), saved_data)
        for k, v in _plain_params(model2).items():
            torch.testing.assert_close(v, saved_params[k], rtol=0, atol=0)
        for _ in range(STEPS_AFTER):
            _train_step(model2, optimizer2, data2)
        for k, v in _plain_params(model2).items():  # same optimizer moments, same batches
            torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
        if rank == 0:
            torch.save({"path": str(path), "saved": saved_params, "data": saved_data},
                       Path(out) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_save_and_resume_model_optimizer_and_data_position(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    mp.spawn(_two_ranks, args=(_free_port(), str(directory), str(tmp_path)), nprocs=2)
    result = torch.load(tmp_path / "rank0.pt")
    assert result["path"] == str(directory / "step-0000000003")
    assert (directory / "latest").read_text().strip() == "step-0000000003"

    # A world of one (no group, no DDP) reads the two-rank checkpoint: parameter names carry
    # no DDP prefix, and each rank's own data position is there under its key.
    model = _model(seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    state: dict[str, Any] = {"train": ModelState(model, optimizer), "data.rank1": torch.Generator().get_state(),
                             "data.rank0": torch.Generator().get_state()}
    assert Checkpointer(directory).load(state) == STEPS_BEFORE
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, result["saved"][k], rtol=0, atol=0)
    assert torch.equal(state["data.rank0"], result["data"])
    assert not torch.equal(state["data.rank1"], state["data.rank0"])
    assert all(s["step"] == STEPS_BEFORE for s in optimizer.state_dict()["state"].values())


# -- a world of one ---------------------------------------------------------------------------


def _trained(seed: int = 0, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _train_step(model, optimizer, data)
    return model, optimizer, data


def test_world_of_one_round_trips_tensors_and_python_values(tmp_path: Path) -> None:
    model, optimizer, data = _trained()
    ckpt = Checkpointer(tmp_path, interval=2)
    state = {"train": ModelState(model, optimizer), "data": data.get_state(),
             "pos": {"step": 2, "epoch": 1, "lr": 0.05, "name": "shard-3"}}
    path = ckpt.save(2, state)
    assert path == tmp_path / "step-0000000002" and (path / ".metadata").is_file()
    assert (tmp_path / "latest").read_text() == "step-0000000002\n"

    model2 = _model(seed=1)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=0.05)
    into: dict[str, Any] = {"train": ModelState(model2, optimizer2), "data": torch.Generator().get_state(),
                            "pos": {"step": 0, "epoch": 0, "lr": 0.0, "name": ""}}
    assert ckpt.load(into) == 2
    assert into["pos"] == {"step": 2, "epoch": 1, "lr": 0.05, "name": "shard-3"}
    assert torch.equal(into["data"], data.get_state())
    for k, v in model2.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    for pid, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(optimizer2.state_dict()["state"][pid][k], v)


def test_no_checkpoint_loads_nothing_and_leaves_the_state_alone(tmp_path: Path) -> None:
    model = _model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"train": ModelState(model, optimizer), "n": 5}
    assert Checkpointer(tmp_path / "not-there").load(state) is None
    assert Checkpointer(tmp_path).load(state) is None
    assert state["n"] == 5
    assert not optimizer.state  # a fresh start is untouched: no optimizer state was created
    assert not (tmp_path / "not-there").exists()


def test_due_is_every_positive_multiple_of_the_interval() -> None:
    ckpt = Checkpointer("/x", interval=20)
    assert [s for s in range(61) if ckpt.due(s)] == [20, 40, 60]
    assert ckpt.path(40) == Path("/x/step-0000000040")
    with pytest.raises(ValueError, match="interval"):
        Checkpointer("/x", interval=0)


def _save_steps(ckpt: Checkpointer, *steps: int) -> None:
    for step in steps:
        ckpt.save(step, {"x": torch.full((2,), float(step)), "step": step})


def _load_x(ckpt: Checkpointer) -> tuple[int | None, float]:
    state: dict[str, Any] = {"x": torch.zeros(2), "step": -1}
    step = ckpt.load(state)
    assert step is None or state["step"] == step
    return step, float(state["x"][0])


@pytest.mark.parametrize("damage", ["garbage", "missing", "names-a-deleted-dir",
                                    "names-an-unfinished-dir"])
def test_a_broken_latest_marker_falls_back_to_the_newest_complete_checkpoint(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = Checkpointer(tmp_path, keep=3)
    _save_steps(ckpt, 10, 20)
    latest = tmp_path / "latest"
    if damage == "garbage":
        latest.write_bytes(b"\xff\x00not a step\n")
    elif damage == "missing":
        latest.unlink()
    elif damage == "names-a-deleted-dir":
        latest.write_text("step-0000000090\n")
    else:  # a save that died before DCP wrote .metadata
        (tmp_path / "step-0000000030").mkdir()
        (tmp_path / "step-0000000030" / "__0_0.distcp").write_bytes(b"partial")
        latest.write_text("step-0000000030\n")
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        assert _load_x(ckpt) == (20, 20.0)
    assert "falling back" in caplog.text and str(tmp_path / "step-0000000020") in caplog.text
    assert str(latest) in caplog.text


def test_an_unfinished_newer_directory_is_never_loaded(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    _save_steps(ckpt, 10)
    (tmp_path / "latest").unlink()
    (tmp_path / "step-0000000020").mkdir()  # no .metadata: the save did not finish
    assert _load_x(ckpt) == (10, 10.0)


def test_only_unfinished_directories_mean_no_checkpoint(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "step-0000000020").mkdir()
    (tmp_path / "latest").write_text("step-0000000020\n")
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        assert _load_x(Checkpointer(tmp_path)) == (None, 0.0)
    assert "starting afresh" in caplog.text


def test_retention_keeps_the_newest_two(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, interval=1)
    (tmp_path / "step-0000000002").mkdir()  # an unfinished save from an earlier life
    (tmp_path / "step-0000000099").mkdir()  # a later, abandoned history
    (tmp_path / "notes.txt").write_text("not ours")
    _save_steps(ckpt, 1, 3, 4, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "notes.txt", "step-0000000004",
                                                          "step-0000000005"]
    assert _load_x(ckpt) == (5, 5.0)
    keep3 = Checkpointer(tmp_path / "three", keep=3)
    _save_steps(keep3, 1, 2, 3, 4)
    assert sorted(p.name for p in (tmp_path / "three").iterdir() if p.name != "latest") == [
        "step-0000000002", "step-0000000003", "step-0000000004"]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    _save_steps(ckpt, 10)
    (tmp_path / "step-0000000010" / "stale.distcp").write_bytes(b"left over")
    ckpt.save(10, {"x": torch.full((2,), 11.0), "step": 10})
    assert not (tmp_path / "step-0000000010" / "stale.distcp").exists()
    assert _load_x(ckpt) == (10, 11.0)


def test_a_key_missing_from_the_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    _save_steps(ckpt, 10)
    with pytest.raises(CheckpointError, match=r"step-0000000010 has no entry for 'model'.*'step', 'x'"):
        ckpt.load({"model": torch.zeros(2), "x": torch.zeros(2)})


def test_a_corrupt_metadata_file_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    _save_steps(ckpt, 10)
    (tmp_path / "step-0000000010" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"step-0000000010/\.metadata"):
        _load_x(ckpt)


def test_the_reserved_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="reserved"):
        Checkpointer(tmp_path).save(1, {"_salamander": 1})


def test_from_environment() -> None:
    assert Checkpointer.from_environment({}) is None
    assert Checkpointer.from_environment({wire.ENV_CHECKPOINT_DIR: ""}) is None
    ckpt = Checkpointer.from_environment({wire.ENV_CHECKPOINT_DIR: "/ckpt"})
    assert ckpt is not None and ckpt.directory == Path("/ckpt") and ckpt.interval == 100
    ckpt = Checkpointer.from_environment({wire.ENV_CHECKPOINT_DIR: "/ckpt",
                                          wire.ENV_CHECKPOINT_INTERVAL: " 25 "})
    assert ckpt is not None and ckpt.interval == 25


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "2.5"])
def test_from_environment_rejects_a_bad_interval_naming_the_variable(raw: str) -> None:
    with pytest.raises(CheckpointError, match=f"{wire.ENV_CHECKPOINT_INTERVAL} must be a positive integer"):
        Checkpointer.from_environment({wire.ENV_CHECKPOINT_DIR: "/ckpt", wire.ENV_CHECKPOINT_INTERVAL: raw})


def test_from_environment_reads_os_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(wire.ENV_CHECKPOINT_DIR, str(tmp_path))
    monkeypatch.setenv(wire.ENV_CHECKPOINT_INTERVAL, "3")
    ckpt = Checkpointer.from_environment()
    assert ckpt is not None and (ckpt.directory, ckpt.interval) == (tmp_path, 3)


def test_the_package_exports_the_checkpointer_lazily() -> None:
    assert salamander_worker.Checkpointer is Checkpointer
    assert salamander_worker.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, RuntimeError)
    assert {"Checkpointer", "CheckpointError", "ModelState"} <= set(salamander_worker.__all__)


@pytest.mark.parametrize("step", [-1, 1.5, "3", True])
def test_a_bad_step_is_refused(tmp_path: Path, step: object) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        Checkpointer(tmp_path).save(step, {"x": torch.zeros(1)})  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())
