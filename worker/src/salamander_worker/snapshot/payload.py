"""A training state as one flat byte payload, and back.

A *state* is a tree of dicts, lists and tuples whose leaves are tensors or plain picklable
values (ints, floats, strings, ``None``, numpy RNG tuples...). :func:`plan` walks it once and
fixes where every tensor's bytes go; :func:`write` copies the tensors into a buffer at those
offsets (the only work done at every snapshot); :func:`read` turns a payload back into a tree
whose tensors are copies, never views of the buffer.

Payload layout (little-endian)::

    [u64 skeleton length][skeleton: pickle of the tree, tensors replaced by TensorRef]
    [zero padding to 64 bytes][tensor bytes, each at a 64-byte aligned offset]

Invariants: a payload is self-describing (no outside schema is needed to read it); every
offset and length in the skeleton is checked against the payload's length before any tensor
is built, and anything malformed raises :class:`PayloadError`. Callers check the payload's
checksum before :func:`read`, so the pickle is only ever read from bytes this module wrote.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ALIGN = 64
_LEN = struct.Struct("<Q")


class PayloadError(ValueError):
    """A payload or a state cannot be laid out or read back; the message says what is wrong."""


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes sit in the payload, and how to rebuild it."""

    offset: int
    nbytes: int
    dtype: str       # str(torch.dtype), e.g. "torch.float32"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """The result of :func:`plan`: the payload's size and each tensor leaf's place, in the order
    :func:`leaves` yields them. ``signature`` changes whenever any place would change."""

    skeleton: bytes
    refs: tuple[TensorRef, ...]
    length: int

    @property
    def signature(self) -> tuple[tuple[int, str, tuple[int, ...]], ...]:
        return tuple((r.nbytes, r.dtype, r.shape) for r in self.refs)


def signature(tree: Any) -> tuple[tuple[int, str, tuple[int, ...]], ...]:
    """The :attr:`Layout.signature` that :func:`plan` would give ``tree``, without pickling
    anything: a snapshot checks it every time to reuse its layout."""
    tensors = [_local(t) for t in leaves(tree)]
    return tuple((t.numel() * t.element_size(), str(t.dtype), tuple(t.shape)) for t in tensors)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _map(tree: Any, on_tensor: Callable[[torch.Tensor], Any]) -> Any:
    """``tree`` with every tensor leaf replaced by ``on_tensor(leaf)``, containers rebuilt."""
    if isinstance(tree, torch.Tensor):
        return on_tensor(tree)
    if isinstance(tree, dict):
        items = [(key, _map(value, on_tensor)) for key, value in tree.items()]
        return OrderedDict(items) if isinstance(tree, OrderedDict) else dict(items)
    if isinstance(tree, list):
        return [_map(value, on_tensor) for value in tree]
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(_map(value, on_tensor) for value in tree)
    return tree


def leaves(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``tree`` in a fixed depth-first order."""
    found: list[torch.Tensor] = []
    _map(tree, lambda t: found.append(t))
    return found


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes this rank holds: a DTensor's local shard, else the tensor itself."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def plan(tree: Any) -> Layout:
    """Lay ``tree`` out: the skeleton (pickled now, with the plain values as they are) and an
    aligned place for every tensor. Raises :class:`PayloadError` for a value pickle refuses."""
    tensors = [_local(t) for t in leaves(tree)]
    sizes = [t.numel() * t.element_size() for t in tensors]
    refs: list[TensorRef] = []

    def placeholder(_: torch.Tensor) -> TensorRef:
        tensor = tensors[len(refs)]
        ref = TensorRef(0, sizes[len(refs)], str(tensor.dtype), tuple(tensor.shape))
        refs.append(ref)
        return ref

    skeleton_tree = _map(tree, placeholder)
    # Offsets depend on the skeleton's length, which depends on the offsets' digits: fix the
    # offsets against a generous skeleton bound, then pickle for real.
    try:
        probe = pickle.dumps(skeleton_tree, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise PayloadError(f"the training state holds a value that cannot be pickled: {exc}") from None
    start = _align(_LEN.size + len(probe) + 64 + 16 * len(refs))
    placed: list[TensorRef] = []
    offset = start
    for ref in refs:
        placed.append(TensorRef(offset, ref.nbytes, ref.dtype, ref.shape))
        offset = _align(offset + ref.nbytes)
    it = iter(placed)
    skeleton = pickle.dumps(_map(tree, lambda _t: next(it)), protocol=pickle.HIGHEST_PROTOCOL)
    if _LEN.size + len(skeleton) > start:
        raise PayloadError("internal: the skeleton outgrew its reserved room")
    return Layout(skeleton=skeleton, refs=tuple(placed), length=offset)


def write(tree: Any, layout: Layout, buffer: memoryview) -> None:
    """Copy ``tree`` (with the same structure and tensor shapes as when ``layout`` was planned)
    into ``buffer`` (at least ``layout.length`` bytes)."""
    copy_tensors(write_skeleton(tree, layout, buffer), buffer)


Pending = list[tuple[torch.Tensor, TensorRef]]   # in increasing payload offset, as planned


def write_skeleton(tree: Any, layout: Layout, buffer: memoryview) -> Pending:
    """Write ``tree``'s skeleton (its plain values change every step: step, RNG...) into
    ``buffer`` and return the tensor copies still to do, for :func:`copy_tensors` (which may
    run on another thread, as long as the tensors do not change meanwhile)."""
    tensors = [_local(t) for t in leaves(tree)]
    if len(tensors) != len(layout.refs):
        raise PayloadError(f"the state has {len(tensors)} tensors, the layout {len(layout.refs)}")
    it = iter(layout.refs)
    skeleton = pickle.dumps(_map(tree, lambda _t: next(it)), protocol=pickle.HIGHEST_PROTOCOL)
    first = layout.refs[0].offset if layout.refs else layout.length
    if _LEN.size + len(skeleton) > first or len(buffer) < layout.length:
        raise PayloadError("the state's plain values outgrew the layout; plan it again")
    _LEN.pack_into(buffer, 0, len(skeleton))
    buffer[_LEN.size:_LEN.size + len(skeleton)] = skeleton
    return [(tensor.detach(), ref) for tensor, ref in zip(tensors, layout.refs) if ref.nbytes]


#: A tensor is checksummed and copied in pieces of this size: the crc reads a piece from the
#: source, and the copy then reads it again from cache. At this size glibc copies with streaming
#: stores when the agent has set its threshold (:mod:`salamander_worker.memcopy`).
CHUNK = 1 << 20


def copy_tensors(pending: Pending, buffer: memoryview, length: int | None = None, *,
                 landed: Callable[[int], None] | None = None, crc_thread: bool = True) -> int | None:
    """Copy each pending tensor's bytes to its place in ``buffer`` (memcpy in ``CHUNK`` pieces,
    GIL released; device tensors come to the host here). With ``length`` (the payload's), also
    return the crc of ``buffer[:length]``, taken from the source piece by piece just before each
    piece's copy, so the checksum costs no extra pass over memory: the copy reads the piece from
    cache, and its destination need never be read back (streaming stores leave it out of cache).
    With ``crc_thread``, more than one core and only host tensors, the crc runs on a thread of
    its own a few pieces ahead of the copy (:mod:`.running_crc`). Invariant: no pending tensor changes while
    this runs (the caller copies anything the forward pass might change in the foreground,
    before training goes on), so the source's bytes and the copy's are the same bytes.
    ``landed``, when given, is called after each piece with an offset below which the pending
    tensors' bytes are all copied (growing; the bytes that are not pending must already be in
    place)."""
    from salamander_worker.snapshot import pool

    target = np.frombuffer(buffer, dtype=np.uint8)
    ordered = sorted(pending, key=lambda item: item[1].offset)
    if crc_thread and length is not None and pool.threads() > 1 and all(
            t.device.type == "cpu" and t.is_contiguous() for t, _ in ordered):
        return _copy_with_crc_ahead(ordered, target, length, landed)
    return _copy(ordered, target, length, landed)


def _parts(ordered: Pending, target: np.ndarray, length: int | None) -> Iterator[tuple[np.ndarray, int | None]]:
    """The payload's bytes in order, as ``(part, at)``: a ``CHUNK``-sized piece of a pending
    tensor's source and the offset its copy goes to, or (with ``length``) bytes already in
    place in ``target`` (the skeleton, gaps, the tail) with ``at`` None. Lazy: a device tensor
    comes to the host only when its first piece is reached."""
    done = 0
    for tensor, ref in ordered:
        if not (tensor.device.type == "cpu" and tensor.is_contiguous()):
            tensor = tensor.cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        if length is not None and ref.offset > done:
            yield target[done:ref.offset], None
        for start in range(0, ref.nbytes, CHUNK):
            yield raw[start:start + CHUNK], ref.offset + start
        done = ref.offset + ref.nbytes
    if length is not None and length > done:
        yield target[done:length], None


def _copy(ordered: Pending, target: np.ndarray, length: int | None,
          landed: Callable[[int], None] | None) -> int | None:
    """:func:`copy_tensors` on the calling thread alone."""
    from salamander_worker.snapshot.region import checksum_update  # region imports nothing of ours

    crc = 0
    for part, at in _parts(ordered, target, length):
        if length is not None:
            crc = checksum_update(part, crc)
        if at is not None:
            np.copyto(target[at:at + len(part)], part)
            if landed is not None:
                landed(at + len(part))
    return crc if length is not None else None


def _copy_with_crc_ahead(ordered: Pending, target: np.ndarray, length: int,
                         landed: Callable[[int], None] | None) -> int:
    """:func:`copy_tensors` with the crc on a :class:`.running_crc.RunningChecksum` over the
    payload's parts (:func:`_parts`); the copy of each piece waits until the crc has read it."""
    from salamander_worker.snapshot.running_crc import RunningChecksum

    parts = list(_parts(ordered, target, length))
    crc = RunningChecksum([part for part, _ in parts])
    try:
        for index, (piece, at) in enumerate(parts):
            if at is None:
                continue
            crc.consumed(index)     # and the parts before it that are not copied (the gaps)
            crc.wait_for(index)
            np.copyto(target[at:at + len(piece)], piece)
            crc.consumed(index + 1)
            if landed is not None:
                landed(at + len(piece))
    except BaseException:
        crc.close()
        raise
    return crc.result()


def read(payload: memoryview | bytes | np.ndarray, *, copy: bool = True) -> Any:
    """The tree a payload holds, with tensors as fresh CPU copies, or with ``copy=False`` as
    views of the payload (valid only while it is neither changed nor unmapped; the restore path
    copies them straight into the live tensors). Raises :class:`PayloadError` if the payload is
    too short, its skeleton does not unpickle, or a tensor lies outside it."""
    view = memoryview(payload).cast("B") if not isinstance(payload, np.ndarray) else memoryview(payload)
    if len(view) < _LEN.size:
        raise PayloadError(f"payload of {len(view)} bytes is too short for its header")
    (size,) = _LEN.unpack_from(view, 0)
    if size > len(view) - _LEN.size:
        raise PayloadError(f"payload says its skeleton has {size} bytes; only {len(view) - _LEN.size} follow")
    try:
        skeleton = _Unpickler(io.BytesIO(view[_LEN.size:_LEN.size + size])).load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a malformed payload
        raise PayloadError(f"payload skeleton does not unpickle: {type(exc).__name__}: {exc}") from None

    def build(ref: Any) -> Any:
        if isinstance(ref, TensorRef):
            return _tensor(view, ref, copy)
        if isinstance(ref, dict):
            items = [(key, build(value)) for key, value in ref.items()]
            return OrderedDict(items) if isinstance(ref, OrderedDict) else dict(items)
        if isinstance(ref, list):
            return [build(value) for value in ref]
        if isinstance(ref, tuple) and not hasattr(ref, "_fields"):
            return tuple(build(value) for value in ref)
        return ref

    try:
        return build(skeleton)
    except RecursionError:  # a skeleton nested too deep, or one that contains itself
        raise PayloadError("payload skeleton is nested too deeply or refers to itself") from None


_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                               torch.complex64, torch.complex128)}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor(view: memoryview, ref: TensorRef, copy: bool = True) -> torch.Tensor:
    # The skeleton's TensorRefs come from a pickle: check that every field is there and of its
    # type before using it (a pickle can set any attributes, or none, on a TensorRef).
    fields = {name: getattr(ref, name, None) for name in ("offset", "nbytes", "dtype", "shape")}
    dtype = _DTYPES.get(fields["dtype"]) if isinstance(fields["dtype"], str) else None
    if dtype is None:
        raise PayloadError(f"payload tensor has unsupported dtype {fields['dtype']!r}")
    if not (_is_count(fields["offset"]) and _is_count(fields["nbytes"]) and isinstance(fields["shape"], tuple)
            and all(_is_count(dim) for dim in fields["shape"])):
        raise PayloadError(f"payload tensor reference {fields} is malformed")
    count = 1
    for dim in ref.shape:
        count *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    if ref.nbytes != count * itemsize or ref.offset < 0 or ref.offset + ref.nbytes > len(view):
        raise PayloadError(f"payload tensor at {ref.offset} ({ref.nbytes} bytes, {ref.shape}) lies outside "
                           f"the {len(view)}-byte payload or does not match its shape")
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=dtype)
    tensor = torch.frombuffer(view, dtype=dtype, count=count, offset=ref.offset).reshape(ref.shape)
    return tensor.clone() if copy else tensor


class _Unpickler(pickle.Unpickler):
    """Unpickles only this module's records and the plain types a training state holds."""

    _ALLOWED = {
        ("salamander_worker.snapshot.payload", "TensorRef"),
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
        ("builtins", "complex"), ("builtins", "slice"), ("builtins", "range"),
        ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"), ("torch", "Size"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
