"""The pure restore planner: erasure-coding groups span distinct nodes; a restarted world restores
from its own memory, a peer's copy, a rebuild from parity, an older step, a persistent checkpoint,
or nothing, in that order, and every rank of a usable plan gets exactly one correct source."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from salamander_worker.snapshot.plan import (
    Copy,
    DataHolding,
    Holdings,
    ParityHolding,
    PersistentStep,
    PlanError,
    Rebuild,
    RestorePlan,
    ec_groups,
    plan_restore,
)

from tests.unit._support import FAST

# -- ec_groups ---------------------------------------------------------------------------------------


def test_groups_take_the_same_local_rank_on_consecutive_nodes() -> None:
    # 4 nodes of 2 ranks, groups of 2 nodes.
    assert ec_groups(8, 2, 2, 1) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # 3 nodes of 1 rank, k larger than the world: one group of every node.
    assert ec_groups(3, 1, 4, 1) == [[0, 1, 2]]
    assert ec_groups(6, 3, 2, 1) == [[0, 3], [1, 4], [2, 5]]


@pytest.mark.parametrize(("nodes", "k", "m", "chunks"), [
    (5, 2, 1, [[0, 1], [2, 3, 4]]),              # a last chunk of 1 < m + 1 joins the one before
    (4, 3, 1, [[0, 1, 2, 3]]),
    (7, 3, 2, [[0, 1, 2], [3, 4, 5, 6]]),
    (8, 3, 2, [[0, 1, 2], [3, 4, 5, 6, 7]]),    # 2 < m + 1 = 3
    (5, 3, 1, [[0, 1, 2], [3, 4]]),              # 2 >= m + 1: stays a group of its own
    (9, 3, 2, [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),
    (2, 2, 1, [[0, 1]]),
    (3, 8, 2, [[0, 1, 2]]),                      # exactly m + 1 nodes
])
def test_a_short_last_chunk_joins_the_previous_one(nodes: int, k: int, m: int, chunks: list[list[int]]) -> None:
    assert ec_groups(nodes, 1, k, m) == chunks
    # With 2 ranks a node, the node chunks repeat once per local rank.
    assert ec_groups(2 * nodes, 2, k, m) == [[2 * n + local for n in chunk] for chunk in chunks for local in (0, 1)]


@pytest.mark.parametrize(("world", "local_world", "m"), [(1, 1, 1), (2, 1, 2), (4, 2, 2), (8, 8, 1), (0, 1, 1)])
def test_too_few_nodes_give_no_groups(world: int, local_world: int, m: int) -> None:
    assert ec_groups(world, local_world, 4, m) == []


@pytest.mark.parametrize(("world", "local_world"), [(4, 0), (4, -1), (6, 4), (3, 2), (1, 2)])
def test_a_world_that_is_no_whole_number_of_nodes_is_refused(world: int, local_world: int) -> None:
    with pytest.raises(PlanError):
        ec_groups(world, local_world, 2, 1)


@FAST
@given(st.integers(1, 40), st.integers(1, 4), st.sampled_from([1, 2]), st.integers(0, 6))
def test_groups_partition_the_world_into_distinct_nodes(nodes: int, local_world: int, m: int, extra: int) -> None:
    k = m + 1 + extra
    world = nodes * local_world
    groups = ec_groups(world, local_world, k, m)
    if nodes < m + 1:
        assert groups == []
        return
    assert sorted(r for g in groups for r in g) == list(range(world))
    for group in groups:
        node_of = [r // local_world for r in group]
        assert len(set(node_of)) == len(group)                        # distinct failure domains
        assert len({r % local_world for r in group}) == 1             # one local rank
        assert node_of == list(range(node_of[0], node_of[0] + len(group)))   # consecutive nodes
        assert m + 1 <= len(group) <= k + m                            # k, or k plus a short tail
    full = [g for g in groups if len(g) != k]
    assert len(full) <= local_world                                    # only the last chunk differs


# -- holdings and plans: helpers --------------------------------------------------------------------


def lengths_at(group: tuple[int, ...], step: int) -> tuple[int, ...]:
    return tuple(1000 + 10 * step + r for r in group)


def checksums_at(group: tuple[int, ...], step: int) -> tuple[int, ...]:
    return tuple(7_000_000 + 100 * step + r for r in group)


def data(rank: int, step: int, slot: int, *, world: int = 4, sharded: bool = False) -> DataHolding:
    return DataHolding(rank=rank, world=world, step=step, length=1000 + 10 * step + rank,
                       checksum=7_000_000 + 100 * step + rank, sharded=sharded, slot=slot)


def parity(group: tuple[int, ...], member: int, step: int, slot: int, *, m: int = 1) -> ParityHolding:
    return ParityHolding(step=step, group=group, member=member, m=m, block_len=64 + step,
                         lengths=lengths_at(group, step), checksums=checksums_at(group, step), slot=slot)


def process(old: int, steps: tuple[int, ...], *, world: int = 4, k: int = 4, m: int = 1,
            sharded: bool = False) -> Holdings:
    """What the process that was old rank ``old`` holds: its data and its parity at ``steps``
    (the i-th step in slot i % 2)."""
    groups = [tuple(g) for g in ec_groups(world, 1, k, m)]
    mine = next((g for g in groups if old in g), None)
    return Holdings(
        data=tuple(data(old, s, i % 2, world=world, sharded=sharded) for i, s in enumerate(steps)),
        parity=() if mine is None else tuple(parity(mine, mine.index(old), s, i % 2, m=m)
                                             for i, s in enumerate(steps)))


def world_of(olds: list[int | None], steps: tuple[int, ...] = (10, 20), **kw: Any) -> list[Holdings]:
    """New rank q is the process that was old rank ``olds[q]`` (None: a fresh process)."""
    return [Holdings() if old is None else process(old, steps, **kw) for old in olds]


# -- plan_restore ---------------------------------------------------------------------------------------


def test_everything_local_restores_from_memory() -> None:
    holdings = world_of([0, 1, 2, 3])
    plan = plan_restore(holdings)
    assert plan == RestorePlan(step=20, tier="memory", want={r: r for r in range(4)},
                               local={r: 1 for r in range(4)}, old_world=4, sharded=plan.sharded)
    check(plan, holdings)


def test_nothing_anywhere_is_tier_none() -> None:
    assert plan_restore([Holdings()] * 3) == RestorePlan(step=None, tier="none", want={})
    assert plan_restore([]) == RestorePlan(step=None, tier="none", want={})


def test_a_rank_whose_data_sits_elsewhere_gets_a_copy() -> None:
    # After a re-rendezvous old ranks 2 and 3 came back as new ranks 3 and 2.
    holdings = world_of([0, 1, 3, 2])
    plan = plan_restore(holdings)
    assert plan.tier == "peers" and plan.step == 20 and plan.rebuilds == ()
    assert plan.local == {0: 1, 1: 1}
    assert plan.copies == (Copy(src=3, dst=2, rank=2, slot=1, length=1000 + 200 + 2, checksum=7_002_002),
                           Copy(src=2, dst=3, rank=3, slot=1, length=1000 + 200 + 3, checksum=7_002_003))
    check(plan, holdings)


def test_a_lost_rank_within_parity_is_rebuilt() -> None:
    holdings = world_of([0, 1, None, 3])
    plan = plan_restore(holdings)
    assert plan.tier == "peers" and plan.step == 20 and plan.copies == ()
    assert plan.local == {0: 1, 1: 1, 3: 1}
    group = (0, 1, 2, 3)
    assert plan.rebuilds == (Rebuild(group=group, m=1, block_len=84, lengths=lengths_at(group, 20),
                                     checksums=checksums_at(group, 20), providers={0: 0, 1: 1, 3: 3},
                                     dests={2: 2}, data_slots={0: 1, 1: 1, 3: 1},
                                     parity_slots={0: 1, 1: 1, 3: 1}),)
    assert plan.rebuilds[0].participants == [0, 1, 2, 3]
    check(plan, holdings)


def test_a_moved_rank_and_a_lost_rank_together() -> None:
    # Old rank 3's process is now new rank 2; new rank 3 is fresh; old rank 2 is gone.
    holdings = world_of([0, 1, 3, None])
    plan = plan_restore(holdings)
    assert plan.tier == "peers" and plan.step == 20
    assert plan.local == {0: 1, 1: 1}
    assert [(c.src, c.dst, c.rank) for c in plan.copies] == [(2, 3, 3)]
    [rebuild] = plan.rebuilds
    assert rebuild.providers == {0: 0, 1: 1, 3: 2} and rebuild.dests == {2: 2}
    assert rebuild.participants == [0, 1, 2]
    check(plan, holdings)


def test_two_lost_ranks_with_two_parity_are_rebuilt() -> None:
    holdings = world_of([None, 1, 2, 3, None], world=5, k=5, m=2)
    plan = plan_restore(holdings)
    assert plan.tier == "peers" and plan.step == 20
    [rebuild] = plan.rebuilds
    assert rebuild.m == 2 and rebuild.providers == {1: 1, 2: 2, 3: 3} and rebuild.dests == {0: 0, 4: 4}
    check(plan, holdings)


def test_two_groups_rebuild_independently() -> None:
    holdings = world_of([0, None, 2, 3, None, 5], world=6, k=3, m=1)
    plan = plan_restore(holdings)
    assert plan.tier == "peers"
    assert [(r.group, r.dests) for r in plan.rebuilds] == [((0, 1, 2), {1: 1}), ((3, 4, 5), {1: 4})]
    check(plan, holdings)


def test_more_lost_than_parity_falls_back_to_an_older_complete_step() -> None:
    # Ranks 2 and 3 lost their step-20 snapshot (say it failed its checksum), not step 10.
    holdings = world_of([0, 1]) + [process(2, (10,)), process(3, (10,))]
    plan = plan_restore(holdings)
    assert plan.tier == "memory" and plan.step == 10
    assert plan.local == {r: 0 for r in range(4)}
    check(plan, holdings)


def test_more_lost_than_parity_falls_back_to_persistent_then_none() -> None:
    holdings = world_of([0, 1, None, None])
    everyone = frozenset(range(4))
    plan = plan_restore(holdings, {5: PersistentStep(4, everyone), 3: PersistentStep(4, everyone)})
    assert plan == RestorePlan(step=5, tier="persistent", want={r: r for r in range(4)}, persistent_step=5,
                               old_world=4, sharded=True)
    # A persistent step missing a rank is no use; an older complete one is.
    plan = plan_restore(holdings, {5: PersistentStep(4, frozenset({0, 1, 2})), 3: PersistentStep(4, everyone)})
    assert plan.tier == "persistent" and plan.step == 3
    assert plan_restore(holdings, {5: PersistentStep(4, frozenset({0, 1, 2}))}).tier == "none"
    assert plan_restore(holdings) == RestorePlan(step=None, tier="none", want={})
    assert plan_restore(holdings, {}).tier == "none"


def test_a_newer_persistent_step_wins_over_memory_and_an_equal_one_does_not() -> None:
    holdings = world_of([0, 1, 2, 3])
    everyone = frozenset(range(4))
    plan = plan_restore(holdings, {30: PersistentStep(4, everyone)})
    assert plan.tier == "persistent" and plan.step == 30 and plan.persistent_step == 30
    assert plan_restore(holdings, {20: PersistentStep(4, everyone)}).tier == "memory"
    assert plan_restore(holdings, {15: PersistentStep(4, everyone)}).step == 20
    # Persistent between the memory steps: memory at 20 is newer.
    holdings = world_of([0, 1, None, None])   # step 20 and 10 both beyond parity
    assert plan_restore(holdings, {15: PersistentStep(4, everyone)}).step == 15


def test_a_sharded_persistent_checkpoint_of_another_world_size_is_not_used() -> None:
    """Unmarked copies (written before copies said whether they are sharded) count as sharded."""
    for copies in (PersistentStep(2, frozenset({0, 1})), PersistentStep(2, frozenset({0, 1}), sharded=True)):
        assert plan_restore(world_of([0, 1, 2, 3]), {30: copies}).tier == "memory"
        assert plan_restore([Holdings()] * 4, {30: copies}).tier == "none"


def test_a_replicated_persistent_checkpoint_loads_into_a_world_of_another_size() -> None:
    """Every replicated copy holds the whole state: new rank r loads old rank r % old world's."""
    grown = plan_restore([Holdings()] * 4, {30: PersistentStep(2, frozenset({0, 1}), sharded=False)})
    assert grown == RestorePlan(step=30, tier="persistent", want={0: 0, 1: 1, 2: 0, 3: 1}, persistent_step=30,
                                old_world=2)
    shrunk = plan_restore([Holdings()] * 2, {30: PersistentStep(3, frozenset({0, 1, 2}), sharded=False)})
    assert shrunk.tier == "persistent" and shrunk.want == {0: 0, 1: 1}
    # Still only a complete step, and still only when no in-memory step is as new.
    assert plan_restore([Holdings()] * 2, {30: PersistentStep(3, frozenset({0, 1}), sharded=False)}).tier == "none"
    assert plan_restore(world_of([0, 1, 2, 3]), {10: PersistentStep(2, frozenset({0, 1}), False)}).tier == "memory"


def test_shards_that_name_their_layout_are_resharded_into_a_world_of_another_size() -> None:
    """Persistent ZeRO or FSDP copies that name their layout load into any world size: new rank
    r takes old rank r % old world's model, RNG and data position, and every rank's shards are
    put together from the old ranks' (the plan says ``reshard`` and how)."""
    zero = PersistentStep(4, frozenset(range(4)), sharded=True, layout="zero")
    shrunk = plan_restore([Holdings()] * 3, {30: zero}, layout="zero")
    assert shrunk == RestorePlan(step=30, tier="persistent", want={0: 0, 1: 1, 2: 2}, persistent_step=30,
                                 old_world=4, sharded=True, reshard="zero")
    assert plan_restore([Holdings()] * 5, {30: zero}, layout="zero").want == {0: 0, 1: 1, 2: 2, 3: 3, 4: 0}
    # The same world needs no resharding; an incomplete step is still not used.
    assert plan_restore([Holdings()] * 4, {30: zero}, layout="zero").reshard is None
    assert plan_restore([Holdings()] * 3, {30: zero._replace(ranks=frozenset({0, 1, 2}))}, layout="zero").tier == "none"
    fsdp = plan_restore([Holdings()] * 3, {30: zero._replace(layout="fsdp")}, layout="fsdp")
    assert (fsdp.tier, fsdp.reshard, fsdp.old_world) == ("persistent", "fsdp", 4)
    assert plan_restore([Holdings()] * 3, {30: zero._replace(layout=None)}, layout="zero").tier == "none"
    # Only into a world sharded the same way: ZeRO copies are no use to FSDP or to DDP, which
    # then fall back to an older copy they can use.
    older = PersistentStep(3, frozenset(range(3)), sharded=True, layout="fsdp")
    assert plan_restore([Holdings()] * 3, {30: zero}, layout="fsdp").tier == "none"
    assert plan_restore([Holdings()] * 3, {30: zero}).tier == "none"
    assert plan_restore([Holdings()] * 4, {30: zero}).tier == "none"   # same size, but a DDP job now
    assert plan_restore([Holdings()] * 3, {30: zero, 20: older}, layout="fsdp").step == 20
    # A newer in-memory step of the new world wins.
    assert plan_restore(world_of([0, 1, 2], steps=(40,), world=3, k=3, sharded=True), {30: zero}, layout="zero").tier == "memory"


def test_a_sharded_snapshot_of_another_world_size_is_not_used_in_memory() -> None:
    # Old world 4 (sharded), new world 2: no rank can take another world's shard.
    holdings = world_of([0, 1], sharded=True)
    assert plan_restore(holdings).tier == "none"
    plan = plan_restore(holdings, {9: PersistentStep(2, frozenset({0, 1}))})
    assert plan.tier == "persistent" and plan.step == 9
    # One sharded snapshot among replicated ones taints the step.
    holdings = world_of([0, 1, 2, 3, None])
    holdings[1] = Holdings(data=(data(1, 20, 1, sharded=True),) + holdings[1].data[:1])
    plan = plan_restore(holdings)
    assert plan.step == 10 and plan.want[4] == 0
    check(plan, holdings)


def test_a_replicated_snapshot_serves_a_grown_or_shrunk_world() -> None:
    grown = world_of([0, 1, None, None, None], world=2, k=2)
    plan = plan_restore(grown)
    assert plan.tier == "peers" and plan.step == 20
    assert plan.want == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}
    assert plan.local == {0: 1, 1: 1}
    assert [(c.src, c.dst, c.rank) for c in plan.copies] == [(0, 2, 0), (1, 3, 1), (0, 4, 0)]
    check(plan, grown)
    shrunk = world_of([0, 1])
    plan = plan_restore(shrunk)
    assert plan.tier == "memory" and plan.want == {0: 0, 1: 1}
    check(plan, shrunk)


def test_a_shrunk_world_rebuilds_a_wanted_lost_rank_and_counts_unwanted_ones() -> None:
    # Old world 4, new world 3: old rank 1 lost and wanted; old rank 3 kept but unwanted.
    holdings = world_of([0, None, 2])
    plan = plan_restore(holdings)
    assert plan.tier == "none"       # group (0,1,2,3) misses members 1 and 3 > m
    holdings = [process(0, (10, 20)), process(3, (10, 20)), process(2, (10, 20))]  # old 3 is new rank 1
    plan = plan_restore(holdings)
    assert plan.tier == "peers" and plan.want == {0: 0, 1: 1, 2: 2}
    [rebuild] = plan.rebuilds
    assert rebuild.providers == {0: 0, 2: 2, 3: 1} and rebuild.dests == {1: 1}
    check(plan, holdings)


def test_a_lost_rank_two_new_ranks_want_is_not_planned_for_one_of_them() -> None:
    # Old world 2 (replicated), new world 4: old rank 0 is lost and would be rebuilt, but new
    # ranks 0 and 2 both want it and a rebuild has a single destination: the step is unusable.
    holdings = [Holdings(), process(1, (10, 20), world=2, k=2), Holdings(), Holdings()]
    plan = plan_restore(holdings)
    assert plan.tier == "none"
    check(plan, holdings)
    assert plan_restore(holdings, {4: PersistentStep(4, frozenset(range(4)))}).tier == "persistent"
    # The same loss with one wanting rank (the world kept its size) is rebuilt.
    plan = plan_restore(holdings[:2])
    assert plan.tier == "peers" and [r.dests for r in plan.rebuilds] == [{0: 0}]
    check(plan, holdings[:2])


def test_steps_whose_snapshots_disagree_on_the_world_are_skipped() -> None:
    holdings = world_of([0, 1, 2, 3])
    stale = data(3, 20, 1, world=8)       # rank 3's step-20 snapshot came from another run's world
    holdings[3] = Holdings(data=(holdings[3].data[0], stale), parity=holdings[3].parity)
    plan = plan_restore(holdings)
    assert plan.tier == "memory" and plan.step == 10
    check(plan, holdings)


def test_parity_that_disagrees_on_lengths_is_not_used() -> None:
    holdings = world_of([0, 1, None, 3])
    p = holdings[3].parity[1]
    holdings[3] = Holdings(data=holdings[3].data, parity=(holdings[3].parity[0], ParityHolding(
        step=p.step, group=p.group, member=p.member, m=p.m, block_len=p.block_len,
        lengths=tuple(x + 1 for x in p.lengths), checksums=p.checksums, slot=p.slot)))
    plan = plan_restore(holdings)
    assert plan.tier == "peers" and plan.step == 10   # step 20's parity is unusable; step 10's is fine
    check(plan, holdings)


def test_data_without_its_parity_on_the_same_process_does_not_provide() -> None:
    holdings = world_of([0, 1, None, 3])
    holdings[3] = Holdings(data=holdings[3].data)       # rank 3 lost its parity file
    plan = plan_restore(holdings)
    assert plan.tier == "none"                           # providers 0, 1 only: 2 missing > m = 1


# -- an invariant check of any plan, and random worlds -----------------------------------------------


def _held(holdings: list[Holdings], step: int) -> dict[int, list[tuple[int, DataHolding]]]:
    found: dict[int, list[tuple[int, DataHolding]]] = {}
    for q, h in enumerate(holdings):
        for d in h.data:
            if d.step == step:
                found.setdefault(d.rank, []).append((q, d))
    return found


def _trivially_restorable(holdings: list[Holdings], step: int) -> bool:
    """Every wanted old rank's data is held by someone at ``step`` (no rebuild needed)."""
    entries = [d for h in holdings for d in h.data if d.step == step]
    worlds = {d.world for d in entries}
    if len(worlds) != 1:
        return False
    old_world = worlds.pop()
    world = len(holdings)
    if world != old_world and any(d.sharded for d in entries):
        return False
    held = _held(holdings, step)
    return all((r if world == old_world else r % old_world) in held for r in range(world))


def check(plan: RestorePlan, holdings: list[Holdings],
          persistent: dict[int, PersistentStep] | None = None, layout: str | None = None) -> None:
    """What every plan must satisfy, whatever the holdings."""
    world = len(holdings)
    steps = {d.step for h in holdings for d in h.data}
    assert plan.tier in ("memory", "peers", "persistent", "none")
    if plan.tier == "none":
        assert plan.step is None and plan.want == {} and not plan.local and not plan.copies and not plan.rebuilds
        assert not any(_trivially_restorable(holdings, s) for s in steps)
        return
    assert set(plan.want) == set(range(world))
    if plan.tier == "persistent":
        copies = (persistent or {})[plan.step]
        assert plan.persistent_step == plan.step and set(range(copies.world)) <= set(copies.ranks)
        assert plan.want == {r: r % copies.world for r in range(world)}
        assert plan.old_world == copies.world and plan.sharded == copies.sharded
        assert copies.layout is None or copies.layout == layout
        resharded = copies.world != world and copies.sharded
        assert plan.reshard == (copies.layout if resharded else None)
        assert copies.world == world or not copies.sharded or plan.reshard is not None
        assert not any(_trivially_restorable(holdings, s) for s in steps if s >= plan.step)
        return
    step = plan.step
    assert step in steps
    assert not any(_trivially_restorable(holdings, s) for s in steps if s > step)
    usable = [p for p, c in (persistent or {}).items()
              if set(range(c.world)) <= c.ranks and c.layout in (None, layout)
              and (c.world == world or not c.sharded or c.layout is not None)]
    assert all(p <= step for p in usable)
    sources: Counter[int] = Counter()
    for r, slot in plan.local.items():
        assert any(d.step == step and d.rank == plan.want[r] and d.slot == slot for d in holdings[r].data)
        sources[r] += 1
    for c in plan.copies:
        assert c.rank == plan.want[c.dst] and c.src != c.dst
        assert any(d.step == step and d.rank == c.rank and d.slot == c.slot and d.length == c.length
                   and d.checksum == c.checksum for d in holdings[c.src].data)
        sources[c.dst] += 1
    for rb in plan.rebuilds:
        assert len(rb.group) - len(rb.providers) <= rb.m
        for j, q in rb.providers.items():
            assert any(d.step == step and d.rank == rb.group[j] and d.slot == rb.data_slots[j]
                       for d in holdings[q].data)
            assert any(p.step == step and p.group == rb.group and p.member == j and p.slot == rb.parity_slots[j]
                       and p.lengths == rb.lengths for p in holdings[q].parity)
        for j, r in rb.dests.items():
            assert j not in rb.providers and rb.group[j] == plan.want[r]
            sources[r] += 1
    assert all(sources[r] == 1 for r in range(world)), (sources, plan)
    assert (plan.tier == "memory") == (not plan.copies and not plan.rebuilds)


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[Holdings], dict[int, PersistentStep]]:
    m = draw(st.sampled_from([1, 2]))
    old_world = draw(st.integers(1, 7))
    k = draw(st.integers(m + 1, 4))
    groups = [tuple(g) for g in ec_groups(old_world, 1, k, m)]
    sharded = draw(st.booleans())
    new_world = draw(st.sampled_from(sorted({old_world, max(1, old_world - 1), old_world + 1, 2 * old_world})))
    pool: list[int | None] = [*range(old_world), *[None] * new_world]
    olds = draw(st.permutations(pool))[:new_world]
    steps = (10, 20)
    holdings = []
    for old in olds:
        if old is None:
            holdings.append(Holdings())
            continue
        mine = next((g for g in groups if old in g), None)
        kept_data = [s for s in steps if draw(st.integers(0, 4))]          # mostly kept
        kept_parity = [s for s in steps if mine is not None and draw(st.integers(0, 4))]
        stale = draw(st.integers(0, 9)) == 0                                # a snapshot of another world
        holdings.append(Holdings(
            data=tuple(data(old, s, i % 2, world=old_world + (stale and s == 20), sharded=sharded)
                       for i, s in enumerate(steps) if s in kept_data),
            parity=tuple(parity(mine, mine.index(old), s, i % 2, m=m)
                         for i, s in enumerate(steps) if s in kept_parity) if mine else ()))
    persistent = draw(st.dictionaries(st.sampled_from([5, 15, 25]), st.builds(
        PersistentStep, st.sampled_from([old_world, new_world]),
        st.sampled_from([frozenset(range(old_world)), frozenset({0})]), st.booleans(),
        st.sampled_from([None, "zero", "fsdp"])),
        max_size=2))
    return holdings, persistent


@FAST
@given(worlds())
def test_every_plan_gives_every_rank_exactly_one_correct_source(scenario: Any) -> None:
    holdings, persistent = scenario
    for layout in (None, "zero", "fsdp"):
        check(plan_restore(holdings, persistent, layout=layout), holdings, persistent, layout)
    check(plan_restore(holdings), holdings)


@FAST
@given(worlds())
def test_every_rank_computes_the_same_plan(scenario: Any) -> None:
    holdings, persistent = scenario
    wired = [Holdings.from_wire(json.loads(json.dumps(h.to_wire()))) for h in holdings]
    assert plan_restore(wired, persistent) == plan_restore(holdings, persistent)


# -- what a plan reads, and planning again without corrupt slots ----------------------------------------


def test_reads_and_receives_name_each_ranks_slots() -> None:
    # Old rank 3's process is now new rank 2; new rank 3 is fresh; old rank 2 is gone.
    holdings = world_of([0, 1, 3, None])
    plan = plan_restore(holdings)
    assert plan.old_world == 4 and plan.sharded is False
    assert plan.reads(0) == [("data", 1), ("parity", 1)]          # its own payload, and a provider
    assert plan.reads(2) == [("data", 1), ("parity", 1)]          # sends old rank 3's copy, provides member 3
    assert plan.reads(3) == []
    assert plan.receives(0) is None and plan.receives(1) is None
    assert plan.receives(3) == 1000 + 200 + 3                       # the copy's length
    [rebuild] = plan.rebuilds
    assert plan.receives(rebuild.dests[2]) == 3 * rebuild.block_len   # k - m blocks


def test_without_drops_only_the_named_slots() -> None:
    held = process(1, (10, 20))
    assert held.without(set()) == held
    dropped = held.without({("data", 1), ("parity", 0)})
    assert [d.slot for d in dropped.data] == [0] and [p.slot for p in dropped.parity] == [1]


def test_planning_again_without_a_corrupt_newest_slot_rebuilds_it() -> None:
    holdings = world_of([0, 1, 2, 3])
    first = plan_restore(holdings)
    assert first.tier == "memory" and first.step == 20 and ("data", 1) in first.reads(2)
    holdings[2] = holdings[2].without({("data", 1)})   # rank 2's step-20 payload failed its crc
    second = plan_restore(holdings)
    assert second.tier == "peers" and second.step == 20
    [rebuild] = second.rebuilds
    assert rebuild.dests == {2: 2} and second.reads(2) == []
    check(second, holdings)


@FAST
@given(worlds(), st.data())
def test_dropping_corrupt_slots_until_none_is_read_ends_and_never_reads_one(scenario: Any, data: Any) -> None:
    """What the snapshotter does: plan, drop the slots found corrupt among those the plan
    reads, plan again. Every round drops a holding, and the final plan reads no corrupt slot."""
    holdings, persistent = scenario
    corrupt = {(q, kind, slot) for q in range(len(holdings)) for kind in ("data", "parity") for slot in (0, 1)
               if data.draw(st.integers(0, 5)) == 0}
    plan = plan_restore(holdings, persistent)
    for _ in range(100):
        if plan.tier not in ("memory", "peers"):
            break
        bad = [{read for read in plan.reads(q) if (q, *read) in corrupt} for q in range(len(holdings))]
        if not any(bad):
            break
        before = sum(len(h.data) + len(h.parity) for h in holdings)
        holdings = [h.without(b) for h, b in zip(holdings, bad)]
        assert sum(len(h.data) + len(h.parity) for h in holdings) < before
        plan = plan_restore(holdings, persistent)
    else:
        raise AssertionError("planning again did not end")
    check(plan, holdings, persistent)
    if plan.tier in ("memory", "peers"):
        assert not any((q, *read) in corrupt for q in range(len(holdings)) for read in plan.reads(q))


# -- the wire form ---------------------------------------------------------------------------------------


def test_holdings_round_trip_through_json() -> None:
    holdings = Holdings(data=(data(0, 10, 0), data(0, 20, 1, sharded=True)),
                        parity=(parity((0, 1, 2), 0, 10, 0, m=2), parity((0, 1, 2), 0, 20, 1)))
    wire = json.loads(json.dumps(holdings.to_wire()))
    assert Holdings.from_wire(wire) == holdings
    assert Holdings.from_wire(Holdings().to_wire()) == Holdings()


def _good_wire() -> dict[str, Any]:
    return json.loads(json.dumps(Holdings(data=(data(0, 10, 0),), parity=(parity((0, 1), 0, 10, 0),)).to_wire()))


def _broken(change: Any) -> dict[str, Any]:
    wire = _good_wire()
    change(wire)
    return wire


@pytest.mark.parametrize("wire", [
    None, [], "data", 3, {}, {"data": []}, {"parity": []},
    {"data": None, "parity": []}, {"data": [1], "parity": []}, {"data": [[1, 2, 3]], "parity": []},
    {"data": [], "parity": [["ab"]]}, {"data": [], "parity": [[[1, 2, 3]]]},
    _broken(lambda w: w["data"][0].pop("checksum")),
    _broken(lambda w: w["data"][0].update(extra=1)),
    _broken(lambda w: w["data"][0].update(step="10")),
    _broken(lambda w: w["data"][0].update(rank=None)),
    _broken(lambda w: w["data"][0].update(slot=1.5)),
    _broken(lambda w: w["data"][0].update(sharded=1)),
    _broken(lambda w: w["data"][0].update(world=True)),
    _broken(lambda w: w["parity"][0].pop("group")),
    _broken(lambda w: w["parity"][0].update(group=None)),
    _broken(lambda w: w["parity"][0].update(group="01")),
    _broken(lambda w: w["parity"][0].update(lengths=[1, "2"])),
    _broken(lambda w: w["parity"][0].update(checksums=5)),
    _broken(lambda w: w["parity"][0].update(m="1")),
    _broken(lambda w: w["parity"][0].update(bogus=[])),
])
def test_malformed_wire_holdings_are_refused(wire: Any) -> None:
    with pytest.raises(PlanError, match="malformed"):
        Holdings.from_wire(wire)
