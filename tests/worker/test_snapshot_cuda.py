"""Snapshots of state on a GPU: DMA into page-locked shared memory on a copy stream (issue 4).

These run only where CUDA is available (CI has no GPU; they were run on a lent H100). The
model is large enough (~25M parameters with AdamW, ~300 MB of state) that the device-to-host
copy is still running when the next step's kernels are queued, so a missing fence, a buffer
read after the forward changed it, or a copy from freed memory shows up as a wrong byte.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from salamander import wire
from salamander_worker.snapshot import payload
from salamander_worker.snapshot.capture import Trainee, capture
from salamander_worker.snapshot.snapshotter import Snapshotter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.BatchNorm1d(4096), torch.nn.ReLU(),
                                *[torch.nn.Linear(4096, 4096) for _ in range(1)],
                                torch.nn.Linear(4096, 1024)).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def host_copy(tree: object) -> list[torch.Tensor]:
    """Every tensor leaf of ``tree`` (local shards), copied to the host now."""
    return [t.detach().cpu().clone() for t in payload.leaves(tree)]


def newest(snap: Snapshotter) -> tuple[int, list[torch.Tensor]]:
    assert snap._data is not None
    entry = snap._data.committed()[0]
    assert snap._data.verify(entry)
    tree = payload.read(snap._data.payload(entry.slot)[:entry.record["length"]])
    return int(entry.record["step"]), [t.clone() for t in payload.leaves(tree)]


def assert_bitwise(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, index
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), f"tensor {index} differs"


@pytest.fixture
def memory() -> Path:
    with tempfile.TemporaryDirectory(prefix="snapcuda-", dir="/dev/shm") as directory:
        yield Path(directory)


@pytest.mark.parametrize("overlap", [True, False])
def test_snapshot_holds_the_state_of_its_step_while_training_goes_on(memory: Path, overlap: bool) -> None:
    model, optimizer = build(0)
    x = torch.randn(512, 1024, device="cuda")
    train_step(model, optimizer, x)
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=memory,
                       overlap=overlap)
    try:
        for step in range(2, 6):
            train_step(model, optimizer, x)
            want = host_copy(capture(Trainee(model, optimizer), step))
            snap.snapshot(step)
            for _ in range(2):    # the next steps change every parameter, moment and BN statistic
                train_step(model, optimizer, x)
            snap.wait()
            got_step, got = newest(snap)
            assert got_step == step
            assert_bitwise(got, want)
        assert snap._copier is not None, "the GPU state was not copied by DMA"
        for slot in range(2):   # both slots were written, straight into page-locked memory
            assert torch.frombuffer(snap._data.payload(slot), dtype=torch.uint8).is_pinned()
        assert snap.stats.dma_s and all(s > 0 for s in snap.stats.dma_s)
    finally:
        snap.close()


def test_restore_puts_a_gpu_state_back_bitwise(memory: Path) -> None:
    model, optimizer = build(0)
    x = torch.randn(512, 1024, device="cuda")
    snap = Snapshotter(model, optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=memory)
    for step in range(1, 4):
        train_step(model, optimizer, x)
        snap.step(step)
    snap.wait()
    want = host_copy(capture(Trainee(model, optimizer), 3))
    snap.close()

    fresh, fresh_optimizer = build(99)
    train_step(fresh, fresh_optimizer, x)   # live Adam state for the restore to fill in place
    restored = Snapshotter(fresh, fresh_optimizer, config=wire.SnapshotConfig(interval=1), memory_dir=memory)
    try:
        step, _ = restored.restore()
        assert step == 3 and restored.stats.restore_tier == "memory"
        assert all(p.is_cuda for p in fresh.parameters())
        assert_bitwise(host_copy(capture(Trainee(fresh, fresh_optimizer), 3)), want)
    finally:
        restored.close()


@pytest.mark.parametrize("piece, threads", [(1 << 20, 3), (64, 2), (16 << 20, 8)])
def test_staged_upload_is_bitwise_and_writes_every_byte(piece: int, threads: int) -> None:
    from salamander_worker.snapshot.device import upload

    generator = torch.Generator().manual_seed(piece + threads)
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator)
               for n in (1, 7, 1 << 20, (3 << 20) + 5, 1000)]
    sources += [torch.randn(513, 257, generator=generator), torch.randn(77, generator=generator).to(torch.bfloat16)]
    targets = [torch.full_like(src, 0, device="cuda") if src.dtype == torch.uint8 else
               torch.full_like(src, float("nan"), device="cuda") for src in sources]
    upload(list(zip(targets, sources)), piece=piece, threads=threads)
    for target, source in zip(targets, sources):
        assert torch.equal(target.cpu().view(-1).view(torch.uint8), source.view(-1).view(torch.uint8))
