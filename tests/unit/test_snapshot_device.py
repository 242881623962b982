"""The GPU snapshot path's host-side logic, which runs without a GPU (issue 4). The copies
themselves are tested on a GPU in ``tests/worker/test_snapshot_cuda.py``."""

from __future__ import annotations

import torch

from salamander_worker.snapshot.device import PinnedRegions, DeviceCopier, stable_pointers, upload
from salamander_worker.snapshot.payload import TensorRef


def test_stable_pointers_are_parameters_and_optimizer_state_not_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    stable = stable_pointers(model, optimizer)
    for p in model.parameters():
        assert p.data_ptr() in stable
        for value in optimizer.state[p].values():
            assert value.data_ptr() in stable
    assert model[1].running_mean.data_ptr() not in stable   # changed by the forward: copied in stream order


def test_split_keeps_payload_order_within_device_and_host() -> None:
    tensors = [torch.zeros(2), torch.zeros(3), torch.zeros(4)]
    pending = [(t, TensorRef(64 * i, t.numel() * 4, "torch.float32", tuple(t.shape))) for i, t in enumerate(tensors)]
    device, host = DeviceCopier.split(pending)
    assert device == [] and [ref.offset for _, ref in host] == [0, 64, 128]


def test_without_cuda_nothing_is_page_locked() -> None:
    if torch.cuda.is_available():
        return
    regions = PinnedRegions()
    assert regions.pin(memoryview(bytearray(4096))) is False
    regions.unpin(memoryview(bytearray(4096)))   # never registered: a no-op


def test_upload_to_host_tensors_copies_directly() -> None:
    sources = [torch.randn(5, 3), torch.arange(7, dtype=torch.int64)]
    targets = [torch.zeros(5, 3), torch.zeros(7, dtype=torch.int64)]
    upload(list(zip(targets, sources)), piece=8, threads=3)
    assert all(torch.equal(t, s) for t, s in zip(targets, sources))
