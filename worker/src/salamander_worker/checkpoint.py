"""Persistent checkpoints with ``torch.distributed.checkpoint`` (DCP), committed by a marker file.

A training script saves every ``interval`` steps and, when it starts, loads the newest
complete checkpoint, so a restarted job continues where it was::

    ckpt = Checkpointer.from_environment()       # SALAMANDER_CHECKPOINT_DIR / _INTERVAL
    state = {"train": ModelState(model, optimizer), "data": {"epoch": 0}}
    start = (ckpt.load(state) or 0) if ckpt else 0   # fills ``state`` in place
    for step in range(start, steps):
        ...
        if ckpt and ckpt.due(step + 1):
            ckpt.save(step + 1, state)

Layout of the checkpoint directory (which every rank must reach: a shared volume)::

    <directory>/step-0000000040/     one DCP checkpoint: its ``.metadata`` and ``*.distcp`` files
    <directory>/step-0000000060/
    <directory>/latest               "step-0000000060": the newest committed checkpoint

Invariants:

* ``step`` counts completed optimizer steps; checkpoint ``step-N`` holds the state after step
  ``N`` and is resumed by running step ``N`` next (``range(N, steps)``).
* A checkpoint is *committed* once ``latest`` names it. Rank 0 writes ``latest`` (temporary
  file, then ``os.replace``) only after every rank has written its part and DCP has written
  ``.metadata``; when :meth:`Checkpointer.save` returns on any rank, the checkpoint is
  committed. A crash at any moment leaves the previous or the new checkpoint loadable (saving
  a step that already has a directory first deletes that directory).
* :meth:`Checkpointer.load` uses ``latest``; if it is missing, malformed or names a directory
  without DCP's ``.metadata``, it falls back (with a warning) to the newest ``step-*``
  directory that has ``.metadata``. With a process group, rank 0 chooses and every rank loads
  the same checkpoint.
* After each save rank 0 keeps the newest ``keep`` (default 2) complete checkpoints up to the
  saved step and deletes every other ``step-*`` directory (older ones, unfinished writes, and
  ones from an abandoned later history).
* Works with and without an initialised process group (a world of one). With a group, ``save``
  and ``load`` are collective: every rank calls them with the same keys.
* DCP keeps **one** copy of each entry that is not sharded (a plain tensor, an ``int``, a
  ``str``...) and every rank reads that copy back: such values must be the same on every rank.
  Model and optimizer state under DDP are (use :class:`ModelState`). A value that differs
  per rank must sit under a key naming the rank (``f"rng.rank{rank}"``); prefer a data
  position shared by all ranks (the step, one generator for the whole world), which also
  survives a change of world size.
* Tensors, nested dicts/lists/tuples and plain Python values (``int``, ``float``, ``str``,
  ``None``) round-trip; loading replaces them in ``state`` (top-level values are re-assigned,
  nested ones and tensors are filled in place). :class:`~torch.distributed.checkpoint.stateful.Stateful`
  values are asked for ``state_dict()`` only when a checkpoint is actually saved or loaded.

Everything this module raises about a checkpoint, its files or its configuration is a
:class:`CheckpointError` whose message names the path or the variable at fault.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from salamander import wire
from salamander_worker import progress, telemetry

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 100  # the spec's default for checkpoint.intervalSteps
DEFAULT_KEEP = 2
LATEST = "latest"
METADATA = ".metadata"  # written by DCP's coordinator last: a directory with it is complete
_RESERVED = "_salamander"  # the checkpoint's own record: {"step": N}
_STEP_DIR = re.compile(r"^step-(\d{10})$")
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be configured, written or read; the message says which and why."""


def step_dir_name(step: int) -> str:
    """``step-0000000040`` for step 40; sorts in step order."""
    return f"step-{step:010d}"


def _parse_step(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _group() else 0


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call in a world of one; that is this module's intent, not a problem."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield


class ModelState:
    """A model (plain or DDP) and optionally its optimizer, as one DCP ``Stateful`` value.

    Uses :func:`torch.distributed.checkpoint.state_dict.get_state_dict` /
    ``set_state_dict``: parameter names carry no DDP ``module.`` prefix and optimizer state is
    keyed by parameter name, so a checkpoint written by a DDP job of any size loads into a
    plain model and back. ``state_dict()`` is called only when saving or loading (it creates
    a fresh optimizer's state, which must not happen on a fresh start).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict["optim"])


class Checkpointer:
    """Saves and loads the checkpoints of one job in ``directory``; see the module's invariants.

    ``interval >= 1`` and ``keep >= 1``. Holds no open files or state between calls, so one
    instance per process is enough and any number of processes can share the directory.
    """

    def __init__(self, directory: str | os.PathLike[str], interval: int = DEFAULT_INTERVAL,
                 keep: int = DEFAULT_KEEP) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive integer, got {keep!r}")
        if not str(directory):
            raise ValueError("directory must not be empty")
        self.directory = Path(directory)
        self.interval = interval
        self.keep = keep

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.directory)!r}, interval={self.interval}, keep={self.keep})"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Checkpointer | None:
        """The checkpointer the job configured, or ``None`` when it configured none.

        Reads ``SALAMANDER_CHECKPOINT_DIR`` (unset or empty: ``None``) and
        ``SALAMANDER_CHECKPOINT_INTERVAL`` (unset or empty: 100; otherwise a positive integer,
        or a :class:`CheckpointError` naming the variable). ``environ`` defaults to
        ``os.environ``.
        """
        env = os.environ if environ is None else environ
        directory = env.get(wire.ENV_CHECKPOINT_DIR, "").strip()
        raw = env.get(wire.ENV_CHECKPOINT_INTERVAL, "").strip()
        interval = DEFAULT_INTERVAL
        if raw:
            try:
                interval = int(raw)
            except ValueError:
                raise CheckpointError(f"environment variable {wire.ENV_CHECKPOINT_INTERVAL} must be "
                                      f"a positive integer, got {raw!r}") from None
            if interval < 1:
                raise CheckpointError(f"environment variable {wire.ENV_CHECKPOINT_INTERVAL} must be "
                                      f"a positive integer, got {raw!r}")
        if not directory:
            return None
        return cls(directory, interval)

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` completed steps: a positive multiple of the interval."""
        return step > 0 and step % self.interval == 0

    def path(self, step: int) -> Path:
        """The directory checkpoint ``step`` is (or would be) written to."""
        return self.directory / step_dir_name(step)

    # -- save ---------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as checkpoint ``step``, commit it, prune old ones; returns its path.

        Collective when a process group exists. An existing ``step-N`` directory (an earlier
        attempt at the same step) is replaced. Training waits for it: the time counts as
        checkpointing in the job's goodput, and in the checkpoint metrics.
        """
        started = time.perf_counter()
        path = self._save(step, state)
        seconds = time.perf_counter() - started
        progress.note_blocked(seconds)
        written = sum(f.stat().st_size for f in path.glob(f"__{_rank()}_*.distcp"))
        telemetry.guarded(lambda: telemetry.worker().checkpoint("save", seconds, written))
        return path

    def _save(self, step: int, state: dict[str, Any]) -> Path:
        try:
            index = -1 if isinstance(step, bool) else operator.index(step)  # ints, numpy ints
        except TypeError:
            index = -1
        if index < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        step = index
        if _RESERVED in state:
            raise CheckpointError(f"the state key {_RESERVED!r} is reserved for the checkpointer")
        path = self.path(step)
        group = _group()
        error: str | None = None
        if _rank() == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                if path.exists():
                    shutil.rmtree(path)
            except OSError as exc:
                error = f"cannot prepare checkpoint directory {path}: {exc}"
        _agree(error, group)  # nobody writes into step-N before rank 0 has cleared it
        try:
            with _quiet_single_process():
                dcp.save({**state, _RESERVED: {"step": step}}, checkpoint_id=path,
                         no_dist=not group)
        except Exception as exc:  # DCP wraps per-rank failures; one error type for callers
            raise CheckpointError(f"cannot write checkpoint {path}: {_summary(exc)}") from exc
        if group:
            dist.barrier()  # every rank has written its part
        if _rank() == 0:
            try:
                if not (path / METADATA).is_file():
                    raise CheckpointError(f"checkpoint {path} has no {METADATA} after saving")
                self._commit(path)
                self._prune(step)
            except CheckpointError as exc:
                error = str(exc)
        _agree(error, group)  # ``latest`` names this checkpoint on every rank's return
        return path

    def _commit(self, path: Path) -> None:
        """Point ``latest`` at ``path`` atomically: readers see the old name or the new one."""
        marker = self.directory / LATEST
        tmp = self.directory / f".{LATEST}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(path.name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, marker)
            with contextlib.suppress(OSError):  # make the rename itself durable where possible
                fd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise CheckpointError(f"cannot write the commit marker {marker}: {exc}") from exc

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints up to ``step``; delete other step dirs."""
        complete = [s for s, p in self._step_dirs() if s <= step and (p / METADATA).is_file()]
        kept = set(sorted(complete)[-self.keep:]) | {step}
        for s, p in self._step_dirs():
            if s not in kept:
                try:
                    shutil.rmtree(p)
                except OSError as exc:  # a leftover costs disk space, not correctness
                    log.warning("cannot delete old checkpoint %s: %s", p, exc)

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every ``step-*`` directory, oldest first; none if no directory."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CheckpointError(f"cannot list checkpoint directory {self.directory}: {exc}") from exc
        found = [(s, p) for p in entries if (s := _parse_step(p.name)) is not None and p.is_dir()]
        return sorted(found)

    # -- load ---------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest complete checkpoint on this process's view of the disk, or ``None``.

        ``latest`` when it names a complete checkpoint; otherwise (with a warning) the newest
        ``step-*`` directory holding ``.metadata``. Not collective.
        """
        marker = self.directory / LATEST
        problem: str | None = None
        try:
            name = marker.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            name, problem = "", f"{marker} is missing"
        except (OSError, UnicodeDecodeError) as exc:
            name, problem = "", f"{marker} cannot be read ({exc})"
        if problem is None:
            if _parse_step(name) is None:
                problem = f"{marker} is malformed (expected a name like step-0000000040, got {name[:60]!r})"
            elif not (self.directory / name / METADATA).is_file():
                problem = f"{marker} names {name}, which is missing or has no {METADATA}"
            else:
                return self.directory / name
        complete = [p for _, p in self._step_dirs() if (p / METADATA).is_file()]
        if not complete:
            if marker.exists():
                log.warning("%s and no complete step-* checkpoint in %s; starting afresh",
                            problem, self.directory)
            return None
        log.warning("%s; falling back to the newest complete checkpoint, %s", problem, complete[-1])
        return complete[-1]

    def load(self, state: dict[str, Any]) -> int | None:
        """Load the newest complete checkpoint into ``state`` in place and return its step.

        ``None`` (and ``state`` untouched) when there is no complete checkpoint. Collective
        when a process group exists: rank 0 chooses the checkpoint and every rank loads it.
        Every top-level key of ``state`` must be in the checkpoint; extra entries in the
        checkpoint are ignored.
        """
        started = time.perf_counter()
        step = self._load(state)
        if step is not None:
            seconds = time.perf_counter() - started
            telemetry.guarded(lambda: telemetry.worker().checkpoint("load", seconds))
        return step

    def _load(self, state: dict[str, Any]) -> int | None:
        if _RESERVED in state:
            raise CheckpointError(f"the state key {_RESERVED!r} is reserved for the checkpointer")
        group = _group()
        path: Path | None = None
        error: str | None = None
        if _rank() == 0:
            try:
                path = self.latest()
            except CheckpointError as exc:
                error = str(exc)
        if group:
            box: list[Any] = [(error, None if path is None else str(path))]
            dist.broadcast_object_list(box, src=0)
            error, chosen = box[0]
            path = None if chosen is None else Path(chosen)
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            return None
        step = _parse_step(path.name)
        assert step is not None  # latest() only returns step-* directories
        self._check_keys(path, state)
        record: dict[str, Any] = {"step": -1}
        full = {**state, _RESERVED: record}
        try:
            with _quiet_single_process():
                dcp.load(full, checkpoint_id=path, no_dist=not group)
        except Exception as exc:
            raise CheckpointError(f"cannot load checkpoint {path}: {_summary(exc)}") from exc
        if full[_RESERVED].get("step") != step:
            raise CheckpointError(f"checkpoint {path} records step {full[_RESERVED].get('step')!r}, "
                                  f"not the {step} its name says")
        for key in state:
            state[key] = full[key]
        return step

    @staticmethod
    def _check_keys(path: Path, state: Mapping[str, Any]) -> None:
        """Every top-level key of ``state`` has an entry in the checkpoint (clear error if not)."""
        try:
            metadata = dcp.FileSystemReader(path).read_metadata()
        except Exception as exc:
            raise CheckpointError(f"cannot read {path / METADATA}: {_summary(exc)}") from exc
        fqns = list(metadata.state_dict_metadata)
        missing = sorted(k for k in state
                         if not any(f == k or f.startswith(k + ".") for f in fqns))
        if missing:
            have = sorted({f.split(".", 1)[0] for f in fqns} - {_RESERVED})
            raise CheckpointError(f"checkpoint {path} has no entry for {', '.join(map(repr, missing))} "
                                  f"(it has {', '.join(map(repr, have)) or 'nothing'})")


def _agree(error: str | None, group: bool) -> None:
    """Share rank 0's outcome with every rank (collective with a group); raise it everywhere.

    Used instead of a bare barrier where rank 0 works alone, so a failure on rank 0 becomes a
    :class:`CheckpointError` on every rank rather than the others waiting for it.
    """
    if group:
        box: list[Any] = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)


def _summary(exc: BaseException) -> str:
    """The gist of an exception: DCP's ``CheckpointException`` carries every rank's traceback."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, cause = min(failures.items(), key=lambda item: item[0])
        return f"rank {rank}: {type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {exc}"
