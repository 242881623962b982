"""Persistent copies of snapshots: the checksum they carry, and copies from before it was named."""

from __future__ import annotations

import warnings
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from salamander_worker.snapshot import region
from salamander_worker.snapshot.persist import Persister, PersistError
from salamander_worker.snapshot.plan import PersistentStep

PAYLOAD = np.random.default_rng(3).integers(0, 256, size=10_000, dtype=np.uint8)


def _write_raw(persister: Persister, step: int, meta: dict) -> Path:
    """A copy written as an older Salamander did: ``meta`` exactly as given."""
    path = persister.path(step, 0)
    path.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"payload": torch.from_numpy(PAYLOAD.copy()), "meta": meta}, checkpoint_id=path, no_dist=True)
    return path


def test_a_copy_names_its_checksum_and_loads_back(tmp_path: Path) -> None:
    persister = Persister(tmp_path)
    persister.save(40, 0, 2, memoryview(PAYLOAD), region.checksum(PAYLOAD), sharded=False)
    assert np.array_equal(persister.load(40, 0), PAYLOAD)
    assert region.ALGORITHM == "crc32"


@pytest.mark.parametrize("sharded", [False, True])
def test_the_listing_says_whether_a_step_is_sharded(tmp_path: Path, sharded: bool) -> None:
    persister = Persister(tmp_path)
    for rank in (0, 1):
        persister.save(40, rank, 2, memoryview(PAYLOAD), region.checksum(PAYLOAD), sharded=sharded)
    persister.save(50, 0, 2, memoryview(PAYLOAD), region.checksum(PAYLOAD), sharded=sharded)
    assert persister.listing() == {40: PersistentStep(2, frozenset({0, 1}), sharded),
                                   50: PersistentStep(2, frozenset({0}), sharded)}


def test_a_copy_whose_bytes_changed_is_refused(tmp_path: Path) -> None:
    persister = Persister(tmp_path)
    persister.save(40, 0, 2, memoryview(PAYLOAD), region.checksum(PAYLOAD) ^ 1, sharded=False)
    with pytest.raises(PersistError, match="fails its crc32 checksum"):
        persister.load(40, 0)


def test_a_copy_from_before_the_checksum_was_named_is_checked_with_crc32c(tmp_path: Path) -> None:
    """Copies written before the switch to CRC-32 carry a CRC-32C and no ``algorithm`` (nor
    ``sharded``): they stay readable, count as sharded, and a changed byte in one is caught."""
    persister = Persister(tmp_path)
    _write_raw(persister, 40, {"step": 40, "rank": 0, "world": 2, "checksum": crc32c.crc32c(PAYLOAD)})
    assert np.array_equal(persister.load(40, 0), PAYLOAD)
    assert persister.listing() == {40: PersistentStep(2, frozenset({0}), sharded=True)}

    _write_raw(persister, 50, {"step": 50, "rank": 0, "world": 2, "checksum": region.checksum(PAYLOAD)})
    with pytest.raises(PersistError, match="fails its crc32c checksum"):
        persister.load(50, 0)


def test_a_copy_with_an_unknown_checksum_is_refused_by_name(tmp_path: Path) -> None:
    persister = Persister(tmp_path)
    _write_raw(persister, 40, {"step": 40, "rank": 0, "world": 2, "checksum": 0, "algorithm": "md5"})
    with pytest.raises(PersistError, match="unknown checksum 'md5'"):
        persister.load(40, 0)


def test_the_checksum_is_isa_l_when_it_is_installed() -> None:
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    assert region._crc32 is isal_zlib.crc32


def test_copies_left_by_a_larger_world_are_deleted_once_they_are_old(tmp_path: Path) -> None:
    """A world of 4 persists steps 10 and 20, then the job shrinks to 3 and persists 30 and 40:
    old rank 3's copies are then deleted by rank 0 with the rest of steps 10 and 20, and only
    the newest two steps of the 3 ranks stay."""
    persister = Persister(tmp_path)
    crc = region.checksum(PAYLOAD)
    for step, world in ((10, 4), (20, 4), (30, 3), (40, 3)):
        for rank in range(world):
            persister.save(step, rank, world, memoryview(PAYLOAD), crc, sharded=False)
    assert persister.listing() == {30: PersistentStep(3, frozenset({0, 1, 2}), False),
                                   40: PersistentStep(3, frozenset({0, 1, 2}), False)}
    assert sorted(p.name for p in persister.root.iterdir()) == ["step-0000000030", "step-0000000040"]


def test_a_sharded_copy_records_its_layout_and_the_listing_says_so(tmp_path: Path) -> None:
    """ZeRO copies record which global parameters their shard holds (so they can be resharded
    into a world of another size); other copies record none, and asking for one names the path."""
    persister = Persister(tmp_path)
    crc = region.checksum(PAYLOAD)
    persister.save(40, 0, 2, memoryview(PAYLOAD), crc, sharded=True, layout="zero", zero=[0, 3, 4])
    persister.save(40, 1, 2, memoryview(PAYLOAD), crc, sharded=True, layout="zero", zero=[1, 2])
    persister.save(50, 0, 2, memoryview(PAYLOAD), crc, sharded=True)
    persister.save(60, 1, 2, memoryview(PAYLOAD), crc, sharded=True, layout="fsdp")
    assert persister.listing() == {40: PersistentStep(2, frozenset({0, 1}), True, layout="zero"),
                                   50: PersistentStep(2, frozenset({0}), True, layout=None),
                                   60: PersistentStep(2, frozenset({1}), True, layout="fsdp")}
    assert persister.zero_params(40, 0) == [0, 3, 4] and persister.zero_params(40, 1) == [1, 2]
    assert np.array_equal(persister.load(40, 1), PAYLOAD)
    with pytest.raises(PersistError, match="records no ZeRO shard layout"):
        persister.zero_params(50, 0)
    with pytest.raises(PersistError, match="rank-00001"):
        persister.zero_params(50, 1)   # no copy at all
    with pytest.raises(PersistError, match="ZeRO layout needs its parameter indices"):
        persister.save(70, 0, 2, memoryview(PAYLOAD), crc, sharded=True, layout="zero")
