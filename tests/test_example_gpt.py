"""The demo job in examples/gpt: its corpus, its model, and a short in-process training run.

Everything here runs in one process (a world of one, no process group) in a few seconds, and
nothing depends on wall-clock time: assertions are about losses, shapes and determinism.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "examples" / "gpt" / "train.py"

if importlib.util.find_spec("salamander_worker") is None:  # source checkout, not installed
    for sub in ("src", "worker/src", "operator/src"):
        sys.path.insert(0, str(ROOT / sub))


def _load_train() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_gpt_train", TRAIN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


train = _load_train()


@pytest.fixture(autouse=True)
def _standalone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure the script sees a world of one even if the test runner has torch env set."""
    for name in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SALAMANDER_RDZV_ENDPOINT",
                 "SALAMANDER_CHECKPOINT_DIR", "SALAMANDER_CHECKPOINT_INTERVAL"):
        monkeypatch.delenv(name, raising=False)


def test_corpus_is_deterministic_and_non_trivial() -> None:
    a = train.make_corpus(50_000, seed=7)
    assert a == train.make_corpus(50_000, seed=7)
    assert a != train.make_corpus(50_000, seed=8)
    assert len(a) == 50_000
    vocab = train.Vocab.of(a)
    assert 20 <= vocab.size <= 64
    assert len(set(a.split())) > 50  # many distinct words, not a repeated phrase
    assert a.count(".") > 500
    ids = vocab.encode(a[:1000])
    assert ids.dtype == torch.long and ids.shape == (1000,)
    assert vocab.decode(ids) == a[:1000]


def test_model_shapes_and_causality() -> None:
    cfg = train.GPTConfig(vocab_size=33, block_size=16, n_layer=2, d_model=32, n_head=4)
    model = train.GPT(cfg).eval()
    idx = torch.randint(0, 33, (3, 16), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (3, 16, 33)
    assert model(idx[:, :5]).shape == (3, 5, 33)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 33
    # Positions before the change see the same prefix, so their logits are identical.
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert train.lm_loss(logits, idx).shape == ()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        train.GPTConfig(vocab_size=33, d_model=30, n_head=4)


def test_batches_depend_on_seed_rank_and_step() -> None:
    data = torch.arange(1000)
    x, y = train.sample_batch(data, 4, 8, seed=1, rank=0, step=3)
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(x, train.sample_batch(data, 4, 8, seed=1, rank=0, step=3)[0])
    assert not torch.equal(x, train.sample_batch(data, 4, 8, seed=1, rank=1, step=3)[0])
    assert not torch.equal(x, train.sample_batch(data, 4, 8, seed=1, rank=0, step=4)[0])


def test_short_single_process_run_lowers_the_loss() -> None:
    cfg = train.TrainConfig(steps=60, batch_size=8, seq_len=32, lr=1e-2, seed=0, log_every=10,
                            n_layer=1, d_model=32, n_head=2)
    lines: list[str] = []
    result = train.train(cfg, train.salamander_worker.context(), log=lines.append)
    assert result.steps_done == 60 and len(result.losses) == 60 and not result.stopped_early
    assert all(math.isfinite(v) for v in result.losses)
    assert math.log(33) - 0.5 < result.first_loss < math.log(33) + 0.5  # starts near uniform
    tail = sum(result.losses[-5:]) / 5
    assert tail < 0.8 * result.first_loss
    assert "step 10/60 loss" in "\n".join(lines)


def test_a_stop_request_ends_the_run_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train.salamander_worker, "should_stop", lambda step: step == 4)
    cfg = train.TrainConfig(steps=20, batch_size=2, seq_len=8, n_layer=1, d_model=16, n_head=2)
    lines: list[str] = []
    result = train.train(cfg, train.salamander_worker.context(), log=lines.append)
    assert result.stopped_early and result.steps_done == 5 and len(result.losses) == 5
    assert any("stop requested" in line for line in lines)


def test_main_runs_and_prints_the_final_line(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        assert train.main(["--steps", "2", "--batch-size", "2", "--seq-len", "8",
                           "--n-layer", "1", "--d-model", "16", "--n-head", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "step 1/2 loss" in out
    assert "final loss" in out and "(first loss" in out


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "must be positive"),
    (["--lr", "nan"], "positive finite"),
    (["--batch-size", "x"], "expected an integer"),
    (["--d-model", "30", "--n-head", "4"], "divisible"),
])
def test_bad_flags_exit_with_a_clear_message(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# -- checkpoints ------------------------------------------------------------------------------

TINY = ["--batch-size", "8", "--seq-len", "32", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
        "--lr", "1e-2", "--log-every", "1"]


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    threads = torch.get_num_threads()
    try:
        code = train.main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().out


def _losses(out: str) -> dict[int, float]:
    """Step number -> loss, from the ``step k/N loss v`` lines."""
    return {int(k): float(v) for k, v in re.findall(r"^step (\d+)/\d+ loss ([\d.]+)$", out, re.MULTILINE)}


def test_a_restarted_run_resumes_from_its_checkpoint(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    code, first = _main([*TINY, "--steps", "30", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "10"],
                        capsys)
    assert code == 0
    before = _losses(first)
    assert sorted(before) == list(range(1, 31))
    assert "resumed" not in first
    assert (ckpt / "latest").read_text().strip() == "step-0000000030"

    code, second = _main([*TINY, "--steps", "50", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "10"],
                         capsys)
    assert code == 0
    assert f"resumed from step 30 (checkpoint {ckpt / 'step-0000000030'})" in second
    after = _losses(second)
    assert sorted(after) == list(range(31, 51))  # it went on from step 31, not from step 1
    initial = before[1]
    assert math.log(33) - 0.5 < initial < math.log(33) + 0.5  # an untrained model's loss
    # The first loss after the restart continues the curve instead of starting over.
    assert abs(after[31] - before[30]) < 0.15
    assert after[31] < initial - 0.5
    assert "done: 50 steps (30 resumed)" in second
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-0000000040", "step-0000000050"]


def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Same model, optimizer moments, learning-rate schedule and batches after the restart."""
    cfg = train.TrainConfig(steps=24, batch_size=4, seq_len=16, lr=1e-2, n_layer=1, d_model=16, n_head=2)
    ctx = train.salamander_worker.context()
    uninterrupted = train.train(cfg, ctx, log=lambda _: None)

    lines: list[str] = []
    monkeypatch.setattr(train.salamander_worker, "should_stop", lambda step: step == 14)  # a preemption
    ckpt = train.Checkpointer(tmp_path, interval=10)
    stopped = train.train(cfg, ctx, log=lines.append, checkpointer=ckpt)
    assert stopped.stopped_early and stopped.steps_done == 15 and stopped.resumed_from is None
    # Checkpointing does not change a fresh run (the optimizer's state is not touched early).
    assert stopped.losses == uninterrupted.losses[:15]
    assert any(line == f"saved checkpoint {tmp_path / 'step-0000000010'}" for line in lines)
    assert any(line == f"saved checkpoint {tmp_path / 'step-0000000015'}" for line in lines)  # on stop

    monkeypatch.setattr(train.salamander_worker, "should_stop", lambda step: False)
    resumed = train.train(cfg, ctx, log=lines.append, checkpointer=ckpt)
    assert resumed.start_step == 15 and resumed.resumed_from == tmp_path / "step-0000000015"
    assert resumed.steps_done == 24 and len(resumed.losses) == 9
    assert resumed.losses == pytest.approx(uninterrupted.losses[15:], rel=1e-5, abs=1e-6)

    again = train.train(cfg, ctx, log=lines.append, checkpointer=ckpt)  # already finished
    assert again.start_step == 24 and again.losses == [] and not again.stopped_early
    assert "nothing to do" in lines[-1]


def test_the_checkpoint_comes_from_the_environment_and_flags_override_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SALAMANDER_CHECKPOINT_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("SALAMANDER_CHECKPOINT_INTERVAL", "2")
    code, _ = _main([*TINY, "--steps", "3"], capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "from-env").iterdir()) == [
        "latest", "step-0000000002", "step-0000000003"]

    monkeypatch.setenv("SALAMANDER_CHECKPOINT_INTERVAL", "not-a-number")  # the flag replaces it
    code, _ = _main([*TINY, "--steps", "2", "--checkpoint-dir", str(tmp_path / "flag"),
                     "--checkpoint-every", "1"], capsys)
    assert code == 0
    assert (tmp_path / "flag" / "step-0000000001").is_dir()


def test_no_checkpoint_configured_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = _main([*TINY, "--steps", "2"], capsys)
    assert code == 0 and "checkpoint" not in out and "resumed" not in out
    assert list(tmp_path.iterdir()) == []
    assert train.checkpointer_for(train.parse_args(["--steps", "2"])) is None


def test_a_bad_checkpoint_interval_in_the_environment_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SALAMANDER_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("SALAMANDER_CHECKPOINT_INTERVAL", "often")
    assert train.main([*TINY, "--steps", "2"]) == 2
    assert "SALAMANDER_CHECKPOINT_INTERVAL must be a positive integer, got 'often'" in capsys.readouterr().err
