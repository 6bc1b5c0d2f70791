"""StorageActor: one node's DRAM tier and its door to the NVMe and S3 tiers.

An async Ray actor pinned to its node. `get(layer, expert)` returns `[ObjectRef]` to the verified blob as a uint8
numpy array in the node's Ray object store: every consumer on the node maps it zero-copy. The actor keeps refs
of recently used blobs within a byte budget (the DRAM tier, LRU); dropping a ref lets Ray reclaim the memory once
no consumer holds it. Concurrent requests for the same blob share one read. Reads go through `ExpertStore`, which
verifies checksums and falls back across tiers, so the DRAM tier only ever holds correct bytes.
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import ray

from policies.eviction import ByteBudgetLRU
from storage_adapters.buffers import return_large_frees_to_os
from storage_adapters.emulated import LINK_PRIORITY, PREFETCH
from storage_adapters.errors import StoreError, TierAccessError
from storage_adapters.store import ExpertStore
from storage_adapters.tiers import adapter_for, keys_for

BlobId = tuple[int, int]  # (layer, expert)


class StorageActor:
    def __init__(self, cfg, node_id: str = "", endpoint_overrides: dict[str, str] | None = None):
        """cfg: the validated ClusterConfig (cluster/config.py). endpoint_overrides: tier name -> endpoint URL
        resolved at start (e.g. the embedded S3 server)."""
        self.cfg, self.node_id = cfg, node_id
        for name in ("storage_adapters", "actors"):   # telemetry.log_level: the adapters log here (retried reads)
            logging.getLogger(name).setLevel(cfg.telemetry.log_level)
        return_large_frees_to_os()  # blob buffers are freed after ray.put: give the memory back, not to a heap
        tiers = cfg.storage_tiers
        self._adapters = [adapter_for(t, (endpoint_overrides or {}).get(t.name)) for t in tiers]
        self._keys = keys_for(tiers)
        dram = cfg.dram
        self.lru = ByteBudgetLRU(int(dram.budget_bytes) if dram else 0)
        self._refs: dict[BlobId, ray.ObjectRef] = {}
        self._inflight: dict[BlobId, tuple] = {}   # blob -> (future, storage tiers its read may use; None: all)
        self._store: ExpertStore | None = None
        self._open_lock = asyncio.Lock()
        self._dense_ref = None
        self.counters = {"hits": 0, "misses": 0, "coalesced": 0, "bytes_read": 0, "read_seconds": 0.0,
                         "uncached": 0, "errors": 0, "range_reads": 0}

    async def _ensure(self) -> ExpertStore:
        if self._store is None:
            async with self._open_lock:
                if self._store is None:
                    self._store = await ExpertStore.open(self._adapters, self._keys)
        return self._store

    async def manifest_json(self) -> bytes:
        return (await self._ensure()).manifest.to_json()

    async def dense(self) -> list:
        """[ref] to the verified dense .safetensors bytes (held for the actor's life: every runtime needs them)."""
        store = await self._ensure()
        if self._dense_ref is None:
            raw, _ = await store.read_dense()
            self._dense_ref = ray.put(raw)
        return [self._dense_ref]

    async def aux(self, name: str) -> bytes | None:
        """A verified side file of the checkpoint (tokenizer.json, ...) or None."""
        return await (await self._ensure()).read_aux(name)

    async def _load(self, bid: BlobId, tiers: list[str] | None = None, cache: bool = True) -> tuple:
        store = await self._ensure()
        t0 = time.perf_counter()
        blob, tier = await store.read_blob(*bid, tiers=tiers)
        self.counters["read_seconds"] += time.perf_counter() - t0
        self.counters["bytes_read"] += blob.nbytes
        admitted, evicted = self.lru.admit(bid, blob.nbytes) if cache else (False, [])
        for v in evicted:
            self._refs.pop(v, None)
        if not admitted:   # not kept in the DRAM tier: the array itself (get_tiered inlines or returns it; no
            self.counters["uncached"] += 1   # put into the object store only to get it back out)
            return blob, tier
        ref = self._refs[bid] = ray.put(blob)
        return ref, tier

    def _storage_tiers(self, tiers: list[str] | None) -> list[str] | None:
        """A TierSet (tier names) -> the storage tiers of it this actor may read; None: all configured."""
        if tiers is None:
            return None
        names = [t for t in tiers if t != "dram"]
        if not names:
            raise ValueError(f"TierSet {list(tiers)} holds no storage tier to read from")
        return names

    async def _get(self, bid: BlobId, tiers: list[str] | None = None) -> tuple:
        """(ref, tier it came from) — "dram" when resident here. A TierSet without "dram" neither reads nor fills
        the DRAM tier: the blob is read from its allowed tiers and handed over uncached."""
        if tiers is not None and "dram" not in tiers:
            self.counters["misses"] += 1
            return await self._load(bid, self._storage_tiers(tiers), cache=False)
        ref = self._refs.get(bid)
        if ref is not None:
            self.lru.touch(bid)
            self.counters["hits"] += 1
            return ref, "dram"
        mine = self._storage_tiers(tiers)
        ent = self._inflight.get(bid)
        if ent is not None:
            fut, theirs = ent
            # join a read in flight only when every tier it may read is one this caller may read too: else it
            # could hand over bytes (or an error) from a tier outside the caller's TierSet
            if mine is None or (theirs is not None and set(theirs) <= set(mine)):
                self.counters["coalesced"] += 1
                try:
                    return await asyncio.shield(fut)
                except Exception:  # noqa: BLE001 - their read failed; ours may still succeed from our own tiers
                    pass
            self.counters["misses"] += 1
            return await self._load(bid, mine)
        self.counters["misses"] += 1
        fut = asyncio.get_running_loop().create_future()
        self._inflight[bid] = (fut, mine)
        try:
            got = await self._load(bid, mine)
            fut.set_result(got)
        except BaseException as e:
            self.counters["errors"] += 1
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._inflight[bid]
        return got

    async def get(self, layer: int, expert: int, tiers: list[str] | None = None) -> list:
        """[ref] to the blob of (layer, expert), from DRAM when resident, else read (verified) from storage.
        tiers: the request's TierSet (names); None: every configured tier."""
        got = (await self._get((layer, expert), tiers))[0]
        return [ray.put(got) if isinstance(got, np.ndarray) else got]

    async def get_tiered(self, layer: int, expert: int, tiers: list[str] | None = None,
                         prefetch: bool = False, inline_max: int = 0) -> list:
        """[ref, tier name it came from] (ExpertWorkers count bytes per tier with it). prefetch: a worker's
        prefetch load — its storage reads queue behind demand reads on a tier that orders them (the emulated link;
        storage_adapters/emulated.py). A demand call that joins a prefetch's read in flight waits for that read.
        inline_max: a blob of at most this many bytes comes back as the array itself, inside the reply (Ray inlines
        replies under ~100 KiB): one round trip instead of the reply plus a get of an object this actor owns;
        larger blobs stay refs (zero-copy from the node's object store)."""
        if prefetch:
            LINK_PRIORITY.set(PREFETCH)    # this call's task only: Ray runs each async actor call as its own task
        ref, tier = await self._get((layer, expert), tiers)
        if isinstance(ref, np.ndarray):   # read, not kept in the DRAM tier: the reply carries it (Ray stores a
            return [ref, tier]            # large reply in the object store: still one round trip, zero-copy)
        if inline_max and (await self._ensure()).manifest.blob(layer, expert).size <= inline_max:
            return [await ref, tier]
        return [ref, tier]

    async def get_ranges(self, layer: int, expert: int, spans: list[tuple[int, int]],
                         tiers: list[str] | None = None, prefetch: bool = False) -> list:
        """[uint8 array of the byte ranges `spans` ((offset, length) in the plaintext blob) concatenated, tier]:
        partial prefetch (docs/weight_prefetch.md). Sliced from the DRAM tier when the blob is resident there
        (verified when it was read); else ranged reads on the first storage tier that serves them, NOT verified
        here (a range has no checksum of its own): the ExpertWorker verifies each tensor once it is whole. Never
        fills the DRAM tier (a part of a blob is not a blob). Encrypted copies cannot be read by range: the whole
        blob is read verified and sliced."""
        if prefetch:
            LINK_PRIORITY.set(PREFETCH)
        bid = (int(layer), int(expert))
        spans = [(int(o), int(n)) for o, n in spans]
        ref = self._refs.get(bid) if tiers is None or "dram" in tiers else None
        if ref is not None:
            self.lru.touch(bid)
            self.counters["hits"] += 1
            blob = await ref                                   # zero-copy view of the verified blob
            return [np.concatenate([blob[o:o + n] for o, n in spans]), "dram"]
        store = await self._ensure()
        entry = store.manifest.blob(*bid)
        failures = []
        for a in store.eligible(entry, self._storage_tiers(tiers)):
            t0 = time.perf_counter()
            try:
                if entry.tiers[a.tier].encrypted:
                    blob, _ = await store.read_blob(*bid, tiers=[a.tier])
                    parts = [blob[o:o + n] for o, n in spans]
                else:
                    parts = await asyncio.gather(*[a.read(entry.key, o, n) for o, n in spans])
            except StoreError as e:                            # this tier cannot serve it: the next may
                failures.append(f"{a.tier}: {e}")
                continue
            out = np.concatenate(parts)
            self.counters["read_seconds"] += time.perf_counter() - t0
            self.counters["bytes_read"] += out.nbytes
            self.counters["range_reads"] += 1
            return [out, a.tier]
        self.counters["errors"] += 1
        raise TierAccessError(f"blob {entry.key!r}: no eligible tier served ranges {spans}: " + "; ".join(failures))

    async def weight_prefetch_config(self) -> dict:
        """The validated `weight_prefetch_config` section (ExpertWorkers started without one ask here)."""
        return self.cfg.weight_prefetch_config.model_dump()

    async def get_many(self, items: list[BlobId]) -> list:
        """Refs for several blobs, read concurrently (the tiers' parallelism does the rest)."""
        out = await asyncio.gather(*[self.get(l, e) for l, e in items])
        return [r[0] for r in out]

    async def stage(self, items: list[BlobId], tiers: list[str] | None = None) -> int:
        """Prefetch into the DRAM tier; returns how many were already resident. Errors are counted, not raised:
        a failed prefetch must not fail anyone — the blob is read again on demand. A TierSet without "dram"
        stages nothing (the DRAM tier is outside it)."""
        if tiers is not None and "dram" not in tiers:
            return 0
        resident = sum(1 for b in items if tuple(b) in self._refs)
        await asyncio.gather(*[self._get((int(l), int(e)), tiers) for l, e in items], return_exceptions=True)
        return resident

    async def evict(self, items: list[BlobId]) -> int:
        n = 0
        for b in items:
            b = tuple(b)
            if self._refs.pop(b, None) is not None:
                self.lru.remove(b)
                n += 1
        return n

    async def resident(self) -> list[BlobId]:
        return self.lru.keys()

    async def snapshot(self) -> tuple:
        """(resident blob ids, blobs being read, DRAM bytes used, DRAM budget): the coordinator's view of this
        node's DRAM tier, in one call."""
        return list(self.lru.keys()), list(self._inflight), self.lru.used, self.lru.budget

    async def stats(self) -> dict:
        s = dict(self.counters)
        s.update(node_id=self.node_id, dram_used_bytes=self.lru.used, dram_budget_bytes=self.lru.budget,
                 dram_blobs=len(self.lru), evictions=self.lru.evictions)
        if self._store is not None:
            st = self._store.stats
            s.update(tier_reads=dict(st.reads), tier_bytes=dict(st.bytes),
                     checksum_failures=dict(st.checksum_failures), fallbacks=st.fallbacks)
        return s

    async def ping(self) -> str:
        """The node this actor actually runs on (placement is checked against it)."""
        return ray.get_runtime_context().get_node_id()
