"""Pydantic models of the TrainingJob resource: spec (what the user asks) and status (what is).

Field names on the wire are camelCase (``procsPerNode``); Python attributes are snake_case.
Unknown fields are rejected, so a typo in a manifest is an error rather than silently ignored.
"""

from __future__ import annotations

import datetime
import posixpath
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, StrictInt, StringConstraints, ValidationInfo,
                      WithJsonSchema, field_validator, model_validator)
from pydantic.alias_generators import to_camel

from salamander.wire import GROUP, MAX_GROUP_SIZE, MIN_GROUP_SIZE, RestoreTier

VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingJob"
PLURAL = "trainingjobs"
SHORT_NAME = "tj"

MAX_WORKERS = 4096
#: ``<name>-worker-<index>`` must stay a DNS label (63 characters) for the largest index.
MAX_NAME_LENGTH = 63 - len("-worker-") - len(str(MAX_WORKERS - 1))

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=MAX_NAME_LENGTH)]
_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")


def _check_quantity(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be an integer or a quantity string such as 500m or 16Gi, got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"quantity must not be negative, got {value}")
    if isinstance(value, str) and not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a resource quantity such as 2, 500m or 16Gi")
    return value


DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN, max_length=253)]
#: A Kubernetes resource quantity: ``2``, ``500m``, ``16Gi``.
Quantity = Annotated[int | str, PlainValidator(_check_quantity),
                     WithJsonSchema({"x-kubernetes-int-or-string": True})]
#: An integer as the CRD's ``type: integer`` means it: no "2" or true.
Count = StrictInt
NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True, use_enum_values=False)


class EnvVar(ApiModel):
    """One environment variable of the worker container."""

    name: Annotated[str, StringConstraints(pattern=ENV_NAME)]
    value: str = ""


class Resources(ApiModel):
    """Container requests and limits, e.g. ``limits: {nvidia.com/gpu: 8}``."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class WorkerTemplate(ApiModel):
    """The container every worker pod runs; Salamander wraps ``command`` in its elastic agent."""

    image: NonEmpty = Field(description="Container image with torch and the training script.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    command: Annotated[list[NonEmpty], Field(min_length=1)] = Field(
        description="The training command, e.g. [python, train.py]; run once per process by the agent.")
    args: list[str] = Field(default_factory=list, description="Arguments appended to command.")
    env: list[EnvVar] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    working_dir: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    service_account_name: DnsSubdomain | None = None


class Replicas(ApiModel):
    """The number of worker nodes (pods). The job runs with any count in ``[min, max]``."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.min <= self.max", "message": "replicas.min must not exceed replicas.max"}]})

    min: Annotated[Count, Field(ge=1, le=MAX_WORKERS)] = 1
    max: Annotated[Count, Field(ge=1, le=MAX_WORKERS)] = 1

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class FailureAction(StrEnum):
    """What to do about a failure, cheapest first.

    ``RetryInPlace`` restarts the processes at once, never refused by the lifetime restart
    budget, only by the storm guard (a transient fault: a reset connection);
    ``RestartProcesses`` restarts them in their pods, with backoff; ``ReplaceNode`` deletes the pod and quarantines its node;
    ``ReplacePod`` replaces the pod but trusts its node; ``FailJob`` ends the job.
    """

    RETRY_IN_PLACE = "RetryInPlace"
    RESTART_PROCESSES = "RestartProcesses"
    REPLACE_POD = "ReplacePod"
    REPLACE_NODE = "ReplaceNode"
    FAIL_JOB = "FailJob"


class FailureRule(ApiModel):
    """A rule of the failure policy. Every criterion given must match (an empty list or an
    unset pattern matches anything); the first matching rule decides the action."""

    kinds: list[NonEmpty] = Field(default_factory=list, description=(
        "Failure kinds or Kubernetes reasons, e.g. OutOfMemory, ContainerOOMKilled, Evicted, Hang, AgentLost."))
    exit_codes: list[Annotated[int, Field(ge=0, le=255)]] = Field(default_factory=list)
    signals: list[Annotated[str, StringConstraints(pattern=r"^(SIG)?[A-Z0-9]+$")]] = Field(
        default_factory=list, description="Signal names such as SIGKILL or KILL.")
    exception_types: list[NonEmpty] = Field(default_factory=list, description=(
        "Exception class names, e.g. torch.OutOfMemoryError or ValueError (matched on the last dotted part too)."))
    log_pattern: str | None = Field(None, description="A regular expression searched in the last log lines.")
    action: FailureAction

    @model_validator(mode="after")
    def _pattern_compiles(self) -> FailureRule:
        if self.log_pattern is not None:
            try:
                re.compile(self.log_pattern)
            except re.error as exc:
                raise ValueError(f"logPattern is not a valid regular expression: {exc}") from None
        return self


class HangPolicy(ApiModel):
    """A hang is no progress for ``factor`` x the median step time, never less than ``floorSeconds``;
    or, before the first step of a round (start-up, rendezvous done, checkpoint loading,
    compilation), no step within ``startupSeconds`` of the processes' start."""

    enabled: bool = True
    factor: Annotated[float, Field(ge=1.0, le=1000.0)] = 3.0
    floor_seconds: Annotated[float, Field(ge=1.0, le=86_400.0)] = 10.0
    startup_seconds: Annotated[float, Field(ge=0.0, le=7 * 86_400.0)] = Field(1800.0, description=(
        "How long the training processes of a round may run before their first step; longer is a "
        "hang (0: never judge start-up). The clock starts when every agent has started its processes."))


class FailurePolicy(ApiModel):
    """How failures are healed. The defaults do the right thing with an empty policy: crashes and
    exceptions restart the processes in place, lost nodes are replaced and quarantined for 30
    minutes, and more than 10 restarts within an hour is a restart storm that fails the job."""

    rules: list[FailureRule] = Field(default_factory=list, description=(
        "Checked in order before the built-in classification; the first match decides."))
    max_restarts_per_window: Annotated[Count, Field(ge=0, le=10_000)] = Field(10, description=(
        "Restarts allowed within windowSeconds; one more is a restart storm and fails the job."))
    window_seconds: Annotated[Count, Field(ge=1, le=30 * 86_400)] = 3600
    backoff_seconds: Annotated[float, Field(ge=0.0, le=3600.0)] = Field(0.0, description=(
        "Delay before the n-th restart in the window: backoffSeconds * 2^(n-1), at most maxBackoffSeconds."))
    max_backoff_seconds: Annotated[float, Field(ge=0.0, le=3600.0)] = 300.0
    quarantine_seconds: Annotated[Count, Field(ge=0, le=30 * 86_400)] = Field(1800, description=(
        "How long a node whose worker was replaced is kept out of the job (0: never quarantine)."))
    hang: HangPolicy = Field(default_factory=HangPolicy)


class CheckpointSpec(ApiModel):
    """Where the worker library writes torch.distributed.checkpoint checkpoints, and how often."""

    directory: NonEmpty = Field(description="A directory every worker can reach (a shared volume).")
    interval_steps: Annotated[Count, Field(ge=1, le=10_000_000)] = 100
    claim_name: DnsSubdomain | None = Field(None, description=(
        "A PersistentVolumeClaim mounted at directory in every worker pod."))


def pod_path(directory: str, working_dir: str | None) -> str:
    """``directory`` as an absolute, normalized path in a worker pod: a relative one is relative
    to the worker's ``workingDir`` (or ``/``)."""
    return posixpath.normpath(posixpath.join("/", working_dir or "/", directory))


class SnapshotSpec(ApiModel):
    """In-memory snapshots of the whole training state, erasure coded across nodes.

    Every ``intervalSteps`` optimizer steps each process copies its state into shared memory;
    the nodes form groups of ``groupSize`` that hold ``parity`` parity blocks each, so a group
    survives ``parity`` lost nodes. Every ``persistEverySnapshots`` snapshots one is also written
    as a torch.distributed.checkpoint. Invariant: ``groupSize >= parity + 1``.
    """

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.groupSize >= self.parity + 1",
         "message": "snapshot.groupSize must be at least parity + 1 (a group needs a data node beside its parity)"}]})

    interval_steps: Annotated[Count, Field(ge=1, le=10_000_000)] = Field(10, description=(
        "Snapshot every this many optimizer steps; a failure loses at most this many steps."))
    group_size: Annotated[Count, Field(ge=MIN_GROUP_SIZE, le=MAX_GROUP_SIZE)] = Field(4, description=(
        "k: worker nodes per erasure-coding group. Parity costs parity/(k-parity) extra memory per node."))
    parity: Annotated[Count, Field(ge=1, le=2)] = Field(1, description=(
        "m: lost nodes a group survives. 1: XOR parity; 2: Reed-Solomon (P+Q)."))
    persist_every_snapshots: Annotated[Count, Field(ge=0, le=10_000_000)] = Field(0, description=(
        "Also write every N-th snapshot as a persistent torch.distributed.checkpoint, in the background "
        "(0: never)."))
    persist_directory: NonEmpty | None = Field(None, description=(
        "Where persistent checkpoints go, a directory every worker can reach; checkpoint.directory when "
        "unset. With checkpoint.claimName it must be on that claim."))

    @model_validator(mode="after")
    def _parity_fits_the_group(self) -> SnapshotSpec:
        if self.group_size < self.parity + 1:
            raise ValueError(f"groupSize ({self.group_size}) must be at least parity + 1 ({self.parity + 1}): "
                             "a group needs at least one node of data beside its parity")
        return self


class ObservabilitySpec(ApiModel):
    """What the job records about itself beyond its metrics."""

    trace_on_hang: bool = Field(True, description=(
        "When a hang is detected, collect every rank's timeline of recent sections (data, forward, "
        "backward, optimizer, communication) before restarting, as one Chrome/Perfetto trace."))
    trace_spans: Annotated[Count, Field(ge=1, le=100_000)] = Field(2000, description=(
        "The newest spans per rank a trace holds."))


class StragglerAction(StrEnum):
    """What is done about a straggler: ``Report`` lists it in status (and an event); ``Evict``
    also replaces its node's worker and quarantines the node, for the causes an eviction can fix."""

    REPORT = "Report"
    EVICT = "Evict"


class StragglerPolicy(ApiModel):
    """How stragglers are detected and what is done about them (``salamander_operator.stragglers``).

    Every rank's busy time (step time minus time waiting on peers: the mean over its last 32
    steps, and the median over its last 16 from workers that send it) is compared with the
    job's median. A rank is a straggler when it is at least ``minSlowdown`` slower and
    ``zThreshold`` robust standard deviations (median absolute deviation) above the median,
    persistently: for at least ``persistSteps`` steps, which the 16-step medians show about 12
    steps later (a slowdown of most steps) and the 32-step means up to one window later (a
    slowdown of a few steps, such as a stalling data loader). It stops being one after as many
    steps below. With
    ``action: Evict`` a straggler whose cause is its node (slow compute, or slow data loading
    on that node alone) has its worker replaced and the node quarantined for
    ``quarantineSeconds``, at most ``maxEvictionsPerHour`` times an hour and never below
    ``replicas.min`` ready workers; an eviction after which the job's median step time did not
    improve by ``minImprovement`` within ``evaluateSteps`` steps is undone (the quarantine is
    lifted). Imbalance (the slow rank moves, or stays slow on a new node) is never evicted.
    """

    action: StragglerAction = Field(StragglerAction.REPORT, description=(
        "Report: list stragglers in status and events only. Evict: also replace the worker of a straggler's "
        "node and quarantine the node, when its cause is the node's compute or its data loading."))
    min_slowdown: Annotated[float, Field(ge=0.01, le=10.0)] = Field(0.1, description=(
        "The slowdown to catch, as a fraction of the median rank's busy time (0.1: 10% slower)."))
    z_threshold: Annotated[float, Field(ge=1.0, le=100.0)] = Field(3.0, description=(
        "How many robust standard deviations (1.4826 x the median absolute deviation, at least 1% of "
        "the median) above the job's median a straggler's busy time must be."))
    persist_steps: Annotated[Count, Field(ge=1, le=10_000_000)] = Field(30, description=(
        "For how many steps a rank must have been slow to be a straggler, and below the threshold to stop "
        "being one; detection takes about 12 steps longer (half the 16-step median window and a 4-step "
        "margin), up to one 32-step window longer for a slowdown of few steps or from older workers."))
    max_evictions_per_hour: Annotated[Count, Field(ge=0, le=1000)] = Field(1, description=(
        "At most this many evictions within any hour (0: never evict)."))
    quarantine_seconds: Annotated[Count, Field(ge=0, le=30 * 86_400)] = Field(3600, description=(
        "How long an evicted straggler's node is kept out of the job."))
    evaluate_steps: Annotated[Count, Field(ge=1, le=10_000_000)] = Field(50, description=(
        "Steps after an eviction over which the job's median step time is compared with the one before."))
    min_improvement: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.05, description=(
        "The fraction by which an eviction must have cut the job's median step time to be kept; "
        "otherwise it is undone (the node's quarantine is lifted)."))


class SchedulingSpec(ApiModel):
    """What the cluster planner (``salamander_operator.planner``) weighs when it divides the
    healthy nodes among jobs, on every capacity change, when the operator runs with planning on.

    A job given ``x`` workers earns ``weight * T(x)``, where ``T`` is its throughput measured at
    the world sizes it has run with, extended by ``x ** scalingExponent`` where unmeasured
    (throughput is in worker-equivalents: only the job's own scaling is measured; ``weight``
    says what one worker of this job is worth beside another job's). Any change of its count
    costs ``transitionSeconds`` of no progress. Priorities are strict: a job of a higher
    priority is planned first and may suspend lower ones; ``weight`` trades within a priority.
    """

    weight: Annotated[float, Field(gt=0.0, le=1e6)] = Field(1.0, description=(
        "What one worker-equivalent of this job's throughput is worth beside other jobs' (Unicron's WAF weight)."))
    priority: Annotated[Count, Field(ge=-1000, le=1000)] = Field(0, description=(
        "Strict priority: higher priorities are planned first and may shrink or suspend lower ones."))
    scaling_exponent: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.9, description=(
        "Throughput at unmeasured worker counts grows as workers ** scalingExponent (1: perfect scaling)."))
    transition_seconds: Annotated[float, Field(ge=0.0, le=86_400.0)] | None = Field(None, description=(
        "Seconds of no progress a change of worker count costs; unset: the job's last measured recovery, "
        "else 60."))


class FaultKind(StrEnum):
    KILL_PROCESS = "KillProcess"    # SIGKILL one training process
    RAISE_EXCEPTION = "RaiseException"  # raise inside one training process
    KILL_WORKER = "KillWorker"      # kill a whole worker node: agent and processes
    HANG_RANK = "HangRank"          # one rank stops making progress
    SLOW_RANK = "SlowRank"          # one rank takes extra time every step


class Fault(ApiModel):
    """A fault to inject once, for rehearsal and tests, when the job first reaches ``atStep``."""

    kind: FaultKind
    at_step: Annotated[Count, Field(ge=1)]
    rank: Annotated[Count, Field(ge=0)] = Field(0, description="The global rank, for process faults.")
    worker: Annotated[Count, Field(ge=0, lt=MAX_WORKERS)] = Field(0, description="The worker, for KillWorker.")
    seconds: Annotated[float, Field(ge=0.0, le=86_400.0)] = Field(0.0, description=(
        "SlowRank: extra seconds per step; HangRank: how long to hang (0: until restarted)."))
    steps: Annotated[Count, Field(ge=0)] = Field(0, description="SlowRank: for how many steps (0: to the end).")


class TrainingJobSpec(ApiModel):
    """What the user asks for. Every field has a default except the worker's image and command."""

    replicas: Replicas = Field(default_factory=Replicas,
                               description="Worker nodes (pods): the job runs with any count in [min, max].")
    procs_per_node: Annotated[Count, Field(ge=1, le=256)] = Field(
        1, description="Training processes per worker node, typically one per GPU.")
    restart_budget: Annotated[Count, Field(ge=0, le=100_000)] = Field(
        100, description=("How many restarts (of processes or of workers) the job may take in its whole "
                          "life before it fails; failurePolicy limits them per time window."))
    worker: WorkerTemplate = Field(description="The container every worker node runs.")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy,
                                          description="How failures are classified and healed.")
    checkpoint: CheckpointSpec | None = Field(None, description="Persistent checkpoints to resume from.")
    snapshot: SnapshotSpec | None = Field(None, description=(
        "In-memory, erasure-coded snapshots of the training state, restored from the nearest copy."))
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec, description=(
        "Per-rank timelines (traces) on hangs."))
    stragglers: StragglerPolicy = Field(default_factory=StragglerPolicy, description=(
        "Straggler detection (always on) and what is done about stragglers: report, or evict their node."))
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description=(
        "Weight and priority for the cluster planner, when the operator plans capacity across jobs."))
    faults: list[Fault] = Field(default_factory=list, description="Faults to inject, for rehearsal and tests.")

    @field_validator("snapshot")
    @classmethod
    def _snapshot_persists_somewhere(cls, snapshot: SnapshotSpec | None, info: ValidationInfo) -> SnapshotSpec | None:
        """Persistent checkpoints need a directory (``persistDirectory``, else ``checkpoint.directory``),
        and with a checkpoint claim that directory must be on the claim, the only shared volume
        a worker pod has. Skipped when ``worker`` or ``checkpoint`` is itself invalid (reported
        on its own)."""
        if snapshot is None or "checkpoint" not in info.data or "worker" not in info.data:
            return snapshot
        checkpoint: CheckpointSpec | None = info.data["checkpoint"]
        if snapshot.persist_every_snapshots > 0 and snapshot.persist_directory is None and checkpoint is None:
            raise ValueError(f"persistEverySnapshots is {snapshot.persist_every_snapshots} but there is nowhere to "
                             "persist: set snapshot.persistDirectory or spec.checkpoint.directory")
        if snapshot.persist_directory is not None and checkpoint is not None and checkpoint.claim_name:
            working_dir = info.data["worker"].working_dir
            claim = pod_path(checkpoint.directory, working_dir)
            persist = pod_path(snapshot.persist_directory, working_dir)
            if persist != claim and not persist.startswith(claim.rstrip("/") + "/"):
                raise ValueError(f"persistDirectory {persist} is not on checkpoint claim {checkpoint.claim_name} "
                                 f"(mounted at {claim}); use a directory under it or leave it unset")
        return snapshot

    def persist_directory(self) -> str | None:
        """Where snapshots are persisted, as written in the spec: ``snapshot.persistDirectory``,
        else ``checkpoint.directory``; None without ``snapshot`` or without either directory."""
        if self.snapshot is None:
            return None
        if self.snapshot.persist_directory is not None:
            return self.snapshot.persist_directory
        return self.checkpoint.directory if self.checkpoint is not None else None


class Phase(StrEnum):
    """The job's lifecycle. ``Succeeded`` and ``Failed`` are terminal, except ``Failed`` for an
    invalid spec, which is re-evaluated when the spec changes."""

    PENDING = "Pending"        # fewer than min workers have ever been ready
    RUNNING = "Running"        # at least min workers are ready
    RESTARTING = "Restarting"  # was running, lost workers below min, replacements on the way
    SUSPENDED = "Suspended"    # the cluster planner gave it no workers; resumes when it gives some
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(StrEnum):
    READY = "Ready"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Reason(StrEnum):
    """CamelCase reasons of conditions and events."""

    INVALID_SPEC = "InvalidSpec"
    WAITING_FOR_WORKERS = "WaitingForWorkers"
    ENOUGH_WORKERS = "EnoughWorkers"
    RESTART_BUDGET_EXHAUSTED = "RestartBudgetExhausted"
    WORKERS_FAILED_AT_END = "WorkersFailedAtEnd"
    ALL_WORKERS_SUCCEEDED = "AllWorkersSucceeded"
    COMPLETED = "Completed"
    RESTART_STORM = "RestartStorm"
    FAILED_BY_POLICY = "FailedByPolicy"
    FAILURE_DETECTED = "FailureDetected"
    PROCESSES_RESTARTED = "ProcessesRestarted"
    WORKER_REPLACED = "WorkerReplaced"
    NODE_QUARANTINED = "NodeQuarantined"
    NODE_RELEASED = "NodeReleased"
    SHRUNK = "Shrunk"
    GREW = "Grew"
    FAULT_INJECTED = "FaultInjected"
    SNAPSHOT_RESTORED = "SnapshotRestored"
    STRAGGLER_DETECTED = "StragglerDetected"
    STRAGGLER_EVICTED = "StragglerEvicted"
    STRAGGLER_EVICTION_UNDONE = "StragglerEvictionUndone"
    RESCALED = "Rescaled"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"


class Condition(ApiModel):
    """One condition; a status holds at most one per ``type``."""

    model_config = ConfigDict(extra="ignore")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: datetime.datetime
    observed_generation: int = 0


class FailureRecord(ApiModel):
    """The newest failure: what it was, where, what was done, and when it healed."""

    model_config = ConfigDict(extra="ignore")

    kind: str
    severity: str
    source: str
    worker: int
    pod: str
    node: str = ""
    message: str = ""
    action: str
    occurred_at: datetime.datetime | None = None
    detected_at: datetime.datetime
    recovered_at: datetime.datetime | None = None

    @property
    def detection_seconds(self) -> float | None:
        """From when the evidence says it happened to the operator's decision, when known."""
        if self.occurred_at is None:
            return None
        return max(0.0, (self.detected_at - self.occurred_at).total_seconds())


class QuarantinedNode(ApiModel):
    """A node kept out of this job until ``until``, because a worker on it failed (SEV1)."""

    model_config = ConfigDict(extra="ignore")

    node: str
    until: datetime.datetime
    reason: str = ""


class RestoreRecord(ApiModel):
    """The newest restore of the training state: from which tier, to which step, when the
    operator first saw it, and in which process life (the agent's ``restartCount``)."""

    model_config = ConfigDict(extra="ignore")

    tier: RestoreTier = Field(description=(
        "memory (this node's shared memory), peers (rebuilt from the group's data and parity), "
        "persistent (a checkpoint), or none (nothing to restore: training started over)."))
    step: int | None = Field(None, description="The step restored (0 or unset with tier none).")
    at: datetime.datetime
    restart_count: int = 0


class GoodputRecord(ApiModel):
    """Productive training time over wall time since the job was submitted, and the lost time
    by cause (see ``salamander_operator.goodput``). ``productiveSeconds`` plus the sum of
    ``lostSeconds`` is ``wallSeconds``. The fields after ``since`` are the ledger's bookkeeping."""

    model_config = ConfigDict(extra="ignore")

    ratio: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.0, description="productiveSeconds / wallSeconds.")
    productive_seconds: Annotated[float, Field(ge=0.0)] = 0.0
    wall_seconds: Annotated[float, Field(ge=0.0)] = 0.0
    lost_seconds: dict[str, Annotated[float, Field(ge=0.0)]] = Field(default_factory=dict, description=(
        "By cause: startup, detection, recovery, recompute, straggling, checkpointing, other."))
    since: datetime.datetime = Field(description="When the operator first saw the job.")
    updated_at: datetime.datetime = Field(description="The time the figures are as of.")
    accounted_until: float | None = Field(None, description="The reporter's time of the newest record accounted.")
    last_step: int = 0
    high_water: int = Field(0, description="The highest step reached: steps up to it are recomputed work.")
    restart_count: int = 0
    blocked_seconds: float = 0.0
    step_seconds: float | None = Field(None, description="The baseline step time straggling is judged against.")
    failure_seen: datetime.datetime | None = None


class StragglerRecord(ApiModel):
    """A current straggler: which rank, where, how much slower than the job's median, why, and
    what was done (see ``spec.stragglers``)."""

    model_config = ConfigDict(extra="ignore")

    rank: int = Field(description="The global rank.")
    worker: int | None = Field(None, description="The worker (pod index) the rank runs in, when known.")
    node: str = Field("", description="The Kubernetes node the rank runs on, when known.")
    slowdown: float = Field(description="Busy time over the job's median, minus 1 (0.25: 25% slower).")
    score: float = Field(description="Robust z-score: standard deviations (from the MAD) above the median.")
    cause: str = Field(description=(
        "node (every rank on its node is slow), compute, data (loading), communication, or imbalance "
        "(the slow rank moves, or stays slow on a new node: no eviction fixes it)."))
    since: datetime.datetime = Field(description="When the rank became a straggler.")
    action: str = Field("Reported", description="What was done: Reported, Evicted or Undone.")


class AllocationRecord(ApiModel):
    """The cluster planner's latest decision for this job: how many workers, and why."""

    workers: int = Field(description="The worker count the planner gives the job (0: suspended).")
    capacity: int = Field(0, description="The healthy nodes the plan divided.")
    reason: str = Field("", description="Why the count is what it is, in words.")
    planned_at: datetime.datetime


class TrainingJobStatus(ApiModel):
    """What is. Written only by the operator; unknown fields are ignored when read back."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase = Phase.PENDING
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int = 0
    desired_workers: int = 0
    ready_workers: int = 0
    world_size: int = 0
    step: int = 0
    loss: float | None = None
    restarts: int = 0
    last_failure: FailureRecord | None = None
    failure_counts: dict[str, int] = Field(default_factory=dict)
    last_restore: RestoreRecord | None = None
    goodput: GoodputRecord | None = None
    restart_times: list[datetime.datetime] = Field(default_factory=list, description=(
        "When the restarts of the newest policy window happened (for the storm guard)."))
    quarantined_nodes: list[QuarantinedNode] = Field(default_factory=list)
    replacements_after: datetime.datetime | None = Field(None, description=(
        "No worker is created before this time: the backoff (failurePolicy.backoffSeconds) of the "
        "newest pod replacement."))
    stragglers: list[StragglerRecord] = Field(default_factory=list, description=(
        "The current stragglers, slowest first."))
    allocation: AllocationRecord | None = Field(None, description=(
        "The cluster planner's worker count for the job, when the operator plans capacity across jobs."))
    start_time: datetime.datetime | None = None
    completion_time: datetime.datetime | None = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class ObjectMeta(ApiModel):
    """The parts of metadata Salamander reads. Others are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    name: DnsLabel
    namespace: str = "default"
    uid: str = ""
    generation: int = 0


class TrainingJob(ApiModel):
    """A whole manifest: ``apiVersion``, ``kind``, ``metadata``, ``spec`` and optional ``status``."""

    api_version: Literal["salamander.dev/v1alpha1"]
    kind: Literal["TrainingJob"]
    metadata: ObjectMeta
    spec: TrainingJobSpec
    status: TrainingJobStatus = Field(default_factory=TrainingJobStatus)
