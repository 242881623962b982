"""Streaming stores for the large copies of training processes (x86-64, glibc).

glibc's ``memcpy`` writes with non-temporal (streaming) stores only above
``glibc.cpu.x86_non_temporal_threshold``, which it derives from the size of the last-level cache:
tens of MiB on a server, and hundreds in a VM that reports its host's whole cache (260 MiB on
the development machine). Below it, each destination line is first read into cache and then
written (read-for-ownership), so a snapshot's 1 MiB pieces cost three passes over memory instead
of two, and push training's working set out of cache. Measured on the development machine
(BENCHMARKS.md, "Streaming stores"): the snapshot's copy of the live tensors ran at 0.56x a plain
large ``memcpy`` with ordinary stores and at 0.84x with streaming ones.

The agent sets the threshold for its training processes to :data:`THRESHOLD` through
``GLIBC_TUNABLES``, which the dynamic loader reads once, at process start: so it is set in the
agent's environment before the workers are spawned, and never changes a running process.
A threshold the user set is kept; ``SALAMANDER_STREAMING_COPIES=0`` leaves the variable alone.
Elsewhere (another architecture or C library) the variable is left alone too.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

#: Copies of at least this many bytes use streaming stores: a snapshot's piece
#: (:data:`salamander_worker.snapshot.payload.CHUNK`), which is then never read back by the
#: copying thread. Smaller copies, whose destination is usually read soon, keep ordinary stores.
THRESHOLD = 1 << 20

ENV_TUNABLES = "GLIBC_TUNABLES"
ENV_SWITCH = "SALAMANDER_STREAMING_COPIES"
TUNABLE = "glibc.cpu.x86_non_temporal_threshold"


def tunables(env: Mapping[str, str], machine: str | None = None, libc: str | None = None) -> str | None:
    """The ``GLIBC_TUNABLES`` value training processes should start with, or None to leave the
    environment as it is (switched off, not x86-64 glibc Linux, or the user chose a threshold).
    Other tunables already set are kept, in their order; the threshold is appended.
    ``machine`` and ``libc`` default to this interpreter's (``platform``)."""
    if env.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    machine = platform.machine() if machine is None else machine
    libc = platform.libc_ver()[0] if libc is None else libc
    if machine.lower() not in ("x86_64", "amd64") or libc != "glibc":
        return None
    current = env.get(ENV_TUNABLES, "")
    names = [item.split("=", 1)[0].strip() for item in current.split(":") if item.strip()]
    if TUNABLE in names:
        return None
    ours = f"{TUNABLE}={THRESHOLD:#x}"
    return f"{current.rstrip(':')}:{ours}" if current.strip(":") else ours
