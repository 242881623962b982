"""Copies of GPU tensors into a snapshot slot by DMA, overlapping the training's compute.

On a GPU node the blocking part of a snapshot is not a CPU memcpy: the copy engines move the
bytes device-to-host while the streaming multiprocessors run the next forward and backward.
For that the host side must be page-locked, so the shared-memory slot file is registered with
CUDA once (``cudaHostRegister``) and the copies go straight into it, with no staging buffer.

How a snapshot's device tensors are copied (:meth:`DeviceCopier.start`):

* tensors that the forward pass may change in place (buffers such as batch-norm statistics:
  anything that is neither a parameter nor optimizer state) are copied on the *current*
  stream, so they are read before the next forward's kernels run;
* then a dedicated copy stream waits for the current stream (everything queued so far,
  ``optimizer.step()`` included) and copies the parameters and optimizer state;
* :meth:`fence`, called before the next ``optimizer.step()``, makes the current stream wait
  for the copy on the GPU: the host thread never blocks, and the step's kernels run only once
  the bytes they overwrite are out;
* :meth:`landed` yields, as the copy engines progress, payload offsets below which every byte
  is in host memory, so the snapshot thread checksums each stretch while later ones are still
  in flight; :meth:`wait` blocks until every byte is there.

Invariants: a source tensor's memory is not reused by the caching allocator before the copy
that reads it has run (``record_stream``); at most one copy is in flight per copier; a region
is registered at most once and unregistered before it is unmapped. Without CUDA, or when the
memory cannot be registered, :meth:`DeviceCopier.ready` is false and the caller copies as on
a CPU node.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from salamander_worker.snapshot.payload import Pending

log = logging.getLogger(__name__)

MARK_EVERY = 64 << 20    # bytes of copies between two progress marks


class DeviceCopyError(RuntimeError):
    """Host memory cannot be registered with CUDA, or a device copy failed; the message says which."""


def address(view: memoryview) -> int:
    """The address of the first byte of a writable buffer."""
    return int(np.frombuffer(view, dtype=np.uint8, count=0 if len(view) == 0 else 1).ctypes.data)


class PinnedRegions:
    """Host ranges registered with CUDA (page-locked for DMA), keyed by start address."""

    def __init__(self) -> None:
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()

    def pin(self, view: memoryview) -> bool:
        """Register ``view`` with CUDA unless it is already; returns whether it is registered.
        A failure (no CUDA, memory locked out by ulimits, a driver that refuses shared memory)
        is logged once per range and leaves the memory pageable."""
        if not torch.cuda.is_available() or len(view) == 0:
            return False
        start, size = address(view), len(view)
        with self._lock:
            if self._sizes.get(start) == size:
                return True
            if start in self._sizes:
                self._unpin(start)
            code = int(torch.cuda.cudart().cudaHostRegister(start, size, 0))
            if code != 0:
                log.warning("cannot page-lock %d bytes of snapshot memory for DMA (cudaError %d); "
                            "device tensors are copied through pageable memory", size, code)
                self._sizes[start] = -1   # remembered, so the warning is not repeated
                return False
            self._sizes[start] = size
            return True

    def unpin(self, view: memoryview) -> None:
        """Unregister ``view`` if it was registered (before its memory is unmapped)."""
        if len(view) == 0:
            return
        with self._lock:
            self._unpin(address(view))

    def _unpin(self, start: int) -> None:
        size = self._sizes.pop(start, None)
        if size is not None and size > 0:
            code = int(torch.cuda.cudart().cudaHostUnregister(start))
            if code != 0:
                log.warning("cudaHostUnregister of snapshot memory failed (cudaError %d)", code)


PINNED = PinnedRegions()


class DeviceCopier:
    """Issues one snapshot's device-to-host copies and tracks their completion."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._begun: torch.cuda.Event | None = None
        self._done: torch.cuda.Event | None = None
        self._marks: list[tuple[torch.cuda.Event, int]] = []
        self._cached: dict[int, _CopyPlan] = {}   # by the slot's address
        self._fenced = True

    @staticmethod
    def split(pending: Pending) -> tuple[Pending, Pending]:
        """(device tensors, host tensors) of ``pending``, each in payload order."""
        device = [(t, ref) for t, ref in pending if t.device.type == "cuda"]
        host = [(t, ref) for t, ref in pending if t.device.type != "cuda"]
        return device, host

    def start(self, pending: Pending, buffer: memoryview, stable: set[int]) -> None:
        """Queue the copies of ``pending`` (device tensors) into ``buffer`` at their payload
        offsets. ``stable`` holds the ``data_ptr()`` of tensors that change only in
        ``optimizer.step()`` (parameters, optimizer state); the others are copied in stream
        order before anything queued later can change them. Returns at once."""
        if self._done is not None and not self._done.query():
            raise DeviceCopyError("a snapshot's device copy is still in flight")
        current = torch.cuda.current_stream(self.device)
        plan = self._plan(pending, buffer, stable)
        for source, target, _ in plan.early:
            target.copy_(source, non_blocking=True)
        self.stream.wait_stream(current)
        begun, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begun.record(self.stream)
        marks: list[tuple[torch.cuda.Event, int]] = []
        with torch.cuda.stream(self.stream):
            for source, target, mark_at in plan.late:
                target.copy_(source, non_blocking=True)
                source.record_stream(self.stream)
                if mark_at:
                    mark = torch.cuda.Event()
                    mark.record(self.stream)
                    marks.append((mark, mark_at))
        done.record(self.stream)
        self._begun, self._done, self._marks, self._fenced = begun, done, marks, False

    def _plan(self, pending: Pending, buffer: memoryview, stable: set[int]) -> _CopyPlan:
        """The copies to queue, reused while the tensors, their places and the buffer stay the
        same (the usual case: every snapshot of a run copies the same parameters and moments),
        so a snapshot costs one ``copy_`` call per tensor and nothing else in Python."""
        key = (address(buffer), len(buffer), tuple((t.data_ptr(), t.is_contiguous(), t.data_ptr() in stable,
                                                    ref.offset, ref.nbytes) for t, ref in pending))
        cached = self._cached.get(key[0])
        if cached is not None and cached.key == key:
            return cached
        host = torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else torch.empty(0, dtype=torch.uint8)
        early: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        late: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        since_mark = 0
        for tensor, ref in pending:
            source = _bytes(tensor, ref.nbytes)
            target = host[ref.offset:ref.offset + ref.nbytes]
            if tensor.data_ptr() not in stable:
                early.append((source, target, 0))
                continue
            # Pending copies come in payload order, so once a mark completes every byte below
            # its offset has landed: earlier tensors were copied before it on the copy stream,
            # the early ones before that stream started, the host-written bytes before any.
            since_mark += ref.nbytes
            mark_at = ref.offset + ref.nbytes if since_mark >= MARK_EVERY else 0
            since_mark = 0 if mark_at else since_mark
            late.append((source, target, mark_at))
        plan = _CopyPlan(key, early, late)
        # A non-contiguous tensor's bytes are a fresh copy, valid for this snapshot only.
        if all(t.is_contiguous() for t, _ in pending):
            if len(self._cached) >= 4:   # one plan per slot: more means the files were reopened
                self._cached.clear()
            self._cached[key[0]] = plan
        return plan

    def fence(self) -> None:
        """Make the current stream wait (on the GPU) for the copy in flight, once."""
        if self._done is not None and not self._fenced:
            torch.cuda.current_stream(self.device).wait_event(self._done)
            self._fenced = True

    def landed(self) -> Iterator[int]:
        """Offsets into the payload, increasing: when one is yielded, every byte below it has
        reached host memory. Blocks (GIL released) until each does. Ends at the last mark; call
        :meth:`wait` for the rest."""
        reached = 0
        for mark, offset in self._marks:
            mark.synchronize()
            if offset > reached:
                reached = offset
                yield offset

    def wait(self) -> None:
        """Block until the copy in flight has reached host memory (releases the GIL)."""
        if self._done is not None:
            self._done.synchronize()

    def copy_seconds(self) -> float | None:
        """How long the copy stream took for the last copy (call after :meth:`wait`)."""
        if self._begun is None or self._done is None:
            return None
        return self._begun.elapsed_time(self._done) / 1e3

    @property
    def in_flight(self) -> bool:
        return self._done is not None and not self._done.query()


@dataclass(frozen=True)
class _CopyPlan:
    """One snapshot's copies as (device bytes, host bytes, progress mark offset or 0)."""

    key: tuple[Any, ...]
    early: list[tuple[torch.Tensor, torch.Tensor, int]]
    late: list[tuple[torch.Tensor, torch.Tensor, int]]


def _bytes(tensor: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``tensor``'s bytes as a flat uint8 view (a contiguous copy if it is not contiguous)."""
    source = tensor.detach()
    if not source.is_contiguous():
        source = source.contiguous()
    raw = source.reshape(-1).view(torch.uint8)
    if raw.numel() != nbytes:
        raise DeviceCopyError(f"device tensor of {raw.numel()} bytes does not fit its {nbytes}-byte place")
    return raw


UPLOAD_PIECE = 16 << 20    # bytes per staged host-to-device piece
UPLOAD_THREADS = 8


def upload(copies: list[tuple[torch.Tensor, torch.Tensor]], *, piece: int | None = None,
           threads: int | None = None) -> None:
    """``dst.copy_(src)`` for every ``(dst, src)`` pair, where ``src`` is on the host (typically
    a view of pageable snapshot memory) and ``dst`` anywhere; returns when every byte is in place.

    Device destinations are filled at memory speed without page-locking the snapshot: each of
    ``threads`` workers copies its pieces (every ``threads``-th ``piece`` of the bytes) into
    one of its two page-locked staging buffers and queues the DMA from it on its own stream,
    so host copies, on all workers at once, overlap the copy engines. A worker reuses a staging buffer only after the DMA out of it has finished. Host destinations, sources that
    are already page-locked, dtypes that differ, and GPUs other than the first one met are
    copied directly."""
    piece = UPLOAD_PIECE if piece is None else piece
    threads = UPLOAD_THREADS if threads is None else threads
    direct: list[tuple[torch.Tensor, torch.Tensor]] = []
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    staged = next((dst.device for dst, _ in copies if dst.device.type == "cuda"), None)
    for dst, src in copies:
        if (dst.device != staged or src.device.type != "cpu" or src.is_pinned() or dst.dtype != src.dtype
                or not dst.is_contiguous() or not src.is_contiguous() or dst.numel() != src.numel()):
            direct.append((dst, src))
            continue
        flat_dst, flat_src = dst.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
        for start in range(0, flat_src.numel(), piece):
            pieces.append((flat_dst[start:start + piece], flat_src[start:start + piece]))
    with torch.no_grad():
        for dst, src in direct:
            dst.copy_(src)
        if not pieces:
            return
        workers = max(1, min(threads, len(pieces)))
        device = pieces[0][0].device
        size = min(piece, max(src.numel() for _, src in pieces))

        def work(index: int) -> None:
            stream = torch.cuda.Stream(device=device)
            staging = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            freed = [torch.cuda.Event(), torch.cuda.Event()]
            with torch.no_grad():   # grad mode is per thread
                for n, (dst, src) in enumerate(pieces[index::workers]):
                    buffer = n % 2
                    if n >= 2:
                        freed[buffer].synchronize()
                    stage = staging[buffer][:src.numel()]
                    np.copyto(stage.numpy(), src.numpy())
                    with torch.cuda.stream(stream):
                        dst.copy_(stage, non_blocking=True)
                        freed[buffer].record(stream)
            stream.synchronize()

        if workers == 1:
            work(0)
            return
        # Its own threads, not the bulk pool (:mod:`.pool`): on the H100 the upload measured
        # 33.6 GB/s on these and 25.0 GB/s (one sample) on the pool; not understood yet.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="salamander-upload") as executor:
            for future in [executor.submit(work, index) for index in range(workers)]:
                future.result()


def stable_pointers(model: torch.nn.Module, optimizer: Any) -> set[int]:
    """``data_ptr()`` of every parameter and optimizer-state tensor: the tensors that change
    only inside ``optimizer.step()`` (their local shards, for DTensors)."""
    found: set[int] = set()
    for param in model.parameters():
        found.add(getattr(param, "_local_tensor", param).data_ptr())
    for opt in (optimizer, getattr(optimizer, "optim", None)):
        for state in getattr(opt, "state", {}).values() if opt is not None else ():
            for value in state.values() if isinstance(state, dict) else ():
                if isinstance(value, torch.Tensor):
                    found.add(getattr(value, "_local_tensor", value).data_ptr())
    return found
