"""Train a small character-level GPT with DistributedDataParallel: Salamander's demo job.

Runs the same way standalone and under torchrun / torch elastic::

    python examples/gpt/train.py --steps 100
    torchrun --standalone --nproc-per-node 2 examples/gpt/train.py

Invariants:

* The corpus (:mod:`corpus`) is generated at start from a fixed seed, so every rank has the
  same text and vocabulary; nothing is downloaded.
* Every rank starts from the same weights (DDP also broadcasts rank 0's) and draws its own
  batches as a pure function of ``(seed, rank, step)``, so ranks see different data and a run
  is reproducible for a given world size.
* Every rank calls ``report`` and ``should_stop`` at every step; when the job asks to stop,
  all ranks leave the loop at the same step and exit 0.
* With a checkpoint directory (``--checkpoint-dir``, else ``SALAMANDER_CHECKPOINT_DIR``, which
  the operator sets from ``spec.checkpoint``) the run saves model, optimizer and step every
  ``--checkpoint-every`` steps (else ``SALAMANDER_CHECKPOINT_INTERVAL``, else 100), when the job
  asks it to stop, and at the end; a (re)started run resumes from the newest checkpoint. The
  data position *is* the step: batches are a pure function of ``(seed, rank, step)``, so a
  resumed run draws exactly the batches an uninterrupted one would have, whatever the world
  size was when it saved. Without a checkpoint directory a restarted worker starts afresh.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # lets the script be imported by path (tests) as well as run
    sys.path.insert(0, _HERE)

import salamander_worker  # noqa: E402
from corpus import Vocab, make_corpus  # noqa: E402
from model import GPT, GPTConfig, lm_loss  # noqa: E402
from salamander import wire  # noqa: E402
from salamander_worker import WorkerContext  # noqa: E402
from salamander_worker import progress as sw_progress  # noqa: E402
from salamander_worker.checkpoint import CheckpointError, Checkpointer, ModelState  # noqa: E402
from salamander_worker.snapshot.snapshotter import Snapshotter  # noqa: E402

CORPUS_CHARS = 200_000
CORPUS_SEED = 1234


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; all positive (``seed >= 0``), ``d_model % n_head == 0``.

    ``checkpoint_dir``/``checkpoint_every`` override ``SALAMANDER_CHECKPOINT_DIR``/``_INTERVAL``
    (``None``: take the environment's).
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    log_every: int = 25
    n_layer: int = 3
    d_model: int = 96
    n_head: int = 4
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None


@dataclass
class TrainResult:
    """What a run did: ``losses[i]`` is the (rank-averaged) loss of step ``start_step + i``.

    ``start_step`` is the step the run resumed from (0 on a fresh start, ``resumed_from`` then
    ``None``); ``steps_done`` counts steps from the very beginning, resumed ones included.
    """

    steps_done: int
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    start_step: int = 0
    resumed_from: Path | None = None

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, rank: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, both ``(batch_size, seq_len)``, chosen by ``(seed, rank, step)``.

    ``data`` is the 1-D encoded corpus, longer than ``seq_len``.
    """
    windows = data.unfold(0, seq_len + 1, 1)  # (N - seq_len, seq_len + 1), a view
    rng = np.random.default_rng([seed, rank, step])
    chunk = windows[torch.from_numpy(rng.integers(0, windows.size(0), size=batch_size))]
    return chunk[:, :-1], chunk[:, 1:]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over the first 10% of steps (at most 20), then cosine decay to ``lr / 10``."""
    warmup = max(1, min(20, cfg.steps // 10))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def _mean_across_ranks(value: torch.Tensor, world_size: int) -> float:
    value = value.detach().clone()
    if world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size
    return float(value)


def checkpointer_for(cfg: TrainConfig) -> Checkpointer | None:
    """The run's checkpointer: the flags in ``cfg`` over the environment; ``None`` without a
    directory. A malformed environment value raises ``CheckpointError`` naming the variable."""
    overrides = {}
    if cfg.checkpoint_dir is not None:
        overrides[wire.ENV_CHECKPOINT_DIR] = cfg.checkpoint_dir
    if cfg.checkpoint_every is not None:
        overrides[wire.ENV_CHECKPOINT_INTERVAL] = str(cfg.checkpoint_every)
    return Checkpointer.from_environment({**os.environ, **overrides})


def train(cfg: TrainConfig, ctx: WorkerContext, log: Callable[[str], None] = print,
          checkpointer: Checkpointer | None = None) -> TrainResult:
    """Train up to step ``cfg.steps`` (fewer if the job asks to stop); ``log`` is used on rank 0 only.

    With ``checkpointer`` the run first resumes from its newest checkpoint, if any, and saves
    when one is due, when asked to stop and after the last step. With ``ctx.world_size > 1``
    the process group must already be initialised.
    """
    say = log if ctx.is_leader else (lambda _msg: None)
    text = make_corpus(CORPUS_CHARS, CORPUS_SEED)
    vocab = Vocab.of(text)
    data = vocab.encode(text)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model: torch.nn.Module = GPT(GPTConfig(vocab_size=vocab.size, block_size=cfg.seq_len,
                                           n_layer=cfg.n_layer, d_model=cfg.d_model,
                                           n_head=cfg.n_head)).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    if ctx.world_size > 1:
        if not dist.is_initialized():
            raise RuntimeError("world_size > 1 but no process group; run under torchrun")
        model = DistributedDataParallel(model)
        salamander_worker.watch_ddp(model)  # backward's wait on peers counts as communication
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    say(f"gpt: {n_params:,} parameters, vocab {vocab.size}, corpus {len(text):,} chars, "
        f"world {ctx.world_size} ({ctx.backend}), restart {ctx.restart_count}")

    result = TrainResult(steps_done=0)
    # A Stateful: model and optimizer state are read (and the optimizer's state created) only
    # when a checkpoint is saved or loaded, so a fresh start trains exactly as without one.
    state = {"train": ModelState(model, optimizer)}
    # In-memory snapshots (spec.snapshot): restored first; they fall back to their own
    # persistent copies, and to the plain checkpoint below only when they have nothing.
    snapshots = Snapshotter(model, optimizer) if os.environ.get(wire.ENV_SNAPSHOT) else None
    if snapshots is not None:
        start, _ = snapshots.restore()
        if start:
            result.start_step = result.steps_done = start
            say(f"resumed from step {start} (snapshot, {snapshots.stats.restore_tier})")
    if checkpointer is not None and not result.start_step:
        restored = checkpointer.load(state)
        if restored is not None:
            result.start_step = result.steps_done = restored
            result.resumed_from = checkpointer.path(restored)
            say(f"resumed from step {restored} (checkpoint {result.resumed_from})")
        if restored is not None and restored >= cfg.steps:
            say(f"nothing to do: the checkpoint is at step {restored}, --steps is {cfg.steps}")

    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len * ctx.world_size
    flops_per_step = 6.0 * n_params * tokens_per_step  # forward + backward of a dense transformer
    section = salamander_worker.section  # per-rank section times (metrics, traces)
    for step in range(result.start_step, cfg.steps):
        with section("data"):
            x, y = sample_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, ctx.rank, step)
            x, y = x.to(ctx.device), y.to(ctx.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        with section("forward"):
            loss = lm_loss(model(x), y)
        with section("backward"):  # DDP's gradient all-reduce overlaps with it
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with section("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        with section("communication"):
            mean_loss = _mean_across_ranks(loss, ctx.world_size)
        result.losses.append(mean_loss)
        result.steps_done = step + 1
        salamander_worker.report(step + 1, loss=mean_loss, total_steps=cfg.steps,
                                 samples=(step + 1) * cfg.batch_size * ctx.world_size,
                                 tokens=(step + 1) * tokens_per_step, flops_per_step=flops_per_step)
        if (step + 1) % cfg.log_every == 0 or step == result.start_step:
            say(f"step {step + 1}/{cfg.steps} loss {mean_loss:.4f}")
        if snapshots is not None:
            snapshots.step(step + 1, data={"step": step + 1})  # batches derive from the step
        with section("communication"):
            stop = salamander_worker.should_stop(step)  # the same answer on every rank
        if checkpointer is not None and (checkpointer.due(step + 1) or stop
                                         or step + 1 == cfg.steps):
            path = checkpointer.save(step + 1, state)
            say(f"saved checkpoint {path}")
        if stop:
            result.stopped_early = step + 1 < cfg.steps
            if result.stopped_early:
                say(f"stop requested; leaving after step {step + 1}")
            break
    if snapshots is not None:
        snapshots.close()
    return result


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {raw}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and validate the command line; invalid input exits with status 2 and a message."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="sequences per step on each rank")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len,
                   help="characters per sequence (also the model's context)")
    p.add_argument("--lr", type=_positive_float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--seed", type=_non_negative_int, default=d.seed, help="weights and data seed")
    p.add_argument("--log-every", type=_positive_int, default=d.log_every,
                   help="print the loss every N steps (rank 0)")
    p.add_argument("--n-layer", type=_positive_int, default=d.n_layer, help="transformer blocks")
    p.add_argument("--d-model", type=_positive_int, default=d.d_model, help="embedding width")
    p.add_argument("--n-head", type=_positive_int, default=d.n_head, help="attention heads")
    p.add_argument("--checkpoint-dir", default=None,
                   help=f"save and resume checkpoints here (default: ${wire.ENV_CHECKPOINT_DIR}, "
                        "none if unset)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help=f"save every N steps (default: ${wire.ENV_CHECKPOINT_INTERVAL}, else 100)")
    a = p.parse_args(argv)
    if a.checkpoint_dir is not None and not a.checkpoint_dir.strip():
        p.error("--checkpoint-dir must not be empty")
    if a.d_model % a.n_head != 0:
        p.error(f"--d-model ({a.d_model}) must be divisible by --n-head ({a.n_head})")
    if a.seq_len >= CORPUS_CHARS:
        p.error(f"--seq-len ({a.seq_len}) must be smaller than the corpus ({CORPUS_CHARS} chars)")
    return TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                       seed=a.seed, log_every=a.log_every, n_layer=a.n_layer,
                       d_model=a.d_model, n_head=a.n_head, checkpoint_dir=a.checkpoint_dir,
                       checkpoint_every=a.checkpoint_every)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: join the job, train, report, leave the process group; returns 0 on success."""
    cfg = parse_args(argv)
    try:
        checkpointer = checkpointer_for(cfg)  # a bad environment fails before joining the job
    except CheckpointError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    torch.set_num_threads(1)  # several worker processes usually share a few cores
    ctx = salamander_worker.init_distributed()
    started = time.monotonic()
    # No try/finally around training: a failed rank must not wait on peers to tear the group
    # down; it exits at once (salamander_worker's excepthook) and its agent restarts the group.
    result = train(cfg, ctx, log=lambda msg: print(msg, flush=True), checkpointer=checkpointer)
    if ctx.is_leader:
        resumed = f" ({result.start_step} resumed)" if result.start_step else ""
        print(f"done: {result.steps_done} steps{resumed} in {time.monotonic() - started:.1f} s", flush=True)
        if result.losses:
            print(f"final loss {result.final_loss:.4f} (first loss {result.first_loss:.4f})", flush=True)
    sw_progress.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
