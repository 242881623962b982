"""The ``--fault`` syntax of ``salamander run``: ``KIND:key=value,...`` to a :class:`Fault`.

    kill-process:step=30,rank=1            SIGKILL global rank 1 when the job reaches step 30
    raise:step=5,rank=0                    raise an exception in rank 0 (also: raise-exception)
    kill-worker:step=60,worker=2           kill worker node 2, agent and processes
    hang-rank:step=90,rank=0,seconds=0     rank 0 stops making progress (0: until restarted)
    slow-rank:step=10,rank=1,seconds=0.5,steps=20   rank 1 takes 0.5 s more per step, 20 steps

Kinds may also be written as in a manifest (``KillProcess``). Keys: ``step`` (also ``atStep``,
``at-step``), ``rank``, ``worker``, ``seconds``, ``steps``; a key that does not apply to the
kind (``worker`` for a process fault, ``rank`` for kill-worker...) is an error rather than
silently ignored. Every defect raises :class:`InvalidSpec` naming the bad part, nothing else.
"""

from __future__ import annotations

import math

from pydantic import ValidationError

from salamander.api.manifest import InvalidSpec, _from_validation
from salamander.api.models import Fault, FaultKind

#: Faults executed inside the training processes (by the worker library); KillWorker is
#: executed by whoever runs the workers (the operator, or ``salamander run``).
PROCESS_FAULT_KINDS = frozenset({FaultKind.KILL_PROCESS, FaultKind.RAISE_EXCEPTION, FaultKind.HANG_RANK,
                                 FaultKind.SLOW_RANK})

_KINDS: dict[str, FaultKind] = {
    "kill-process": FaultKind.KILL_PROCESS, "kill": FaultKind.KILL_PROCESS,
    "raise": FaultKind.RAISE_EXCEPTION, "raise-exception": FaultKind.RAISE_EXCEPTION,
    "kill-worker": FaultKind.KILL_WORKER,
    "hang-rank": FaultKind.HANG_RANK, "hang": FaultKind.HANG_RANK,
    "slow-rank": FaultKind.SLOW_RANK, "slow": FaultKind.SLOW_RANK,
} | {kind.value.lower(): kind for kind in FaultKind}

#: The CLI name of each kind, as :func:`format_fault` writes it.
KIND_NAMES: dict[FaultKind, str] = {
    FaultKind.KILL_PROCESS: "kill-process", FaultKind.RAISE_EXCEPTION: "raise",
    FaultKind.KILL_WORKER: "kill-worker", FaultKind.HANG_RANK: "hang-rank", FaultKind.SLOW_RANK: "slow-rank",
}

_KEYS = {"step": "at_step", "at-step": "at_step", "atstep": "at_step", "at_step": "at_step",
         "rank": "rank", "worker": "worker", "seconds": "seconds", "steps": "steps"}

#: Which optional keys apply to which kind (``step`` applies to all and is required).
_APPLIES: dict[str, frozenset[FaultKind]] = {
    "rank": PROCESS_FAULT_KINDS,
    "worker": frozenset({FaultKind.KILL_WORKER}),
    "seconds": frozenset({FaultKind.HANG_RANK, FaultKind.SLOW_RANK}),
    "steps": frozenset({FaultKind.SLOW_RANK}),
}

_SYNTAX = "expected KIND:step=N[,key=value...], e.g. kill-process:step=30,rank=1"


def _show(text: str, limit: int = 40) -> str:
    """A part of the user's input, quoted, on one line and of bounded length."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _integer(key: str, raw: str) -> int:
    value = raw.strip()
    digits = value[1:] if value[:1] in ("+", "-") else value
    if not digits or not all(c in "0123456789" for c in digits) or len(digits) > 18:
        raise InvalidSpec(key, f"must be a whole number, got {_show(raw)}")
    return int(value)


def _seconds(key: str, raw: str) -> float:
    try:
        value = float(raw.strip()) if raw.isascii() else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidSpec(key, f"must be a number of seconds, got {_show(raw)}")
    return value


def parse_fault(text: str) -> Fault:
    """Parse one ``--fault`` value. Raises :class:`InvalidSpec` (``field`` is the bad key, or
    ``kind``, or empty for the overall form) for anything that is not a valid fault."""
    if not isinstance(text, str):
        raise InvalidSpec("", f"a fault must be text, got {type(text).__name__}")
    kind_text, colon, rest = text.strip().partition(":")
    kind_text = kind_text.strip()
    if not kind_text:
        raise InvalidSpec("", f"a fault needs a kind; {_SYNTAX}")
    kind = _KINDS.get(kind_text.lower())
    if kind is None:
        raise InvalidSpec("kind", f"unknown fault kind {_show(kind_text)}; "
                                  f"one of {', '.join(KIND_NAMES.values())}")
    fields: dict[str, int | float] = {}
    for item in rest.split(",") if colon else []:
        if not item.strip():
            continue  # a trailing or doubled comma
        key_text, equals, value = item.partition("=")
        key_text = key_text.strip()
        if not equals or not key_text:
            raise InvalidSpec("", f"{_show(item.strip())} is not key=value; {_SYNTAX}")
        key = _KEYS.get(key_text.lower())
        if key is None:
            raise InvalidSpec(key_text if key_text.isprintable() and len(key_text) <= 40 else _show(key_text),
                              "unknown key; one of step, rank, worker, seconds, steps")
        name = "step" if key == "at_step" else key
        if key in fields:
            raise InvalidSpec(name, "given twice")
        if key != "at_step" and kind not in _APPLIES[key]:
            raise InvalidSpec(name, f"does not apply to {KIND_NAMES[kind]}")
        fields[key] = _seconds(name, value) if key == "seconds" else _integer(name, value)
    if "at_step" not in fields:
        raise InvalidSpec("step", f"is required: the step at which to inject, e.g. {KIND_NAMES[kind]}:step=30")
    try:
        return Fault(kind=kind, **fields)
    except ValidationError as exc:
        error = _from_validation(exc, "")
        field = {"at_step": "step", "atStep": "step"}.get(error.field, error.field)
        raise InvalidSpec(field, error.problem) from None


def format_fault(fault: Fault) -> str:
    """The ``--fault`` text of ``fault``, naming only the keys that apply to its kind:
    ``parse_fault(format_fault(f))`` equals ``f`` when ``f`` leaves the others at their defaults."""
    parts = [f"step={fault.at_step}"]
    if fault.kind in _APPLIES["rank"]:
        parts.append(f"rank={fault.rank}")
    if fault.kind in _APPLIES["worker"]:
        parts.append(f"worker={fault.worker}")
    if fault.kind in _APPLIES["seconds"]:
        parts.append(f"seconds={fault.seconds!r}")
    if fault.kind in _APPLIES["steps"]:
        parts.append(f"steps={fault.steps}")
    return f"{KIND_NAMES[fault.kind]}:{','.join(parts)}"
