"""The overlapped snapshot on a CPU node: the copy runs on the snapshot thread while the next
forward and backward run, and ``optimizer.step()`` waits for it (issue 4).

The background copy is held until the training thread has run the next forward, so a tensor
that the forward changes in place (batch-norm statistics) and that is left to the background
shows up as a wrong byte. The checksum is computed from the source pieces; the committed slot
must verify against it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from salamander import wire
from salamander_worker.snapshot import payload, snapshotter
from salamander_worker.snapshot.capture import Trainee, capture
from salamander_worker.snapshot.snapshotter import Snapshotter


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def leaves(tree: object) -> list[torch.Tensor]:
    return [t.detach().clone() for t in payload.leaves(tree)]


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event the snapshot thread's copies wait for (foreground copies do not)."""
    release = threading.Event()
    real = payload.copy_tensors

    def copy_tensors(pending, buffer, length=None, **options):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread():
            assert release.wait(timeout=30), "the test never released the background copy"
        return real(pending, buffer, length, **options)

    monkeypatch.setattr(snapshotter.payload, "copy_tensors", copy_tensors)
    return release


def test_a_forward_during_the_background_copy_does_not_reach_the_snapshot(tmp_path: Path,
                                                                           held: threading.Event) -> None:
    model, optimizer = build()
    x = torch.randn(64, 16)
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=tmp_path, overlap=True)
    try:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        want = leaves(capture(Trainee(model, optimizer), 1))
        snap.snapshot(1)
        model(x).square().mean().backward()   # changes the running mean and variance in place
        held.set()
        optimizer.step()                      # waits for the copy of parameters and moments
        snap.wait()
        assert snap._data is not None
        entry = snap._data.committed()[0]
        assert entry.record["step"] == 1
        assert snap._data.verify(entry), "the checksum from the source pieces does not match the slot"
        got = [t.clone() for t in payload.leaves(payload.read(snap._data.payload(entry.slot)[:entry.record["length"]]))]
        assert len(got) == len(want)
        for index, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"tensor {index} is not the state of step 1"
    finally:
        held.set()
        snap.close()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("crc_thread", [True, False])
def test_the_copy_s_crc_runs_on_a_thread_of_its_own_unless_told_not_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlap: bool, crc_thread: bool) -> None:
    model, optimizer = build()
    seen: list[bool] = []
    real = payload.copy_tensors

    def copy_tensors(pending, buffer, length=None, **options):  # type: ignore[no-untyped-def]
        if length is not None:
            seen.append(options["crc_thread"])
        return real(pending, buffer, length, **options)

    monkeypatch.setattr(snapshotter.payload, "copy_tensors", copy_tensors)
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=tmp_path,
                       overlap=overlap, **({} if crc_thread else {"crc_thread": False}))
    try:
        model(torch.randn(8, 16)).square().mean().backward()
        optimizer.step()
        snap.snapshot(1)
        snap.wait()
    finally:
        snap.close()
    assert seen == [crc_thread]
