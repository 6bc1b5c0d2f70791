"""Streaming access to .safetensors files without loading them: parse the header, read one tensor (or one
leading-dimension slice of it) with pread, and write a file tensor by tensor.

Conversion works on raw bytes, so bf16 needs no numpy support and peak memory is one tensor slice, not a file.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import CheckpointError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_HEADER_LIMIT = 100 << 20  # the safetensors spec caps the header at 100 MB


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one .safetensors file; raises CheckpointError naming the file when corrupt."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_LIMIT:
                raise CheckpointError(f"{path}: header length {n} is implausible; the file is corrupt")
            raw = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint file: {e.strerror}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {e}") from e
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = meta["dtype"], tuple(int(x) for x in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from exc
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if e - b != int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype] or base + e > size:
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype}{list(shape)}) does not fit its byte range "
                                  f"[{b}, {e}) in a file of {size} bytes; the file is truncated or corrupt")
        out[name] = TensorInfo(name, dtype, shape, path, base + b, base + e)
    return out


def read_tensor_bytes(info: TensorInfo, index: int | None = None, rows: tuple[int, int] | None = None,
                      out: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes of a tensor, or of `tensor[index]`, or of `tensor[index, rows[0]:rows[1]]`, as a uint8 array.

    Slices along the leading dimensions of a C-contiguous tensor are contiguous byte ranges, so one pread suffices.
    """
    start, length = info.start, info.nbytes
    item = DTYPE_SIZES[info.dtype]
    if index is not None:
        per = length // info.shape[0]
        start, length = start + index * per, per
        if rows is not None:
            row = per // info.shape[1]
            start, length = start + rows[0] * row, (rows[1] - rows[0]) * row
    assert length % item == 0, f"{info.name}: slice is not a whole number of elements"
    buf = np.empty(length, np.uint8) if out is None else out[:length]
    mv, got = memoryview(buf), 0
    try:
        with open(info.file, "rb", buffering=0) as f:
            while got < length:  # one pread returns at most ~2 GiB on Linux, and may return short counts
                n = os.preadv(f.fileno(), [mv[got:]], start + got)
                if n == 0:
                    break
                got += n
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read {info.name}: {e.strerror or e}") from e
    if got != length:
        raise CheckpointError(f"{info.file}: short read of {info.name} ({got} of {length} bytes)")
    return buf


class SafetensorsWriter:
    """Writes a .safetensors file tensor by tensor: the header is fixed up front from (name, dtype, shape), then
    each tensor's bytes are appended in order, so no more than one tensor is ever held."""

    def __init__(self, path: str, specs: list[tuple[str, str, tuple[int, ...]]]):
        header, off = {}, 0
        for name, dtype, shape in specs:
            n = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
        self.data_start = 8 + len(raw)
        self.offsets = {k: (self.data_start + v["data_offsets"][0], self.data_start + v["data_offsets"][1])
                        for k, v in header.items()}
        self.size = self.data_start + off
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._order = [name for name, _, _ in specs]
        self._next, self._done = 0, 0  # index of the tensor being written, bytes of it written so far

    def write_part(self, name: str, data) -> None:
        """Append the next piece of tensor `name`; tensors come in header order, each in one or more pieces."""
        while self._next < len(self._order) and self.offsets[self._order[self._next]][0] == \
                self.offsets[self._order[self._next]][1]:
            self._next += 1  # zero-size tensors have nothing to write
        assert self._next < len(self._order) and self._order[self._next] == name, \
            f"tensors must be written in header order: expected {self._order[self._next:self._next + 1]}, got {name!r}"
        b, e = self.offsets[name]
        mv = memoryview(data).cast("B")
        assert self._done + len(mv) <= e - b, f"{name}: more bytes given than the header's {e - b}"
        self._f.write(mv)
        self._done += len(mv)
        if self._done == e - b:
            self._next, self._done = self._next + 1, 0

    def write(self, name: str, data) -> None:
        self.write_part(name, data)
        assert self._done == 0, f"{name}: fewer bytes given than the header says"

    def close(self) -> None:
        rest = [n for n in self._order[self._next:] if self.offsets[n][0] != self.offsets[n][1]]
        assert not rest, f"SafetensorsWriter closed before every tensor was written: {rest[:3]}"
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()
