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
parameter is cut like the parameter. :func:`rows` builds the new rank's tree from the trees of
the old ranks whose chunks overlap its rows (:func:`fsdp_sources`): each sharded leaf is the
new rank's rows of the old chunks laid end to end. An optimizer state leaf counts as sharded
when it has its parameter's shape in the base tree (Adam's moments), and must then have it in
every tree given; any other (Adam's step count) is the base tree's.

Both are pure: no I/O, nothing live is touched. Everything not sharded (model buffers,
scheduler, RNG, data position, group hyperparameters) comes from the base tree, the old rank
whose place the new rank takes; anything missing or inconsistent raises :class:`ReshardError`,
naming it, before anything live changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from salamander_worker.snapshot.capture import CaptureError, Rows, chunk_rows, cloned


class ReshardError(CaptureError):
    """Old ranks' shards cannot be put together for this rank; the message says why."""


def shard_indices(tree: Any, source: str) -> list[int]:
    """The global indices a snapshot tree's ZeRO shard holds, in local order (checked against
    the number of parameters its optimizer's groups hold)."""
    zero = tree.get("zero") if isinstance(tree, Mapping) else None
    params = zero.get("params") if isinstance(zero, Mapping) else None
    if not isinstance(params, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in params):
        raise ReshardError(f"{source} has no ZeRO shard layout (snapshots taken before it was recorded "
                           "cannot be resharded)")
    if len(set(params)) != len(params):
        raise ReshardError(f"{source} names a parameter twice in its ZeRO shard")
    held = sum(len(group["params"]) for group in _groups(tree, source))
    if held != len(params):
        raise ReshardError(f"{source} lists {len(params)} parameters in its ZeRO layout; its optimizer "
                           f"holds {held}")
    return params


def _groups(tree: Any, source: str) -> list[Mapping[str, Any]]:
    groups = _mapping(tree, "optimizer", source).get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ReshardError(f"{source} has no well-formed optimizer param_groups")
    return groups


def keep_only(tree: Mapping[str, Any], wanted: set[int], source: str) -> dict[str, Any]:
    """``tree``'s ZeRO shard with the optimizer state of only the ``wanted`` global parameters,
    cloned: what :func:`merge` needs of a source, without holding on to its payload's memory."""
    indices = shard_indices(tree, source)
    optim = _mapping(tree, "optimizer", source)
    state = _mapping(optim, "state", source)
    kept = {local: cloned(state[local]) for local, index in enumerate(indices) if index in wanted and local in state}
    return {"optimizer": {"state": kept, "param_groups": optim["param_groups"]}, "zero": {"params": indices}}


def merge(base: Mapping[str, Any], sources: Mapping[int, Mapping[str, Any]], live: Sequence[Sequence[int]]
          ) -> dict[str, Any]:
    """The tree for a rank whose local optimizer holds, group by group, the global parameters
    ``live``: ``base``'s (the old rank whose model, RNG and data position it takes) with the
    optimizer state gathered from ``sources`` (old rank -> its tree, or :func:`keep_only` of
    it; ``base`` among them or not)."""
    groups = _groups(base, "the base snapshot")
    if len(groups) != len(live):
        raise ReshardError(f"the snapshot's optimizer has {len(groups)} parameter groups; the live one has {len(live)}")
    found: dict[int, Any] = {}
    owner: dict[int, int] = {}
    for old_rank, tree in sorted(sources.items()):
        source = f"old rank {old_rank}'s snapshot"
        state = _mapping(_mapping(tree, "optimizer", source), "state", f"{source}'s optimizer")
        for local, index in enumerate(shard_indices(tree, source)):
            if owner.setdefault(index, old_rank) != old_rank:
                raise ReshardError(f"parameter {index} is in the ZeRO shards of old ranks {owner[index]} and {old_rank}")
            if local in state:   # a parameter that never had a gradient has no state
                found[index] = state[local]
    wanted = [index for group in live for index in group]
    uncovered = sorted(set(wanted) - set(owner))
    if uncovered:
        raise ReshardError(f"no old rank's snapshot given holds parameters {uncovered[:8]}")
    state = {local: found[index] for local, index in enumerate(wanted) if index in found}
    new_groups, start = [], 0
    for group, indices in zip(groups, live):
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


def fsdp_sources(live: Mapping[str, Rows], old_world: int) -> list[int]:
    """The old ranks (of ``old_world``) whose chunk of some live parameter overlaps this rank's rows."""
    needed = set()
    for want in live.values():
        if want.stop > want.start:
            needed |= {q for q in range(old_world)
                       if _overlap(chunk_rows(want.shape[0], old_world, q), (want.start, want.stop))}
    return sorted(needed)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def rows(base: Mapping[str, Any], old: Mapping[int, Mapping[str, Any]], old_world: int,
         live: Mapping[str, Rows]) -> dict[str, Any]:
    """The tree for a rank whose FSDP parameters are ``live`` (fully qualified name -> rows),
    from ``old`` (old rank -> its tree; at least the :func:`fsdp_sources`) of a world of
    ``old_world`` ranks; ``base`` gives everything not sharded."""
    model = dict(_mapping(base, "model", "the base snapshot"))
    optim = _mapping(base, "optimizer", "the base snapshot")
    state = {name: dict(leaves) if isinstance(leaves, Mapping) else leaves
             for name, leaves in _mapping(optim, "state", "the base snapshot's optimizer").items()}
    olds = {q: (_mapping(t, "model", f"old rank {q}'s snapshot"),
                _mapping(_mapping(t, "optimizer", f"old rank {q}'s snapshot"), "state", f"old rank {q}'s optimizer"))
            for q, t in sorted(old.items())}
    for name, want in live.items():
        what = f"parameter {name}"
        if not want.shape or not 0 <= want.start <= want.stop <= want.shape[0]:
            raise ReshardError(f"{what}: rows [{want.start}, {want.stop}) of shape {want.shape} are not a row range")
        sources = fsdp_sources({name: want}, old_world)
        missing = [q for q in sources if q not in olds]
        if missing:
            raise ReshardError(f"{what}: the snapshots of old ranks {missing} are needed and not given")
        pieces = {q: olds[q][0].get(name) for q in sources}
        _check_pieces(pieces, want, old_world, what)
        model[name] = _take(pieces, want, old_world, like=model.get(name))
        leaves = state.get(name)
        if not isinstance(leaves, dict):
            continue
        shape = getattr(_mapping(base, "model", "the base snapshot").get(name), "shape", None)
        for leaf, value in leaves.items():
            if not (isinstance(value, torch.Tensor) and value.dim() and value.shape == shape):
                continue   # not cut like its parameter (Adam's step count): the base's
            saved = {q: olds[q][1][name].get(leaf) if isinstance(olds[q][1].get(name), Mapping) else None
                     for q in sources}
            _check_pieces(saved, want, old_world, f"optimizer state {leaf} of {what}")
            leaves[leaf] = _take(saved, want, old_world, like=value)
    return {**base, "model": model, "optimizer": {**optim, "state": state}}


def _mapping(tree: Any, key: str, what: str) -> Mapping[str, Any]:
    value = tree.get(key) if isinstance(tree, Mapping) else None
    if not isinstance(value, Mapping):
        raise ReshardError(f"{what} has no {key} mapping")
    return value


def _check_pieces(pieces: Mapping[int, Any], want: Rows, old_world: int, what: str) -> None:
    """Every piece is old rank q's chunk of a tensor of ``want.shape`` (``torch.chunk``'s rows)."""
    for q, piece in pieces.items():
        start, stop = chunk_rows(want.shape[0], old_world, q)
        if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != (stop - start, *want.shape[1:]):
            got = tuple(piece.shape) if isinstance(piece, torch.Tensor) else type(piece).__name__
            raise ReshardError(f"{what}: old rank {q}'s shard is {got}, not rows [{start}, {stop}) of {want.shape}")


def _take(pieces: Mapping[int, torch.Tensor], want: Rows, old_world: int, like: Any) -> torch.Tensor:
    """Rows ``[want.start, want.stop)`` of the old chunks (a view when they fall in one)."""
    parts = []
    for q, piece in sorted(pieces.items()):
        start, stop = chunk_rows(want.shape[0], old_world, q)
        lo, hi = max(want.start, start), min(want.stop, stop)
        if lo < hi:
            parts.append(piece[lo - start:hi - start])
    if not parts:
        template = like if isinstance(like, torch.Tensor) else next(iter(pieces.values()), None)
        dtype = template.dtype if isinstance(template, torch.Tensor) else torch.float32
        return torch.empty((0, *want.shape[1:]), dtype=dtype)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
