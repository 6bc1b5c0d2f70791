"""How many ranged GETs to split a blob into, learned online.

Against a real object store one connection is capped (~90 MB/s) and every request pays a first-byte latency, so a
blob arrives fastest in many parallel ranges. Against a server that is itself the bottleneck (a local
S3-compatible server that copies the whole object for every ranged GET, or a saturated gateway) extra ranges add
work and lose throughput. Neither is known in advance, so `PartTuner` hill-climbs the part count on the
aggregate throughput measured while reads are in flight (idle gaps between requests do not count against it).
A move that loses throughput is undone and the next exploration waits twice as long (up to `max_hold` windows),
so at the optimum the cost of probing fades.
"""
from __future__ import annotations

import time

HISTORY = 1024   # windows PartTuner.history keeps


class PartTuner:
    def __init__(self, max_parts: int, *, start: int | None = None, window_blobs: int = 4, max_hold: int = 32,
                 clock=time.monotonic):
        assert max_parts >= 1, f"max_parts must be >= 1, got {max_parts}"
        self.max_parts = max_parts
        self.parts = min(max_parts, start or max_parts)
        self.window_blobs, self.max_hold, self.clock = window_blobs, max_hold, clock
        self._dir = -1                 # next exploration: halve (-1) or double (+1)
        self._hold, self._wait = 1, 0  # windows to stay put after a failed probe, and how many are left
        self._base: tuple[int, float] | None = None  # (parts, throughput) the current probe is judged against
        self._active, self._busy_since = 0, 0.0
        self._win_bytes, self._win_busy, self._win_blobs = 0, 0.0, 0
        # (parts, bytes/s) of the last HISTORY windows, for telemetry and tests: the tuner lives as long as its actor
        self.history: list[tuple[int, float]] = []

    def begin(self) -> int:
        """A blob read starts: the number of parts to split it into."""
        if self._active == 0:
            self._busy_since = self.clock()
        self._active += 1
        return self.parts

    def end(self, nbytes: int) -> None:
        now = self.clock()
        self._active -= 1
        if self._active == 0:
            self._win_busy += now - self._busy_since
        self._win_bytes += nbytes
        self._win_blobs += 1
        if self._win_blobs >= self.window_blobs:
            busy = self._win_busy + (now - self._busy_since if self._active else 0.0)
            if self._active:
                self._busy_since = now
            if busy > 0:
                self._judge(self._win_bytes / busy)
            self._win_bytes, self._win_busy, self._win_blobs = 0, 0.0, 0

    def _judge(self, rate: float) -> None:
        self.history.append((self.parts, rate))
        if len(self.history) > 2 * HISTORY:   # trimmed in halves: amortised O(1)
            del self.history[:-HISTORY]
        if self._base is not None and self._base[0] != self.parts:   # we were probing a neighbour
            if rate < self._base[1]:                                  # worse: go back, probe less often
                self.parts = self._base[0]
                self._dir = -self._dir
                self._hold = min(self.max_hold, self._hold * 2)
                self._wait = self._hold
                self._base = (self.parts, self._base[1])
                return
            self._hold = 1                                            # better: keep going that way
        self._base = (self.parts, rate)
        if self._wait > 0:
            self._wait -= 1
            return
        nxt = self.parts * 2 if self._dir > 0 else self.parts // 2
        if not 1 <= nxt <= self.max_parts:
            self._dir = -self._dir
            nxt = self.parts * 2 if self._dir > 0 else self.parts // 2
        if 1 <= nxt <= self.max_parts:
            self.parts = nxt
