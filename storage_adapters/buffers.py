"""Page-aligned host buffers: what O_DIRECT reads need and what CUDA pins cheaply."""
from __future__ import annotations

import numpy as np

PAGE = 4096


def align_up(n: int, align: int = PAGE) -> int:
    return (n + align - 1) // align * align


def aligned_empty(nbytes: int, align: int = PAGE) -> np.ndarray:
    """A uint8 array of nbytes whose data pointer is a multiple of `align` (numpy only guarantees 64 B)."""
    if nbytes < 0:
        raise ValueError(f"aligned_empty: negative size {nbytes}")
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    out = raw[start:start + nbytes]
    # numpy gives an empty slice the base's address, so only a non-empty buffer has a meaningful alignment
    assert nbytes == 0 or out.ctypes.data % align == 0, "aligned_empty: misaligned buffer"
    return out


def aligned_zeros(nbytes: int, align: int = PAGE) -> np.ndarray:
    out = aligned_empty(nbytes, align)
    out[:] = 0
    return out


def return_large_frees_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations >= threshold with mmap and unmap them on free.

    By default glibc raises its mmap threshold to the size of the last large block freed (up to 32 MiB), after
    which expert-sized buffers come from the heap and freed ones stay resident: a streaming job that handles a
    few 32 MiB blobs at a time would look (and be, to the OOM killer) several times larger. Fixing the threshold
    keeps resident memory at what is live. Returns False where this is not glibc (nothing changes)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD (setting it disables adjustment)
    except (OSError, AttributeError):
        return False
