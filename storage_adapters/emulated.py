"""EmulatedLink: a tier adapter whose reads take the time a configured link would take.

A CPU-only machine has no PCIe or network link whose transfers leave the CPU free: a local read finishes in
microseconds and an emulated S3 server (moto behind a shaping proxy) burns several ms of CPU per GET on the very
cores that compute. To put benchmarks in the regime users of offloading are in — a load is a WAIT of
`latency + bytes / bandwidth` while the CPU goes on computing, as a DMA or a remote read is — this wrapper does the
real read from the wrapped adapter (real bytes, real checksums downstream) and then sleeps what is left of the
modelled time. The model is the simulator's `Link` (policies/simulator.py): `channels` transfers at once (per
adapter instance, i.e. per storage actor), each taking `latency_s + bytes / bandwidth_Bps`; further reads queue.
Used only where a tier config says `emulate:` (benchmarks, tests); writes, stats and deletes pass straight through.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from .base import read_fresh


class EmulatedLink:
    def __init__(self, inner, *, latency_s: float, bandwidth_Bps: float, channels: int = 8):
        assert latency_s >= 0 and bandwidth_Bps > 0 and channels >= 1, \
            f"emulated link needs latency_s >= 0, bandwidth_Bps > 0, channels >= 1; got " \
            f"{latency_s}, {bandwidth_Bps}, {channels}"
        self.inner = inner
        self.tier, self.uri = inner.tier, inner.uri
        self.latency_s, self.bandwidth_Bps, self.channels = float(latency_s), float(bandwidth_Bps), int(channels)
        self._slots: asyncio.Semaphore | None = None   # made on first use: it binds to the running loop
        self.waited_s = 0.0   # modelled time spent sleeping beyond the real reads (for benchmarks' bookkeeping)

    def transfer_s(self, nbytes: int) -> float:
        """Seconds one read of nbytes occupies a channel."""
        return self.latency_s + nbytes / self.bandwidth_Bps

    async def read_into(self, key: str, out, offset: int = 0) -> int:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.channels)
        async with self._slots:
            t0 = time.perf_counter()
            n = await self.inner.read_into(key, out, offset)
            left = self.transfer_s(n) - (time.perf_counter() - t0)
            if left > 0:
                self.waited_s += left
                await asyncio.sleep(left)
            return n

    async def read(self, key: str, offset: int = 0, length: int | None = None) -> np.ndarray:
        return await read_fresh(self, key, offset, length, f"{self.uri}/{key}")

    def __getattr__(self, name):   # stat, exists, write, write_file, delete, close, path, ...: the real tier's
        return getattr(self.inner, name)
