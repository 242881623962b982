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


@pytest.mark.parametrize(("overlap", "cores", "torch_threads", "forced", "expected"), [
    (False, 2, 2, None, True),     # the copy blocks training: its crc gets a thread
    (True, 2, 2, None, False),     # in the background, torch's threads take every core
    (True, 8, 4, None, True),      # ... or leave one free
    (True, 2, 2, True, True),      # the constructor decides when told
    (False, 8, 1, False, False),
])
def test_the_copy_s_crc_gets_a_thread_of_its_own_only_when_it_costs_training_no_core(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlap: bool, cores: int, torch_threads: int,
        forced: bool | None, expected: bool) -> None:
    model, optimizer = build()
    seen: list[bool] = []
    real = payload.copy_tensors

    def copy_tensors(pending, buffer, length=None, **options):  # type: ignore[no-untyped-def]
        if length is not None:
            seen.append(options["crc_thread"])
        return real(pending, buffer, length, **options)

    monkeypatch.setattr(snapshotter.payload, "copy_tensors", copy_tensors)
    monkeypatch.setattr(snapshotter.pool, "threads", lambda: cores)
    monkeypatch.setattr(snapshotter.torch, "get_num_threads", lambda: torch_threads)
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=tmp_path,
                       overlap=overlap, crc_thread=forced)
    try:
        model(torch.randn(8, 16)).square().mean().backward()
        optimizer.step()
        snap.snapshot(1)
        snap.wait()
    finally:
        snap.close()
    assert seen == [expected]
