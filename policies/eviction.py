"""Byte-budgeted LRU: the DRAM tier's admission and eviction order (and the base of the HBM caches' policies)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class ByteBudgetLRU:
    """Keys with sizes, least recently used first. `admit` evicts until the new entry fits; the budget is never
    exceeded, and an entry larger than the whole budget is refused (the caller serves it uncached)."""

    def __init__(self, budget_bytes: int):
        assert budget_bytes >= 0, f"budget must be >= 0, got {budget_bytes}"
        self.budget = budget_bytes
        self.used = 0
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()
        self._pinned: dict[Hashable, int] = {}
        self.evictions = 0

    def __contains__(self, key) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list:
        return list(self._sizes)

    def touch(self, key) -> bool:
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return True
        return False

    def pin(self, key) -> None:
        """An entry in use is never evicted (pins nest)."""
        assert key in self._sizes, f"pin of absent key {key!r}"
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def unpin(self, key) -> None:
        n = self._pinned.get(key, 0)
        assert n > 0, f"unpin of unpinned key {key!r}"
        if n == 1:
            del self._pinned[key]
        else:
            self._pinned[key] = n - 1

    def admit(self, key, size: int) -> tuple[bool, list]:
        """(admitted, evicted keys). Re-admitting a present key refreshes it."""
        if key in self._sizes:
            self.remove(key)
        if size > self.budget:
            return False, []
        evicted = []
        for victim in list(self._sizes):
            if self.used + size <= self.budget:
                break
            if victim in self._pinned:
                continue
            self.used -= self._sizes.pop(victim)
            evicted.append(victim)
        if self.used + size > self.budget:  # everything left is pinned
            return False, evicted
        self._sizes[key] = size
        self.used += size
        self.evictions += len(evicted)
        assert self.used <= self.budget, "ByteBudgetLRU: budget exceeded"
        return True, evicted

    def remove(self, key) -> int:
        size = self._sizes.pop(key, 0)
        self.used -= size
        self._pinned.pop(key, None)
        return size
