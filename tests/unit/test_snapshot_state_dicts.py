"""The cached ``get_state_dict``: the same answer as torch's, leaf by leaf, for every shape of
state a training run goes through, with torch called once per shape."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from salamander_worker.snapshot.state_dicts import StateDicts, _same


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    m(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def torch_answer(m: torch.nn.Module, opt: torch.optim.Optimizer | None):  # type: ignore[no-untyped-def]
    if opt is None:
        return get_state_dict(m, [])[0], None
    return get_state_dict(m, opt)


def test_every_shape_of_a_run_gets_torchs_answer_and_torch_is_called_once_per_shape() -> None:
    m = model()
    opt = torch.optim.AdamW([{"params": list(m[0].parameters())},
                             {"params": list(m[1].parameters()) + list(m[3].parameters()), "lr": 0.1}])
    cache = StateDicts()
    for n in range(6):
        if n == 2:
            step(m, opt)   # Adam's state appears: a new shape
        got = cache(m, opt)
        assert _same(got, torch_answer(m, opt)), n
        if n >= 3:
            step(m, opt)   # values change, the shape does not
    assert cache.torch_calls == 2   # before and after the optimizer state existed
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})   # not the model's: torch decides
    try:
        expected = torch_answer(m, opt)
    except Exception:   # noqa: BLE001 - torch refuses it; so must the cache
        expected = None
    if expected is not None:
        assert _same(cache(m, opt), expected)


def test_ddp_prefixes_are_stripped_as_torch_does_and_a_model_alone(one_process_group) -> None:  # type: ignore[no-untyped-def]
    m = torch.nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    step(m, opt)
    cache = StateDicts()
    for _ in range(3):
        got = cache(m, opt)
        assert _same(got, torch_answer(m, opt))
        assert next(iter(got[0])) == "0.weight"   # DDP's "module." is gone, as torch does
        assert next(iter(got[1]["state"])) == "0.weight"
        step(m, opt)
    assert cache.torch_calls == 1
    alone = StateDicts()
    for _ in range(2):
        assert _same(alone(m, None), torch_answer(m, None))
    assert alone.torch_calls == 1


def test_renamed_answers_hold_the_live_tensors_and_current_values() -> None:
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    step(m, opt)
    cache = StateDicts()
    cache(m, opt)
    for group in opt.param_groups:
        group["lr"] = 0.5          # a scheduler changed it: a value, not the shape
    model_state, optim_state = cache(m, opt)
    assert cache.torch_calls == 1
    assert model_state["0.weight"].data_ptr() == m[0].weight.data_ptr()
    assert optim_state["state"]["0.weight"]["exp_avg"] is opt.state[m[0].weight]["exp_avg"]
    assert [g["lr"] for g in optim_state["param_groups"]] == [0.5]


def test_a_shape_torch_answers_differently_keeps_calling_torch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import salamander_worker.snapshot.state_dicts as sd

    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    real = sd.get_state_dict

    def different(module, optimizers):  # type: ignore[no-untyped-def]
        model_state, optim_state = real(module, optimizers)
        return {k: v.clone() for k, v in model_state.items()}, optim_state   # other storage

    monkeypatch.setattr(sd, "get_state_dict", different)
    cache = StateDicts()
    for _ in range(3):
        got = cache(m, opt)
        assert got[0]["0.weight"].data_ptr() != m[0].weight.data_ptr()   # torch's (patched) answer
    assert cache.torch_calls == 3


def test_same_compares_leaves_strictly() -> None:
    t = torch.zeros(4)
    assert _same({"a": [t, 1.0, float("nan")]}, {"a": [t.view(4), 1.0, float("nan")]})
    assert not _same({"a": t}, {"a": t.clone()})
    assert not _same({"a": 1, "b": 2}, {"b": 2, "a": 1})   # order matters
    assert not _same([1, 2], (1, 2))
    assert not _same({"a": t}, {"a": t.view(2, 2)})
    assert not _same(1, 1.0)
    assert not _same({"a": 1}, OrderedDict(a=1))
