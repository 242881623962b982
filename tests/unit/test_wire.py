"""The Progress record that rank 0 publishes in the rendezvous store."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander import wire
from salamander.wire import Progress, WireError
from tests.unit._support import FAST

BASE: dict[str, Any] = {"step": 10, "samples": 640, "world_size": 4, "time": 1700000000.5}


def encode(**fields: Any) -> bytes:
    return json.dumps({**BASE, **fields}).encode()


def test_keys_are_per_run() -> None:
    assert wire.progress_key("r1") == "salamander/r1/progress"
    assert wire.stop_key("r1") == "salamander/r1/stop"
    assert wire.progress_key("r1") != wire.progress_key("r2")


@pytest.mark.parametrize("progress", [
    Progress(step=0, samples=0, world_size=1, time=0.0),
    Progress(step=10, samples=640, world_size=4, time=1.5, loss=2.25, restart_count=2, total_steps=100),
    Progress(step=10, samples=640, world_size=4, time=1.5, loss=None, restart_count=0, total_steps=None),
])
def test_round_trip(progress: Progress) -> None:
    raw = progress.encode()
    assert isinstance(raw, bytes)
    assert Progress.decode(raw) == progress


def test_optional_fields_default() -> None:
    p = Progress.decode(encode())
    assert (p.loss, p.restart_count, p.total_steps) == (None, 0, None)
    assert p.time == 1700000000.5


def test_integer_time_and_loss_are_accepted() -> None:
    p = Progress.decode(encode(time=5, loss=3))
    assert p.time == 5.0 and isinstance(p.time, float)
    assert p.loss == 3


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b"\xff\xfe\x00", b"{'step': 1}", "é".encode("latin-1")])
def test_non_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(WireError, match="not JSON"):
        Progress.decode(raw)


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"text"', b"null", b"true", b"[1, 2]"])
def test_non_object_is_rejected(raw: bytes) -> None:
    with pytest.raises(WireError, match="not a JSON object"):
        Progress.decode(raw)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(WireError, match="unknown fields") as info:
        Progress.decode(encode(lr=0.1))
    assert "lr" in str(info.value)


@pytest.mark.parametrize("missing", ["step", "samples", "world_size", "time"])
def test_required_fields(missing: str) -> None:
    data = dict(BASE)
    del data[missing]
    with pytest.raises(WireError, match=missing):
        Progress.decode(json.dumps(data).encode())


@pytest.mark.parametrize("field, value", [
    ("step", "10"), ("step", 1.0), ("step", True), ("step", None),
    ("samples", False), ("samples", [1]),
    ("world_size", True), ("world_size", 2.0),
    ("time", "now"), ("time", True), ("time", None),
    ("loss", "low"), ("loss", True), ("loss", [0.1]),
    ("restart_count", 1.0), ("restart_count", False), ("restart_count", None),
    ("total_steps", "100"), ("total_steps", 10.0), ("total_steps", True),
])
def test_wrong_types_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(WireError, match=field):
        Progress.decode(encode(**{field: value}))


@pytest.mark.parametrize("fields", [{"step": -1}, {"samples": -5}, {"world_size": 0}, {"world_size": -2},
                                    {"total_steps": -1}])
def test_out_of_range_values_are_rejected(fields: dict[str, int]) -> None:
    with pytest.raises(WireError):
        Progress.decode(encode(**fields))


def test_negative_restart_count_is_rejected() -> None:
    with pytest.raises(WireError):
        Progress.decode(encode(restart_count=-1))


@pytest.mark.parametrize("loss", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_loss_decodes_as_none(loss: str) -> None:
    raw = json.dumps(BASE).encode()[:-1] + f', "loss": {loss}}}'.encode()
    assert Progress.decode(raw).loss is None


def test_encoding_a_non_finite_loss_round_trips_to_none() -> None:
    p = Progress(step=1, samples=1, world_size=1, time=0.0, loss=math.nan)
    assert Progress.decode(p.encode()).loss is None


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


@pytest.mark.parametrize("raw", [
    b'{"step":1,"samples":1,"world_size":1,"time":1' + b"0" * 400 + b"}",
    b'{"step":1' + b"0" * 5000 + b',"samples":1,"world_size":1,"time":1}',
    b"[" * 100_000,
], ids=["time-overflows-float", "int-over-4300-digits", "deep-nesting"])
def test_hostile_json_raises_only_wire_error(raw: bytes) -> None:
    with pytest.raises(WireError):
        Progress.decode(raw)


json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def _decode_outcome(raw: bytes) -> None:
    try:
        p = Progress.decode(raw)
    except WireError as exc:
        assert str(exc)
        return
    assert isinstance(p, Progress)
    assert p.step >= 0 and p.samples >= 0 and p.world_size >= 1
    assert p.loss is None or math.isfinite(p.loss)
    assert p.total_steps is None or p.total_steps >= 0
    assert Progress.decode(p.encode()) == p or math.isnan(p.time)


@FAST
@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_progress_or_wire_error(raw: bytes) -> None:
    _decode_outcome(raw)


@FAST
@given(json_values)
def test_arbitrary_json_gives_progress_or_wire_error(value: Any) -> None:
    _decode_outcome(json.dumps(value).encode())


@FAST
@given(st.fixed_dictionaries(
    {"step": st.integers(-3, 10**9), "samples": st.integers(-3, 10**12), "world_size": st.integers(-1, 1024),
     "time": st.floats(allow_nan=True) | st.integers(-10**12, 10**12)},
    optional={"loss": st.none() | st.floats() | st.integers(-5, 5) | st.booleans(),
              "restart_count": st.integers(0, 100) | st.booleans() | st.floats(),
              "total_steps": st.none() | st.integers(-3, 10**9) | st.text(max_size=3),
              "extra": json_scalars}))
def test_near_valid_records_give_progress_or_wire_error(record: dict[str, Any]) -> None:
    _decode_outcome(json.dumps(record).encode())


@FAST
@given(st.builds(Progress, step=st.integers(0, 10**12), samples=st.integers(0, 10**15),
                 world_size=st.integers(1, 10**5), time=st.floats(allow_nan=False, allow_infinity=False),
                 loss=st.none() | st.floats(allow_nan=False, allow_infinity=False),
                 restart_count=st.integers(0, 1000), total_steps=st.none() | st.integers(0, 10**12)))
def test_every_valid_progress_round_trips(progress: Progress) -> None:
    assert Progress.decode(progress.encode()) == progress
