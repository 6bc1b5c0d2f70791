"""Host bytes -> device memory, for ExpertWorker's loads (torch only; no Ray, so jobs.bench_hbm times it alone).

A blob arrives as a read-only uint8 view of Ray's object store (shared memory, pageable). The GPU's copy engine
reads only page-locked memory at full rate, so on CUDA the bytes pass through pinned staging buffers on a copy
stream of their own (computes on the default stream never wait behind a load). The blob goes in chunks, two
staging buffers per copy: while the copy engine reads chunk i from one buffer the CPU fills the other with chunk
i+1, so the host memcpy and the DMA overlap instead of adding up (one whole-blob staging buffer costs
n / memcpy_rate + n / dma_rate; chunked, about the larger of the two). One core's memcpy is the slower of the two
(measured on an H100 host: ~7 GB/s memcpy against ~54 GB/s DMA from pinned memory, docs/benchmarks.md "GPU"),
so each chunk's memcpy is split over `copy_threads` threads (numpy releases the GIL while it copies). Pinned
memory is `slots x 2 x chunk` with chunks at most one expert; a Mixtral expert (352 MB in bf16) no longer needs
two pinned buffers of its own size.

On CPU the device is host memory: one memcpy into a fresh tensor, the same call.
"""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Slot:
    bufs: tuple[torch.Tensor, torch.Tensor]           # 2 x [chunk] uint8, pinned
    read: tuple[torch.cuda.Event, torch.cuda.Event]   # recorded after the DMA that reads bufs[i] was queued


class HostToDevice:
    def __init__(self, device: torch.device, *, chunk_bytes: int = 32 << 20, slots: int = 2, copy_threads: int = 8,
                 max_bytes: int | None = None):
        """slots: copies that may run at once (each holds 2 pinned chunks). max_bytes: the largest copy expected
        (one expert): chunks are never larger, so a small model does not pin 2 x 32 MiB per slot. Larger copies
        still work, in more chunks."""
        assert chunk_bytes >= 4096 and slots >= 1 and copy_threads >= 1, \
            f"chunk_bytes {chunk_bytes} (>= 4096), slots {slots} (>= 1), copy_threads {copy_threads} (>= 1)"
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.chunk = int(chunk_bytes) if not max_bytes else min(int(chunk_bytes), -(-int(max_bytes) // 4096) * 4096)
        self.pinned_bytes = 0
        self.threads = copy_threads
        # (the executor starts its threads on first use: none on CPU, where copy() never splits)
        self._pool = ThreadPoolExecutor(copy_threads, thread_name_prefix="h2d") if copy_threads > 1 else None
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self._slots: queue.Queue[_Slot] = queue.Queue()
            for _ in range(slots):
                self._slots.put(_Slot(tuple(torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True)
                                            for _ in range(2)),
                                      (torch.cuda.Event(), torch.cuda.Event())))
            self.pinned_bytes = slots * 2 * self.chunk

    def copy(self, host: np.ndarray, dst: torch.Tensor | None = None) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """host: uint8 [n], contiguous. Returns (device uint8 [n], event): on CUDA the event is recorded on the copy
        stream after the last chunk, and the bytes are on the device when this returns (a compute on another
        stream still orders itself after them with wait_event); on CPU the event is None. dst: a device uint8
        tensor of n bytes to fill instead of a fresh one."""
        assert host.dtype == np.uint8 and host.ndim == 1, f"host bytes must be uint8 [n], got {host.dtype} {host.shape}"
        n = host.nbytes
        dev = torch.empty(n, dtype=torch.uint8, device=self.device) if dst is None else dst
        assert dev.numel() == n and dev.dtype == torch.uint8, f"dst holds {dev.numel()} {dev.dtype}, need {n} uint8"
        if not self.cuda:
            np.copyto(dev.numpy(), host)
            return dev, None
        caller = torch.cuda.current_stream(self.device)
        slot = self._slots.get()
        try:
            with torch.cuda.stream(self.stream):
                # dev was allocated on the caller's stream, and the caching allocator hands out a block freed there
                # while that stream's queued kernels may still read or write it: the DMA goes after them
                self.stream.wait_stream(caller)
                for i, off in enumerate(range(0, n, self.chunk)):
                    b, m = i & 1, min(self.chunk, n - off)
                    if i >= 2:
                        slot.read[b].synchronize()            # the DMA two chunks back has read this buffer
                    self._fill(slot.bufs[b][:m].numpy(), host[off:off + m])   # object store -> pinned
                    dev[off:off + m].copy_(slot.bufs[b][:m], non_blocking=True)   # pinned -> device, async
                    slot.read[b].record(self.stream)
                ready = torch.cuda.Event()
                ready.record(self.stream)
            ready.synchronize()   # the slot's buffers are reusable, and the caller may count the bytes as landed
        finally:
            self._slots.put(slot)
        return dev, ready

    def _fill(self, dst: np.ndarray, src: np.ndarray) -> None:
        """dst[:] = src, split evenly over the copy threads in pieces of at least 4 MiB (on the H100 host, 1 MiB
        pieces made an 8 MiB copy slower than two 4 MiB ones: 0.13 against 0.18 of the DMA rate)."""
        n = src.nbytes
        piece = max(4 << 20, -(-n // self.threads))
        if self._pool is None or n <= piece:
            np.copyto(dst, src)
            return
        for f in [self._pool.submit(np.copyto, dst[o:o + piece], src[o:o + piece]) for o in range(0, n, piece)]:
            f.result()
