"""Putting ZeRO optimizer shards saved by a world of one size together for another (pure)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from salamander_worker.snapshot.capture import CaptureError, Rows, chunk_rows
from salamander_worker.snapshot.reshard import (ReshardError, fsdp_sources, keep_only, merge, rows, shard_indices,
                                                sources_needed)

GROUP = {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.01}


def state_of(index: int) -> dict:
    """The Adam state global parameter ``index`` would have: distinct values per parameter."""
    return {"step": torch.tensor(float(index)), "exp_avg": torch.full((2,), float(index)),
            "exp_avg_sq": torch.full((2,), float(index) / 10)}


def tree_of(rank: int, groups: list[list[int]], *, stepped: bool = True) -> dict:
    """The snapshot tree old rank ``rank`` takes when its local optimizer holds ``groups``."""
    flat = [i for g in groups for i in g]
    local_groups, start = [], 0
    for g in groups:
        local_groups.append({**GROUP, "params": list(range(start, start + len(g)))})
        start += len(g)
    return {"step": 7, "model": {"w": torch.ones(3)}, "scheduler": {"last_epoch": 7}, "rng": {"rank": rank},
            "data": {"index": 70 + rank},
            "optimizer": {"state": {local: state_of(i) for local, i in enumerate(flat)} if stepped else {},
                          "param_groups": local_groups},
            "zero": {"params": flat}}


OLD = {0: [[0, 3], [5]], 1: [[1], [4, 6]], 2: [[2], []]}   # 7 parameters, 2 groups, world 3
OLD_LOCAL = {i: [j for g in OLD[r] for j in g].index(i) for r in OLD for g in OLD[r] for i in g}


def test_a_new_rank_gets_the_state_of_its_own_parameters_from_whichever_old_rank_held_them() -> None:
    trees = {rank: tree_of(rank, groups) for rank, groups in OLD.items()}
    merged = merge(trees[1], trees, [[0, 2], [6]])
    assert merged["zero"] == {"params": [0, 2, 6]}
    assert [g["params"] for g in merged["optimizer"]["param_groups"]] == [[0, 1], [2]]
    assert all(g["lr"] == 0.01 for g in merged["optimizer"]["param_groups"])
    for local, index in enumerate([0, 2, 6]):
        assert merged["optimizer"]["state"][local] is trees[{0: 0, 2: 2, 6: 1}[index]]["optimizer"]["state"][
            OLD_LOCAL[index]]
    # Everything else is the base tree's: model, RNG, data position, scheduler, step.
    assert merged["rng"] == {"rank": 1} and merged["data"] == {"index": 71} and merged["step"] == 7
    assert merged["model"] is trees[1]["model"]



def test_only_the_old_ranks_holding_a_new_ranks_parameters_are_read() -> None:
    layouts = {rank: [i for g in groups for i in g] for rank, groups in OLD.items()}
    assert sources_needed([[0, 3], [5]], layouts) == [0]
    assert sources_needed([[0, 2], [6]], layouts) == [0, 1, 2]
    assert sources_needed([[], []], layouts) == []
    with pytest.raises(ReshardError, match=r"parameters \[9\]"):
        sources_needed([[9], []], layouts)


def test_an_optimizer_that_never_stepped_merges_into_empty_state() -> None:
    trees = {rank: tree_of(rank, groups, stepped=False) for rank, groups in OLD.items()}
    merged = merge(trees[0], trees, [[0, 1, 2, 3], [4, 5, 6]])
    assert merged["optimizer"]["state"] == {}
    assert [g["params"] for g in merged["optimizer"]["param_groups"]] == [[0, 1, 2, 3], [4, 5, 6]]


def test_bad_inputs_are_refused_by_name_and_are_capture_errors() -> None:
    trees = {rank: tree_of(rank, groups) for rank, groups in OLD.items()}
    with pytest.raises(ReshardError, match=r"parameters \[2\]"):
        merge(trees[0], {0: trees[0], 1: trees[1]}, [[0, 2], [6]])   # old rank 2 not given
    with pytest.raises(ReshardError, match="2 parameter groups; the live one has 1"):
        merge(trees[0], trees, [[0, 1, 2, 3, 4, 5, 6]])
    legacy = {k: v for k, v in trees[2].items() if k != "zero"}
    with pytest.raises(ReshardError, match="old rank 2's snapshot has no ZeRO shard layout"):
        merge(trees[0], {**trees, 2: legacy}, [[0, 2], [6]])
    with pytest.raises(ReshardError, match="names a parameter twice"):
        shard_indices({"zero": {"params": [1, 1]}}, "old rank 5's snapshot")
    with pytest.raises(ReshardError, match="no ZeRO shard layout"):
        shard_indices({"zero": {"params": [1, "x"]}}, "old rank 5's snapshot")
    with pytest.raises(ReshardError, match="base snapshot has no optimizer"):
        merge({"model": {}}, trees, [[0], [1]])
    with pytest.raises(ReshardError, match="base snapshot has no optimizer"):
        merge([1], trees, [[0], [1]])   # type: ignore[arg-type]
    with pytest.raises(ReshardError, match="old rank 1's snapshot has no optimizer"):
        merge(trees[0], {0: trees[0], 1: [1]}, [[0], [5]])   # type: ignore[dict-item]
    with pytest.raises(ReshardError, match="parameter 3 is in the ZeRO shards of old ranks 0 and 1"):
        merge(trees[0], {0: trees[0], 1: tree_of(1, [[1, 3], [4, 6]])}, [[0, 3], [5]])
    short = {**trees[1], "zero": {"params": [1, 4]}}
    with pytest.raises(ReshardError, match="lists 2 parameters in its ZeRO layout; its optimizer holds 3"):
        merge(trees[0], {0: trees[0], 1: short}, [[0], [5]])
    with pytest.raises(ReshardError, match="no well-formed optimizer param_groups"):
        merge(trees[0], {0: {**trees[0], "optimizer": {"state": {}, "param_groups": [{"lr": 1}]}}}, [[0], [5]])
    assert issubclass(ReshardError, CaptureError)


def test_keep_only_clones_the_wanted_state_and_merges_the_same() -> None:
    """A source cut down to what a rank needs (so its payload can be let go) merges to the same
    tree, and shares no memory with the source."""
    trees = {rank: tree_of(rank, groups) for rank, groups in OLD.items()}
    live = [[0, 2], [6]]
    kept = {rank: keep_only(tree, {0, 2, 6}, f"old rank {rank}") for rank, tree in trees.items()}
    assert set(kept[1]["optimizer"]["state"]) == {OLD_LOCAL[6]} and kept[0]["optimizer"]["state"].keys() == {0}
    merged, full = merge(trees[1], kept, live), merge(trees[1], trees, live)
    for local in range(3):
        a, b = merged["optimizer"]["state"][local]["exp_avg"], full["optimizer"]["state"][local]["exp_avg"]
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 5), st.randoms(use_true_random=False))
def test_any_old_and_new_partition_gives_every_parameter_its_own_state(params: int, old_world: int,
                                                                        new_world: int, rnd: random.Random) -> None:
    """Shards of any old world put together for any new world: every new rank's state for its
    parameters is the state those parameters had, and nothing else."""
    def partition(world: int) -> list[list[list[int]]]:
        ranks: list[list[list[int]]] = [[[], []] for _ in range(world)]
        for i in range(params):
            ranks[rnd.randrange(world)][i % 2].append(i)
        return ranks
    old = partition(old_world)
    trees = {rank: tree_of(rank, groups) for rank, groups in enumerate(old)}
    layouts = {rank: tree["zero"]["params"] for rank, tree in trees.items()}
    for rank, live in enumerate(partition(new_world)):
        base = rank % old_world
        needed = sources_needed(live, layouts)
        merged = merge(trees[base], {r: trees[r] for r in {base, *needed}}, live)
        flat = [i for g in live for i in g]
        assert merged["zero"]["params"] == flat
        assert set(merged["optimizer"]["state"]) == set(range(len(flat)))
        for local, index in enumerate(flat):
            assert torch.equal(merged["optimizer"]["state"][local]["exp_avg"], state_of(index)["exp_avg"])


# -- FSDP: rows of every old rank's chunk, laid end to end -----------------------------------------


def test_chunk_rows_is_torch_chunks_layout() -> None:
    for n in range(0, 12):
        for world in range(1, 6):
            chunks = torch.arange(n).chunk(world) if n else ()
            got = [chunk_rows(n, world, rank) for rank in range(world)]
            expected = [(int(c[0]), int(c[-1]) + 1) for c in chunks if len(c)]
            assert [(a, b) for a, b in got if b > a] == expected
            assert all(b >= a for a, b in got) and sum(b - a for a, b in got) == n


def fsdp_tree(rank: int, world: int, full: dict[str, torch.Tensor]) -> dict:
    """Old rank ``rank``'s tree: its chunk of every parameter, Adam moments cut the same way."""
    model = {name: t.chunk(world)[rank] if rank < len(t.chunk(world)) else t[0:0] for name, t in full.items()}
    model["buffer"] = torch.tensor([rank])   # not sharded: the base's is kept
    return {"step": 9, "model": model, "rng": {"rank": rank}, "data": rank, "zero": None,
            "optimizer": {"state": {name: {"step": torch.tensor(9.0), "exp_avg": 2 * model[name]}
                                    for name in full},
                          "param_groups": [{"lr": 0.1, "params": list(full)}]}}


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 9))
def test_any_old_fsdp_world_reshards_into_any_new_one(old_world: int, new_world: int, rows_: int) -> None:
    full = {"w": torch.arange(rows_ * 3, dtype=torch.float32).view(rows_, 3),
            "b": torch.arange(rows_, dtype=torch.float32) + 100}
    old = [fsdp_tree(r, old_world, full) for r in range(old_world)]
    for rank in range(new_world):
        live = {name: Rows(tuple(t.shape), *chunk_rows(t.shape[0], new_world, rank)) for name, t in full.items()}
        sources = fsdp_sources(live, old_world)
        merged = rows(old[rank % old_world], {q: old[q] for q in sources}, old_world, live)
        for name, t in full.items():
            start, stop = live[name].start, live[name].stop
            assert torch.equal(merged["model"][name], t[start:stop])
            assert torch.equal(merged["optimizer"]["state"][name]["exp_avg"], 2 * t[start:stop])
            assert merged["optimizer"]["state"][name]["step"] is old[rank % old_world]["optimizer"]["state"][name][
                "step"]
        assert merged["model"]["buffer"].item() == rank % old_world and merged["rng"] == {"rank": rank % old_world}


def test_fsdp_shards_that_do_not_add_up_are_refused_by_name() -> None:
    full = {"w": torch.zeros(6, 2)}
    old = dict(enumerate(fsdp_tree(r, 2, full) for r in range(2)))
    with pytest.raises(ReshardError, match=r"parameter w: old rank 0's shard is \(3, 2\), not rows \[0, 4\) of \(7, 2\)"):
        rows(old[0], old, 2, {"w": Rows((7, 2), 0, 4)})
    with pytest.raises(ReshardError, match="parameter w: old rank 0's shard is"):
        rows(old[0], old, 2, {"w": Rows((6, 3), 0, 3)})
    with pytest.raises(ReshardError, match="parameter v: old rank 0's shard is NoneType"):
        rows(old[0], old, 2, {"v": Rows((6, 2), 0, 3)})
    with pytest.raises(ReshardError, match="are not a row range"):
        rows(old[0], old, 2, {"w": Rows((6, 2), 4, 8)})
    with pytest.raises(ReshardError, match="are not a row range"):
        rows(old[0], old, 2, {"w": Rows((), 0, 0)})
    with pytest.raises(ReshardError, match=r"the snapshots of old ranks \[1\] are needed and not given"):
        rows(old[0], {0: old[0]}, 2, {"w": Rows((6, 2), 2, 6)})
    # An Adam moment cut like its parameter in the base tree must be so in every tree used.
    broken = fsdp_tree(1, 2, full)
    del broken["optimizer"]["state"]["w"]["exp_avg"]
    with pytest.raises(ReshardError, match="optimizer state exp_avg of parameter w: old rank 1's shard is NoneType"):
        rows(old[0], {0: old[0], 1: broken}, 2, {"w": Rows((6, 2), 2, 4)})
    with pytest.raises(ReshardError, match="base snapshot has no model"):
        rows([], old, 2, {"w": Rows((6, 2), 0, 3)})   # type: ignore[arg-type]


def test_fsdp_sources_are_the_old_ranks_whose_chunks_overlap() -> None:
    live = {"w": Rows((8, 2), *chunk_rows(8, 3, 1)), "b": Rows((8,), *chunk_rows(8, 3, 1))}   # rows [3, 6)
    assert fsdp_sources(live, 2) == [0, 1] and fsdp_sources(live, 4) == [1, 2] and fsdp_sources(live, 8) == [3, 4, 5]
    assert fsdp_sources({"w": Rows((1, 2), 1, 1)}, 4) == []
