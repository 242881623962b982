"""Persistent copies of snapshots, in torch.distributed.checkpoint (DCP) format.

Every rank writes its own snapshot payload, independently (no collective, so a rank that is
being evicted can flush alone)::

    <directory>/snapshots/step-0000000040/rank-00003/   a DCP checkpoint: .metadata, *.distcp
        {"payload": uint8 tensor,
         "meta": {"step", "rank", "world", "sharded", "checksum", "algorithm", "layout"},
         "zero": int64 tensor (only for ZeRO shards: the global parameter indices the shard holds)}

A rank directory is complete once DCP has written its ``.metadata`` (DCP writes it last); a
step is usable when every rank of its world has a complete directory. Each rank keeps its two
newest complete steps and deletes its older directories (and any step directory left empty).
:meth:`Persister.load` checks the payload's checksum before returning it: ``algorithm`` names it
(``"crc32"``, :data:`.region.ALGORITHM`); copies written before it was recorded carry a CRC-32C
and are checked with the ``crc32c`` package, so they stay readable. ``sharded`` says whether each
rank's payload holds only its shard of the state (ZeRO, FSDP); copies without it count as sharded,
so the planner never loads them into a world of another size, unless they name their shard
``layout`` (``"zero"`` or ``"fsdp"``, :func:`.capture.shard_layout`): those are put together for
the new world (:mod:`.reshard`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from salamander_worker.snapshot import dcp_bytes
from salamander_worker.snapshot.plan import PersistentStep
from salamander_worker.snapshot.region import ALGORITHM, checksum

log = logging.getLogger(__name__)

KEEP = 2
_STEP = re.compile(r"^step-(\d{10})$")
_RANK = re.compile(r"^rank-(\d{5})$")
METADATA = ".metadata"


class PersistError(RuntimeError):
    """A persistent snapshot cannot be written or read; the message names the path."""


class Persister:
    """Writes and reads per-rank DCP copies of snapshot payloads under ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.root = self.directory / "snapshots"

    def path(self, step: int, rank: int) -> Path:
        return self.root / f"step-{step:010d}" / f"rank-{rank:05d}"

    def save(self, step: int, rank: int, world: int, view: memoryview, crc: int, *, sharded: bool,
             layout: str | None = None, zero: list[int] | None = None) -> Path:
        """Write ``view`` (the payload of old rank ``rank`` at ``step``, of a world of ``world``
        ranks; ``sharded`` when it holds only this rank's shard, ``layout`` how, when it can be
        resharded; ``zero`` the global indices of the parameters a ZeRO shard holds) and prune
        old copies."""
        if (layout == "zero") != (zero is not None):
            raise PersistError("a ZeRO layout needs its parameter indices, and only it has them")
        path = self.path(step, rank)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            path.mkdir(parents=True, exist_ok=True)
            state = {"payload": torch.frombuffer(view, dtype=torch.uint8) if len(view) else
                     torch.empty(0, dtype=torch.uint8),
                     "meta": {"step": step, "rank": rank, "world": world, "sharded": sharded, "checksum": crc,
                              "algorithm": ALGORITHM, "layout": layout or ""}}
            if zero is not None:
                state["zero"] = torch.tensor(zero, dtype=torch.int64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(state, checkpoint_id=path, no_dist=True)
        except Exception as exc:  # noqa: BLE001 - disk full, permissions...: name the path
            raise PersistError(f"cannot write persistent snapshot {path}: {exc}") from exc
        self._prune(rank, world)
        return path

    def _complete(self) -> dict[int, dict[int, Path]]:
        """step -> {rank: directory} of complete rank directories."""
        found: dict[int, dict[int, Path]] = {}
        if not self.root.is_dir():
            return found
        for step_dir in self.root.iterdir():
            step_match = _STEP.match(step_dir.name)
            if not step_match or not step_dir.is_dir():
                continue
            for rank_dir in step_dir.iterdir():
                rank_match = _RANK.match(rank_dir.name)
                if rank_match and (rank_dir / METADATA).is_file():
                    found.setdefault(int(step_match.group(1)), {})[int(rank_match.group(1))] = rank_dir
        return found

    def _prune(self, rank: int, world: int) -> None:
        """Delete this rank's copies but its ``KEEP`` newest complete ones. Rank 0 also deletes,
        in the steps older than its own oldest kept one, the directories of ranks outside
        ``world``: a larger world left them before the job shrank, and no rank would otherwise
        ever delete them."""
        mine = sorted(step for step, ranks in self._complete().items() if rank in ranks)
        for step in mine[:-KEEP]:
            self._remove(step, rank)
        if rank != 0 or len(mine) < KEEP:
            return
        for step_dir in self.root.iterdir():
            step_match = _STEP.match(step_dir.name)
            if not step_match or int(step_match.group(1)) >= mine[-KEEP] or not step_dir.is_dir():
                continue
            for rank_dir in list(step_dir.iterdir()):
                rank_match = _RANK.match(rank_dir.name)
                if rank_match and int(rank_match.group(1)) >= world:
                    self._remove(int(step_match.group(1)), int(rank_match.group(1)))

    def _remove(self, step: int, rank: int) -> None:
        """Delete old rank ``rank``'s copy of ``step``, and the step's directory once empty."""
        shutil.rmtree(self.path(step, rank), ignore_errors=True)
        try:
            self.path(step, rank).parent.rmdir()   # only if empty
        except OSError:
            pass

    def listing(self) -> dict[int, PersistentStep]:
        """step -> its world size, the old ranks with a complete copy and whether the copies
        are sharded, for the restore planner. A step whose first copy is unreadable is left out."""
        result: dict[int, PersistentStep] = {}
        for step, ranks in self._complete().items():
            try:
                meta = _read_meta(ranks[min(ranks)])
            except Exception:  # noqa: BLE001 - an unreadable copy is not offered
                continue
            result[step] = PersistentStep(int(meta["world"]), frozenset(ranks), bool(meta.get("sharded", True)),
                                          layout=meta.get("layout") or None)
        return result

    def zero_params(self, step: int, rank: int) -> list[int]:
        """The global parameter indices old rank ``rank``'s ZeRO shard at ``step`` holds."""
        path = self.path(step, rank)
        try:
            if "zero" not in _keys(path):
                raise PersistError(f"persistent snapshot {path} records no ZeRO shard layout")
            zero = _read(path, tensors=("zero",))["zero"]
        except PersistError:
            raise
        except Exception as exc:  # noqa: BLE001 - missing, truncated or foreign files
            raise PersistError(f"cannot read persistent snapshot {path}: {exc}") from exc
        return [int(i) for i in zero.tolist()]

    def load(self, step: int, rank: int) -> np.ndarray:
        """The payload old rank ``rank`` persisted at ``step``, checked against its checksum."""
        path = self.path(step, rank)
        try:
            meta = _read_meta(path)
            data = dcp_bytes.read_uint8(path, "payload")   # one read, not dcp.load's three copies
            fast = data is not None
            if data is None:
                data = _read(path, tensors=("payload",))["payload"].numpy()
        except Exception as exc:  # noqa: BLE001 - missing, truncated or foreign files
            raise PersistError(f"cannot read persistent snapshot {path}: {exc}") from exc
        algorithm = meta.get("algorithm", _LEGACY)
        if fast and _checksum(algorithm, path)(data) != meta["checksum"]:
            try:   # the one-read path misread a layout it thought it knew: DCP's own reader decides
                data = _read(path, tensors=("payload",))["payload"].numpy()
            except Exception as exc:  # noqa: BLE001
                raise PersistError(f"cannot read persistent snapshot {path}: {exc}") from exc
        if _checksum(algorithm, path)(data) != meta["checksum"] or meta["step"] != step:
            raise PersistError(f"persistent snapshot {path} fails its {algorithm} checksum or names another step")
        return data


#: What copies written before the checksum's name was recorded were checked with.
_LEGACY = "crc32c"

#: The meta fields every copy has; others (``sharded``, ``algorithm``, ``layout``) came later.
_META = {"step": 0, "rank": 0, "world": 0, "checksum": 0}
_LATER = {"sharded": True, "algorithm": "", "layout": ""}


def _keys(path: Path) -> dict[str, Any]:
    """The items of the copy at ``path``, by name, with their metadata (DCP's)."""
    return dcp.FileSystemReader(path).read_metadata().state_dict_metadata


def _read(path: Path, *, tensors: tuple[str, ...] = ()) -> dict[str, Any]:
    """The copy at ``path``: ``{"meta": ...}`` with whichever fields it has, and each of
    ``tensors`` (``"payload"``, ``"zero"``) by name. Raises whatever DCP raises."""
    keys = _keys(path)
    state: dict[str, Any] = {"meta": {**_META, **{k: v for k, v in _LATER.items() if f"meta.{k}" in keys}}}
    for name in tensors:
        state[name] = torch.empty(keys[name].size, dtype=keys[name].properties.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return state


def _read_meta(path: Path) -> dict[str, Any]:
    return _read(path)["meta"]


def _checksum(algorithm: object, path: Path) -> Callable[[np.ndarray], int]:
    """The function that computes checksum ``algorithm`` (a name read from ``path``)."""
    if algorithm == ALGORITHM:
        return checksum
    if algorithm == _LEGACY:
        try:
            import crc32c
        except ImportError:
            raise PersistError(f"persistent snapshot {path} has a CRC-32C checksum; checking it needs the "
                               "crc32c package") from None
        return crc32c.crc32c
    raise PersistError(f"persistent snapshot {path} has an unknown checksum {algorithm!r}")


_keep_alive: list[socket.socket] = []


def flush_on_sigterm(flush: Callable[[], None]) -> None:
    """On SIGTERM (the notice before eviction or preemption) run ``flush`` on a helper thread,
    then exit with 143. Works even while the main thread is stuck in a collective: Python's C
    signal handler writes the signal to a wakeup socket, whichever thread the kernel chose,
    and the helper wakes on it. Call from the main thread, once (it owns the wakeup fd)."""
    if threading.current_thread() is not threading.main_thread():
        raise PersistError("flush_on_sigterm must be called from the main thread")
    reader, writer = socket.socketpair()
    writer.setblocking(False)

    _keep_alive.append(writer)   # the C handler writes to its fd for the life of the process

    def wait_for_notice() -> None:
        while True:
            got = reader.recv(1)
            if not got:
                return            # the socket was closed: no more notices can come
            if got[0] == signal.SIGTERM:
                break
        try:
            flush()
        except Exception:  # noqa: BLE001 - exiting anyway; say why the flush failed
            log.exception("flushing the snapshot on SIGTERM failed")
        finally:
            os._exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, lambda *_: None)  # installs the C handler; the helper acts
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=wait_for_notice, name="salamander-sigterm", daemon=True).start()
