"""ZeroRedundancyOptimizer state saved by a world of one size, put together for another.

ZeRO gives each rank the optimizer state of a partition of the parameters, and the partition
depends on the world size, so a rank's snapshot only fits the same rank of a world of the same
size. To let a job that shrank or grew keep its optimizer state, a ZeRO trainee's snapshot tree
records under ``"zero"`` the *global index* of each parameter its local optimizer holds, in the
order of the local optimizer's ``state_dict`` (its local indices 0, 1, ...). The global index
is the parameter's position in the ZeRO optimizer's own ``param_groups``, flattened: the same
in every world size, independent of module wrappers.

:func:`merge` builds, from the trees of the old ranks that held the new rank's parameters, the
tree the new rank would have captured itself: its optimizer state keyed by its own local
indices. Pure: no I/O, nothing live is touched.

Invariants: every live local parameter's state is the saved state of the same global
parameter, taken as it is (the source trees' own tensors; :func:`.capture.apply` copies them);
everything but the optimizer state (model, scheduler, RNG, data position, group
hyperparameters) comes from the base tree; anything missing or inconsistent raises
:class:`ReshardError`, naming it, before anything live changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from salamander_worker.snapshot.capture import CaptureError


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
