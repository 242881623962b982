"""A 1-D uint8 tensor saved by torch.distributed.checkpoint, read straight into memory.

``dcp.load`` of a tensor copies its bytes three times: it reads the item's bytes, ``torch.load``s
them, and copies the result into the destination. For a persistent snapshot (hundreds of MB
per rank) that triples the memory and halves the speed of a restore. DCP's ``FileSystemWriter``
stores each tensor as a ``torch.save`` blob, a zip archive whose entries are stored
uncompressed, at an offset of a ``.distcp`` file. :func:`read_uint8` finds the blob through the
checkpoint's metadata, the storage entry through the archive's central directory, and reads its
bytes with one read into a new array.

Invariant: it returns the tensor's bytes or None, and never raises: for anything it does not
recognise (another serialization, transforms, compression, a truncated file) it returns None and
the caller falls back to ``dcp.load``. It checks layout, not content: the caller checks the
bytes against their checksum.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

_LOCAL_HEADER = struct.Struct("<4s22xHH")   # signature, (fields skipped), name length, extra length
_CHUNK = 8 << 20                             # bytes per read: steady readahead, no giant syscalls


def read_uint8(path: Path, fqn: str) -> np.ndarray | None:
    """The bytes of the 1-D uint8 tensor ``fqn`` of the DCP checkpoint at ``path``, or None."""
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
        tensor = metadata.state_dict_metadata.get(fqn)
        props = getattr(tensor, "properties", None)
        if tensor is None or getattr(props, "dtype", None) != torch.uint8 or len(tensor.size) != 1:
            return None
        nbytes = int(tensor.size[0])
        infos = [info for index, info in metadata.storage_data.items() if index.fqn == fqn]
        if len(infos) != 1 or getattr(infos[0], "transform_descriptors", None):
            return None
        info = infos[0]
        with open(path / info.relative_path, "rb", buffering=0) as file:
            archive = zipfile.ZipFile(io.BufferedReader(_Segment(file, info.offset, info.length)))
            storages = [e for e in archive.infolist() if "/data/" in e.filename and not e.filename.endswith(".pkl")
                        and "/.data/" not in e.filename]
            if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED \
                    or storages[0].file_size != nbytes:
                return None
            file.seek(info.offset + storages[0].header_offset)
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
            start = storages[0].header_offset + _LOCAL_HEADER.size + name_len + extra_len
            if signature != b"PK\x03\x04" or start + nbytes > info.length:
                return None
            out = torch.empty(nbytes, dtype=torch.uint8).numpy()
            view, done = memoryview(out), 0
            file.seek(info.offset + start)
            while done < nbytes:
                got = file.readinto(view[done:done + _CHUNK])
                if not got:
                    return None
                done += got
            return out
    except Exception:  # noqa: BLE001 - anything unrecognised: the caller uses dcp.load
        return None


class _Segment(io.RawIOBase):
    """Bytes ``[start, start + length)`` of ``file`` as a file of their own (for ``zipfile``)."""

    def __init__(self, file: BinaryIO, start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:   # type: ignore[override]
        wanted = max(0, min(len(buffer), self._length - self._pos))
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:wanted]) or 0
        self._pos += got
        return got
