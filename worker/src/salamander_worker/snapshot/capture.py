"""What a snapshot holds: a training run's whole state as one tree, and putting it back.

The tree is ``{"step", "model", "optimizer", "scheduler", "rng", "data", "zero"}``:

* ``model`` and ``optimizer`` come from torch's ``get_state_dict`` (parameter names without
  DDP's ``module.`` prefix; FSDP parameters and their optimizer state as DTensors, of which the
  payload keeps this rank's local shard). A :class:`ZeroRedundancyOptimizer` contributes its
  local partition (``optimizer.optim``), the unique shard this rank holds, and ``zero``
  records which parameters that is (:func:`zero_groups`), so that :mod:`.reshard` can put the
  shards of a world of another size together; ``zero`` is None for any other optimizer.
* ``rng`` holds Python's, numpy's, torch's CPU and (when CUDA is initialised) every CUDA
  device's generator state.
* ``data`` is whatever the caller passes as the data-loader position (plain values or a
  ``state_dict()``).

:func:`apply` puts a tree back into live objects: tensors are copied in place into the current
state's tensors (so devices, DTensor meshes and placements come from the live objects; CPU
copies on a few threads, :func:`copy_all`), then ``set_state_dict`` / ``load_state_dict`` run,
which copy nothing more: their tensors are the live ones already filled. A tree that does not match the live objects'
structure or shapes raises :class:`CaptureError` before anything is changed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import set_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import Shard

from salamander_worker.snapshot import pool
from salamander_worker.snapshot.device import upload
from salamander_worker.snapshot.state_dicts import StateDicts


class CaptureError(RuntimeError):
    """A snapshot's state does not fit the live training objects; the message names the key."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


@dataclass
class Trainee:
    """The live objects whose state a snapshot holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Stateful | None = None
    state_dicts: StateDicts = field(default_factory=StateDicts, repr=False, compare=False)

    @property
    def sharded(self) -> bool:
        """True when ranks hold different model or optimizer state (ZeRO, FSDP): then a rank's
        snapshot only fits the same rank of a world of the same size."""
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            return True
        return any(hasattr(p, "_local_tensor") for p in self.model.parameters())


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A process may see fewer devices than the one that took the snapshot (another node):
        # each device it has takes the state of the device of the same index.
        for device, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def _model_and_optimizer(trainee: Trainee) -> tuple[dict[str, Any], Any]:
    """``get_state_dict``'s answer (through :class:`.state_dicts.StateDicts`)."""
    if isinstance(trainee.optimizer, ZeroRedundancyOptimizer):
        zero = trainee.optimizer
        # ZeRO's own groups are the truth (an LR scheduler on it changes them); ZeRO copies them
        # to the local optimizer only inside step(), so without this the captured learning rate
        # would be one scheduler step old.
        sync = getattr(zero, "_sync_param_groups", None)
        if sync is not None:
            sync(zero.param_groups, zero.optim.param_groups)
        model_state, _ = trainee.state_dicts(trainee.model, None)
        return model_state, zero.optim.state_dict()
    return trainee.state_dicts(trainee.model, trainee.optimizer)


def zero_groups(trainee: Trainee) -> list[list[int]] | None:
    """For a ZeRO optimizer, the global index of each parameter in its local partition, group
    by group, in the order of the local optimizer's ``state_dict``; None for any other. A
    parameter's global index is its position in the ZeRO optimizer's ``param_groups``,
    flattened: the same in a world of any size."""
    zero = trainee.optimizer
    if not isinstance(zero, ZeroRedundancyOptimizer) or not hasattr(zero, "optim"):
        return None   # (with overlap_with_ddp, ZeRO builds its local optimizer only at the first steps)
    index = {id(p): i for i, p in enumerate(p for group in zero.param_groups for p in group["params"])}
    return [[index[id(p)] for p in group["params"]] for group in zero.optim.param_groups]


def shard_layout(trainee: Trainee) -> str | None:
    """How the trainee's state is sharded, when :mod:`.reshard` can put it together for a world
    of another size: ``"zero"`` (a ZeroRedundancyOptimizer) or ``"fsdp"`` (every DTensor
    parameter cut in rows over one mesh dimension spanning the world in rank order, as FSDP2's
    ``fully_shard`` does); None for replicated state and for layouts it cannot (HSDP's 2-D
    meshes, other placements)."""
    if isinstance(trainee.optimizer, ZeroRedundancyOptimizer):
        return "zero" if zero_groups(trainee) is not None else None
    dtensors = [p for p in trainee.model.parameters() if hasattr(p, "_local_tensor")]
    return "fsdp" if dtensors and all(_rows_over_the_world(p) for p in dtensors) else None


def _rows_over_the_world(param: Any) -> bool:
    mesh, placements = param.device_mesh, param.placements
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return (mesh.ndim == 1 and len(placements) == 1 and isinstance(placements[0], Shard)
            and placements[0].dim == 0 and mesh.mesh.tolist() == list(range(world)))


class Rows(NamedTuple):
    """A live FSDP parameter: its global shape and the rows ``[start, stop)`` this rank holds."""

    shape: tuple[int, ...]
    start: int
    stop: int


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of ``rows`` that ``torch.chunk(..., world)`` gives ``rank``
    (FSDP2's ``Shard(0)``): chunks of ``ceil(rows / world)``, the last ones short or empty."""
    size = -(-rows // world)
    start = min(rows, rank * size)
    return start, min(rows, start + size)


def fsdp_rows(trainee: Trainee) -> dict[str, Rows]:
    """Fully qualified name -> :class:`Rows` of every FSDP parameter (``shard_layout`` "fsdp")."""
    model_state, _ = _model_and_optimizer(trainee)
    found = {}
    for name, value in model_state.items():
        if not hasattr(value, "_local_tensor"):
            continue
        mesh = value.device_mesh
        start, stop = chunk_rows(value.shape[0], mesh.size(), mesh.get_local_rank())
        if value.to_local().shape[0] != stop - start:
            raise CaptureError(f"FSDP parameter {name} holds {value.to_local().shape[0]} rows on this rank, "
                               f"not the {stop - start} of torch.chunk's layout")
        found[name] = Rows(tuple(value.shape), start, stop)
    return found


def capture(trainee: Trainee, step: int, data: Any = None) -> dict[str, Any]:
    """The state tree after ``step`` completed optimizer steps. Tensors are live (not copied):
    write the tree out before training changes them."""
    model_state, optim_state = _model_and_optimizer(trainee)
    zero = zero_groups(trainee)
    return {
        "step": step,
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": trainee.scheduler.state_dict() if trainee.scheduler is not None else None,
        "rng": rng_state(),
        "data": data,
        "zero": None if zero is None else {"params": [i for group in zero for i in group]},
    }


def apply(trainee: Trainee, tree: dict[str, Any]) -> tuple[int, Any]:
    """Put ``tree`` back into ``trainee``; returns ``(step, data)``. ``tree``'s tensors may be
    views of snapshot memory: they are copied into the live tensors, and whatever is kept as
    it is (a fresh optimizer's state, the scheduler's and the data position's tensors) is
    cloned, so nothing live ever aliases a snapshot."""
    return prepare(trainee, tree)()


def prepare(trainee: Trainee, tree: dict[str, Any]) -> Callable[[], tuple[int, Any]]:
    """Check that ``tree`` fits ``trainee`` and return what puts it back (:func:`apply`'s
    second half). Raises :class:`CaptureError` on a mismatch, so a collective restore can agree
    that every rank's tree fits before any rank changes anything. It changes no parameter,
    buffer, scheduler or RNG; a fresh optimizer (no state yet) may be given torch's zero-step
    state (``get_state_dict`` creates it), which a caller that then applies nothing clears."""
    if not isinstance(tree, dict) or not {"step", "model", "optimizer", "rng"} <= set(tree):
        raise CaptureError("snapshot state lacks one of step, model, optimizer, rng")
    if not isinstance(tree["rng"], dict) or not {"python", "numpy", "torch"} <= set(tree["rng"]):
        raise CaptureError("snapshot RNG state lacks one of python, numpy, torch")
    if trainee.scheduler is not None and tree.get("scheduler") is None:
        raise CaptureError("snapshot has no LR scheduler state but a scheduler was given")
    zero = zero_groups(trainee)
    saved = tree.get("zero")
    if zero is not None and isinstance(saved, dict) and saved.get("params") != [i for g in zero for i in g]:
        raise CaptureError("snapshot's ZeRO shard holds other parameters than this rank's partition "
                           "(a world of another size took it: reshard it first)")
    model_live, optim_live = _model_and_optimizer(trainee)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    model_state = _fill(model_live, tree["model"], "model", copies)
    optim_state = None if trainee.optimizer is None else _fill(optim_live, tree["optimizer"], "optimizer", copies)

    def put_back() -> tuple[int, Any]:
        copy_all(copies)
        # The state dicts below hold the live tensors themselves, now filled: torch's copy_ of
        # a tensor onto itself returns at once, so loading them costs no second copy.
        if isinstance(trainee.optimizer, ZeroRedundancyOptimizer):
            set_state_dict(trainee.model, [], model_state_dict=model_state, optim_state_dict={})
            zero = trainee.optimizer
            zero.optim.load_state_dict(optim_state)
            sync = getattr(zero, "_sync_param_groups", None)
            if sync is not None:
                sync(zero.optim.param_groups, zero.param_groups)
        elif trainee.optimizer is None:
            set_state_dict(trainee.model, [], model_state_dict=model_state, optim_state_dict={})
        else:
            set_state_dict(trainee.model, trainee.optimizer, model_state_dict=model_state,
                           optim_state_dict=optim_state)
        if trainee.scheduler is not None:
            trainee.scheduler.load_state_dict(cloned(tree["scheduler"]))
        set_rng_state(tree["rng"])
        return int(tree["step"]), cloned(tree.get("data"))

    return put_back


#: Contiguous CPU copies larger than this are cut into pieces of this size, so one large
#: tensor also spreads over the bulk pool's threads.
COPY_PIECE = 16 << 20


def copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run ``dst.copy_(src)`` for every pair, without autograd. Copies into CPU tensors run on
    the bulk thread pool (:mod:`.pool`; torch releases the GIL), large contiguous ones cut into
    ``COPY_PIECE`` pieces, largest first; copies from the host into a GPU go through
    :func:`.device.upload` (staged through page-locked buffers on several threads, overlapping
    the copy engines); any other pair runs in order in the calling thread."""
    parallel: list[tuple[torch.Tensor, torch.Tensor]] = []
    uploads: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for dst, src in copies:
            if dst.device.type == "cuda" and src.device.type == "cpu":
                uploads.append((dst, src))
            elif dst.device.type != "cpu" or src.device.type != "cpu":
                dst.copy_(src)
            elif (dst.nbytes > 2 * COPY_PIECE and dst.is_contiguous() and src.is_contiguous()
                  and dst.dtype == src.dtype and dst.shape == src.shape):
                flat_dst, flat_src = dst.view(-1), src.view(-1)
                step = max(1, COPY_PIECE // dst.element_size())
                parallel += [(flat_dst[i:i + step], flat_src[i:i + step]) for i in range(0, flat_dst.numel(), step)]
            else:
                parallel.append((dst, src))
    if uploads:
        upload(uploads)
    parallel.sort(key=lambda pair: -pair[0].nbytes)
    pool.run(_copy, parallel)


def _copy(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():   # grad mode is per thread
        pair[0].copy_(pair[1])


def _fresh(tree: Any, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``tree`` with every tensor replaced by a new, uninitialised one of the same shape, dtype,
    device and layout; the copies that fill them are appended to ``copies`` (so together with
    the rest they run once the whole tree has been checked, in parallel)."""
    if isinstance(tree, torch.Tensor):
        new = torch.empty_like(tree, memory_format=torch.preserve_format)
        copies.append((new, tree))
        return new
    if isinstance(tree, dict):
        return {key: _fresh(value, copies) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_fresh(value, copies) for value in tree)
    return tree


def cloned(tree: Any) -> Any:
    """``tree`` with every tensor replaced by a copy."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {key: cloned(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(cloned(value) for value in tree)
    return tree


def _fill(live: Any, saved: Any, path: str, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``live`` with its plain values replaced by ``saved``'s, its tensors kept: the in-place
    copies of ``saved``'s tensors into them are appended to ``copies``, for the caller to run
    once the whole tree has been checked. Structures must match; a fresh optimizer's empty
    state is the exception: the saved optimizer state is then taken into new tensors (whose
    copies are appended too)."""
    if isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise CaptureError(f"snapshot has no tensor at {path}")
        local = getattr(live, "_local_tensor", live)
        if tuple(local.shape) != tuple(saved.shape) or local.dtype != saved.dtype:
            raise CaptureError(f"snapshot tensor {path} is {tuple(saved.shape)} {saved.dtype}; the live one "
                               f"is {tuple(local.shape)} {local.dtype}")
        copies.append((local, saved))
        return live
    if isinstance(live, dict):
        if not isinstance(saved, dict):
            raise CaptureError(f"snapshot has no mapping at {path}")
        if set(live) != set(saved):
            if path.endswith("state") and not live:
                return _fresh(saved, copies)  # the optimizer has not stepped yet: no state to fill in place
            missing, extra = sorted(map(str, set(live) - set(saved))), sorted(map(str, set(saved) - set(live)))
            raise CaptureError(f"snapshot keys at {path} differ: missing {missing[:5]}, unexpected {extra[:5]}")
        return {key: _fill(live[key], saved[key], f"{path}.{key}", copies) for key in live}
    if isinstance(live, (list, tuple)) and isinstance(saved, (list, tuple)) and len(live) == len(saved):
        return type(live)(_fill(a, b, f"{path}[{i}]", copies) for i, (a, b) in enumerate(zip(live, saved)))
    return saved
