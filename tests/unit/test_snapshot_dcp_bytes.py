"""Reading a persistent copy's payload straight from DCP's file: the same bytes as ``dcp.load``,
and None (so the caller falls back to ``dcp.load``) for anything it does not recognise."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from salamander_worker.snapshot import dcp_bytes, region
from salamander_worker.snapshot.dcp_bytes import read_uint8
from salamander_worker.snapshot.persist import Persister, PersistError


def save(path: Path, state: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path, no_dist=True)


@pytest.mark.parametrize("size", [0, 1, 4097, 3_000_001])
def test_the_bytes_are_those_dcp_saved(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8)
    save(tmp_path, {"meta": {"step": 3, "note": "x" * 100}, "payload": torch.from_numpy(data.copy()),
                    "zero": torch.arange(7)})
    got = read_uint8(tmp_path, "payload")
    assert got is not None and got.dtype == np.uint8 and np.array_equal(got, data)


def test_anything_unrecognised_gives_none(tmp_path: Path) -> None:
    save(tmp_path, {"payload": torch.arange(100, dtype=torch.uint8), "floats": torch.zeros(4),
                    "grid": torch.zeros(2, 2, dtype=torch.uint8)})
    assert read_uint8(tmp_path, "floats") is None          # not uint8
    assert read_uint8(tmp_path, "grid") is None            # not 1-D
    assert read_uint8(tmp_path, "missing") is None
    assert read_uint8(tmp_path / "nowhere", "payload") is None
    info = next(i for k, i in dcp.FileSystemReader(tmp_path).read_metadata().storage_data.items()
                if k.fqn == "payload")
    distcp = tmp_path / info.relative_path
    distcp.write_bytes(distcp.read_bytes()[:info.offset + info.length - 30])   # the archive's directory cut
    assert read_uint8(tmp_path, "payload") is None
    distcp.write_bytes(b"\0" * 5000)                        # garbage
    assert read_uint8(tmp_path, "payload") is None


def test_a_persistent_copy_loads_through_it_and_through_dcp_alike(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.random.default_rng(1).integers(0, 256, size=200_000, dtype=np.uint8)
    persister = Persister(tmp_path)
    persister.save(10, 0, 1, memoryview(data), region.checksum(data), sharded=False)
    calls = []
    real = dcp_bytes.read_uint8
    monkeypatch.setattr(dcp_bytes, "read_uint8", lambda *a: calls.append(a) or real(*a))
    assert np.array_equal(persister.load(10, 0), data) and len(calls) == 1
    monkeypatch.setattr(dcp_bytes, "read_uint8", lambda *a: None)   # the fallback: dcp.load
    assert np.array_equal(persister.load(10, 0), data)


def test_a_changed_byte_in_the_file_fails_the_checksum(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(0, 256, size=100_000, dtype=np.uint8)
    persister = Persister(tmp_path)
    persister.save(10, 0, 1, memoryview(data), region.checksum(data), sharded=False)
    distcp = next(persister.path(10, 0).glob("*.distcp"))
    raw = bytearray(distcp.read_bytes())
    at = bytes(raw).find(data[5000:5064].tobytes())
    assert at > 0
    raw[at + 10] ^= 0xFF
    distcp.write_bytes(bytes(raw))
    with pytest.raises(PersistError, match="fails its crc32 checksum"):
        persister.load(10, 0)


def test_bytes_misread_by_the_one_read_path_are_read_again_by_dcp(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Should torch's layout change under it, wrong bytes fail the checksum and DCP's own
    reader decides, rather than a good copy being refused."""
    data = np.random.default_rng(3).integers(0, 256, size=50_000, dtype=np.uint8)
    persister = Persister(tmp_path)
    persister.save(10, 0, 1, memoryview(data), region.checksum(data), sharded=False)
    monkeypatch.setattr(dcp_bytes, "read_uint8", lambda *a: np.zeros(data.size, dtype=np.uint8))
    assert np.array_equal(persister.load(10, 0), data)
