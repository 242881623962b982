"""The snapshot payload codec: any training-state tree (nested containers, plain values, RNG
states, tensors of every supported dtype and layout) comes back bitwise; a layout survives a
changed step but not a changed shape; and a malformed payload raises PayloadError, nothing else."""

from __future__ import annotations

import math
import os
import pickle
import random
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from salamander_worker.snapshot import payload
from salamander_worker.snapshot.payload import ALIGN, PayloadError, TensorRef

from tests.unit._support import FAST, QUICK

# read() accepts read-only bytes; torch warns (once) when it views them, before copying.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)


# -- helpers ---------------------------------------------------------------------------------------


def encode(tree: Any) -> tuple[payload.Layout, bytearray]:
    layout = payload.plan(tree)
    buffer = bytearray(layout.length)
    payload.write(tree, layout, memoryview(buffer))
    return layout, buffer


def roundtrip(tree: Any) -> Any:
    return payload.read(memoryview(encode(tree)[1]))


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of arbitrary bit patterns (NaN payloads, infinities, -0.0, subnormals...)."""
    gen = torch.Generator().manual_seed(seed)
    count = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    itemsize = torch.empty((), dtype=dtype).element_size()
    bits = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=gen)
    return bits.view(dtype).reshape(shape)


def assert_same(got: Any, want: Any, path: str = "tree") -> None:
    """Equal types all the way down, tensors bitwise equal, floats equal bit for bit."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), path
        assert got.device.type == "cpu" and not got.requires_grad, path
        assert raw_bytes(got) == raw_bytes(want), path
        return
    assert type(got) is type(want), f"{path}: {type(got)} is not {type(want)}"
    if isinstance(want, dict):
        assert list(got) == list(want), path
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), path
    else:
        assert got == want, path


# -- round trips -----------------------------------------------------------------------------------


def test_a_training_like_tree_comes_back_bitwise() -> None:
    rng = np.random.RandomState(7)
    py = random.Random(7)
    tree = {
        "step": 12,
        "model": OrderedDict([("layer.weight", random_tensor(torch.float32, (4, 3), 1)),
                              ("layer.bias", random_tensor(torch.float32, (4,), 2))]),
        "optimizer": {"state": {0: {"step": torch.tensor(12.0), "exp_avg": random_tensor(torch.float32, (4, 3), 3)}},
                      "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0, 1], "name": None}]},
        "scheduler": {"last_epoch": 12, "_last_lr": [0.0005], "gamma": 0.5},
        "rng": {"python": py.getstate(), "numpy": rng.get_state(), "numpy_global": np.random.get_state(),
                "torch": torch.get_rng_state()},
        "data": ("epoch", 3, -1.5, float("inf"), -0.0, None, True, "ünïcode", b"bytes"),
        "empty": {}, "empty_list": [], "empty_tuple": (),
    }
    assert_same(roundtrip(tree), tree)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (5,), (3, 7), (2, 3, 5)], ids=str)
def test_every_dtype_and_shape_comes_back_bitwise(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = random_tensor(dtype, shape, seed=len(shape) * 31 + DTYPES.index(dtype))
    tree = {"t": tensor, "after": random_tensor(torch.uint8, (3,), 5)}  # a neighbour after it
    got = roundtrip(tree)
    assert_same(got, tree)


@pytest.mark.parametrize("make", [
    lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),         # transposed
    lambda: torch.arange(20, dtype=torch.int64)[::3],                         # strided
    lambda: torch.arange(3, dtype=torch.bfloat16).expand(4, 3),              # zero stride
    lambda: torch.arange(24, dtype=torch.float16).reshape(2, 3, 4)[:, 1:, ::2],
    lambda: torch.arange(10, dtype=torch.float64)[3:7],                      # offset into storage
    lambda: torch.tensor([True, False, True, True])[::2],
    lambda: torch.randn(3, 3, dtype=torch.complex64).t(),
    lambda: torch.nn.Parameter(torch.randn(2, 2)),                           # requires grad
], ids=["transposed", "strided", "expanded", "sliced3d", "offset", "bool-strided", "complex-t", "parameter"])
def test_non_contiguous_and_special_tensors_come_back_as_contiguous_copies(make: Any) -> None:
    tensor = make()
    got = roundtrip({"x": tensor})["x"]
    assert got.is_contiguous()
    assert got.dtype == tensor.dtype and got.shape == tensor.shape
    assert torch.equal(got, tensor.detach())
    assert raw_bytes(got) == raw_bytes(tensor)


def test_global_rng_states_round_trip_and_restore_the_same_streams() -> None:
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    tree = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    back = roundtrip(tree)
    assert_same(back, tree)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    torch.set_rng_state(back["torch"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_read_returns_copies_not_views_of_the_buffer() -> None:
    tensor = torch.arange(16, dtype=torch.float32)
    layout, buffer = encode({"t": tensor})
    got = payload.read(memoryview(buffer))["t"]
    ref = layout.refs[0]
    buffer[ref.offset:ref.offset + ref.nbytes] = b"\xff" * ref.nbytes
    assert torch.equal(got, tensor)          # the buffer changed under it: the copy did not
    got.add_(1)                              # writable, and writing it leaves the buffer alone
    assert bytes(buffer[ref.offset:ref.offset + ref.nbytes]) == b"\xff" * ref.nbytes


def test_the_same_tensor_twice_gives_two_independent_copies() -> None:
    tensor = torch.arange(4, dtype=torch.int32)
    got = roundtrip([tensor, tensor])
    assert torch.equal(got[0], tensor) and torch.equal(got[1], tensor)
    got[0].zero_()
    assert torch.equal(got[1], tensor)


def test_layout_places_tensors_aligned_and_apart() -> None:
    tree = [random_tensor(torch.float32, (n,), n) for n in (1, 17, 0, 64, 3)]
    layout = payload.plan(tree)
    assert [r.nbytes for r in layout.refs] == [4, 68, 0, 256, 12]
    end = 0
    for ref in layout.refs:
        assert ref.offset % ALIGN == 0 and ref.offset >= end
        assert ref.offset >= 8 + len(layout.skeleton)
        end = ref.offset + ref.nbytes
    assert end <= layout.length and layout.length % ALIGN == 0


def test_plain_tree_without_tensors() -> None:
    tree = {"step": 3, "data": [1, 2.5, "x", None, (True,)]}
    layout, buffer = encode(tree)
    assert layout.refs == () and layout.signature == ()
    assert_same(payload.read(bytes(buffer)), tree)


# Random trees: containers of plain values and small tensors.
_plain = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.binary(max_size=8))
_tensors = st.builds(random_tensor, st.sampled_from(DTYPES),
                     st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(0, 2**31))
_trees = st.recursive(
    st.one_of(_plain, _tensors),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), children, max_size=4),
        st.dictionaries(st.text(max_size=5), children, max_size=4).map(lambda d: OrderedDict(sorted(d.items()))),
    ),
    max_leaves=12)


@QUICK
@given(_trees)
def test_any_tree_comes_back_bitwise(tree: Any) -> None:
    assert_same(roundtrip(tree), tree)


# -- the layout across steps -------------------------------------------------------------------------


def _state(step: int, seed: int, shape: tuple[int, ...] = (5, 3)) -> dict[str, Any]:
    return {"step": step, "w": random_tensor(torch.float32, shape, seed),
            "b": random_tensor(torch.bfloat16, (3,), seed),
            "rng": {"numpy": np.random.RandomState(seed).get_state(), "python": random.Random(seed).getstate()}}


@pytest.mark.parametrize("later_step", [2, 255, 256, 65536, 2**31, 10**15, 2**63])
def test_a_layout_survives_new_plain_values_and_tensor_values(later_step: int) -> None:
    layout = payload.plan(_state(1, seed=1))
    buffer = bytearray(layout.length)
    payload.write(_state(1, seed=1), layout, memoryview(buffer))
    later = _state(later_step, seed=2)
    assert payload.plan(later).signature == layout.signature
    payload.write(later, layout, memoryview(buffer))
    assert_same(payload.read(memoryview(buffer)), later)


def test_a_changed_shape_or_dtype_changes_the_signature() -> None:
    base = payload.plan(_state(1, seed=1)).signature
    assert payload.plan(_state(9, seed=5)).signature == base
    assert payload.plan(_state(1, seed=1, shape=(3, 5))).signature != base   # same bytes, other shape
    assert payload.plan(_state(1, seed=1, shape=(6, 3))).signature != base
    other_dtype = dict(_state(1, seed=1), b=random_tensor(torch.float16, (3,), 1))
    assert payload.plan(other_dtype).signature != base
    more = dict(_state(1, seed=1), extra=torch.zeros(1))
    assert payload.plan(more).signature != base


def test_write_refuses_a_tree_that_no_longer_fits_its_layout() -> None:
    layout = payload.plan(_state(1, seed=1))
    buffer = memoryview(bytearray(layout.length))
    with pytest.raises(PayloadError):
        payload.write(dict(_state(1, seed=1), extra=torch.zeros(2)), layout, buffer)   # one tensor more
    with pytest.raises(PayloadError):
        payload.write({"w": torch.zeros(5, 3)}, layout, buffer)                       # fewer tensors
    with pytest.raises(PayloadError):
        payload.write(dict(_state(1, seed=1), data="x" * 10_000), layout, buffer)      # plain values grew
    with pytest.raises(PayloadError):
        payload.write(_state(1, seed=1), layout, memoryview(bytearray(layout.length - 1)))  # buffer too short


def test_plan_refuses_an_unpicklable_value() -> None:
    with pytest.raises(PayloadError):
        payload.plan({"step": 1, "fn": lambda: None})


# -- malformed payloads --------------------------------------------------------------------------------


def _valid() -> tuple[payload.Layout, bytes]:
    layout, buffer = encode(_state(4, seed=4))
    return layout, bytes(buffer)


def _with_skeleton(skeleton: bytes, tail: bytes = b"\0" * 256) -> bytes:
    return struct.pack("<Q", len(skeleton)) + skeleton + tail


def test_every_truncation_that_cuts_data_is_refused() -> None:
    layout, data = _valid()
    end = max(r.offset + r.nbytes for r in layout.refs)
    for cut in sorted({*range(0, 40), *range(0, end, 7), end - 1}):
        with pytest.raises(PayloadError):
            payload.read(data[:cut])
    payload.read(data[:end])  # only padding was cut: still whole


@pytest.mark.parametrize("size", [2**64 - 1, 2**63, 10**9])
def test_a_skeleton_length_beyond_the_payload_is_refused(size: int) -> None:
    _, data = _valid()
    with pytest.raises(PayloadError, match="skeleton"):
        payload.read(struct.pack("<Q", size) + data[8:])
    with pytest.raises(PayloadError, match="skeleton"):
        payload.read(struct.pack("<Q", len(data) - 7) + data[8:])


@pytest.mark.parametrize("garbage", [
    b"", b"\x00", b"\x01" * 7, b"\x00" * 8,                    # too short / empty skeleton
    _with_skeleton(b"not a pickle at all"),
    _with_skeleton(b"\x80\x05"),                               # protocol header, then nothing
    _with_skeleton(b"\x80\x05]q\x00(K\x01"),                   # cut in the middle of a list
    _with_skeleton(b"\x80\x05\x95" + b"\xff" * 8),             # a frame claiming 2**64 bytes
    _with_skeleton(b"\x80\x05h\x07."),                         # memo lookup of nothing
    bytes(range(256)) * 4,
], ids=lambda g: repr(g[:16]))
def test_garbage_is_refused(garbage: bytes) -> None:
    with pytest.raises(PayloadError):
        payload.read(garbage)


def _ref_payload(ref: Any, length: int = 512) -> bytes:
    skeleton = pickle.dumps({"t": ref}, protocol=pickle.HIGHEST_PROTOCOL)
    return _with_skeleton(skeleton, b"\0" * (length - 8 - len(skeleton)))


@pytest.mark.parametrize("ref", [
    TensorRef(10**6, 4, "torch.float32", (1,)),          # past the end
    TensorRef(508, 8, "torch.float32", (2,)),            # straddles the end
    TensorRef(-64, 4, "torch.float32", (1,)),            # negative offset
    TensorRef(256, 8, "torch.float32", (1,)),            # nbytes does not match the shape
    TensorRef(256, 4, "torch.float32", (2,)),
    TensorRef(256, 4, "torch.float32", (-1, -1)),        # negative dims with a positive product
    TensorRef(256, 4, "torch.quint8", (4,)),             # unsupported dtype
    TensorRef(256, 4, "float32", (1,)),
    TensorRef(256, 4, ["torch.float32"], (1,)),          # unhashable dtype
    TensorRef("256", 4, "torch.float32", (1,)),          # fields of the wrong type
    TensorRef(256, 4.0, "torch.float32", (1,)),
    TensorRef(256, 4, "torch.float32", None),
    TensorRef(256, 4, "torch.float32", "ab"),
    TensorRef(256, 1, "torch.bool", (True,)),
    TensorRef(True, 1, "torch.bool", (1,)),
], ids=repr)
def test_a_tensor_reference_that_does_not_fit_is_refused(ref: TensorRef) -> None:
    with pytest.raises(PayloadError):
        payload.read(_ref_payload(ref))


def test_a_fitting_hand_made_reference_is_read() -> None:
    data = bytearray(_ref_payload(TensorRef(256, 8, "torch.int32", (2,))))
    data[256:264] = struct.pack("<ii", 7, -9)
    assert payload.read(bytes(data))["t"].tolist() == [7, -9]


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class _Harmless:
    pass


@pytest.mark.parametrize("make", [
    lambda marker: _Evil(f"touch {marker}"),
    lambda marker: os.system,
    lambda marker: {"nested": [(_Evil(f"touch {marker}"),)]},
    lambda marker: _Harmless(),
    lambda marker: eval,
    lambda marker: pickle.loads,
    lambda marker: torch.load,
], ids=["reduce-os-system", "os-system", "nested", "test-class", "eval", "pickle-loads", "torch-load"])
def test_a_skeleton_naming_a_forbidden_class_is_refused_without_running_it(make: Any, tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    skeleton = pickle.dumps(make(marker), protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(PayloadError, match="refusing"):
        payload.read(_with_skeleton(skeleton))
    assert not marker.exists()


def test_a_self_referencing_or_very_deep_skeleton_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(PayloadError):
        payload.read(_with_skeleton(pickle.dumps(loop, protocol=pickle.HIGHEST_PROTOCOL)))
    # 100,000 nested lists, built opcode by opcode (pickle.dumps itself would recurse too deep).
    depth = 100_000
    deep = b"\x80\x05" + b"]" * depth + b"a" * (depth - 1) + b"."
    with pytest.raises(PayloadError):
        payload.read(_with_skeleton(deep))


# -- fuzzing: read raises PayloadError or returns, never anything else ---------------------------------


def _read_or_payload_error(data: bytes) -> None:
    try:
        payload.read(bytearray(data))
    except PayloadError:
        pass


@FAST
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_payload_error(data: bytes) -> None:
    _read_or_payload_error(data)


@FAST
@given(st.binary(max_size=256), st.binary(max_size=256))
def test_random_skeletons_behind_a_valid_header_only_ever_raise_payload_error(skeleton: bytes, tail: bytes) -> None:
    _read_or_payload_error(_with_skeleton(b"\x80\x05" + skeleton, tail))
    _read_or_payload_error(_with_skeleton(skeleton, tail))


# Opcodes a pickle is made of, so the fuzzer gets far into the unpickler and into read's checks.
_OPCODES = [b"]", b")", b"}", b"N", b"\x88", b"\x89", b"K\x05", b"J\xff\xff\xff\xff", b"a", b"e", b"(", b"t",
            b"l", b"s", b"u", b"\x85", b"\x86", b"\x87", b"\x94", b"h\x00", b"q\x00", b"0", b"2", b"\x8c\x05torch",
            b"\x8c\x0dtorch.float32", b"\x8c\x22salamander_worker.snapshot.payload", b"\x8c\x09TensorRef",
            b"\x93", b"\x81", b"b", b"R", b"c__builtin__\neval\n", b"G\x7f\xf8\x00\x00\x00\x00\x00\x00", b"."]


@FAST
@given(st.lists(st.sampled_from(_OPCODES), max_size=40), st.integers(0, 600))
def test_opcode_soup_only_ever_raises_payload_error(ops: list[bytes], tail: int) -> None:
    _read_or_payload_error(_with_skeleton(b"\x80\x05" + b"".join(ops) + b".", b"\x01" * tail))


@FAST
@given(st.data())
def test_a_mutated_valid_payload_only_ever_raises_payload_error(data: st.DataObject) -> None:
    layout, valid = _valid()
    mutated = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, 8 + len(layout.skeleton) - 1))   # header and skeleton
        mutated[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(mutated))))
    _read_or_payload_error(bytes(mutated if cut is None else mutated[:cut]))


@pytest.mark.parametrize("seed, step, shape", [(1, 1, (3, 4)), (5, 9, (3, 4)), (1, 1, (3, 5)), (1, 1, (6, 3))])
def test_the_cheap_signature_is_the_planned_one(seed: int, step: int, shape: tuple[int, int]) -> None:
    state = _state(step, seed=seed, shape=shape)
    assert payload.signature(state) == payload.plan(state).signature
