"""The one async interface every tier adapter implements, documented in full.

Keys are relative to the adapter's root (a directory, or a bucket prefix): "manifest.json", "experts/L000/E001.bin".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ObjectInfo:
    size: int                                             # bytes as stored
    metadata: dict[str, str] = field(default_factory=dict)  # written with the object (S3 user metadata, xattrs)


@runtime_checkable
class BlobAdapter(Protocol):
    """Byte access to one tier location.

    - `read_into(key, out, offset)` fills the caller-owned buffer `out` (any writable contiguous uint8 buffer;
      page-aligned ones take the fast path) with bytes [offset, offset + len(out)) of the object and returns the
      count. Raises BlobNotFound when the object is absent, TierAccessError when the tier cannot serve it
      (unreadable path, missing bucket, access denied, short/truncated data after retries).
    - `read(key, offset, length)` is read_into on a fresh page-aligned buffer; length None means to the end.
    - `stat(key)` returns ObjectInfo or None when absent; `exists(key)` is `stat(key) is not None`.
    - `write(key, data, metadata)` stores bytes atomically: readers see the old object or the whole new one,
      never a prefix. `write_file` does the same from a local file (large dense files, multipart on S3).
    - `delete(key)` removes the object; absent objects are not an error.
    - `close()` releases pools and connections.
    Adapters never verify checksums: `ExpertStore` does, against the manifest, before bytes reach any cache.
    """

    tier: str
    uri: str

    async def read_into(self, key: str, out, offset: int = 0) -> int: ...
    async def read(self, key: str, offset: int = 0, length: int | None = None) -> np.ndarray: ...
    async def stat(self, key: str) -> ObjectInfo | None: ...
    async def exists(self, key: str) -> bool: ...
    async def write(self, key: str, data, metadata: dict[str, str] | None = None) -> None: ...
    async def write_file(self, key: str, path: str, metadata: dict[str, str] | None = None) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def close(self) -> None: ...


async def read_fresh(adapter, key: str, offset: int, length: int | None, where: str) -> np.ndarray:
    """`read` for any adapter: size the range (to the end when length is None), then read_into a fresh
    page-aligned buffer. `where` names the object in errors."""
    from .buffers import aligned_empty
    from .errors import BlobNotFound, TierAccessError
    if length is None:
        info = await adapter.stat(key)
        if info is None:
            raise BlobNotFound(f"tier {adapter.tier!r}: {where} does not exist")
        length = info.size - offset
        if length < 0:
            raise TierAccessError(f"tier {adapter.tier!r}: {where} holds {info.size} bytes; offset {offset} lies "
                                  f"beyond its end")
    buf = aligned_empty(length)
    await adapter.read_into(key, buf, offset)
    return buf


def as_u8(out) -> memoryview:
    """A writable flat byte view of a caller buffer (numpy array, bytearray, memoryview, CPU torch tensor's numpy)."""
    mv = memoryview(out)
    if mv.readonly:
        raise ValueError("read_into needs a writable buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
