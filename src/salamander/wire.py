"""The contract between the operator (or the local runtime) and the workers.

Everything that crosses the boundary between a worker pod and whoever manages it is
named here once: environment variables, labels, and the keys and record formats the
workers publish in the rendezvous store. The rendezvous store is a ``TCPStore`` hosted
by the operator (or by ``salamander run``), never by a worker, so losing any worker
never loses membership or progress.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

log = logging.getLogger(__name__)

GROUP = "salamander.dev"

# Environment the manager sets on every worker container.
ENV_JOB = "SALAMANDER_JOB"                    # <namespace>/<name>
ENV_RUN_ID = "SALAMANDER_RUN_ID"              # unique per job; the rendezvous run id
ENV_RDZV_ENDPOINT = "SALAMANDER_RDZV_ENDPOINT"  # host:port of the rendezvous store
ENV_NODE_INDEX = "SALAMANDER_NODE_INDEX"      # the worker slot i of <job>-worker-<i>
ENV_CONTROL_ENDPOINT = "SALAMANDER_CONTROL_ENDPOINT"  # host:port of the operator's control plane
ENV_CONTROL_TOKEN = "SALAMANDER_CONTROL_TOKEN"  # the job's credential, from its Secret
CREDENTIAL_KEY = "token"                      # the key of the token in the job's Secret
ENV_POD_NAME = "SALAMANDER_POD_NAME"          # from the downward API
ENV_NODE_NAME = "SALAMANDER_NODE_NAME"        # from the downward API
ENV_CHECKPOINT_DIR = "SALAMANDER_CHECKPOINT_DIR"  # spec.checkpoint.directory, when set
ENV_CHECKPOINT_INTERVAL = "SALAMANDER_CHECKPOINT_INTERVAL"  # spec.checkpoint.intervalSteps
ENV_FAULTS = "SALAMANDER_FAULTS"              # spec.faults as JSON; processes run only the process faults
ENV_SNAPSHOT = "SALAMANDER_SNAPSHOT"          # spec.snapshot as SnapshotConfig.encode() JSON, when set
# The node's shared-memory directory for snapshots. Set by the Salamander agent for its
# training processes (it owns that memory), never by the operator.
ENV_SNAPSHOT_MEMORY = "SALAMANDER_SNAPSHOT_MEMORY"
SNAPSHOT_SHM_ROOT = "/dev/shm/salamander"     # agents' snapshot directories: <root>/<run>/<host>-<pid>

ENV_METRICS_PORT = "SALAMANDER_METRICS_PORT"  # the agent serves its pod's metrics on this port

# Labels on every object the operator creates for a job.
LABEL_JOB = f"{GROUP}/job"
LABEL_ROLE = f"{GROUP}/role"
LABEL_INDEX = f"{GROUP}/worker-index"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "salamander-operator"


def progress_key(run_id: str) -> str:
    """The store key under which rank 0 of a run publishes its latest :class:`Progress`."""
    return f"salamander/{run_id}/progress"


def stop_key(run_id: str) -> str:
    """The store key whose presence asks every worker of a run to stop at the next step."""
    return f"salamander/{run_id}/stop"


def fault_key(run_id: str, fault_index: int) -> str:
    """The store counter that makes fault ``fault_index`` of a run fire once: the first process
    whose ``add`` returns 1 fires it; restarted processes that replay the step do not."""
    return f"salamander/{run_id}/fault/{fault_index}"


def trace_request_key(run_id: str) -> str:
    """Where a trace request is posted: its id (text). Every rank's trace responder watches it
    and answers each new id once (:mod:`salamander_worker.timeline`)."""
    return f"salamander/{run_id}/trace/request"


def trace_rank_key(run_id: str, request: str, rank: int) -> str:
    """Where rank ``rank`` leaves its answer to trace request ``request``."""
    return f"salamander/{run_id}/trace/{request}/rank/{rank}"


def fault_fired_key(run_id: str, fault_index: int) -> str:
    """Where the firing process writes the wall-clock time (seconds, as text) it fired at."""
    return f"salamander/{run_id}/fault/{fault_index}/at"


def claim_fault(store: Any, run_id: str, fault_index: int) -> bool:
    """Claim fault ``fault_index`` of a run on its rendezvous store: True for the one caller, of
    all that ever try (training processes, restarted ones, the operator), that is to fire it.
    The winner records when it fired; failing to record that does not undo the claim (it is
    logged). Raises whatever the store raises on the claim itself."""
    if store.add(fault_key(run_id, fault_index), 1) != 1:
        return False
    try:
        store.set(fault_fired_key(run_id, fault_index), str(time.time()))
    except Exception as exc:  # noqa: BLE001 - claimed: fire anyway, only the timestamp is lost
        log.warning("fault %d of run %s: recording when it fired failed: %s", fault_index, run_id, exc)
    return True


def read_progress(store: Any, run_id: str) -> Progress | None:
    """The newest progress record of ``run_id`` in ``store`` (any torch.distributed ``Store``),
    or None if there is none. Raises :class:`WireError` for a malformed record."""
    key = progress_key(run_id)
    if not store.check([key]):
        return None
    return Progress.decode(store.get(key))


class WireError(ValueError):
    """A record read from the wire is malformed; the message names what is wrong."""


#: Where a training process restored its state from, nearest first; ``none``: nothing to
#: restore (a fresh start, or every tier missed), so training started from step 0.
RestoreTier = Literal["memory", "peers", "persistent", "none"]
RESTORE_TIERS: tuple[str, ...] = get_args(RestoreTier)


def json_object(raw: str | bytes, what: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object; raises :class:`WireError` (naming ``what``), never anything else.
    Every record read from the wire (and the traces' answers) is parsed by this one function."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, huge integers
        raise WireError(f"{what} is not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise WireError(f"{what} is nested too deeply") from None
    if not isinstance(data, dict):
        raise WireError(f"{what} is not a JSON object")
    return data


def _check_fields(data: dict[str, Any], fields: dict[str, Any], required: set[str], what: str) -> None:
    """No unknown field, every ``required`` one present, each present one of its type
    (``fields``: name -> type or tuple of types; a boolean is never an integer)."""
    unknown = set(data) - set(fields)
    if unknown:
        raise WireError(f"{what} has unknown fields: {sorted(unknown)}")
    for name, kind in fields.items():
        if name not in data:
            if name in required:
                raise WireError(f"{what} lacks field {name!r}")
            continue
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise WireError(f"{what} field {name!r} has the wrong type: {str(value)[:80]!r}")


#: Bounds of :class:`SnapshotConfig`, the same as ``spec.snapshot``'s (``salamander.api.models``).
MIN_GROUP_SIZE, MAX_GROUP_SIZE = 2, 64
PARITIES = (1, 2)


@dataclass(frozen=True)
class SnapshotConfig:
    """How the training processes snapshot their state in memory (``$SALAMANDER_SNAPSHOT``).

    A snapshot every ``interval`` optimizer steps, erasure coded across groups of ``group_size``
    nodes with ``parity`` parity blocks per group (1: XOR, 2: Reed-Solomon P+Q), so a group
    survives ``parity`` lost nodes; every ``persist_every`` snapshots (0: never) one is also
    written as a torch.distributed.checkpoint under ``persist_directory``.

    Invariants (checked by :meth:`decode` and :meth:`check`): ``interval >= 1``,
    ``2 <= group_size <= 64``, ``parity in (1, 2)``, ``group_size >= parity + 1``,
    ``persist_every >= 0``, ``persist_directory`` non-empty when given and given when
    ``persist_every > 0``.
    """

    interval: int = 10
    group_size: int = 4
    parity: int = 1
    persist_every: int = 0
    persist_directory: str | None = None

    def encode(self) -> str:
        """Compact JSON text for the environment variable; :meth:`decode` reads it back equal."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> SnapshotConfig:
        """Parse ``$SALAMANDER_SNAPSHOT``. Every field is optional (its default then); raises
        :class:`WireError` naming the bad field, never anything else."""
        what = "snapshot config"
        data = json_object(raw, what)
        _check_fields(data, {"interval": int, "group_size": int, "parity": int, "persist_every": int,
                             "persist_directory": (str, type(None))}, set(), what)
        return cls(**data).check()

    def check(self) -> SnapshotConfig:
        """``self`` if it holds the invariants; raises :class:`WireError` naming the bad field."""
        if self.interval < 1:
            raise WireError(f"snapshot config field 'interval' must be >= 1, got {self.interval}")
        if not MIN_GROUP_SIZE <= self.group_size <= MAX_GROUP_SIZE:
            raise WireError(f"snapshot config field 'group_size' must be from {MIN_GROUP_SIZE} to "
                            f"{MAX_GROUP_SIZE}, got {self.group_size}")
        if self.parity not in PARITIES:
            raise WireError(f"snapshot config field 'parity' must be 1 (XOR) or 2 (Reed-Solomon), got {self.parity}")
        if self.group_size < self.parity + 1:
            raise WireError(f"snapshot config field 'group_size' must be at least parity + 1 = {self.parity + 1}, "
                            f"got {self.group_size}")
        if self.persist_every < 0:
            raise WireError(f"snapshot config field 'persist_every' must be >= 0, got {self.persist_every}")
        if self.persist_directory == "":
            raise WireError("snapshot config field 'persist_directory' must not be empty")
        if self.persist_every > 0 and self.persist_directory is None:
            raise WireError("snapshot config field 'persist_directory' is required when persist_every > 0")
        return self


@dataclass(frozen=True)
class Progress:
    """What a training script last reported: the step reached, its loss, and throughput inputs.

    Invariants: ``step >= 0``, ``samples >= 0``, ``world_size >= 1``; ``loss`` is finite or None;
    ``time`` is the reporter's wall clock (seconds since the epoch).

    ``restore_tier`` and ``restore_step`` say where this process life (``restart_count``)
    restored its state from: a tier of :data:`RESTORE_TIERS` and the step restored (``>= 0``).
    A restored tier (not ``none``) comes with its step; ``none`` with step 0 or None, and an
    unset tier with no step. Records from before these fields still decode, with both None.

    ``blocked_s`` (finite, ``>= 0``) is the time this process life spent with training blocked
    on checkpoints and snapshots, so far: the checkpointing share of lost goodput.
    """

    step: int
    samples: int
    world_size: int
    time: float
    loss: float | None = None
    restart_count: int = 0
    total_steps: int | None = None
    restore_tier: str | None = None
    restore_step: int | None = None
    blocked_s: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Progress:
        """Parse a record; raises :class:`WireError` naming the bad field, never anything else."""
        data = json_object(raw, "progress record")
        fields = {
            "step": int, "samples": int, "world_size": int, "time": (int, float),
            "loss": (int, float, type(None)), "restart_count": int, "total_steps": (int, type(None)),
            "restore_tier": (str, type(None)), "restore_step": (int, type(None)),
            "blocked_s": (int, float),
        }
        _check_fields(data, fields, {"step", "samples", "world_size", "time"}, "progress record")
        if data["step"] < 0 or data["samples"] < 0 or data["world_size"] < 1 or data.get("restart_count", 0) < 0:
            raise WireError("progress fields step, samples and restart_count must be >= 0, world_size >= 1")
        try:
            when = float(data["time"])
        except OverflowError:
            raise WireError("progress field 'time' is out of range") from None
        if not math.isfinite(when):
            raise WireError("progress field 'time' must be finite")
        total = data.get("total_steps")
        if total is not None and total < 0:
            raise WireError("progress field total_steps must be >= 0")
        loss = data.get("loss")
        try:
            loss = None if loss is None else float(loss)
        except OverflowError:
            loss = None
        if loss is not None and not math.isfinite(loss):
            loss = None  # a diverged loss is reported as unknown rather than breaking JSON/status
        tier, restored = _restore(data.get("restore_tier"), data.get("restore_step"))
        try:
            blocked = float(data.get("blocked_s", 0.0))
        except OverflowError:
            raise WireError("progress field 'blocked_s' is out of range") from None
        if not (math.isfinite(blocked) and blocked >= 0.0):
            raise WireError(f"progress field 'blocked_s' must be finite and >= 0, got {blocked}")
        return cls(step=data["step"], samples=data["samples"], world_size=data["world_size"],
                   time=when, loss=loss, restart_count=data.get("restart_count", 0),
                   total_steps=total, restore_tier=tier, restore_step=restored, blocked_s=blocked)


def _restore(tier: str | None, step: int | None) -> tuple[str | None, int | None]:
    """The checked restore fields of a progress record (see :class:`Progress`)."""
    if tier is not None and tier not in RESTORE_TIERS:
        raise WireError(f"progress field 'restore_tier' must be one of {list(RESTORE_TIERS)}, got {tier[:40]!r}")
    if step is not None and step < 0:
        raise WireError(f"progress field 'restore_step' must be >= 0, got {step}")
    if step is not None and tier is None:
        raise WireError("progress field 'restore_step' is given without a restore_tier")
    if tier == "none" and step not in (None, 0):
        raise WireError(f"progress field 'restore_step' must be 0 or unset with restore_tier 'none' "
                        f"(nothing was restored), got {step}")
    if step is None and tier not in (None, "none"):
        raise WireError(f"progress field 'restore_step' is required with restore_tier {tier!r}")
    return tier, step


#: The most sections one rank's timing may carry (bounded, so a heartbeat stays small).
MAX_TIMING_SECTIONS = 32
MAX_SECTION_NAME = 64


@dataclass(frozen=True)
class RankTiming:
    """Where one rank's step time went, as means per step over its last ``window`` steps
    (:mod:`salamander_worker.sections`), sent from every rank through its agent's heartbeat to
    the operator's straggler detector.

    ``step_s`` is the mean step time; ``wait_s`` the part spent waiting on peers (the
    ``communication`` section, and the tail of ``backward`` after the rank's last gradient
    bucket was ready, under ``watch_ddp``). In a synchronous job every rank's ``step_s`` is
    about the same; a straggler is the rank with the most ``step_s - wait_s`` (busy time).
    ``sections`` holds the mean seconds per step of every section (``communication``
    included) and ``other``, the time outside any section.

    ``busy_median_s`` is the median of the rank's per-step busy time (step time minus
    communication) over its last ``median_window`` steps (at most ``window`` of them, the
    newest): unlike the means it follows a slowdown about ``median_window / 2`` steps after it
    starts and ends, whatever its size, and a single outlying step barely moves it. None (and
    ``median_window`` 0) from workers that do not send it; the detector then uses the means.

    Invariants (:meth:`check`): ``rank >= 0``, ``step >= 0``, ``window >= 1``, every time finite
    and ``>= 0``, ``wait_s <= step_s`` (within rounding), at most :data:`MAX_TIMING_SECTIONS`
    sections with names of 1..:data:`MAX_SECTION_NAME` printable characters; ``busy_median_s``
    either None with ``median_window == 0``, or finite and ``>= 0`` with
    ``1 <= median_window <= window``; ``busy_steps`` at most :data:`MAX_BUSY_STEPS` values, each
    finite and ``>= 0``, ``busy_first_step >= 0`` (0 when ``busy_steps`` is empty), and the newest
    of them no later than ``step``.

    ``busy_steps`` are the rank's busy seconds (step time minus communication) of each of its
    newest closed steps, one value per step, oldest first: step ``busy_first_step``, then
    ``busy_first_step + 1``, and so on (consecutive; the steps are numbered as
    ``Recorder.end_step`` closes them, the same on every rank of a synchronous job). The
    operator's sequential test (:mod:`salamander_operator.stragglers`) lines ranks up by these
    step numbers. Empty (the default) from workers that do not send them: the detector then uses
    the windowed forms alone.
    """

    rank: int
    step: int
    window: int
    step_s: float
    wait_s: float
    sections: dict[str, float]
    busy_median_s: float | None = None
    median_window: int = 0
    busy_first_step: int = 0
    busy_steps: tuple[float, ...] = ()

    @property
    def busy_s(self) -> float:
        return max(0.0, self.step_s - self.wait_s)

    def check(self) -> RankTiming:
        """``self`` if it holds the invariants; raises :class:`WireError` naming the bad field."""
        what = f"rank timing of rank {self.rank}"
        if self.rank < 0 or self.step < 0 or self.window < 1:
            raise WireError(f"{what}: rank and step must be >= 0 and window >= 1")
        for name, value in (("step_s", self.step_s), ("wait_s", self.wait_s)):
            if not (math.isfinite(value) and value >= 0.0):
                raise WireError(f"{what}: {name} must be finite and >= 0, got {value}")
        if self.wait_s > self.step_s * 1.001 + 1e-6:
            raise WireError(f"{what}: wait_s ({self.wait_s}) exceeds step_s ({self.step_s})")
        if len(self.sections) > MAX_TIMING_SECTIONS:
            raise WireError(f"{what}: {len(self.sections)} sections, at most {MAX_TIMING_SECTIONS}")
        for name, value in self.sections.items():
            if not (isinstance(name, str) and 0 < len(name) <= MAX_SECTION_NAME and name.isprintable()):
                raise WireError(f"{what}: bad section name {str(name)[:80]!r}")
            if not (isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0.0):
                raise WireError(f"{what}: section {name!r} must be a finite number >= 0, got {value!r}")
        if self.busy_median_s is None:
            if self.median_window != 0:
                raise WireError(f"{what}: median_window is {self.median_window} without a busy_median_s")
        else:
            value = self.busy_median_s
            if not (isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0.0):
                raise WireError(f"{what}: busy_median_s must be a finite number >= 0, got {value!r}")
            if not 1 <= self.median_window <= self.window:
                raise WireError(f"{what}: median_window must be 1..window ({self.window}), "
                                f"got {self.median_window}")
        self._check_busy_steps(what)
        return self

    def _check_busy_steps(self, what: str) -> None:
        steps = self.busy_steps
        if not isinstance(steps, tuple):
            raise WireError(f"{what}: busy_steps must be a tuple, got a {type(steps).__name__}")
        if len(steps) > MAX_BUSY_STEPS:
            raise WireError(f"{what}: busy_steps has {len(steps)} values, at most {MAX_BUSY_STEPS}")
        first = self.busy_first_step
        if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= _INT64:
            raise WireError(f"{what}: busy_first_step must be an int64 >= 0, got {first!r}")
        if not steps:
            if first != 0:
                raise WireError(f"{what}: busy_first_step is {first} without busy_steps")
            return
        if first + len(steps) - 1 > self.step:
            raise WireError(f"{what}: busy_steps end at step {first + len(steps) - 1}, after step {self.step}")
        for i, value in enumerate(steps):
            if isinstance(value, bool) or not isinstance(value, float | int) or not math.isfinite(value) \
                    or value < 0.0:
                raise WireError(f"{what}: busy_steps[{i}] must be a finite number >= 0, got {str(value)[:80]!r}")


# Each training process writes its RankTiming, about once a second, as JSON to
# ``$SALAMANDER_TIMINGS_DIR/rank-<rank>.json`` (replaced atomically); its agent creates the
# directory, sets the variable for its processes, and sends what it finds with its heartbeats.
ENV_TIMINGS_DIR = "SALAMANDER_TIMINGS_DIR"
MAX_TIMINGS_PER_HEARTBEAT = 1024
MAX_BUSY_STEPS = 256  # per-step busy times in one RankTiming (workers send their newest 64)
MAX_TIMING_BYTES = 16384  # one encoded RankTiming (32 sections of 64-character names and 256 steps fit)
_INT32, _INT64 = 2**31 - 1, 2**63 - 1


def timing_file_name(rank: int) -> str:
    """The name of rank ``rank``'s timing file in ``$SALAMANDER_TIMINGS_DIR``."""
    return f"rank-{int(rank)}.json"


def encode_rank_timing(timing: RankTiming) -> bytes:
    """``timing`` as compact JSON (its fields, by name; without ``busy_median_s`` and
    ``median_window`` when it has no median, and without ``busy_first_step`` and
    ``busy_steps`` when it has no per-step busy times, as older workers wrote it)."""
    data = asdict(timing)
    if timing.busy_median_s is None:
        del data["busy_median_s"], data["median_window"]
    if not timing.busy_steps:
        del data["busy_first_step"], data["busy_steps"]
    else:
        data["busy_steps"] = list(timing.busy_steps)
    return json.dumps(data, separators=(",", ":")).encode()


def decode_rank_timing(raw: str | bytes) -> RankTiming:
    """Parse and check a RankTiming; raises :class:`WireError` naming the bad field, never
    anything else. Integers must fit the wire (rank and window in int32, step in int64)."""
    if len(raw) > MAX_TIMING_BYTES:
        raise WireError(f"rank timing is {len(raw)} bytes, at most {MAX_TIMING_BYTES}")
    data = json_object(raw, "rank timing")
    fields = {"rank": int, "step": int, "window": int, "step_s": (int, float), "wait_s": (int, float),
              "sections": dict, "busy_median_s": (int, float, type(None)), "median_window": int,
              "busy_first_step": int, "busy_steps": list}
    _check_fields(data, fields, set(fields) - {"busy_median_s", "median_window", "busy_first_step", "busy_steps"},
                  "rank timing")
    if not (data["rank"] <= _INT32 and data["window"] <= _INT32 and data["step"] <= _INT64
            and data.get("median_window", 0) <= _INT32):
        raise WireError("rank timing fields rank/window/median_window (int32) or step (int64) are out of range")
    sections: dict[str, float] = {}
    for name, value in data["sections"].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"rank timing section {str(name)[:80]!r} is not a number: {str(value)[:80]!r}")
        try:
            sections[name] = float(value)
        except OverflowError:
            raise WireError(f"rank timing section {str(name)[:80]!r} is out of range") from None
    median = data.get("busy_median_s")
    try:
        step_s, wait_s = float(data["step_s"]), float(data["wait_s"])
        median = None if median is None else float(median)
    except OverflowError:
        raise WireError("rank timing fields step_s/wait_s/busy_median_s are out of range") from None
    return RankTiming(rank=data["rank"], step=data["step"], window=data["window"], step_s=step_s,
                      wait_s=wait_s, sections=sections, busy_median_s=median,
                      median_window=data.get("median_window", 0),
                      busy_first_step=data.get("busy_first_step", 0),
                      busy_steps=busy_steps_of(data.get("busy_steps", []))).check()


def busy_steps_of(values: Any) -> tuple[float, ...]:
    """Per-step busy times from the wire (a JSON list or a protobuf repeated field) as a tuple of
    floats; raises :class:`WireError` for too many values or one that is not a finite number
    (never anything else). The values' sign is left to :meth:`RankTiming.check`."""
    if len(values) > MAX_BUSY_STEPS:
        raise WireError(f"rank timing busy_steps has {len(values)} values, at most {MAX_BUSY_STEPS}")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"rank timing busy_steps[{i}] is not a number: {str(value)[:80]!r}")
        try:
            number = float(value)
        except OverflowError:
            raise WireError(f"rank timing busy_steps[{i}] is out of range") from None
        if not math.isfinite(number):
            raise WireError(f"rank timing busy_steps[{i}] must be finite, got {number}")
        out.append(number)
    return tuple(out)
