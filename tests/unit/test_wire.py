"""The Progress record that rank 0 publishes in the rendezvous store, and the snapshot config
the workers read from ``$SALAMANDER_SNAPSHOT``."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander import wire
from salamander.wire import RESTORE_TIERS, Progress, SnapshotConfig, WireError
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
    Progress(step=30, samples=640, world_size=4, time=1.5, restart_count=1, restore_tier="peers", restore_step=20),
    Progress(step=3, samples=6, world_size=4, time=1.5, restore_tier="none"),
    Progress(step=3, samples=6, world_size=4, time=1.5, restore_tier="none", restore_step=0),
])
def test_round_trip(progress: Progress) -> None:
    raw = progress.encode()
    assert isinstance(raw, bytes)
    assert Progress.decode(raw) == progress


def test_optional_fields_default() -> None:
    p = Progress.decode(encode())
    assert (p.loss, p.restart_count, p.total_steps) == (None, 0, None)
    assert (p.restore_tier, p.restore_step) == (None, None)  # records from before restores still decode
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
    ("restore_tier", 1), ("restore_tier", True), ("restore_tier", ["memory"]),
    ("restore_step", "5"), ("restore_step", 5.0), ("restore_step", False),
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
    assert p.restore_tier is None or p.restore_tier in RESTORE_TIERS
    if p.restore_tier in ("memory", "peers", "persistent"):
        assert p.restore_step is not None and p.restore_step >= 0
    else:  # nothing restored: no step, or step 0 with tier "none"
        assert p.restore_step is None or (p.restore_tier, p.restore_step) == ("none", 0)
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
              "restore_tier": st.none() | st.sampled_from([*RESTORE_TIERS, "disk", "Memory", ""]) | json_scalars,
              "restore_step": st.none() | st.integers(-3, 10**9) | st.booleans() | st.floats(),
              "extra": json_scalars}))
def test_near_valid_records_give_progress_or_wire_error(record: dict[str, Any]) -> None:
    _decode_outcome(json.dumps(record).encode())


restores = (st.tuples(st.none(), st.none()) | st.tuples(st.just("none"), st.none() | st.just(0))
            | st.tuples(st.sampled_from(["memory", "peers", "persistent"]), st.integers(0, 10**12)))


@FAST
@given(st.builds(Progress, step=st.integers(0, 10**12), samples=st.integers(0, 10**15),
                 world_size=st.integers(1, 10**5), time=st.floats(allow_nan=False, allow_infinity=False),
                 loss=st.none() | st.floats(allow_nan=False, allow_infinity=False),
                 restart_count=st.integers(0, 1000), total_steps=st.none() | st.integers(0, 10**12)), restores)
def test_every_valid_progress_round_trips(progress: Progress, restore: tuple[str | None, int | None]) -> None:
    tier, step = restore
    progress = dataclasses.replace(progress, restore_tier=tier, restore_step=step)
    assert Progress.decode(progress.encode()) == progress


# --- restores in progress records -------------------------------------------------------------------

@pytest.mark.parametrize("tier", ["memory", "peers", "persistent"])
def test_a_restored_tier_decodes_with_its_step(tier: str) -> None:
    p = Progress.decode(encode(restart_count=2, restore_tier=tier, restore_step=7))
    assert (p.restart_count, p.restore_tier, p.restore_step) == (2, tier, 7)


@pytest.mark.parametrize("fields, needle", [
    ({"restore_tier": "disk", "restore_step": 3}, "restore_tier"),
    ({"restore_tier": "Memory", "restore_step": 3}, "restore_tier"),
    ({"restore_tier": "", "restore_step": 3}, "restore_tier"),
    ({"restore_tier": "memory"}, "restore_step"),
    ({"restore_tier": "peers", "restore_step": None}, "restore_step"),
    ({"restore_tier": "memory", "restore_step": -1}, "restore_step"),
    ({"restore_step": 4}, "restore_step"),
    ({"restore_tier": None, "restore_step": 4}, "restore_step"),
    ({"restore_tier": "none", "restore_step": 4}, "restore_step"),
])
def test_malformed_restores_are_rejected(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(WireError, match=needle):
        Progress.decode(encode(**fields))


# --- the snapshot config ($SALAMANDER_SNAPSHOT) -----------------------------------------------------

def test_snapshot_env_names() -> None:
    assert wire.ENV_SNAPSHOT == "SALAMANDER_SNAPSHOT"
    assert wire.ENV_SNAPSHOT_MEMORY == "SALAMANDER_SNAPSHOT_MEMORY"


@pytest.mark.parametrize("config", [
    SnapshotConfig(),
    SnapshotConfig(interval=1, group_size=2, parity=1),
    SnapshotConfig(interval=100, group_size=64, parity=2, persist_every=5, persist_directory="/ckpt/snap"),
    SnapshotConfig(group_size=3, parity=2, persist_every=0, persist_directory="relative/dir"),
])
def test_snapshot_config_round_trip(config: SnapshotConfig) -> None:
    raw = config.encode()
    assert isinstance(raw, str) and " " not in raw and "\n" not in raw  # compact, one line for the env
    assert SnapshotConfig.decode(raw) == config
    assert SnapshotConfig.decode(raw.encode()) == config


def test_snapshot_config_fields_default() -> None:
    assert SnapshotConfig.decode("{}") == SnapshotConfig() == SnapshotConfig(
        interval=10, group_size=4, parity=1, persist_every=0, persist_directory=None)
    assert SnapshotConfig.decode('{"parity": 2}') == SnapshotConfig(parity=2)


@pytest.mark.parametrize("raw", ["", "not json", "{", b"\xff\xfe", "{'interval': 1}"])
def test_snapshot_config_that_is_not_json(raw: str | bytes) -> None:
    with pytest.raises(WireError, match="snapshot config is not JSON"):
        SnapshotConfig.decode(raw)


@pytest.mark.parametrize("raw", ["[]", "1", '"text"', "null", "true"])
def test_snapshot_config_that_is_not_an_object(raw: str) -> None:
    with pytest.raises(WireError, match="not a JSON object"):
        SnapshotConfig.decode(raw)


def test_snapshot_config_with_unknown_fields() -> None:
    with pytest.raises(WireError, match="unknown fields.*intervalSteps"):
        SnapshotConfig.decode('{"intervalSteps": 5}')  # the spec's name, not the wire's


@pytest.mark.parametrize("field, value", [
    ("interval", "10"), ("interval", 10.0), ("interval", True), ("interval", None),
    ("group_size", "4"), ("group_size", 4.5), ("group_size", False), ("group_size", [4]),
    ("parity", 1.0), ("parity", True), ("parity", None),
    ("persist_every", "3"), ("persist_every", 2.0), ("persist_every", None),
    ("persist_directory", 3), ("persist_directory", ["/x"]), ("persist_directory", True),
])
def test_snapshot_config_wrong_types(field: str, value: Any) -> None:
    with pytest.raises(WireError, match=field):
        SnapshotConfig.decode(json.dumps({field: value}))


@pytest.mark.parametrize("fields, field", [
    ({"interval": 0}, "interval"), ({"interval": -5}, "interval"),
    ({"group_size": 1}, "group_size"), ({"group_size": 65}, "group_size"), ({"group_size": -4}, "group_size"),
    ({"parity": 0}, "parity"), ({"parity": 3}, "parity"), ({"parity": -1}, "parity"),
    ({"group_size": 2, "parity": 2}, "group_size"),
    ({"persist_every": -1}, "persist_every"),
    ({"persist_every": 1}, "persist_directory"), ({"persist_every": 3, "persist_directory": None}, "persist_directory"),
    ({"persist_directory": ""}, "persist_directory"),
])
def test_snapshot_config_out_of_range(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(WireError, match=field):
        SnapshotConfig.decode(json.dumps(fields))
    with pytest.raises(WireError, match=field):
        SnapshotConfig(**fields).check()


def test_snapshot_config_group_size_error_names_the_parity_rule() -> None:
    with pytest.raises(WireError, match=r"at least parity \+ 1 = 3"):
        SnapshotConfig.decode('{"group_size": 2, "parity": 2}')


@pytest.mark.parametrize("raw", [
    '{"interval":1' + "0" * 5000 + "}",
    "[" * 100_000,
    '{"persist_directory":"' + "x" * 10 + '"' + ", " * 3 + "}",
], ids=["int-over-4300-digits", "deep-nesting", "trailing-commas"])
def test_hostile_snapshot_config_raises_only_wire_error(raw: str) -> None:
    with pytest.raises(WireError):
        SnapshotConfig.decode(raw)


def _snapshot_outcome(raw: str | bytes) -> None:
    try:
        c = SnapshotConfig.decode(raw)
    except WireError as exc:
        assert str(exc)
        return
    assert c.interval >= 1 and 2 <= c.group_size <= 64 and c.parity in (1, 2) and c.group_size >= c.parity + 1
    assert c.persist_every >= 0 and (c.persist_every == 0 or c.persist_directory)
    assert SnapshotConfig.decode(c.encode()) == c


@FAST
@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_a_snapshot_config_or_wire_error(raw: bytes) -> None:
    _snapshot_outcome(raw)


@FAST
@given(st.fixed_dictionaries({}, optional={
    "interval": st.integers(-2, 10**6) | json_scalars, "group_size": st.integers(-1, 70) | json_scalars,
    "parity": st.integers(-1, 3) | json_scalars, "persist_every": st.integers(-2, 50) | json_scalars,
    "persist_directory": st.none() | st.text(max_size=6) | json_scalars, "extra": json_scalars}))
def test_near_valid_snapshot_configs_give_a_config_or_wire_error(record: dict[str, Any]) -> None:
    _snapshot_outcome(json.dumps(record))


@FAST
@given(st.builds(SnapshotConfig, interval=st.integers(1, 10**9), group_size=st.integers(3, 64),
                 parity=st.sampled_from([1, 2]), persist_every=st.integers(0, 10**6),
                 persist_directory=st.text(min_size=1, max_size=20)))
def test_every_valid_snapshot_config_round_trips(config: SnapshotConfig) -> None:
    assert SnapshotConfig.decode(config.encode()) == config


# --- RankTiming: the windowed median of busy time ---------------------------------------------------

def _timing(**fields: Any) -> wire.RankTiming:
    values: dict[str, Any] = dict(rank=3, step=120, window=32, step_s=0.5, wait_s=0.1,
                                  sections={"forward": 0.4, "communication": 0.1})
    return wire.RankTiming(**(values | fields))


@pytest.mark.parametrize("timing", [
    _timing(), _timing(busy_median_s=0.38, median_window=16), _timing(busy_median_s=0.0, median_window=1),
    _timing(busy_median_s=2.5, median_window=32),  # a median may exceed the mean step time
])
def test_rank_timing_round_trips_with_and_without_a_median(timing: wire.RankTiming) -> None:
    assert timing.check() is timing
    assert wire.decode_rank_timing(wire.encode_rank_timing(timing)) == timing


def test_a_rank_timing_without_a_median_encodes_as_older_workers_wrote_it() -> None:
    old = {"rank": 3, "step": 120, "window": 32, "step_s": 0.5, "wait_s": 0.1,
           "sections": {"forward": 0.4, "communication": 0.1}}
    assert json.loads(wire.encode_rank_timing(_timing())) == old
    decoded = wire.decode_rank_timing(json.dumps(old))
    assert decoded.busy_median_s is None and decoded.median_window == 0 and decoded == _timing()
    assert wire.decode_rank_timing(json.dumps(old | {"busy_median_s": None})) == _timing()
    assert wire.decode_rank_timing(json.dumps(old | {"busy_median_s": 1, "median_window": 8})).busy_median_s == 1.0


@pytest.mark.parametrize("fields, needle", [
    ({"busy_median_s": math.nan, "median_window": 16}, "busy_median_s must be a finite number"),
    ({"busy_median_s": math.inf, "median_window": 16}, "busy_median_s must be a finite number"),
    ({"busy_median_s": -0.1, "median_window": 16}, "busy_median_s must be a finite number"),
    ({"busy_median_s": True, "median_window": 16}, "busy_median_s must be a finite number"),
    ({"busy_median_s": "0.3", "median_window": 16}, "busy_median_s must be a finite number"),
    ({"busy_median_s": 0.3, "median_window": 0}, "median_window must be 1..window (32), got 0"),
    ({"busy_median_s": 0.3, "median_window": 33}, "median_window must be 1..window (32), got 33"),
    ({"busy_median_s": 0.3}, "median_window must be 1..window"),
    ({"median_window": 16}, "median_window is 16 without a busy_median_s"),
])
def test_a_malformed_median_is_rejected_by_name(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(WireError, match="rank timing of rank 3") as info:
        _timing(**fields).check()
    assert needle in str(info.value)


@pytest.mark.parametrize("extra, needle", [
    ({"busy_median_s": "fast", "median_window": 16}, "'busy_median_s' has the wrong type"),
    ({"busy_median_s": True, "median_window": 16}, "'busy_median_s' has the wrong type"),
    ({"busy_median_s": 0.3, "median_window": 16.0}, "'median_window' has the wrong type"),
    ({"busy_median_s": 0.3, "median_window": 2**31}, "out of range"),
    ({"busy_median_s": "1e400", "median_window": 16}, "busy_median_s must be a finite number"),
    ({"busy_median_s": "NaN", "median_window": 16}, "busy_median_s must be a finite number"),
    ({"busy_median_s": -1, "median_window": 16}, "busy_median_s must be a finite number"),
    ({"busy_median_s": 0.3, "median_window": 0}, "median_window must be 1..window"),
    ({"median_window": 4}, "without a busy_median_s"),
])
def test_a_malformed_median_in_json_is_rejected_by_name(extra: dict[str, Any], needle: str) -> None:
    raw = json.loads(wire.encode_rank_timing(_timing())) | extra
    text = json.dumps(raw)
    if extra.get("busy_median_s") in ("1e400", "NaN"):  # numbers JSON reads as non-finite floats
        text = text.replace(f'"{extra["busy_median_s"]}"', extra["busy_median_s"])
    with pytest.raises(WireError) as info:
        wire.decode_rank_timing(text)
    assert needle in str(info.value)


# --- RankTiming: per-step busy times ------------------------------------------------------------

def test_rank_timing_round_trips_with_per_step_busy_times() -> None:
    timing = _timing(busy_median_s=0.38, median_window=16, busy_first_step=57, busy_steps=(0.4,) * 63 + (1e-9,))
    assert timing.check() is timing
    assert wire.decode_rank_timing(wire.encode_rank_timing(timing)) == timing
    most = _timing(step=300, busy_first_step=300 - wire.MAX_BUSY_STEPS + 1, busy_steps=(123.456789,) * wire.MAX_BUSY_STEPS,
                   sections={f"{i:02d}" + "n" * (wire.MAX_SECTION_NAME - 2): 1.2345678901234567
                             for i in range(wire.MAX_TIMING_SECTIONS)})
    assert len(wire.encode_rank_timing(most)) <= wire.MAX_TIMING_BYTES  # the largest valid one fits
    assert wire.decode_rank_timing(wire.encode_rank_timing(most)) == most
    # without them it encodes as older workers wrote it
    assert "busy_steps" not in json.loads(wire.encode_rank_timing(_timing()))


@pytest.mark.parametrize("fields, needle", [
    ({"busy_first_step": 1, "busy_steps": (0.1, math.nan)}, "busy_steps[1] must be a finite number >= 0"),
    ({"busy_first_step": 1, "busy_steps": (-0.1,)}, "busy_steps[0] must be a finite number >= 0"),
    ({"busy_first_step": 1, "busy_steps": (True,)}, "busy_steps[0] must be a finite number >= 0"),
    ({"busy_first_step": 1, "busy_steps": [0.1]}, "busy_steps must be a tuple"),
    ({"busy_first_step": 1, "busy_steps": (0.1,) * (wire.MAX_BUSY_STEPS + 1)}, "at most 256"),
    ({"busy_first_step": 5}, "busy_first_step is 5 without busy_steps"),
    ({"busy_first_step": -1, "busy_steps": (0.1,)}, "busy_first_step must be an int64 >= 0"),
    ({"busy_first_step": 100, "busy_steps": (0.1,) * 22}, "busy_steps end at step 121, after step 120"),
])
def test_malformed_per_step_busy_times_are_rejected_by_name(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(WireError, match="rank timing of rank 3") as info:
        _timing(**fields).check()
    assert needle in str(info.value)


@pytest.mark.parametrize("extra, needle", [
    ({"busy_first_step": 1, "busy_steps": "0.1"}, "'busy_steps' has the wrong type"),
    ({"busy_first_step": 1.0, "busy_steps": [0.1]}, "'busy_first_step' has the wrong type"),
    ({"busy_first_step": 1, "busy_steps": [0.1, "x"]}, "busy_steps[1] is not a number"),
    ({"busy_first_step": 1, "busy_steps": [0.1, None]}, "busy_steps[1] is not a number"),
    ({"busy_first_step": 1, "busy_steps": [0.1, False]}, "busy_steps[1] is not a number"),
    ({"busy_first_step": 1, "busy_steps": "NaN"}, "busy_steps[0] must be finite"),
    ({"busy_first_step": 1, "busy_steps": [10**400]}, "busy_steps[0] is out of range"),
    ({"busy_first_step": 1, "busy_steps": [0.1] * 300}, "at most 256"),
    ({"busy_first_step": 2**63, "busy_steps": [0.1]}, "busy_first_step must be an int64"),
])
def test_malformed_per_step_busy_times_in_json_are_rejected_by_name(extra: dict[str, Any], needle: str) -> None:
    raw = json.loads(wire.encode_rank_timing(_timing())) | extra
    text = json.dumps(raw)
    if extra.get("busy_steps") == "NaN":  # a number JSON reads as a non-finite float
        text = text.replace('"busy_steps": "NaN"', '"busy_steps": [NaN]')
    with pytest.raises(WireError) as info:
        wire.decode_rank_timing(text)
    assert needle in str(info.value)
