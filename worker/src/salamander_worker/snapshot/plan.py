"""Pure decisions: which ranks form erasure-coding groups, and how a restarted world restores.

Nothing here touches memory, files or the network; the snapshotter gathers every rank's
:class:`Holdings` and every rank computes the same :class:`RestorePlan` from them.

Restore invariants:

* The plan names one step ``S`` for the whole world; every rank resumes from ``S`` or the
  plan's tier is ``"none"`` (start from scratch). ``S`` is the newest step every rank reaches.
* New rank ``r`` restores the state old rank ``want(r)`` had: ``r`` itself when the world has
  the same size; when it changed, rank ``r`` takes old rank ``r % old_world``, and only a
  replicated (not sharded) snapshot can be used, or a persistent copy of shards that name their
  layout (ZeRO, FSDP), which the plan marks ``reshard``: each rank then also reads the old ranks
  that hold parts of its new shard (:mod:`.reshard`).
* Sources, nearest first: the rank's own memory; a copy from the process that holds it (after a
  re-rendezvous ranks may move between nodes); a rebuild from its erasure-coding group, which
  needs at most ``m`` members of the group lost at ``S``; a persistent checkpoint, only when
  every wanted rank has one at the same step and no in-memory step is as new.
* Operations are listed in one global order that every rank executes identically, so
  point-to-point transfers never deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

TIERS = ("memory", "peers", "persistent", "none")


class PlanError(ValueError):
    """Holdings are inconsistent or a group layout is impossible; the message says which."""


def ec_groups(world: int, local_world: int, k: int, m: int) -> list[list[int]]:
    """Erasure-coding groups of global ranks: ranks with the same local rank on ``k``
    consecutive nodes (so every member sits on a different node, a distinct failure domain).
    A last chunk of fewer than ``m + 1`` nodes joins the chunk before it; a world of fewer than
    ``m + 1`` nodes has no groups (snapshots are then only in local memory)."""
    if local_world < 1 or world % local_world:
        raise PlanError(f"world {world} is not a whole number of nodes of {local_world} ranks")
    nodes = world // local_world
    if nodes < m + 1:
        return []
    chunks = [list(range(start, min(start + k, nodes))) for start in range(0, nodes, k)]
    if len(chunks) > 1 and len(chunks[-1]) < m + 1:
        chunks[-2].extend(chunks.pop())
    return [[node * local_world + local for node in chunk] for chunk in chunks for local in range(local_world)]


@dataclass(frozen=True)
class DataHolding:
    """A verified data slot this process holds: the snapshot old rank ``rank`` took at ``step``."""

    rank: int
    world: int
    step: int
    length: int
    checksum: int
    sharded: bool
    slot: int


@dataclass(frozen=True)
class ParityHolding:
    """A verified parity slot: member ``member`` of group ``group`` (old global ranks) at ``step``."""

    step: int
    group: tuple[int, ...]
    member: int
    m: int
    block_len: int
    lengths: tuple[int, ...]
    checksums: tuple[int, ...]
    slot: int


@dataclass(frozen=True)
class Holdings:
    data: tuple[DataHolding, ...] = ()
    parity: tuple[ParityHolding, ...] = ()

    def without(self, bad: set[tuple[str, int]]) -> Holdings:
        """These holdings less the slots named in ``bad``: ``("data", slot)`` or
        ``("parity", slot)`` (slots whose payload failed its checksum)."""
        return Holdings(tuple(d for d in self.data if ("data", d.slot) not in bad),
                        tuple(p for p in self.parity if ("parity", p.slot) not in bad))

    def to_wire(self) -> dict[str, Any]:
        return {"data": [d.__dict__ for d in self.data], "parity": [
            dict(p.__dict__, group=list(p.group), lengths=list(p.lengths), checksums=list(p.checksums))
            for p in self.parity]}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Holdings:
        try:
            data = tuple(DataHolding(**d) for d in raw["data"])
            parity = tuple(ParityHolding(**dict(p, group=tuple(p["group"]), lengths=tuple(p["lengths"]),
                                                checksums=tuple(p["checksums"]))) for p in raw["parity"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed holdings: {exc}") from None
        for holding in (*data, *parity):
            for name, value in holding.__dict__.items():
                if name == "sharded":
                    ok = isinstance(value, bool)
                elif name in ("group", "lengths", "checksums"):
                    ok = all(_is_int(v) for v in value)
                else:
                    ok = _is_int(value)
                if not ok:
                    raise PlanError(f"malformed holdings: {type(holding).__name__}.{name} is {value!r}")
        return cls(data, parity)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rebuild:
    """Rebuild the data of ``lost`` members of ``group`` at the plan's step.

    ``providers[j]`` is the new rank holding intact member ``j``'s data and parity; ``dests[j]``
    the new rank that receives lost member ``j``'s rebuilt payload."""

    group: tuple[int, ...]
    m: int
    block_len: int
    lengths: tuple[int, ...]
    checksums: tuple[int, ...]
    providers: dict[int, int]
    dests: dict[int, int]
    data_slots: dict[int, int]     # member -> data slot on its provider
    parity_slots: dict[int, int]   # member -> parity slot on its provider

    @property
    def participants(self) -> list[int]:
        return sorted(set(self.providers.values()) | set(self.dests.values()))


@dataclass(frozen=True)
class Copy:
    """Send old rank ``rank``'s payload (``length`` bytes, from slot ``slot``) from ``src`` to ``dst``."""

    src: int
    dst: int
    rank: int
    slot: int
    length: int
    checksum: int


@dataclass(frozen=True)
class RestorePlan:
    step: int | None
    tier: str
    want: dict[int, int]                       # new rank -> old rank
    local: dict[int, int] = field(default_factory=dict)   # new rank -> own data slot
    copies: tuple[Copy, ...] = ()
    rebuilds: tuple[Rebuild, ...] = ()
    persistent_step: int | None = None
    old_world: int | None = None               # the world that took the snapshot
    sharded: bool = False                      # whether that snapshot is sharded (ZeRO, FSDP)
    reshard: str | None = None                 # the layout of shards from a world of another size

    def reads(self, rank: int) -> list[tuple[str, int]]:
        """The slots new rank ``rank`` reads from its own files when it executes this plan,
        as ``("data", slot)`` and ``("parity", slot)``, without repeats: its own payload, the
        payloads it sends to others, and what it contributes to rebuilds."""
        found: list[tuple[str, int]] = []
        if rank in self.local:
            found.append(("data", self.local[rank]))
        found += [("data", c.slot) for c in self.copies if c.src == rank]
        for rb in self.rebuilds:
            for j, q in sorted(rb.providers.items()):
                if q == rank:
                    found += [("data", rb.data_slots[j]), ("parity", rb.parity_slots[j])]
        return list(dict.fromkeys(found))

    def receives(self, rank: int) -> int | None:
        """How many bytes new rank ``rank`` receives its payload into (a copy's length, or
        ``k - m`` blocks for a rebuild), or None when it restores from its own memory."""
        for copy in self.copies:
            if copy.dst == rank:
                return copy.length
        for rb in self.rebuilds:
            if rank in rb.dests.values():
                return (len(rb.group) - rb.m) * rb.block_len
        return None


def _want(new_world: int, old_world: int, sharded: bool) -> dict[int, int] | None:
    if new_world == old_world:
        return {r: r for r in range(new_world)}
    if sharded:
        return None
    return {r: r % old_world for r in range(new_world)}


class PersistentStep(NamedTuple):
    """A step's persistent copies: the world that wrote them, the old ranks whose copy is
    complete, whether each holds only its rank's shard (unknown counts as sharded), and the
    shards' layout when they can be resharded into a world of another size (``"zero"``,
    ``"fsdp"``; None: they cannot)."""

    world: int
    ranks: frozenset[int]
    sharded: bool = True
    layout: str | None = None


def plan_restore(holdings: list[Holdings], persistent: dict[int, PersistentStep] | None = None, *,
                 layout: str | None = None) -> RestorePlan:
    """The plan for a world of ``len(holdings)`` ranks; ``holdings[q]`` is what new rank ``q``
    holds. ``persistent`` maps each persistent step to its :class:`PersistentStep`; ``layout``
    is how the new world's state is sharded (``"zero"``, ``"fsdp"``, None): only copies of that
    layout are resharded."""
    world = len(holdings)
    steps = sorted({d.step for h in holdings for d in h.data}, reverse=True)
    best_persistent = _best_persistent(world, persistent or {}, layout)
    for step in steps:
        if best_persistent is not None and best_persistent.step is not None and best_persistent.step > step:
            break
        plan = _plan_step(holdings, step)
        if plan is not None:
            return plan
    if best_persistent is not None:
        return best_persistent
    return RestorePlan(step=None, tier="none", want={})


def _best_persistent(world: int, persistent: dict[int, PersistentStep], layout: str | None) -> RestorePlan | None:
    for step in sorted(persistent, reverse=True):
        copies = persistent[step]
        if set(range(copies.world)) - set(copies.ranks):
            continue
        if copies.layout is not None and copies.layout != layout:
            continue   # shards of another layout (a ZeRO job's copies for a DDP job) fit no rank
        reshard = copies.layout if copies.sharded and copies.world != world else None
        want = _want(world, copies.world, sharded=copies.sharded and reshard is None)
        if want is not None:
            return RestorePlan(step=step, tier="persistent", want=want, persistent_step=step,
                               old_world=copies.world, sharded=copies.sharded, reshard=reshard)
    return None


def _plan_step(holdings: list[Holdings], step: int) -> RestorePlan | None:
    world = len(holdings)
    entries = [(q, d) for q, h in enumerate(holdings) for d in h.data if d.step == step]
    worlds = {d.world for _, d in entries}
    if len(worlds) != 1:
        return None
    old_world = worlds.pop()
    want = _want(world, old_world, sharded=any(d.sharded for _, d in entries))
    if want is None:
        return None
    holder: dict[int, tuple[int, DataHolding]] = {}
    for q, d in entries:
        if d.rank not in holder or q == want.get(q):  # prefer no one in particular; first holder wins
            holder.setdefault(d.rank, (q, d))
    local: dict[int, int] = {}
    copies: list[Copy] = []
    lost_wanted: dict[int, int] = {}   # old rank -> new rank that wants it
    for r in range(world):
        old = want[r]
        own = next((d for d in holdings[r].data if d.step == step and d.rank == old), None)
        if own is not None:
            local[r] = own.slot
        elif old in holder:
            q, d = holder[old]
            copies.append(Copy(src=q, dst=r, rank=old, slot=d.slot, length=d.length, checksum=d.checksum))
        elif old in lost_wanted:
            # Two new ranks (the world grew) want one lost payload, and a rebuild has one
            # destination per member: this step cannot give every rank its state.
            return None
        else:
            lost_wanted[old] = r
    rebuilds = _rebuilds(holdings, step, lost_wanted, holder)
    if rebuilds is None:
        return None
    tier = "memory" if not copies and not rebuilds else "peers"
    return RestorePlan(step=step, tier=tier, want=want, local=local, copies=tuple(copies),
                       rebuilds=tuple(rebuilds), old_world=old_world,
                       sharded=any(d.sharded for _, d in entries))


def _rebuilds(holdings: list[Holdings], step: int, lost_wanted: dict[int, int],
              holder: dict[int, tuple[int, DataHolding]]) -> list[Rebuild] | None:
    """One rebuild per group with wanted lost members, or None if any is beyond its parity."""
    if not lost_wanted:
        return []
    parity: dict[tuple[tuple[int, ...], int], tuple[int, ParityHolding]] = {}
    for q, h in enumerate(holdings):
        for p in h.parity:
            if p.step == step:
                parity.setdefault((p.group, p.member), (q, p))
    groups = {group for group, _ in parity}
    result: list[Rebuild] = []
    remaining = dict(lost_wanted)
    for group in sorted(groups):
        wanted_here = {j: remaining.pop(old) for j, old in enumerate(group) if old in remaining}
        if not wanted_here:
            continue
        providers: dict[int, int] = {}
        data_slots: dict[int, int] = {}
        parity_slots: dict[int, int] = {}
        sample: ParityHolding | None = None
        for j, old in enumerate(group):
            pq = parity.get((group, j))
            if old in holder and pq is not None and holder[old][0] == pq[0]:
                providers[j] = pq[0]
                data_slots[j] = holder[old][1].slot
                parity_slots[j] = pq[1].slot
                sample = sample or pq[1]
        if sample is None or len(group) - len(providers) > sample.m:
            return None
        if any(parity[(group, j)][1].lengths != sample.lengths for j in providers):
            return None
        # A lost member nobody wants (the world shrank) counts against m but gets no destination.
        result.append(Rebuild(group=group, m=sample.m, block_len=sample.block_len, lengths=sample.lengths,
                              checksums=sample.checksums, providers=providers,
                              dests={j: r for j, r in wanted_here.items() if j not in providers},
                              data_slots=data_slots, parity_slots=parity_slots))
    if remaining:
        return None
    return result
