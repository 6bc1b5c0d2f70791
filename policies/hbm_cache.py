"""The bookkeeping of a worker's HBM expert cache: which experts are resident, their bytes, pins, prefetch flags,
and in what order to evict them. Tensors live in the worker (actors/expert_worker.py); this holds no memory.

Policies (`make_policy(name)`):
  lru             least recently used first
  lfu             least frequently used first (ties: least recent); counts decay by half every `decay_every`
                  accesses so that yesterday's hot experts do not squat forever
  slru            segmented LRU: an entry used once sits in probation, a second use promotes it to the protected
                  segment (at most `protected_frac` of the budget); probation is evicted first
  prefetch_aware  SPEC-045 §3: prefetched entries carry a flag until first used. Eviction order: prefetched
                  entries whose request was cancelled (stale) first, then used entries by LRU, then fresh
                  prefetched entries last, oldest first — a prefetch that is about to be used is not thrown out
                  by the next prefetch, and a wasted one does not linger.
Under every policy, prefetched entries cancelled before their first use (`mark_stale`: their request ended, or
the router did not select what the runtime's fast path predicted) are evicted first, unless values (below) decide
the order.
A PrefetchCoordinator may set `CacheIndex.hints` ({key: value}), and the runtime's fast path may merge its latest
P into them (`update_hints`): eviction then goes by the values, lowest first (what the next layers and tokens are
least likely to use), whatever the policy; keys never valued go last. A use spends a coordinator's prediction: the
key drops to `hints_used[key]` (its reuse value) or the default; the fast path's values stay until replaced.
Invariants (asserted): bytes used never exceed the budget; a pinned entry (in use by a compute) is never evicted.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator

POLICIES = ("lru", "lfu", "slru", "prefetch_aware")


@dataclass
class Entry:
    size: int
    pins: int = 0
    prefetched: bool = False   # loaded by a prefetch and not used since
    stale: bool = False        # its prefetch was cancelled before use
    request: str | None = None  # the request a prefetch was for
    uses: float = 0.0          # (decayed) access count
    protected: bool = False    # SLRU segment


class _Policy:
    name = "lru"

    def __init__(self, **kw):
        self.tick = 0

    def on_insert(self, key, e: Entry, entries: "OrderedDict[Hashable, Entry]") -> None:
        pass

    def on_access(self, key, e: Entry, entries: "OrderedDict[Hashable, Entry]") -> None:
        pass

    def order(self, entries: "OrderedDict[Hashable, Entry]") -> Iterable:
        """Keys, first to evict first (entries is kept in recency order, least recent first)."""
        return list(entries)


class LRU(_Policy):
    name = "lru"


class LFU(_Policy):
    name = "lfu"

    def __init__(self, decay_every: int = 4096, **kw):
        super().__init__()
        self.decay_every = decay_every

    def on_access(self, key, e, entries):
        self.tick += 1
        if self.tick % self.decay_every == 0:
            for x in entries.values():
                x.uses /= 2

    def order(self, entries):
        rank = {k: i for i, k in enumerate(entries)}
        return sorted(entries, key=lambda k: (entries[k].uses, rank[k]))


class SLRU(_Policy):
    name = "slru"

    def __init__(self, protected_frac: float = 0.8, budget: int = 0, **kw):
        super().__init__()
        self.protected_cap = int(protected_frac * budget)

    def on_access(self, key, e, entries):
        if e.protected or e.uses < 2:
            return
        e.protected = True
        prot = [k for k, x in entries.items() if x.protected]
        used = sum(entries[k].size for k in prot)
        for k in prot:  # demote the least recent protected entries back to probation to respect the cap
            if used <= self.protected_cap:
                break
            if k != key:
                entries[k].protected = False
                used -= entries[k].size

    def order(self, entries):
        return [k for k, x in entries.items() if not x.protected] + [k for k, x in entries.items() if x.protected]


class PrefetchAware(_Policy):
    name = "prefetch_aware"

    def order(self, entries):
        stale = [k for k, x in entries.items() if x.prefetched and x.stale]
        used = [k for k, x in entries.items() if not x.prefetched]
        fresh = [k for k, x in entries.items() if x.prefetched and not x.stale]
        return stale + used + fresh


def make_policy(name: str, budget: int = 0, **kw) -> _Policy:
    cls = {"lru": LRU, "lfu": LFU, "slru": SLRU, "prefetch_aware": PrefetchAware}.get(name)
    if cls is None:
        raise ValueError(f"unknown eviction policy {name!r}; supported: {', '.join(POLICIES)}")
    return cls(budget=budget, **kw)


class DoesNotFit(Exception):
    """Not enough unpinned bytes to make room: the caller waits for pins to drop or serves the miss uncached."""


@dataclass
class CacheIndex:
    budget: int
    policy: _Policy = field(default_factory=LRU)
    used: int = 0
    entries: "OrderedDict[Hashable, Entry]" = field(default_factory=OrderedDict)
    evictions: int = 0
    wasted_prefetches: int = 0   # evicted while still flagged prefetched (never used)
    # keys evicted and not loaded since -> whether a prefetch had loaded them and nobody used them (why a later miss
    # missed, telemetry only); bounded by the keys that were ever resident
    evicted: dict = field(default_factory=dict)
    # a coordinator's values of residents (higher: keep longer; policies/ranking.py Plan.keep): when set, eviction
    # goes lowest value first; entries it does not value (loaded since it looked) go last, in policy order
    hints: dict | None = None
    hints_used: dict | None = None   # {key: value once used}: a use spends a prediction; the key drops to this
    hints_used_default: float | None = None  # ... or to this when it did not say (None, and no hints_used: a use
                                             # leaves the value as it was)

    def __post_init__(self):
        assert self.budget >= 0, f"budget must be >= 0, got {self.budget}"

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def access(self, key) -> bool:
        """A compute uses `key`: a hit refreshes recency, counts the use, clears the prefetch flag."""
        e = self.entries.get(key)
        if e is None:
            return False
        self.entries.move_to_end(key)
        if self.hints is not None:
            v = (self.hints_used or {}).get(key, self.hints_used_default)
            if v is not None:
                self.hints[key] = v
        e.uses += 1
        e.prefetched = e.stale = False
        self.policy.on_access(key, e, self.entries)
        return True

    def set_hints(self, values: dict, used: dict | None = None) -> None:
        """A coordinator's values of residents ({key: value}; {} clears them) and, optionally, their values once used
        (a key absent from `used` drops to the mean of `used` at its next use; no `used`: a use keeps the value)."""
        self.hints = values or None
        self.hints_used = used or None
        self.hints_used_default = float(sum(used.values()) / len(used)) if used else None

    def update_hints(self, values: dict) -> None:
        """Merge values into the current ones (the runtime's fast path: the latest P of each expert it predicted,
        layer by layer); a use keeps the value until the next prediction replaces it."""
        if self.hints is None:
            self.hints, self.hints_used, self.hints_used_default = {}, None, None
        self.hints.update(values)

    def pin(self, key) -> None:
        self.entries[key].pins += 1

    def unpin(self, key) -> None:
        e = self.entries[key]
        assert e.pins > 0, f"unpin of unpinned {key!r}"
        e.pins -= 1

    def plan_room(self, size: int) -> list:
        """Keys to evict so that `size` more bytes fit, in policy order, never pinned ones; DoesNotFit if
        impossible. Nothing changes until `commit`."""
        if size > self.budget:
            raise DoesNotFit(f"an entry of {size} bytes exceeds the whole budget of {self.budget} bytes")
        need = self.used + size - self.budget
        out = []
        if need <= 0:
            return out
        order = self.policy.order(self.entries)
        if self.hints:   # stable: equal values (and the unvalued, last) keep the policy's order
            h = self.hints
            order = sorted(order, key=lambda k: h.get(k, float("inf")))
        ents = self.entries
        if not self.hints and any(e.stale for e in ents.values()):   # cancelled prefetches nobody used go first,
            order = [k for k in order if ents[k].stale] + [k for k in order if not ents[k].stale]   # any policy
        for k in order:
            e = self.entries[k]
            if e.pins:
                continue
            out.append(k)
            need -= e.size
            if need <= 0:
                return out
        raise DoesNotFit(f"need {self.used + size - self.budget} bytes but only unpinned entries' "
                         f"{sum(e.size for e in self.entries.values() if not e.pins)} bytes can be evicted")

    def admits(self, key, size: int) -> bool:
        """Whether a prefetch of `key` (size bytes) that names no victims may load: yes when it fits without
        evicting, is resident already, or has no value; otherwise only when every resident it would evict is valued
        below it (hints). So a prediction never displaces an expert predicted likelier than itself."""
        v = self.hints.get(key) if self.hints else None
        if v is None or key in self.entries or self.used + size <= self.budget:
            return True
        try:
            victims = self.plan_room(size)
        except DoesNotFit:
            return False
        h = self.hints
        return all(h.get(k, float("inf")) < v for k in victims)

    def insert(self, key, size: int, prefetched: bool = False, request: str | None = None) -> list:
        """Make room (evicting per policy) and insert; returns evicted keys. Raises DoesNotFit."""
        assert key not in self.entries, f"{key!r} already resident"
        victims = self.plan_room(size)
        for k in victims:
            self.remove(k, evicted=True)
        e = Entry(size=size, prefetched=prefetched, request=request)
        self.entries[key] = e
        self.evicted.pop(key, None)
        self.used += size
        self.policy.on_insert(key, e, self.entries)
        assert self.used <= self.budget, f"cache over budget: {self.used} > {self.budget}"
        return victims

    def insert_evicting_only(self, key, size: int, victims: Iterable = (), prefetched: bool = True,
                             request: str | None = None) -> list:
        """A coordinator's prefetch: make room by evicting only `victims` (the residents it valued lower; those
        gone or pinned meanwhile are skipped), never anything else; DoesNotFit (nothing changed) if that is not
        enough. Returns the evicted keys."""
        assert key not in self.entries, f"{key!r} already resident"
        chosen, room = [], self.budget - self.used
        for v in victims:
            if room >= size:
                break
            e = self.entries.get(v)
            if e is not None and not e.pins and v != key:
                chosen.append(v)
                room += e.size
        if room < size:
            raise DoesNotFit(f"{key!r} needs {size} bytes; free {self.budget - self.used} plus the named victims' "
                             f"{room - (self.budget - self.used)} bytes is not enough")
        for v in chosen:
            self.remove(v, evicted=True)
        e = Entry(size=size, prefetched=prefetched, request=request)
        self.entries[key] = e
        self.evicted.pop(key, None)
        self.used += size
        self.policy.on_insert(key, e, self.entries)
        assert self.used <= self.budget, f"cache over budget: {self.used} > {self.budget}"
        return chosen

    def remove(self, key, evicted: bool = False) -> int:
        e = self.entries.pop(key)
        assert e.pins == 0, f"removing pinned {key!r}"
        self.used -= e.size
        if evicted:
            self.evictions += 1
            self.wasted_prefetches += e.prefetched
            self.evicted[key] = e.prefetched
        return e.size

    def mark_stale(self, request: str | None = None, keys: Iterable | None = None, unowned_only: bool = False) -> int:
        """Cancellation: prefetched-but-unused entries of `request` (or `keys`; with unowned_only only those no
        request's prefetch loaded) become first to evict. Returns how many were newly marked."""
        n = 0
        wanted = set(keys) if keys is not None else None
        for k, e in self.entries.items():
            if not e.prefetched or e.stale:
                continue
            mine = request is not None and e.request == request
            named = bool(wanted) and k in wanted and not (unowned_only and e.request is not None)
            if mine or named:
                e.stale = True
                n += 1
        return n

    def keys(self) -> Iterator:
        return iter(self.entries)
