"""In-memory snapshots across real processes (gloo over loopback, one "node" per process).

Each node's shared memory is its own directory under /dev/shm; losing a node means its
process dies *and* its directory is deleted. What must come back is compared bitwise with
what the training process captured at its newest committed snapshot: parameters, optimizer
shards (ZeroRedundancyOptimizer: every rank holds a different one), LR scheduler, RNG states
and data position.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from salamander_worker.snapshot.region import SlotFile

RANK_SCRIPT = Path(__file__).with_name("snapshot_rank.py")
pytestmark = pytest.mark.timeout(180)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, world: int, memory: list[Path], out: Path, *extra: str,
            wait: bool = True) -> list[subprocess.Popen]:
    port = _port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), mode, "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--memory", str(memory[r]), "--out", str(out), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    if wait:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
        for p, output in zip(procs, outputs):
            assert p.returncode in (0, 17), f"{mode} rank exited {p.returncode}:\n{output[-3000:]}"
    return procs


@pytest.fixture()
def nodes(tmp_path: Path):
    root = Path("/dev/shm") / f"salamander-test-{os.getpid()}-{tmp_path.name}"
    dirs = [root / f"node-{i}" for i in range(4)]
    for d in dirs:
        d.mkdir(parents=True)
    yield dirs
    shutil.rmtree(root, ignore_errors=True)


def _assert_same(a: object, b: object, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy arrays in the RNG state
        assert (a == b).all(), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _check_restored(out: Path, world: int, tier: str, want: dict[int, int] | None = None,
                    step: int | None = None) -> None:
    """Every rank restored, from ``tier``, exactly the state old rank ``want[rank]`` captured
    at its newest snapshot (or at ``step``)."""
    want = want or {r: r for r in range(world)}
    for rank in range(world):
        restored = torch.load(out / f"restored-{rank}.pt", weights_only=False)
        name = f"expected-{want[rank]}.pt" if step is None else f"expected-{want[rank]}-{step}.pt"
        expected = torch.load(out / name, weights_only=False)
        assert restored["tier"] == tier
        assert restored["step"] == expected["step"]
        assert restored["data"] == expected["data"]
        _assert_same(expected["state"], restored["state"])


def _newest_payload(node: Path) -> tuple[dict, bytes]:
    """The record and payload bytes of the newest snapshot in a node's data file."""
    region = SlotFile.open(node / "local-0.data", 0, create=False)
    try:
        newest = region.committed()[0]
        return newest.record, bytes(region.payload(newest.slot)[:newest.record["length"]])
    finally:
        region.close()


def _assert_kept_bitwise(node: Path, record: dict, payload: bytes) -> None:
    """The rebuilt (or copied) payload was committed in the node's data file, byte for byte
    what the lost node held, under the lost node's record; it is the file's oldest commit
    (the snapshot taken right after the restore comes next)."""
    region = SlotFile.open(node / "local-0.data", 0, create=False)
    try:
        entries = region.committed()
        kept = min(entries, key=lambda e: e.seq)
        assert {key: kept.record[key] for key in ("step", "rank", "world", "length", "checksum")} == \
            {key: record[key] for key in ("step", "rank", "world", "length", "checksum")}
        assert region.verify(kept)
        assert bytes(region.payload(kept.slot)[:kept.record["length"]]) == payload
    finally:
        region.close()


@pytest.mark.parametrize(("m", "lost"), [(1, 1), (2, 1), (2, 2)])
def test_lost_nodes_are_rebuilt_bitwise_from_the_group(nodes: list[Path], tmp_path: Path, m: int, lost: int) -> None:
    """k=4: ``lost`` nodes of the group lose their process and their shared memory at once.
    Each is rebuilt straight into a slot of its new data file, committed there bitwise."""
    _launch("train", 4, nodes, tmp_path, "--zero", "--m", str(m))
    originals = [_newest_payload(node) for node in nodes[1:1 + lost]]
    for node in nodes[1:1 + lost]:
        shutil.rmtree(node)
        node.mkdir()
    _launch("restore", 4, nodes, tmp_path, "--zero", "--m", str(m))
    _check_restored(tmp_path, 4, "peers")
    for node, (record, payload) in zip(nodes[1:1 + lost], originals):
        _assert_kept_bitwise(node, record, payload)


def test_fsdp_shards_of_a_lost_node_are_rebuilt_bitwise(nodes: list[Path], tmp_path: Path) -> None:
    """FSDP2 (fully_shard): parameters and Adam state are DTensors; each rank's local shard is
    unique, so the lost node's shard exists only as parity until it is rebuilt."""
    _launch("train", 4, nodes, tmp_path, "--fsdp")
    shutil.rmtree(nodes[3])
    nodes[3].mkdir()
    _launch("restore", 4, nodes, tmp_path, "--fsdp")
    _check_restored(tmp_path, 4, "peers")


def test_ranks_that_moved_nodes_take_their_state_from_peers(nodes: list[Path], tmp_path: Path) -> None:
    """After a re-rendezvous ranks may land on other nodes: node i now runs rank (i+1) % 4."""
    _launch("train", 4, nodes, tmp_path, "--zero")
    _launch("restore", 4, [nodes[(r + 1) % 4] for r in range(4)], tmp_path, "--zero")
    _check_restored(tmp_path, 4, "peers")


def test_a_lost_node_under_moved_ranks_is_rebuilt_by_a_rank_that_also_provides(nodes: list[Path],
                                                                               tmp_path: Path) -> None:
    """Node i now runs rank (i+1) % 4 and node 1's memory is gone: rank 1 (on node 2, holding
    old rank 2's data) rebuilds old rank 1 from the group while contributing to it itself, and
    sends old rank 2's data on. Rank 0 (on the empty node 1) receives its copy into a new data
    file, rank 3 (on node 0) into the slot that held old rank 0's older snapshot; both keep it
    there. (Rank 1's rebuild does not fit node 2's file, sized for old rank 2's smaller ZeRO
    shard: it is received into process memory.)"""
    _launch("train", 4, nodes, tmp_path, "--zero", "--steps", "6")
    old_0, old_3 = _newest_payload(nodes[0]), _newest_payload(nodes[3])
    shutil.rmtree(nodes[1])
    nodes[1].mkdir()
    _launch("restore", 4, [nodes[(r + 1) % 4] for r in range(4)], tmp_path, "--zero")
    _check_restored(tmp_path, 4, "peers")
    _assert_kept_bitwise(nodes[1], *old_0)
    _assert_kept_bitwise(nodes[0], *old_3)


def test_killed_processes_restore_from_local_memory(nodes: list[Path], tmp_path: Path) -> None:
    _launch("train", 2, nodes, tmp_path, "--zero", "--k", "2")
    _launch("restore", 2, nodes, tmp_path, "--zero", "--k", "2")
    _check_restored(tmp_path, 2, "memory")


def test_a_crash_in_the_middle_of_a_snapshot_resumes_from_the_previous_one(nodes: list[Path],
                                                                             tmp_path: Path) -> None:
    # Snapshots at steps 2 and 4 commit; every rank dies half-way through writing step 6's.
    _launch("train", 2, nodes, tmp_path, "--k", "2", "--steps", "6", "--tear-at", "6")
    _launch("restore", 2, nodes, tmp_path, "--k", "2")
    _check_restored(tmp_path, 2, "memory")
    assert torch.load(tmp_path / "restored-0.pt", weights_only=False)["step"] == 4


def _corrupt_newest(node: Path) -> None:
    region = SlotFile.open(node / "local-0.data", 0, create=False)
    newest = region.committed()[0]
    region.payload(newest.slot)[100] ^= 0xFF
    assert not region.verify(newest)
    region.close()


def test_corrupted_memory_is_detected_and_rebuilt_from_peers(nodes: list[Path], tmp_path: Path) -> None:
    _launch("train", 4, nodes, tmp_path, "--zero", "--steps", "6")
    _corrupt_newest(nodes[2])
    _launch("restore", 4, nodes, tmp_path, "--zero")
    _check_restored(tmp_path, 4, "peers")


def test_corrupted_newest_slots_beyond_parity_restore_the_older_snapshot_from_memory(nodes: list[Path],
                                                                                     tmp_path: Path) -> None:
    """Two members of an m=1 group have a corrupt newest slot: step 6 cannot be restored, so
    every rank takes step 4 from its own memory (its older slot), never the corrupt bytes."""
    _launch("train", 4, nodes, tmp_path, "--zero", "--steps", "6")
    for node in nodes[1:3]:
        _corrupt_newest(node)
    _launch("restore", 4, nodes, tmp_path, "--zero")
    _check_restored(tmp_path, 4, "memory", step=4)


def test_a_corrupted_parity_slot_is_not_used_by_a_rebuild(nodes: list[Path], tmp_path: Path) -> None:
    """Node 1 is lost and node 2's newest parity is corrupt: step 6 cannot be rebuilt, so node
    1 is rebuilt at step 4 and every other rank restores step 4 from memory."""
    _launch("train", 4, nodes, tmp_path, "--zero", "--steps", "6")
    region = SlotFile.open(nodes[2] / "local-0.parity", 0, create=False)
    newest = region.committed()[0]
    region.payload(newest.slot)[10] ^= 0x40
    assert not region.verify(newest)
    region.close()
    shutil.rmtree(nodes[1])
    nodes[1].mkdir()
    _launch("restore", 4, nodes, tmp_path, "--zero")
    _check_restored(tmp_path, 4, "peers", step=4)


def test_corruption_beyond_parity_falls_back_to_the_persistent_copy(nodes: list[Path], tmp_path: Path) -> None:
    persist = tmp_path / "persist"
    _launch("train", 4, nodes, tmp_path, "--zero", "--steps", "6", "--persist", str(persist),
            "--persist-every", "1")
    for node in nodes[1:3]:           # two members of an m=1 group: beyond what parity covers
        _corrupt_newest(node)
        region = SlotFile.open(node / "local-0.data", 0, create=False)
        for entry in region.committed():
            region.payload(entry.slot)[64] ^= 0x01
        region.close()
    _launch("restore", 4, nodes, tmp_path, "--zero", "--persist", str(persist), "--persist-every", "1")
    _check_restored(tmp_path, 4, "persistent")


def test_sigterm_flushes_the_newest_snapshot_to_the_persistent_location(nodes: list[Path], tmp_path: Path) -> None:
    persist = tmp_path / "persist"
    procs = _launch("train", 2, nodes, tmp_path, "--k", "2", "--steps", "6", "--persist", str(persist),
                    "--persist-every", "100", "--hang-after", wait=False)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training did not finish"
        time.sleep(0.1)
    assert not (persist / "snapshots").exists()   # persistEvery=100: nothing written yet
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 128 + signal.SIGTERM
    for rank in range(2):
        assert (persist / "snapshots" / "step-0000000006" / f"rank-{rank:05d}" / ".metadata").is_file()


def test_a_replicated_persistent_copy_restores_into_a_world_of_another_size(nodes: list[Path],
                                                                           tmp_path: Path) -> None:
    """Every node is lost (the job comes back on 3 new nodes instead of 2): replicated copies
    load into the bigger world, new rank r taking old rank r % 2's."""
    persist = tmp_path / "persist"
    _launch("train", 2, nodes, tmp_path, "--k", "2", "--steps", "6", "--persist", str(persist), "--persist-every", "1")
    for node in nodes:
        shutil.rmtree(node)
        node.mkdir()
    _launch("restore", 3, nodes, tmp_path, "--k", "2", "--persist", str(persist), "--persist-every", "1")
    _check_restored(tmp_path, 3, "persistent", want={0: 0, 1: 1, 2: 0})


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 3), (3, 2)])
def test_zero_shards_are_resharded_bitwise_into_a_world_of_another_size(nodes: list[Path], tmp_path: Path,
                                                                        old_world: int, new_world: int) -> None:
    """ZeRO gives each rank the optimizer state of a partition that depends on the world size.
    The job comes back with another number of ranks (the old world's memory is of no use to
    it: its shards are cut for the old size). Each new rank restores from the persistent copies:
    old rank r % old world's model, RNG and data position, and for every parameter of its new
    partition exactly the optimizer state that parameter had, from whichever old rank held it."""
    persist = tmp_path / "persist"
    _launch("train", old_world, nodes, tmp_path, "--zero", "--k", str(old_world), "--steps", "6",
            "--persist", str(persist), "--persist-every", "1")
    _launch("restore", new_world, nodes, tmp_path, "--zero", "--k", str(new_world), "--persist", str(persist),
            "--persist-every", "1")
    old = [torch.load(tmp_path / f"expected-{r}.pt", weights_only=False) for r in range(old_world)]
    by_index = {index: tree["state"]["optimizer"]["state"][local]
                for tree in old for local, index in enumerate(tree["state"]["zero"]["params"])}
    covered = []
    for rank in range(new_world):
        restored = torch.load(tmp_path / f"restored-{rank}.pt", weights_only=False)
        base = old[rank % old_world]
        assert (restored["tier"], restored["step"], restored["data"]) == ("persistent", 6, base["data"])
        state, expected = restored["state"], base["state"]
        for key in ("model", "scheduler", "rng", "step"):
            _assert_same(expected[key], state[key], key)
        params = state["zero"]["params"]
        covered += params
        assert set(state["optimizer"]["state"]) == set(range(len(params)))
        for local, index in enumerate(params):
            _assert_same(by_index[index], state["optimizer"]["state"][local], f"parameter {index}")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in state["optimizer"]["param_groups"]]
        assert groups == [{k: v for k, v in g.items() if k != "params"}
                          for g in expected["optimizer"]["param_groups"]]
        assert groups[0]["lr"] == pytest.approx(0.01 * 0.9)   # StepLR on ZeRO: x0.9 at step 5, not stale
    assert sorted(covered) == sorted(by_index)   # every parameter is on exactly one new rank


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 3), (3, 2)])
def test_fsdp_shards_are_resharded_bitwise_into_a_world_of_another_size(nodes: list[Path], tmp_path: Path,
                                                                        old_world: int, new_world: int) -> None:
    """FSDP2 cuts every parameter and its Adam moments into row chunks, one per rank (96, 48 and
    8 rows here: 8 rows over 3 ranks are chunks of 3, 3 and 2). Restored into another world size
    from the persistent copies, the new ranks' chunks laid end to end are bitwise the old ranks'
    laid end to end; everything else is old rank r % old world's."""
    persist = tmp_path / "persist"
    _launch("train", old_world, nodes, tmp_path, "--fsdp", "--k", str(old_world), "--steps", "6",
            "--persist", str(persist), "--persist-every", "1")
    _launch("restore", new_world, nodes, tmp_path, "--fsdp", "--k", str(new_world), "--persist", str(persist),
            "--persist-every", "1")
    old = [torch.load(tmp_path / f"expected-{r}.pt", weights_only=False)["state"] for r in range(old_world)]
    new = [torch.load(tmp_path / f"restored-{r}.pt", weights_only=False) for r in range(new_world)]
    for rank, restored in enumerate(new):
        base = torch.load(tmp_path / f"expected-{rank % old_world}.pt", weights_only=False)
        assert (restored["tier"], restored["step"], restored["data"]) == ("persistent", 6, base["data"])
        for key in ("scheduler", "rng", "step"):
            _assert_same(base["state"][key], restored["state"][key], key)
    names = list(old[0]["model"])
    assert names and names == list(new[0]["state"]["model"])
    for name in names:
        def joined(trees: list[dict], pick) -> torch.Tensor:
            return torch.cat([pick(tree) for tree in trees])
        assert torch.equal(joined(old, lambda t: t["model"][name]), joined(new, lambda r: r["state"]["model"][name]))
        for leaf in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(joined(old, lambda t: t["optimizer"]["state"][name][leaf]),
                               joined(new, lambda r: r["state"]["optimizer"]["state"][name][leaf])), (name, leaf)
        assert all(torch.equal(r["state"]["optimizer"]["state"][name]["step"], old[0]["optimizer"]["state"][name]["step"])
                   for r in new)
    # The chunks really were cut differently: the 8-row layer's shards have other sizes.
    assert [t["model"]["4.weight"].shape[0] for t in old] != [r["state"]["model"]["4.weight"].shape[0] for r in new]


def test_a_snapshot_that_does_not_fit_one_rank_changes_no_rank(nodes: list[Path], tmp_path: Path) -> None:
    """Rank 2 comes back with a wider model than its snapshot's: its tree does not fit. Every
    rank learns it before any rank changes anything, so all start from scratch together (no
    persistent copy here), with their parameters as built and no optimizer state, instead of
    three ranks restored and one not, or the others waiting for it."""
    _launch("train", 4, nodes, tmp_path)
    _launch("restore", 4, nodes, tmp_path, "--mismatch-rank", "2")
    for rank in range(4):
        restored = torch.load(tmp_path / f"restored-{rank}.pt", weights_only=False)
        assert (restored["tier"], restored["step"]) == ("none", 0)
        assert restored["untouched"] == {"optimizer_state": 0, "params_as_built": True}
