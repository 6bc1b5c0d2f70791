"""EmulatedLink: a tier adapter whose reads take the time a configured link would take.

A CPU-only machine has no PCIe or network link whose transfers leave the CPU free: a local read finishes in
microseconds and an emulated S3 server (moto behind a shaping proxy) burns several ms of CPU per GET on the very
cores that compute. To put benchmarks in the regime users of offloading are in — a load is a WAIT of
`latency + bytes / bandwidth` while the CPU goes on computing, as a DMA or a remote read is — this wrapper does the
real read from the wrapped adapter (real bytes, real checksums downstream) and then sleeps what is left of the
modelled time. The model is the simulator's `Link` (policies/simulator.py): `channels` transfers at once (per
adapter instance, i.e. per storage actor), each taking `latency_s + bytes / bandwidth_Bps`; further reads queue.
Waiting reads are served by priority, then in arrival order: a read issued under `LINK_PRIORITY` = PREFETCH
(the StorageActor sets it for a worker's prefetch loads) waits behind every demand read, as an I/O scheduler or a
DMA queue with priorities would order them; a transfer already on a channel is never preempted.
With `split_min_bytes`, a read is split as the real adapters split one (S3Adapter's parallel ranged GETs, NvmeAdapter's
parallel chunks): it takes the channels that are free when it starts, up to one per `split_min_bytes`, and its parts
run at once, each paying the latency — `latency_s + bytes / (parts * bandwidth_Bps)`. It never waits for a second
channel, so on a busy link it is one read on one channel, as before. Without it, every read holds one channel.
Used only where a tier config says `emulate:` (benchmarks, tests); writes, stats and deletes pass straight through.
"""
from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import time

import numpy as np

from .base import as_u8, read_fresh

DEMAND, PREFETCH = 0, 1
# the priority of reads made in this asyncio context (a task inherits its creator's value)
LINK_PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("link_priority", default=DEMAND)


def split_parts(nbytes: int, split_min_bytes: int | None, channels: int) -> int:
    """How many parts a read of nbytes wants on an idle link: one per split_min_bytes at least, at most `channels`;
    1 when reads are not split (split_min_bytes None or 0)."""
    if not split_min_bytes:
        return 1
    return max(1, min(channels, nbytes // split_min_bytes))


class EmulatedLink:
    def __init__(self, inner, *, latency_s: float, bandwidth_Bps: float, channels: int = 8,
                 split_min_bytes: int | None = None):
        assert latency_s >= 0 and bandwidth_Bps > 0 and channels >= 1, \
            f"emulated link needs latency_s >= 0, bandwidth_Bps > 0, channels >= 1; got " \
            f"{latency_s}, {bandwidth_Bps}, {channels}"
        assert split_min_bytes is None or split_min_bytes >= 1, f"split_min_bytes must be >= 1, got {split_min_bytes}"
        self.inner = inner
        self.tier, self.uri = inner.tier, inner.uri
        self.latency_s, self.bandwidth_Bps, self.channels = float(latency_s), float(bandwidth_Bps), int(channels)
        self.split_min_bytes = split_min_bytes
        self._free = self.channels
        self._waiting: list[tuple[int, int, asyncio.Future]] = []   # heap of (priority, arrival, future)
        self._seq = itertools.count()
        self.waited_s = 0.0   # modelled time spent sleeping beyond the real reads (for benchmarks' bookkeeping)
        self.queued = {DEMAND: 0, PREFETCH: 0}   # reads that found every channel busy, by priority
        self.split_reads = 0                     # reads that ran on more than one channel

    def transfer_s(self, nbytes: int, parts: int = 1) -> float:
        """Seconds a read of nbytes split into `parts` parallel parts occupies its channels."""
        return self.latency_s + nbytes / (parts * self.bandwidth_Bps)

    def parts_for(self, nbytes: int) -> int:
        """How many parts a read of nbytes wants (before seeing which channels are free)."""
        return split_parts(nbytes, self.split_min_bytes, self.channels)

    def _take_more(self, want: int) -> int:
        """Channels beyond the first that a starting read takes without waiting: only free ones, never one a
        queued read is waiting for (a waiter would have been handed it)."""
        extra = min(want - 1, self._free) if not self._waiting else 0
        self._free -= extra
        return extra

    async def _acquire(self) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        prio = LINK_PRIORITY.get()
        self.queued[prio] = self.queued.get(prio, 0) + 1
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (prio, next(self._seq), fut))
        try:
            await fut                      # _release hands its channel over by resolving fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()            # the channel was handed to us as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():             # a cancelled waiter is skipped
                fut.set_result(None)
                return
        self._free += 1

    async def read_into(self, key: str, out, offset: int = 0) -> int:
        await self._acquire()
        held = 1 + self._take_more(self.parts_for(len(as_u8(out))))
        self.split_reads += held > 1
        try:
            t0 = time.perf_counter()
            n = await self.inner.read_into(key, out, offset)
            left = self.transfer_s(n, held) - (time.perf_counter() - t0)
            if left > 0:
                self.waited_s += left
                await asyncio.sleep(left)
            return n
        finally:
            for _ in range(held):
                self._release()

    async def read(self, key: str, offset: int = 0, length: int | None = None) -> np.ndarray:
        return await read_fresh(self, key, offset, length, f"{self.uri}/{key}")

    def __getattr__(self, name):   # stat, exists, write, write_file, delete, close, path, ...: the real tier's
        return getattr(self.inner, name)
