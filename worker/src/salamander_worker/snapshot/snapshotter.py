"""The snapshot API a training script uses: one call to restore, one call per step.

::

    snap = Snapshotter(model, optimizer, scheduler=sched)   # config from SALAMANDER_SNAPSHOT
    start, data = snap.restore()          # collective; (0, None) when there is nothing to resume
    for step in range(start, steps):
        ...                               # forward, backward, optimizer.step()
        snap.step(step + 1, data={"epoch": e, "index": i})   # a snapshot when due

What happens at a snapshot (every ``interval`` steps):

* **Blocking**: the state (see :mod:`.capture`) is copied into the free slot of this rank's
  shared-memory file (:mod:`.region`), pre-allocated on the first snapshot. With ``overlap``
  (the default when there is an optimizer) the tensor copy itself runs on the background
  thread during the next forward and backward, and the next ``optimizer.step()`` waits for it
  (a step pre-hook): parameters and optimizer state must change only in ``optimizer.step()``.
  On a GPU the copy is DMA into the page-locked slot on a copy stream (:mod:`.device`), and
  the hook is a GPU-side wait: the host thread does not block at all.
* **Background** (overlapping the next steps): crc32 of the payload as it lands, the atomic
  commit, and every ``persist_every`` snapshots a torch.distributed.checkpoint of the payload.
  Beside the copy, on a second thread, the erasure-coding exchange within the rank's group
  (point to point on a dedicated gloo group; rotating parity, :mod:`.erasure`) runs window by
  window as the copy lands the bytes it needs (:mod:`.exchange`), then the parity commit. So a
  snapshot is protected about one window after its copy ends, not one exchange after.
* The next snapshot waits for the previous one's background work, so at most one snapshot is
  in flight and the newest *protected* snapshot is never the one being overwritten.

Restore (collective, every rank): each rank lists what its own files hold (from the records),
the holdings are all-gathered, and :func:`.plan.plan_restore` picks the newest step every rank
can reach and the nearest source per rank: own memory, a peer's copy, a rebuild from the group's
parity, or the persistent checkpoint. Each rank then checks the crc32 of only the slots the plan
reads; if any is corrupt, every rank plans again without it. A rebuild runs point to point (each
surviving member reduces a share of every lost block) straight into a slot of the receiver's data
file, where it is committed once its crc32 matches. If a transfer or a checksum fails, every
rank falls to the next tier together. After a restore from anything but local memory a snapshot
is taken at once, so the restored state is protected again.

Invariants: step ``N`` means ``N`` completed optimizer steps (resume by running step ``N``);
every rank calls :meth:`step` with the same ``N``; a payload is checked against its crc32
before it is read; nothing in this module lets a malformed file or peer message crash training
without a :class:`SnapshotError` naming it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from salamander import wire
from salamander_worker import progress, telemetry
from salamander_worker.snapshot import erasure, exchange, payload, persist, pool, reshard
from salamander_worker.snapshot.capture import Trainee, capture, fsdp_rows, prepare, shard_layout, zero_groups
from salamander_worker.snapshot.device import PINNED, DeviceCopier, stable_pointers
from salamander_worker.snapshot.plan import (DataHolding, Holdings, ParityHolding, PersistentStep, Rebuild,
                                             RestorePlan, ec_groups, plan_restore)
from salamander_worker.snapshot.region import SLOTS, Committed, RegionError, SlotFile, checksum, checksum_update

log = logging.getLogger(__name__)

HEADROOM = 1.05          # slot capacity over the first payload, for state that grows a little


class SnapshotError(RuntimeError):
    """A snapshot cannot be taken or restored; the message says which file, rank or step."""


@dataclass
class Stats:
    """What the snapshots of this process cost, for benchmarks and metrics."""

    snapshots: int = 0
    blocking_s: list[float] = field(default_factory=list)   # copy into shared memory
    waiting_s: list[float] = field(default_factory=list)    # waiting for the previous background
    copy_wait_s: list[float] = field(default_factory=list)  # optimizer.step() waiting for the copy
    background_s: list[float] = field(default_factory=list)
    encode_s: list[float] = field(default_factory=list)     # protection's time beyond the copy's commit
    dma_s: list[float] = field(default_factory=list)        # GPU copy-stream time of a snapshot's DMA
    protected_step: int | None = None
    persisted_step: int | None = None
    restore_tier: str | None = None
    restore_step: int | None = None
    restore_s: float | None = None
    restore_phases: dict[str, float] = field(default_factory=dict)   # seconds per restore phase


def default_memory_dir() -> Path:
    """The node's snapshot directory: ``SALAMANDER_SNAPSHOT_MEMORY`` (set by the agent) or
    ``/dev/shm/salamander/<run id>/<host>`` when the script runs under plain torchrun."""
    explicit = os.environ.get(wire.ENV_SNAPSHOT_MEMORY)
    if explicit:
        return Path(explicit)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    return Path(wire.SNAPSHOT_SHM_ROOT) / run / socket.gethostname()


class _Worker:
    """One daemon thread running submitted calls in order. Unlike a ThreadPoolExecutor's, its
    thread never holds up the interpreter's exit: a parity exchange stuck on a dead peer must not
    keep a failing training process alive."""

    def __init__(self, name: str) -> None:
        self._calls: queue.Queue[tuple[Future[Any], Any, tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(exc)


class Snapshotter:
    """In-memory, erasure-coded snapshots of one rank's training state."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 scheduler: Any = None, config: wire.SnapshotConfig | None = None,
                 memory_dir: str | os.PathLike[str] | None = None, overlap: bool = True,
                 pipeline: bool = True, crc_thread: bool | None = None) -> None:
        if config is None:
            raw = os.environ.get(wire.ENV_SNAPSHOT)
            try:
                config = wire.SnapshotConfig.decode(raw) if raw else wire.SnapshotConfig()
            except wire.WireError as exc:
                raise SnapshotError(f"{wire.ENV_SNAPSHOT}: {exc}") from None
        self.config = config
        self.trainee = Trainee(model, optimizer, scheduler)
        self.stats = Stats()
        group = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if group else 0
        self.world = dist.get_world_size() if group else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.directory = Path(memory_dir) if memory_dir is not None else default_memory_dir()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(f"cannot create snapshot directory {self.directory}: {exc}") from None
        self._gloo = dist.new_group(backend="gloo") if group else None
        self._ec_group: list[int] | None = None
        self._ec_pg: Any = None
        if group:
            for ranks in ec_groups(self.world, self.local_world, config.group_size, config.parity):
                pg = dist.new_group(ranks=ranks, backend="gloo")  # every rank creates every group
                if self.rank in ranks:
                    self._ec_group, self._ec_pg = ranks, pg
        self._data: SlotFile | None = None
        self._parity: SlotFile | None = None
        self._layout: payload.Layout | None = None
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._copied = threading.Event()   # set when no tensor copy is pending
        self._copied.set()
        self._copier: DeviceCopier | None = None   # created at the first snapshot of CUDA tensors
        self.overlap = overlap and optimizer is not None
        # A host copy's crc may run on a thread of its own, a few pieces ahead of the copy
        # (:mod:`.running_crc`); None: decided per copy (:meth:`_crc_on_its_own_thread`).
        self.crc_thread = crc_thread
        if self.overlap:
            # Parameters and optimizer state change only in optimizer.step(): the copy of a
            # snapshot runs during the next forward and backward, and the next step waits for it.
            for opt in {id(o): o for o in (optimizer, getattr(optimizer, "optim", None)) if o is not None}.values():
                opt.register_step_pre_hook(lambda *_: self._await_copy())
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._background, name="salamander-snapshot", daemon=True)
        self._thread.start()
        # With ``pipeline`` the parity exchange runs on its own thread beside the copy, window by
        # window as the bytes land; without, it starts once the copy has been committed.
        self._exchanger = _Worker("salamander-parity") if pipeline and self._ec_group is not None else None
        self._persister = persist.Persister(config.persist_directory) if config.persist_every and \
            config.persist_directory else None
        if self._persister is not None:
            persist.flush_on_sigterm(self._flush_for_termination)

    # -- files ---------------------------------------------------------------------------------

    def _path(self, kind: str) -> Path:
        return self.directory / f"local-{self.local_rank}.{kind}"

    def _existing(self, kind: str) -> SlotFile | None:
        try:
            return SlotFile.open(self._path(kind), 0, create=False)
        except Exception:  # noqa: BLE001 - absent or not ours: nothing to restore from it
            return None

    # -- saving --------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return step > 0 and step % self.config.interval == 0

    def step(self, step: int, data: Any = None) -> bool:
        """Take a snapshot of the state after ``step`` optimizer steps if one is due; returns
        whether it did. Blocks only for the copy (and for the previous snapshot's background
        work if that has not finished)."""
        if not self.due(step):
            return False
        self.snapshot(step, data)
        return True

    def snapshot(self, step: int, data: Any = None) -> None:
        """Take a snapshot now (every rank must call it with the same ``step``)."""
        self._raise_background_error()
        started = time.perf_counter()
        self._idle.wait()
        waited = time.perf_counter() - started
        tree = capture(self.trainee, step, data)
        layout = self._layout
        if layout is None or layout.signature != payload.signature(tree):
            layout = self._layout = payload.plan(tree)
        if self._data is None or self._data.capacity < layout.length:
            self._open_data(layout.length)
        assert self._data is not None
        slot = self._data.begin()
        try:
            pending = payload.write_skeleton(tree, layout, self._data.payload(slot))
        except payload.PayloadError:
            layout = self._layout = payload.plan(tree)
            if self._data.capacity < layout.length:
                self._open_data(layout.length)
                slot = self._data.begin()
            pending = payload.write_skeleton(tree, layout, self._data.payload(slot))
        crc = None
        by_dma = self._copy_by_dma(pending, self._data.payload(slot))
        if by_dma:
            pending = []
        elif not self.overlap:
            crc = payload.copy_tensors(pending, self._data.payload(slot), layout.length,
                                       crc_thread=self._crc_on_its_own_thread(foreground=True))
            pending = []
        else:
            pending = self._copy_volatile(pending, self._data.payload(slot))
        blocking = time.perf_counter() - started - waited
        self.stats.snapshots += 1
        self.stats.blocking_s.append(blocking)
        self.stats.waiting_s.append(waited)
        progress.note_blocked(blocking + waited)
        telemetry.guarded(lambda: telemetry.worker().snapshot_stage("blocking", blocking + waited))
        self._idle.clear()
        if pending:
            self._copied.clear()
        self._jobs.put((step, slot, layout.length, pending, crc, by_dma))

    def _crc_on_its_own_thread(self, foreground: bool) -> bool:
        """Whether a host copy's crc runs on a thread of its own: as the constructor's
        ``crc_thread`` says; by default always when the copy blocks training (training's
        threads are idle then), and in the background only when torch's threads leave a core
        free. With every core busy, that thread slowed the copy and training down
        (BENCHMARKS.md)."""
        if self.crc_thread is not None:
            return self.crc_thread
        return foreground or pool.threads() > torch.get_num_threads()

    def _open_data(self, length: int) -> None:
        """(Re)open this rank's data file with room for ``length`` bytes (plus headroom)."""
        if self._data is not None:
            self._unpin_data()
            self._data.close()
        self._data = SlotFile.open(self._path("data"), int(length * HEADROOM))

    def _unpin_data(self) -> None:
        if self._data is not None:
            for slot in range(SLOTS):
                PINNED.unpin(self._data.payload(slot))

    def _copy_by_dma(self, pending: payload.Pending, buffer: memoryview) -> bool:
        """Start the copy of a snapshot whose tensors live on a GPU, straight into the
        page-locked slot (:mod:`.device`); host tensors in the same state (e.g. Adam's step
        counts) are copied here and now. Returns False, having done nothing, when the state
        has no CUDA tensors or its memory cannot be page-locked: the caller copies it."""
        device, host = DeviceCopier.split(pending)
        if not device or len({t.device for t, _ in device}) > 1 or not PINNED.pin(buffer):
            return False   # (state spread over several GPUs in one process: copied as on a CPU node)
        if self._copier is None:
            self._copier = DeviceCopier(device[0][0].device)
        payload.copy_tensors(host, buffer)
        self._copier.start(device, buffer, stable_pointers(self.trainee.model, self.trainee.optimizer))
        if not self.overlap:
            self._copier.wait()
        return True

    def _copy_volatile(self, pending: payload.Pending, buffer: memoryview) -> payload.Pending:
        """Copy now the tensors that training may change before ``optimizer.step()`` (buffers
        such as batch-norm statistics, which the next forward updates in place); return the
        rest (parameters and optimizer state), which the background copies while the next
        forward and backward run, and which stay unchanged until the step waits for it."""
        stable = stable_pointers(self.trainee.model, self.trainee.optimizer)
        volatile = [(t, ref) for t, ref in pending if t.data_ptr() not in stable]
        if volatile:
            payload.copy_tensors(volatile, buffer)
        return [(t, ref) for t, ref in pending if t.data_ptr() in stable]

    def _await_copy(self) -> None:
        if self._copier is not None:
            self._copier.fence()   # a GPU-side wait: the host goes on queueing the step
        if self._copied.is_set():
            return
        started = time.perf_counter()
        self._copied.wait()
        waited = time.perf_counter() - started
        self.stats.copy_wait_s.append(waited)
        progress.note_blocked(waited)

    def wait(self) -> None:
        """Block until the last snapshot's background work (commit, parity, persist) is done."""
        self._idle.wait()
        self._raise_background_error()

    def close(self) -> None:
        """Finish background work and stop the thread (files stay: the agent owns them)."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self._exchanger is not None:
            self._exchanger.stop()
        self._unpin_data()

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise SnapshotError(f"snapshot background work failed: {error}") from error

    def _background(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            started = time.perf_counter()
            step, slot, length, pending, crc, by_dma = job
            landing = exchange.Landing(length)
            encoding: Future[None] | None = None
            try:
                assert self._data is not None
                if not by_dma and not pending:
                    landing.advance(length)   # copied in the foreground, before this job was queued
                if self._exchanger is not None:   # the parity exchange follows the copy as it lands
                    encoding = self._exchanger.submit(self._encode, step, slot, landing)
                if by_dma:
                    assert self._copier is not None
                    crc = self._checksum_as_landed(self._data.payload(slot), length, landing)
                    copied = time.perf_counter() - started
                    self.stats.dma_s.append(self._copier.copy_seconds() or 0.0)
                    telemetry.guarded(lambda: telemetry.worker().snapshot_stage("copy", copied))
                if pending:
                    crc = payload.copy_tensors(pending, self._data.payload(slot), length, landed=landing.advance,
                                               crc_thread=self._crc_on_its_own_thread(foreground=False))
                    self._copied.set()
                    copied = time.perf_counter() - started
                    telemetry.guarded(lambda: telemetry.worker().snapshot_stage("copy", copied))
                assert crc is not None
                self._protect(step, slot, length, crc, landing, encoding)
            except BaseException as exc:  # noqa: BLE001 - surfaced to the training thread
                landing.fail(f"{type(exc).__name__}: {exc}")
                if encoding is not None:
                    with contextlib.suppress(BaseException):
                        encoding.result()   # it stops at the failed landing; the copy's error is the one to report
                log.exception("snapshot background work failed")
                self._error = exc
            finally:
                self._copied.set()
                self.stats.background_s.append(time.perf_counter() - started)
                self._idle.set()

    def _checksum_as_landed(self, buffer: memoryview, length: int, landing: exchange.Landing) -> int:
        """The crc32 of ``buffer[:length]`` while a device copy into it is in flight: each
        stretch is checksummed (and announced to ``landing``) as soon as the copy engines have
        written it."""
        assert self._copier is not None
        crc, done = 0, 0
        for reached in self._copier.landed():
            crc = checksum_update(buffer[done:reached], crc)
            done = reached
            landing.advance(done)
        self._copier.wait()
        return checksum_update(buffer[done:length], crc)

    def _protect(self, step: int, slot: int, length: int, crc: int, landing: exchange.Landing,
                 encoding: Future[None] | None) -> None:
        """Commit the copied slot, then see its parity exchange through (``encoding`` when it
        has been running beside the copy, else run it now), then persist if due."""
        assert self._data is not None
        committed = self._data.commit(slot, length, {"step": step, "rank": self.rank, "world": self.world,
                                                     "sharded": self.trainee.sharded}, crc=crc)
        landing.finish(crc)
        telemetry.guarded(lambda: telemetry.worker().snapshot_committed(length))
        if self._ec_group is not None:
            started = time.perf_counter()
            if encoding is not None:
                encoding.result()
            else:
                self._encode(step, slot, landing)
            encoded = time.perf_counter() - started   # what protection took beyond the copy
            self.stats.encode_s.append(encoded)
            telemetry.guarded(lambda: telemetry.worker().snapshot_stage("encode", encoded))
        if self._persister is not None and (step // self.config.interval) % self.config.persist_every == 0:
            started = time.perf_counter()
            self._persist(committed)
            persisted = time.perf_counter() - started
            telemetry.guarded(lambda: telemetry.worker().snapshot_stage("persist", persisted))

    # -- erasure coding ------------------------------------------------------------------------

    def _encode(self, step: int, slot: int, landing: exchange.Landing) -> None:
        """Exchange blocks with the group as this member's copy lands (:func:`.exchange.encode_parity`)
        and commit this member's parity for the snapshot, recording every member's length and
        crc32 (gathered once all copies are done)."""
        assert self._ec_group is not None and self._data is not None
        group, pg, m = self._ec_group, self._ec_pg, self.config.parity
        k, j = len(group), self._ec_group.index(self.rank)
        mine = torch.tensor([step, landing.length], dtype=torch.int64)
        everyone = [torch.empty(2, dtype=torch.int64) for _ in group]
        dist.all_gather(everyone, mine, group=pg)
        steps = {int(t[0]) for t in everyone}
        if steps != {step}:
            raise SnapshotError(f"group {group} snapshot steps disagree: {sorted(steps)}")
        lengths = [int(t[1]) for t in everyone]
        block_len = erasure.block_length(lengths, k, m)
        if self._parity is None or self._parity.capacity < m * block_len:
            if self._parity is not None:
                self._parity.close()
            self._parity = SlotFile.open(self._path("parity"), int(m * block_len * HEADROOM))
        pslot = self._parity.begin()
        out = np.frombuffer(self._parity.payload(pslot), dtype=np.uint8, count=m * block_len)
        data = np.frombuffer(self._data.payload(slot), dtype=np.uint8, count=landing.length)
        exchange.encode_parity(pg, group, m, data, landing, block_len, out)
        crcs = [torch.empty(1, dtype=torch.int64) for _ in group]
        dist.all_gather(crcs, torch.tensor([landing.checksum()], dtype=torch.int64), group=pg)
        self._parity.commit(pslot, m * block_len, {
            "step": step, "group": group, "member": j, "m": m, "block_len": block_len,
            "lengths": lengths, "checksums": [int(t[0]) for t in crcs]})
        self.stats.protected_step = step

    # -- persistence ---------------------------------------------------------------------------

    def _persist(self, committed: Committed) -> None:
        assert self._persister is not None and self._data is not None
        record = committed.record
        view = self._data.payload(committed.slot)[:record["length"]]
        layout = shard_layout(self.trainee) if record.get("world") == self.world else None
        zero = zero_groups(self.trainee) if layout == "zero" else None
        self._persister.save(record["step"], self.rank, self.world, view, record["checksum"],
                             sharded=bool(record.get("sharded", True)), layout=layout,
                             zero=None if zero is None else [i for group in zero for i in group])
        self.stats.persisted_step = record["step"]

    def _flush_for_termination(self) -> None:
        """On SIGTERM: let in-flight work finish (briefly), then persist the newest local
        snapshot if it is newer than the last persisted one. Never collective."""
        self._idle.wait(timeout=20)
        if self._data is None or self._persister is None:
            return
        for entry in self._data.committed():
            if self.stats.persisted_step is not None and entry.record["step"] <= self.stats.persisted_step:
                return
            if self._data.verify(entry):
                self._persist(entry)
                log.warning("flushed snapshot of step %s to %s on SIGTERM", entry.record["step"],
                            self._persister.directory)
                return

    # -- restoring -----------------------------------------------------------------------------

    def restore(self) -> tuple[int, Any]:
        """Restore the newest snapshot every rank can reach; returns ``(step, data)`` to resume
        from, or ``(0, None)`` if there is none. Collective: every rank calls it once, before
        training.

        Holdings come from the slot records alone; only the slots the plan reads are checked
        against their crc32, and if any rank finds one corrupt, every rank drops those slots
        and plans again (:meth:`_verify_plan`): no unverified byte is ever read."""
        started = last = time.perf_counter()
        phases = self.stats.restore_phases
        self._checked: dict[tuple[str, int], bool] = {}

        def mark(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            phases[name] = now - last
            last = now

        holdings = self._holdings()
        mark("holdings")
        if self._gloo is not None:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, holdings.to_wire(), group=self._gloo)
            everyone = [Holdings.from_wire(h) for h in gathered]
            listing = [self._persister.listing() if self._persister and self.rank == 0 else None]
            dist.broadcast_object_list(listing, src=0, group=self._gloo)
            persistent = listing[0]
        else:
            everyone = [holdings]
            persistent = self._persister.listing() if self._persister else None
        layout = shard_layout(self.trainee)
        plan = plan_restore(everyone, persistent, layout=layout)
        mark("plan")
        plan = self._verify_plan(plan, everyone, persistent, layout)
        mark("verify")
        if plan.tier == "none" and persistent and self.rank == 0:
            log.warning("no snapshot to restore into a world of %s ranks; persistent copies not usable: %s",
                        self.world, "; ".join(_unusable(step, c, self.world, layout)
                                              for step, c in sorted(persistent.items())))
        step, data = 0, None

        def attempt(plan: RestorePlan) -> Callable[[], tuple[int, Any]] | None:
            """Fetch this rank's tree and check it fits (:func:`.capture.prepare`: no live state
            changes); None on any failure, logged: every rank must learn of it through
            :meth:`_agree`, or the others wait forever."""
            try:
                tree = self._fetch(plan)
                mark("transfer")
                if tree is None:
                    raise SnapshotError(f"the plan gives rank {self.rank} no payload")
                if tree.get("step") != plan.step:
                    raise SnapshotError(f"the snapshot of step {plan.step} holds step {tree.get('step')}")
                return prepare(self.trainee, tree)
            except Exception as exc:  # noqa: BLE001 - any failure: all ranks fall to the next tier together
                log.warning("restoring step %s from %s failed on rank %s: %s", plan.step, plan.tier, self.rank, exc)
                return None

        optimizer = self.trainee.optimizer
        fresh = optimizer is not None and not optimizer.state   # (torch may create state to check against)
        put_back = None
        if plan.step is not None:
            put_back = attempt(plan)
            if not self._agree(put_back is not None):
                if plan.tier == "persistent":
                    raise SnapshotError(f"loading the persistent snapshot of step {plan.step} failed on a rank")
                plan = plan_restore([Holdings() for _ in everyone], persistent, layout=layout)  # the next tier
                put_back = attempt(plan) if plan.step is not None else None
                if plan.step is not None and not self._agree(put_back is not None):
                    raise SnapshotError(f"loading the persistent snapshot of step {plan.step} failed on a rank")
        if put_back is not None:
            step, data = put_back()   # every rank's tree fits: now change the live objects
            mark("apply")
        elif fresh and optimizer is not None:
            optimizer.state.clear()   # get_state_dict's zero-step state, made while checking: not training's
        self.stats.restore_tier, self.stats.restore_step = plan.tier, plan.step
        self.stats.restore_s = time.perf_counter() - started
        progress.note_restore(plan.tier, plan.step)
        log.info("rank %s restored step %s from %s in %.3f s", self.rank, plan.step, plan.tier,
                 self.stats.restore_s)
        if plan.tier in ("peers", "persistent") and plan.step is not None:
            with self._timed("protect"):
                self._settle_data_file()
                self.snapshot(plan.step, data)   # protect the restored state at once
        return step, data

    def _agree(self, ok: bool) -> bool:
        if self._gloo is None:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._gloo)
        return flag.item() == 0

    def _holdings(self) -> Holdings:
        """What this rank's files hold, from their records alone (payloads are checked later,
        and only those a plan reads); adopts the files."""
        data = []
        for slot, rec in self._records("data"):
            try:
                data.append(DataHolding(rank=int(rec["rank"]), world=int(rec["world"]), step=int(rec["step"]),
                                        length=rec["length"], checksum=rec["checksum"],
                                        sharded=bool(rec.get("sharded")), slot=slot))
            except (TypeError, ValueError) as exc:
                log.warning("data slot %s of %s has a malformed record (%s); not used", slot, self._path("data"), exc)
        parity = []
        for slot, rec in self._records("parity"):
            try:
                parity.append(ParityHolding(step=int(rec["step"]), group=tuple(int(r) for r in rec["group"]),
                                            member=int(rec["member"]), m=int(rec["m"]),
                                            block_len=int(rec["block_len"]),
                                            lengths=tuple(int(n) for n in rec["lengths"]),
                                            checksums=tuple(int(c) for c in rec["checksums"]), slot=slot))
            except (TypeError, ValueError) as exc:
                log.warning("parity slot %s of %s has a malformed record (%s); not used", slot,
                            self._path("parity"), exc)
        return Holdings(tuple(data), tuple(parity))

    def _records(self, kind: str) -> list[tuple[int, dict[str, Any]]]:
        """(slot, record) of every committed slot of this rank's ``kind`` file whose record has
        the fields a holding needs (payloads unchecked); adopts the file."""
        region = self._existing(kind)
        if region is None:
            return []
        if kind == "data":
            self._data = region
        else:
            self._parity = region
        fields = ("rank", "world", "step") if kind == "data" else \
            ("step", "group", "member", "m", "block_len", "lengths", "checksums")
        return [(entry.slot, entry.record) for entry in region.committed()
                if all(key in entry.record for key in fields)]

    def _verify_plan(self, plan: RestorePlan, everyone: list[Holdings],
                     persistent: dict[int, PersistentStep] | None, layout: str | None) -> RestorePlan:
        """Check the slots ``plan`` reads on every rank against their crc32; while any rank
        finds a corrupt one, every rank drops the corrupt slots from the holdings and plans
        again (collective; every rank gets the same plan). Returns a plan whose in-memory
        reads all passed, or a persistent or empty one. Each round removes at least one
        holding, so this ends."""
        while plan.tier in ("memory", "peers"):
            self._prepare_receive(plan)   # a receiver allocates while the senders verify
            bad = [read for read in plan.reads(self.rank) if not self._check(*read)]
            everyone_bad = self._gather_bad(bad)
            if not any(everyone_bad):
                return plan
            for q, slots in enumerate(everyone_bad):
                if slots:
                    log.warning("rank %s: %s at step %s fail their checksum; planning again without them",
                                q, ", ".join(f"{kind} slot {slot}" for kind, slot in slots), plan.step)
            everyone = [h.without(set(slots)) for h, slots in zip(everyone, everyone_bad)]
            plan = plan_restore(everyone, persistent, layout=layout)
        return plan

    def _check(self, kind: str, slot: int) -> bool:
        """Whether slot ``slot`` of this rank's ``kind`` file still matches its record's crc32
        (computed once per restore)."""
        key = (kind, slot)
        if key not in self._checked:
            region = self._data if kind == "data" else self._parity
            entry = None if region is None else next((e for e in region.committed() if e.slot == slot), None)
            with self._timed(f"verify.{kind}"):
                self._checked[key] = entry is not None and region is not None and region.verify(entry)
            if not self._checked[key]:
                log.warning("%s slot %s of %s fails its checksum; not used", kind, slot, self._path(kind))
        return self._checked[key]

    def _gather_bad(self, bad: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
        """Every rank's corrupt slots, indexed by rank (collective; one small all-reduce when
        nothing is corrupt anywhere)."""
        if self._gloo is None:
            return [bad]
        if self._agree(not bad):
            return [[] for _ in range(self.world)]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, [list(read) for read in bad], group=self._gloo)
        try:
            return [[(str(kind), int(slot)) for kind, slot in slots] for slots in gathered]
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"malformed list of corrupt slots from a peer: {exc}") from None

    def _prepare_receive(self, plan: RestorePlan) -> None:
        """If this rank receives its payload (a copy or a rebuild) and has no data file, create
        it now, sized as a snapshot would (the allocation overlaps the senders' checks); the
        payload is then received straight into a slot of it (:meth:`_receive_into`)."""
        size = plan.receives(self.rank)
        if size is None or self._data is not None:
            return
        with self._timed("verify.allocate"):
            try:   # slot 1 is allocated in the background, while the payload arrives in slot 0
                self._data = SlotFile.open(self._path("data"), max(size, int(size * HEADROOM)),
                                           allocate_later=True)
            except RegionError as exc:
                log.warning("cannot create %s to receive into (%s); receiving into process memory",
                            self._path("data"), exc)

    def _settle_data_file(self) -> None:
        """Wait for the background allocation of a data file created to receive into; if it
        failed, drop the file, so the next snapshot creates it again (and reports the error)."""
        if self._data is None:
            return
        try:
            self._data.settle()
        except RegionError as exc:
            log.warning("%s; the next snapshot creates the file again", exc)
            self._data.close()
            self._data = None

    def _receive_into(self, plan: RestorePlan, size: int) -> tuple[np.ndarray, int | None]:
        """Where this rank receives ``size`` bytes of its payload: the slot of its data file
        that the next commit would use, when the file is large enough and the plan reads
        nothing from that slot (its record is wiped now); otherwise new process memory.
        Returns the buffer and the slot (None for process memory)."""
        region = self._data
        free = region is not None and ("data", region.next_slot()) not in plan.reads(self.rank)
        if region is not None and free and region.capacity >= size:
            try:
                slot = region.begin()
            except RegionError as exc:   # its background allocation failed
                log.warning("cannot receive into %s (%s); receiving into process memory", region.path, exc)
            else:
                return np.frombuffer(region.payload(slot), dtype=np.uint8, count=size), slot
        return np.empty(size, dtype=np.uint8), None

    def _keep(self, plan: RestorePlan, slot: int | None, length: int, crc: int) -> None:
        """Commit a received payload that passed its checksum in the data-file slot it was
        received into, so the restored state is in this node's memory too."""
        if slot is None or self._data is None or plan.step is None or plan.old_world is None:
            return
        with self._timed("transfer.commit"):
            self._data.commit(slot, length, {"step": plan.step, "rank": plan.want[self.rank],
                                             "world": plan.old_world, "sharded": plan.sharded}, crc=crc)

    def _execute(self, plan: RestorePlan) -> np.ndarray | memoryview | None:
        """Run the plan's transfers (every rank, same order); returns this rank's payload.

        A payload that arrives corrupt does not stop this rank from taking part in the
        transfers and group creations that follow (the others would wait for it); the failure
        is raised once they are all done, for the ranks to agree on the next tier."""
        failures: list[str] = []
        mine: Any = None
        if self.rank in plan.local:
            assert self._data is not None
            entry = next(e for e in self._data.committed() if e.slot == plan.local[self.rank])
            mine = self._data.payload(entry.slot)[:entry.record["length"]]
        for copy in plan.copies:
            if self.rank == copy.src:
                assert self._data is not None
                view = self._data.payload(copy.slot)[:copy.length]
                dist.send(torch.frombuffer(view, dtype=torch.uint8), dst=copy.dst, group=self._gloo)
            elif self.rank == copy.dst:
                buffer, slot = self._receive_into(plan, copy.length)
                dist.recv(torch.from_numpy(buffer), src=copy.src, group=self._gloo)
                with self._timed("transfer.checksum"):
                    crc = checksum(buffer)
                if crc != copy.checksum:
                    failures.append(f"copy of rank {copy.rank}'s snapshot from rank {copy.src} fails its checksum")
                    continue
                self._keep(plan, slot, copy.length, crc)
                mine = buffer
        for rebuild in plan.rebuilds:
            with self._timed("transfer.new_group"):
                pg = dist.new_group(ranks=rebuild.participants, backend="gloo")  # every rank, same order
            if self.rank in rebuild.participants:
                try:
                    with self._timed("transfer.rebuild"):
                        rebuilt = self._rebuild(plan, rebuild, pg)
                except SnapshotError as exc:   # its checksum, checked after every transfer
                    failures.append(str(exc))
                    continue
                if rebuilt is not None:
                    mine = rebuilt
        if failures:
            raise SnapshotError("; ".join(failures))
        return mine

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Add the block's duration to ``stats.restore_phases[phase]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            phases = self.stats.restore_phases
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - started

    def _rebuild(self, plan: RestorePlan, rb: Rebuild, pg: Any) -> np.ndarray | None:
        """Rebuild lost members' payloads at their destinations; returns this rank's, if it is
        one of them.

        Per stripe and parity row, the providers' contributions (their data block times the
        row's coefficient, or their parity block) are XORed into the row's syndrome on the
        stripe's solver by :func:`.exchange.xor_reduce` (point-to-point; each provider reduces a share).
        With one lost data block and row 0 (always so for m=1) the syndrome *is* the block, and
        it is reduced straight into the destination's buffer (a slot of its data file, see
        :meth:`_receive_into`); otherwise the solver solves the stripe and sends each block to
        its destination. The destination checks the whole payload's crc32 before using it."""
        k, m, block_len = len(rb.group), rb.m, rb.block_len
        roles = erasure.roles(k, m)
        lost = sorted(rb.dests)
        provides = sorted(j for j, q in rb.providers.items() if q == self.rank)
        data_views: dict[int, np.ndarray] = {}
        parity_views: dict[int, np.ndarray] = {}
        if provides:
            if self._data is None or self._parity is None:
                raise SnapshotError(f"rank {self.rank} provides members {provides} of group {rb.group} "
                                    "but has no snapshot files")
            for j in provides:
                data_views[j] = np.frombuffer(self._data.payload(rb.data_slots[j]), dtype=np.uint8,
                                              count=rb.lengths[j])
                parity_views[j] = np.frombuffer(self._parity.payload(rb.parity_slots[j]), dtype=np.uint8,
                                                count=m * block_len)
        receive: dict[int, tuple[np.ndarray, int | None]] = {
            j: self._receive_into(plan, (k - m) * block_len) for j in lost if rb.dests[j] == self.rank}
        missing = [j for j in range(k) if j not in rb.providers]
        for stripe in range(k):
            lost_here = [roles[stripe][j].index for j in missing if roles[stripe][j].kind == "data"]
            wanted = [j for j in lost if roles[stripe][j].kind == "data"]
            if not wanted:
                continue
            rows = [r for r in range(m) if (stripe + r) % k not in missing][:len(lost_here)]
            if len(rows) < len(lost_here):
                raise SnapshotError(f"stripe {stripe} of group {rb.group} lost more than its parity covers")
            solver = rb.dests[wanted[0]]
            direct = len(lost_here) == 1 and rows == [0]   # the row-0 syndrome is the lost block
            syndromes: dict[int, np.ndarray] = {}
            for row in rows:
                contributors = sorted({rb.providers[j] for j in rb.providers
                                       if roles[stripe][j].kind == "data" or roles[stripe][j].index == row})
                part = None
                if self.rank in contributors:
                    part = exchange.Part([exchange.contributed(roles[stripe][j], row, data_views[j],
                                                               parity_views[j], block_len)
                                  for j in provides
                                  if roles[stripe][j].kind == "data" or roles[stripe][j].index == row])
                out = None
                if self.rank == solver:
                    if direct:
                        block = roles[stripe][wanted[0]].block
                        out = receive[wanted[0]][0][block * block_len:(block + 1) * block_len]
                    else:
                        out = syndromes[row] = np.empty(block_len, dtype=np.uint8)
                with self._timed("transfer.reduce"):
                    exchange.xor_reduce(pg, part, contributors, solver, out, block_len)
            if direct:
                continue
            if self.rank == solver:
                with self._timed("transfer.solve"):
                    solved = erasure.solve_stripe(k, m, stripe, lost_here, syndromes)
            for j in wanted:
                block = roles[stripe][j].block
                piece = slice(block * block_len, (block + 1) * block_len)
                if self.rank == solver and rb.dests[j] == self.rank:
                    receive[j][0][piece] = solved[roles[stripe][j].index]
                elif self.rank == solver:
                    dist.send(torch.from_numpy(np.ascontiguousarray(solved[roles[stripe][j].index])),
                              dst=rb.dests[j], group=pg)
                elif rb.dests[j] == self.rank:
                    dist.recv(torch.from_numpy(receive[j][0][piece]), src=solver, group=pg)
        mine = None
        for j, (buffer, slot) in receive.items():
            rebuilt = buffer[:rb.lengths[j]]
            with self._timed("transfer.checksum"):
                crc = checksum(rebuilt)
            if crc != rb.checksums[j]:
                raise SnapshotError(f"rebuilt snapshot of member {j} of group {rb.group} fails its checksum")
            self._keep(plan, slot, rb.lengths[j], crc)
            mine = rebuilt
        return mine

    def _fetch(self, plan: RestorePlan) -> Any:
        """This rank's state tree under ``plan`` (its tensors may be views of snapshot memory,
        which :func:`.capture.apply` copies from), or None when the plan gives it no payload."""
        if plan.tier == "persistent":
            return self._load_persistent(plan)
        buffer = self._execute(plan)
        if buffer is None:
            return None
        with self._timed("transfer.decode"):
            return payload.read(buffer, copy=False)

    def _load_persistent(self, plan: RestorePlan) -> Any:
        """The tree of old rank ``want[rank]``'s persistent copy; for a ``reshard`` plan, put
        together with the shards of the old ranks that hold parts of this rank's (ZeRO: those
        holding its parameters; FSDP: those whose chunks overlap its rows). Each copy is checked
        against its checksum as it is read."""
        assert self._persister is not None and plan.step is not None
        base_rank = plan.want[self.rank]
        with self._timed("transfer.load"):
            base = payload.read(self._persister.load(plan.step, base_rank), copy=False)
        if plan.reshard is None:
            return base
        assert plan.old_world is not None   # the planner reshards only into the trainee's own layout
        if plan.reshard == "zero":
            live = zero_groups(self.trainee)
            assert live is not None
            with self._timed("transfer.layout"):
                layouts = {old: self._persister.zero_params(plan.step, old) for old in range(plan.old_world)}
            wanted = {index for group in live for index in group}
            sources: dict[int, Any] = {base_rank: base}
            with self._timed("transfer.load"):
                for old in reshard.sources_needed(live, layouts):
                    if old not in sources:   # one copy in memory at a time: keep only what this rank needs
                        tree = payload.read(self._persister.load(plan.step, old), copy=False)
                        sources[old] = reshard.keep_only(tree, wanted, f"old rank {old}'s snapshot")
                        del tree
            return reshard.merge(base, sources, live)
        rows = fsdp_rows(self.trainee)
        trees = {base_rank: base}
        with self._timed("transfer.load"):
            for old in reshard.fsdp_sources(rows, plan.old_world):
                if old not in trees:
                    trees[old] = payload.read(self._persister.load(plan.step, old), copy=False)
        return reshard.rows(base, trees, plan.old_world, rows)


def _unusable(step: int, copies: PersistentStep, world: int, layout: str | None) -> str:
    """Why the persistent copies of ``step`` cannot be loaded into a world of ``world`` ranks
    whose state is sharded in ``layout``."""
    missing = sorted(set(range(copies.world)) - copies.ranks)
    if missing:
        return f"step {step}: ranks {missing} of its {copies.world} have no complete copy"
    if copies.world != world and copies.sharded and copies.layout is None:
        return (f"step {step}: sharded over {copies.world} ranks in a layout that does not reshard "
                "(or written before copies recorded their layout)")
    if copies.world != world and copies.sharded and copies.layout != layout:
        return f"step {step}: {copies.layout} shards over {copies.world} ranks; this trainee's state is " + (
            f"{layout} shards" if layout else "not sharded so")
    return f"step {step}: failed its checks"
