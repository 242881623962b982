"""The contract between the operator (or the local runtime) and the workers.

Everything that crosses the boundary between a worker pod and whoever manages it is
named here once: environment variables, labels, and the keys and record formats the
workers publish in the rendezvous store. The rendezvous store is a ``TCPStore`` hosted
by the operator (or by ``salamander run``), never by a worker, so losing any worker
never loses membership or progress.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

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


def fault_fired_key(run_id: str, fault_index: int) -> str:
    """Where the firing process writes the wall-clock time (seconds, as text) it fired at."""
    return f"salamander/{run_id}/fault/{fault_index}/at"


def read_progress(store: Any, run_id: str) -> Progress | None:
    """The newest progress record of ``run_id`` in ``store`` (any torch.distributed ``Store``),
    or None if there is none. Raises :class:`WireError` for a malformed record."""
    key = progress_key(run_id)
    if not store.check([key]):
        return None
    return Progress.decode(store.get(key))


class WireError(ValueError):
    """A record read from the wire is malformed; the message names what is wrong."""


@dataclass(frozen=True)
class Progress:
    """What a training script last reported: the step reached, its loss, and throughput inputs.

    Invariants: ``step >= 0``, ``samples >= 0``, ``world_size >= 1``; ``loss`` is finite or None;
    ``time`` is the reporter's wall clock (seconds since the epoch).
    """

    step: int
    samples: int
    world_size: int
    time: float
    loss: float | None = None
    restart_count: int = 0
    total_steps: int | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Progress:
        """Parse a record; raises :class:`WireError` naming the bad field, never anything else."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, huge integers
            raise WireError(f"progress record is not JSON: {str(exc)[:200]}") from None
        except RecursionError:
            raise WireError("progress record is nested too deeply") from None
        if not isinstance(data, dict):
            raise WireError("progress record is not a JSON object")
        fields = {
            "step": int, "samples": int, "world_size": int, "time": (int, float),
            "loss": (int, float, type(None)), "restart_count": int, "total_steps": (int, type(None)),
        }
        unknown = set(data) - set(fields)
        if unknown:
            raise WireError(f"progress record has unknown fields: {sorted(unknown)}")
        for name, kind in fields.items():
            if name not in data:
                if name in ("loss", "restart_count", "total_steps"):
                    continue
                raise WireError(f"progress record lacks field {name!r}")
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise WireError(f"progress field {name!r} has the wrong type: {value!r}")
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
        return cls(step=data["step"], samples=data["samples"], world_size=data["world_size"],
                   time=when, loss=loss, restart_count=data.get("restart_count", 0),
                   total_steps=total)
