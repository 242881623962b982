"""Capturing a training state and putting it back (one process, no process group): a fresh
model, optimizer and LR scheduler take the captured state bitwise, the RNG streams (torch, numpy,
Python) continue where they were, so training continues exactly as if never interrupted; and a
state that does not fit is refused before anything is changed."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from salamander_worker.snapshot import capture as capture_mod
from salamander_worker.snapshot import payload
from salamander_worker.snapshot.capture import CaptureError, Trainee, apply, capture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def make(seed: int, hidden: int = 5, out: int = 3, optimizer: str = "adamw") -> Trainee:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, out))
    if optimizer == "adamw":
        optim: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    else:
        optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return Trainee(model, optim, scheduler)


def train(trainee: Trainee, steps: int) -> list[Any]:
    """A few steps whose inputs come from all three RNGs; returns everything it drew and lost."""
    seen: list[Any] = []
    for _ in range(steps):
        x = torch.randn(8, 4) * (1 + np.random.rand()) + random.random()
        loss = trainee.model(torch.nn.functional.dropout(x, 0.25)).pow(2).mean()
        loss.backward()
        trainee.optimizer.step()
        trainee.optimizer.zero_grad()
        trainee.scheduler.step()
        seen.append((loss.item(), x.tolist(), trainee.scheduler.get_last_lr()))
    seen.append((torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()))
    return seen


def snapshot(tree: Any) -> Any:
    """The tree as a restore sees it: through the payload codec, tensors copied."""
    layout = payload.plan(tree)
    buffer = bytearray(layout.length)
    payload.write(tree, layout, memoryview(buffer))
    return payload.read(memoryview(buffer))


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bitwise(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, path
        assert raw(got) == raw(want), path
    elif isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            assert_bitwise(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_bitwise(a, b, f"{path}[{i}]")
    else:
        assert got == want, path


def params(trainee: Trainee) -> dict[str, bytes]:
    return {name: raw(p) for name, p in trainee.model.named_parameters()}


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_a_captured_state_applied_to_fresh_objects_continues_training_bitwise() -> None:
    seed_all(1)
    live = make(seed=1)
    train(live, 3)
    saved = snapshot(capture(live, 3, data={"epoch": 0, "batch": 24}))
    at_capture = params(live)
    optim_at_capture = snapshot(live.optimizer.state_dict())
    sched_at_capture = dict(live.scheduler.state_dict())
    assert saved["step"] == 3 and set(saved) == {"step", "model", "optimizer", "scheduler", "rng", "data", "zero"}
    expected = train(live, 3)        # the run as it would have gone on

    seed_all(99)                     # a fresh process: other weights, other RNG streams
    fresh = make(seed=2)
    assert fresh.optimizer.state_dict()["state"] == {}
    assert params(fresh) != at_capture
    step, data = apply(fresh, saved)
    assert (step, data) == (3, {"epoch": 0, "batch": 24})

    assert params(fresh) == at_capture
    restored = fresh.optimizer.state_dict()
    assert_bitwise(restored["state"], optim_at_capture["state"])
    assert restored["param_groups"] == optim_at_capture["param_groups"]
    assert restored["param_groups"][0]["lr"] == 0.005
    assert dict(fresh.scheduler.state_dict()) == sched_at_capture
    assert fresh.scheduler.get_last_lr() == [0.005]
    assert train(fresh, 3) == expected                       # losses, inputs, LRs, RNG draws
    assert params(fresh) == params(live)
    assert_bitwise(fresh.optimizer.state_dict()["state"], live.optimizer.state_dict()["state"])


def test_the_rng_streams_continue_identically() -> None:
    seed_all(5)
    torch.rand(7)
    np.random.rand(11)
    random.random()
    saved = snapshot(capture(make(seed=5), 0))
    expected = (torch.rand(4).tolist(), torch.randn(2).tolist(), np.random.rand(4).tolist(),
                np.random.randint(0, 1000, 4).tolist(), random.random(), random.getrandbits(64))
    seed_all(6)
    apply(make(seed=6), saved)
    assert (torch.rand(4).tolist(), torch.randn(2).tolist(), np.random.rand(4).tolist(),
            np.random.randint(0, 1000, 4).tolist(), random.random(), random.getrandbits(64)) == expected


def test_a_model_without_optimizer_or_scheduler() -> None:
    seed_all(3)
    source = make(seed=3)
    saved = snapshot(capture(Trainee(source.model), 7, data=[1, 2]))
    assert saved["optimizer"] is None and saved["scheduler"] is None
    target = make(seed=4)
    assert apply(Trainee(target.model), saved) == (7, [1, 2])
    assert params(target) == params(source)


def _snapshot_of_trained(seed: int = 1, **kw: Any) -> tuple[Any, Trainee]:
    seed_all(seed)
    live = make(seed=seed, **kw)
    train(live, 2)
    return snapshot(capture(live, 2)), live


def _untouched(trainee: Trainee) -> Any:
    """Everything apply could change, as bytes and values."""
    return (params(trainee), snapshot(trainee.optimizer.state_dict()), dict(trainee.scheduler.state_dict()),
            raw(torch.get_rng_state()), np.random.get_state()[1].tobytes(), random.getstate())


@pytest.mark.parametrize(("kw", "match"), [
    ({"out": 4}, r"model\.2\.weight"),            # the last layer's shape differs: found after the first's
    ({"hidden": 6}, r"model\.0\.weight"),
    ({"optimizer": "sgd"}, r"optimizer"),         # the model fits, the optimizer state does not
])
def test_a_mismatched_state_is_refused_before_anything_changes(kw: dict[str, Any], match: str) -> None:
    saved, _ = _snapshot_of_trained()
    seed_all(50)
    fresh = make(seed=50, **kw)
    train(fresh, 1)  # give it optimizer state and a scheduler position of its own
    before = _untouched(fresh)
    with pytest.raises(CaptureError, match=match):
        apply(fresh, saved)
    assert_bitwise(_untouched(fresh), before)


def test_a_missing_parameter_is_refused_before_anything_changes() -> None:
    saved, _ = _snapshot_of_trained()
    del saved["model"]["2.bias"]
    seed_all(51)
    fresh = make(seed=51)
    before_params = params(fresh)
    with pytest.raises(CaptureError, match="missing"):
        apply(fresh, saved)
    assert params(fresh) == before_params


def test_a_tensor_of_another_dtype_is_refused() -> None:
    saved, _ = _snapshot_of_trained()
    saved["model"]["2.bias"] = saved["model"]["2.bias"].double()
    fresh = make(seed=52)
    before_params = params(fresh)
    with pytest.raises(CaptureError, match="float64"):
        apply(fresh, saved)
    assert params(fresh) == before_params


def test_a_scheduler_without_saved_state_is_refused_before_anything_changes() -> None:
    saved, _ = _snapshot_of_trained()
    saved["scheduler"] = None
    fresh = make(seed=53)
    before_params = params(fresh)
    with pytest.raises(CaptureError, match="scheduler"):
        apply(fresh, saved)
    assert params(fresh) == before_params


@pytest.mark.parametrize("tree", [None, [], {}, {"step": 1, "model": {}, "optimizer": None},
                                  {"step": 1, "model": {}, "optimizer": None, "rng": {"python": None}}])
def test_a_tree_lacking_its_parts_is_refused(tree: Any) -> None:
    fresh = make(seed=54)
    before_params = params(fresh)
    with pytest.raises(CaptureError):
        apply(fresh, tree)
    assert params(fresh) == before_params


def test_a_fresh_optimizers_empty_state_takes_a_copy_of_the_saved_state() -> None:
    """A copy, not the saved tensors: those may be views of snapshot memory. The copies into
    the new tensors are queued with the others, to run once everything has been checked."""
    saved_state = {"0.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}
    copies: list[Any] = []
    taken = capture_mod._fill({}, saved_state, "optimizer.state", copies)
    assert len(copies) == 2
    capture_mod.copy_all(copies)
    assert taken.keys() == saved_state.keys()
    for key in ("step", "exp_avg"):
        assert torch.equal(taken["0.weight"][key], saved_state["0.weight"][key])
        assert taken["0.weight"][key].data_ptr() != saved_state["0.weight"][key].data_ptr()
    with pytest.raises(CaptureError, match="differ"):
        capture_mod._fill({"a": 1}, saved_state, "optimizer.state", copies)


def test_copy_all_fills_every_destination_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large contiguous copies are cut into pieces across the pool's threads; strided, small
    and other-dtype ones are copied whole; the result is what a plain loop of copy_ gives."""
    monkeypatch.setattr(capture_mod, "COPY_PIECE", 1000)
    monkeypatch.setattr(capture_mod.pool, "threads", lambda: 4)
    g = torch.Generator().manual_seed(3)
    sources = [torch.randn(5001, generator=g), torch.randn(70, 90, generator=g).t(),
               torch.randint(0, 100, (3, 4000), generator=g), torch.randn(7, generator=g),
               torch.randn(0, generator=g)]
    leaf = torch.zeros(5001, requires_grad=True)   # a parameter: copied without autograd
    targets = [leaf, torch.zeros(90, 70), torch.zeros(3, 4000, dtype=torch.int64), torch.zeros(7),
               torch.zeros(0)]
    capture_mod.copy_all(list(zip([leaf.detach(), *targets[1:]], sources)))
    for target, source in zip(targets, sources):
        assert torch.equal(target.detach(), source)


def test_zero_captures_the_learning_rate_its_scheduler_set_and_its_layout(one_process_group) -> None:  # type: ignore[no-untyped-def]
    """An LR scheduler on a ZeroRedundancyOptimizer changes ZeRO's groups; ZeRO passes them to
    its local optimizer only inside step(). The snapshot holds the rate the next step will use,
    and a restore puts it back there; the tree also says which parameters the shard holds."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(zero, lambda epoch: 0.5 ** epoch)
    model(torch.randn(2, 4)).sum().backward()
    zero.step()
    scheduler.step()
    assert zero.param_groups[0]["lr"] == 0.25
    tree = snapshot(capture(Trainee(model, zero, scheduler), 1))
    assert tree["optimizer"]["param_groups"][0]["lr"] == 0.25
    assert sorted(tree["zero"]["params"]) == [0, 1, 2, 3] and capture_mod.shard_layout(Trainee(model, zero)) == "zero"
    fresh_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    fresh = ZeroRedundancyOptimizer(fresh_model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.5)
    apply(Trainee(fresh_model, fresh, torch.optim.lr_scheduler.LambdaLR(fresh, lambda epoch: 0.5 ** epoch)), tree)
    assert fresh.param_groups[0]["lr"] == 0.25 and fresh.optim.param_groups[0]["lr"] == 0.25

