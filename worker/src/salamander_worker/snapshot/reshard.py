"""Sharded state saved by a world of one size, put together for another: ZeRO and FSDP.

**ZeRO** gives each rank the optimizer state of a partition of the parameters, and the partition
depends on the world size, so a rank's snapshot only fits the same rank of a world of the same
size. To let a job that shrank or grew keep its optimizer state, a ZeRO trainee's snapshot tree
records under ``"zero"`` the *global index* of each parameter its local optimizer holds, in the
order of the local optimizer's ``state_dict`` (its local indices 0, 1, ...). The global index
is the parameter's position in the ZeRO optimizer's own ``param_groups``, flattened: the same
in every world size, independent of module wrappers.

:func:`merge` builds, from the trees of the old ranks that held the new rank's parameters, the
tree the new rank would have captured itself: its optimizer state keyed by its own local
indices. Every live local parameter's state is the saved state of the same global parameter,
taken as it is (the source trees' own tensors; :func:`.capture.apply` copies them).

**FSDP** (FSDP2, ``fully_shard`` on a 1-D mesh) cuts every parameter into row chunks, rank
``i`` holding chunk ``i`` of ``torch.chunk(param, world)``, and the optimizer state of a
parameter is cut like the parameter. :func:`rows` builds the new rank's tree from *every* old
rank's tree (in rank order): each sharded leaf is the new rank's rows of the old chunks laid end
to end. An optimizer state leaf counts as sharded when it has its parameter's local shape on
every old rank (Adam's moments); any other (Adam's step count) is the base tree's.

Both are pure: no I/O, nothing live is touched. Everything not sharded (model buffers,
scheduler, RNG, data position, group hyperparameters) comes from the base tree, the old rank
whose place the new rank takes; anything missing or inconsistent raises :class:`ReshardError`,
naming it, before anything live changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from salamander_worker.snapshot.capture import CaptureError, Rows


class ReshardError(CaptureError):
    """Old ranks' ZeRO shards cannot be put together for this rank; the message says why."""


def shard_indices(tree: Any, source: str) -> list[int]:
    """The global indices a snapshot tree's ZeRO shard holds, in local order (checked)."""
    zero = tree.get("zero") if isinstance(tree, Mapping) else None
    params = zero.get("params") if isinstance(zero, Mapping) else None
    if not isinstance(params, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in params):
        raise ReshardError(f"{source} has no ZeRO shard layout (snapshots taken before it was recorded "
                           "cannot be resharded)")
    if len(set(params)) != len(params):
        raise ReshardError(f"{source} names a parameter twice in its ZeRO shard")
    return params


def merge(base: Mapping[str, Any], sources: Mapping[int, Mapping[str, Any]], live: Sequence[Sequence[int]]
          ) -> dict[str, Any]:
    """The tree for a rank whose local optimizer holds, group by group, the global parameters
    ``live``: ``base``'s (the old rank whose model, RNG and data position it takes) with the
    optimizer state gathered from ``sources`` (old rank -> its tree; ``base`` among them or not)."""
    base_optim = base.get("optimizer")
    if not isinstance(base_optim, Mapping) or not isinstance(base_optim.get("param_groups"), list):
        raise ReshardError("the base snapshot has no optimizer param_groups")
    groups = base_optim["param_groups"]
    if len(groups) != len(live):
        raise ReshardError(f"the snapshot's optimizer has {len(groups)} parameter groups; the live one has {len(live)}")
    found: dict[int, Any] = {}
    covered: set[int] = set()
    for old_rank, tree in sorted(sources.items()):
        optim = tree.get("optimizer")
        if not isinstance(optim, Mapping) or not isinstance(optim.get("state"), Mapping):
            raise ReshardError(f"old rank {old_rank}'s snapshot has no optimizer state")
        for local, index in enumerate(shard_indices(tree, f"old rank {old_rank}'s snapshot")):
            covered.add(index)
            if local in optim["state"]:   # a parameter that never had a gradient has no state
                found.setdefault(index, optim["state"][local])
    wanted = [index for group in live for index in group]
    uncovered = sorted(set(wanted) - covered)
    if uncovered:
        raise ReshardError(f"no old rank's snapshot given holds parameters {uncovered[:8]}")
    state = {local: found[index] for local, index in enumerate(wanted) if index in found}
    new_groups, start = [], 0
    for group, indices in zip(groups, live):
        if not isinstance(group, Mapping):
            raise ReshardError("the base snapshot's param_groups hold a non-mapping")
        new_groups.append({**group, "params": list(range(start, start + len(indices)))})
        start += len(indices)
    return {**base, "optimizer": {"state": state, "param_groups": new_groups},
            "zero": {"params": wanted}}


def sources_needed(live: Sequence[Sequence[int]], holdings: Mapping[int, Sequence[int]]) -> list[int]:
    """The old ranks whose shards (``holdings``: old rank -> global indices) hold any of the
    ``live`` parameters, in rank order; raises if one is held by none."""
    wanted = {index for group in live for index in group}
    held = {index for indices in holdings.values() for index in indices}
    if wanted - held:
        raise ReshardError(f"no old rank's shard holds parameters {sorted(wanted - held)[:8]}")
    return [rank for rank, indices in sorted(holdings.items()) if wanted & set(indices)]


def rows(base: Mapping[str, Any], old: Sequence[Mapping[str, Any]], live: Mapping[str, Rows]) -> dict[str, Any]:
    """The tree for a rank whose FSDP parameters are ``live`` (fully qualified name -> rows),
    from ``old``, every old rank's tree in rank order; ``base`` gives everything not sharded."""
    if not old:
        raise ReshardError("no old rank's snapshot given")
    model = dict(_mapping(base, "model", "the base snapshot"))
    optim = _mapping(base, "optimizer", "the base snapshot")
    state = {name: dict(leaves) if isinstance(leaves, Mapping) else leaves
             for name, leaves in _mapping(optim, "state", "the base snapshot's optimizer").items()}
    olds = [(_mapping(t, "model", f"old rank {r}'s snapshot"),
             _mapping(_mapping(t, "optimizer", f"old rank {r}'s snapshot"), "state", f"old rank {r}'s optimizer"))
            for r, t in enumerate(old)]
    for name, want in live.items():
        pieces = [m.get(name) for m, _ in olds]
        _check_pieces(pieces, want, f"parameter {name}")
        model[name] = _take(pieces, want)
        if not isinstance(state.get(name), dict):
            continue
        for leaf, value in state[name].items():   # sharded like its parameter on every old rank
            saved = [s[name].get(leaf) if isinstance(s.get(name), Mapping) else None for _, s in olds]
            if isinstance(value, torch.Tensor) and value.dim() and all(
                    isinstance(t, torch.Tensor) and t.shape == p.shape for t, p in zip(saved, pieces)):
                state[name][leaf] = _take(saved, want)
    return {**base, "model": model, "optimizer": {**optim, "state": state}}


def _mapping(tree: Any, key: str, what: str) -> Mapping[str, Any]:
    value = tree.get(key) if isinstance(tree, Mapping) else None
    if not isinstance(value, Mapping):
        raise ReshardError(f"{what} has no {key} mapping")
    return value


def _check_pieces(pieces: Sequence[Any], want: Rows, what: str) -> None:
    if not all(isinstance(p, torch.Tensor) and p.dim() >= 1 for p in pieces):
        raise ReshardError(f"{what} is not a sharded tensor in every old rank's snapshot")
    total = sum(p.shape[0] for p in pieces)
    if total != want.shape[0] or any(tuple(p.shape[1:]) != tuple(want.shape[1:]) for p in pieces):
        raise ReshardError(f"{what}: the old ranks' shards make {(total, *pieces[0].shape[1:])}; "
                           f"the live parameter is {want.shape}")
    if not 0 <= want.start <= want.stop <= total:
        raise ReshardError(f"{what}: rows [{want.start}, {want.stop}) are outside its {total} rows")


def _take(pieces: Sequence[torch.Tensor], want: Rows) -> torch.Tensor:
    """Rows ``[want.start, want.stop)`` of ``pieces`` laid end to end (a view when they fall in one)."""
    parts, offset = [], 0
    for piece in pieces:
        lo, hi = max(want.start, offset), min(want.stop, offset + piece.shape[0])
        if lo < hi:
            parts.append(piece[lo - offset:hi - offset])
        offset += piece.shape[0]
    if not parts:
        return pieces[0][0:0]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
