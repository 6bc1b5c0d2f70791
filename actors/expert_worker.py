"""ExpertWorker: one per GPU. Owns an HBM expert cache and computes the experts it owns.

Loads come from the node's DRAM tier (a StorageActor's object-store ref, mapped zero-copy) into a device blob; on
CUDA through a pinned staging buffer and a non-blocking copy on a dedicated stream, so loads overlap compute; on a
CPU-only machine the same path lands in CPU tensors. A blob's gate/up/down are views into it at the manifest's
4 KiB-aligned offsets. The cache's bookkeeping (budget, pins, eviction order) is `policies.hbm_cache.CacheIndex`;
its byte budget is never exceeded and an expert in use is never evicted.

A threaded actor (Ray runs its methods on `max_concurrency` threads; a synchronous actor call costs less than an
asyncio one, which matters at one call per worker per MoE layer). Demand loads (a compute's misses) go out all at
once on the worker's I/O pool; prefetches wait in a priority queue served by a few background threads, so a
prefetch never blocks a compute. torch releases the GIL, so loads keep flowing while experts compute.
"""
from __future__ import annotations

import heapq
import itertools
import resource
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
import torch.nn.functional as F

from policies.cost_model import RateMeter, Rates, decide_miss
from policies.hbm_cache import CacheIndex, DoesNotFit, make_policy
from storage_adapters.manifest import Manifest

Key = tuple[int, int]  # (layer, expert)
MISS = "miss"  # compute_resident's answer when an expert is not resident (the caller falls back to compute)
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


SMALL_PAYLOAD = 64 << 10  # below this, activations travel as raw bytes: Ray's numpy path costs ~0.5 ms a call


def pack_rows(x: np.ndarray):
    """Activations for the wire: raw float32 bytes when small (a decode step), the array itself when large
    (prefill: Ray hands big numpy arrays over zero-copy)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.tobytes() if x.nbytes < SMALL_PAYLOAD else x


def unpack_rows(obj, rows: int) -> np.ndarray:
    """Inverse of pack_rows: [rows, H] float32 (read-only when it came zero-copy)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return np.frombuffer(obj, dtype=np.float32).reshape(rows, -1)
    return obj


def expert_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: x [n, H] -> [n, H]; weights in nn.Linear's [out, in] layout (gate/up [I, H], down [H, I])."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@dataclass
class _Resident:
    blob: torch.Tensor                      # [size] uint8 on the device
    tensors: tuple[torch.Tensor, ...]       # gate, up, down views into blob
    ready: torch.cuda.Event | None = None   # set when the async H2D copy has landed
    cached: bool = True                     # False: no room (all pinned), used by one compute and dropped
    tier: str = "dram"                      # the tier its bytes came from (dram, nvme, s3)


@dataclass(order=True)
class _Queued:
    neg_priority: float
    seq: int
    key: Key = field(compare=False)
    request: str | None = field(compare=False, default=None)
    victims: list | None = field(compare=False, default=None)  # coordinator orders: evict only these (or none)
    tiers: list | None = field(compare=False, default=None)    # the request's TierSet (None: every tier)


class ExpertWorker:
    def __init__(self, worker_id: int, manifest_json: bytes, hbm_budget_bytes: int, storage_by_node: dict,
                 *, device: str = "auto", policy: str = "lru", prefetch_concurrency: int = 2, cpu_threads: int = 1,
                 io_threads: int = 8, miss_rates: dict | None = None):
        """miss_rates: None — a miss always waits for the load into the cache. Otherwise policies/cost_model.py
        decides per missed expert between waiting for the transfer and computing it on the CPU straight from the
        DRAM tier (nothing cached then), from {link_Bps, link_latency_s, device_flops, cpu_flops} (configured
        priors) and, with measure=True, the rates this worker measures on its own loads."""
        self.worker_id = worker_id
        # inputs arrive read-only (zero-copy from Ray's object store) and are only read: torch need not warn
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.manifest = Manifest.from_json(manifest_json, f"worker {worker_id}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"worker {worker_id}: device 'cuda' requested but CUDA is not available here")
        self.device = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # CPU workers share the node's cores with each other and the runtime: one intra-op thread each, so
            # small expert matmuls do not pay for a thread pool that has no idle cores to run on
            torch.set_num_threads(cpu_threads)
        largest = self.manifest.expert_bytes
        if hbm_budget_bytes < largest:
            raise ValueError(f"worker {worker_id}: HBM budget of {hbm_budget_bytes} bytes is smaller than one expert "
                             f"({largest} bytes); raise workers.hbm_budget_bytes")
        self.cache = CacheIndex(hbm_budget_bytes, make_policy(policy, hbm_budget_bytes))
        node = self.node_id = ray.get_runtime_context().get_node_id()
        # storage_by_node: node id -> [StorageActor]; use this node's (its DRAM tier is our zero-copy source)
        handles = storage_by_node.get(node) or next(iter(storage_by_node.values()))
        self.storage = handles[worker_id % len(handles)]
        self.local_storage = node in storage_by_node
        self._storage_by_node = storage_by_node   # other nodes' actors: the fallback when ours is gone
        self._res: dict[Key, _Resident] = {}
        # guards the cache index, _res, the load table, the prefetch queue and the counters across the actor's
        # call threads, the I/O pool, the prefetch threads and the compiled-graph thread
        self._lock = threading.RLock()
        self._loading: dict[Key, Future] = {}
        self._queue: list[_Queued] = []
        self._queued: dict[Key, _Queued] = {}
        self._seq = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix=f"worker{worker_id}-io")
        self._prefetchers = [threading.Thread(target=self._prefetch_loop, daemon=True,
                                              name=f"worker{worker_id}-prefetch{i}")
                             for i in range(prefetch_concurrency)]
        for t in self._prefetchers:
            t.start()
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._staging: queue.Queue = queue.Queue()
            for _ in range(2):
                self._staging.put(torch.empty(largest, dtype=torch.uint8, pin_memory=True))
        self.miss_rates = None
        if miss_rates is not None:
            r = dict(miss_rates)
            self._measure = bool(r.pop("measure", False))
            self.miss_rates = Rates(**r)
            self._link_meter = RateMeter(self.miss_rates.link_Bps)
        self.counters = dict(cpu_computes=0, hits=0, misses=0, prefetch_hits=0, loads=0, demand_loads=0, prefetch_loads=0,
                             bytes_loaded=0, load_seconds=0.0, compute_calls=0, tokens=0, uncached=0,
                             prefetch_dropped=0, cancelled=0, peak_used_bytes=0, stall_seconds=0.0,
                             tier_bytes={})
        self.counters["storage_retries"] = 0   # blob reads re-asked after a storage actor died (see _read_blob)

    def _count(self, **inc) -> None:
        with self._lock:
            for k, v in inc.items():
                self.counters[k] += v

    # -- loading ------------------------------------------------------------------------------------------------
    def _views(self, key: Key, blob: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = self.manifest.blob(*key)
        out = []
        for role in ("gate", "up", "down"):
            t = b.tensors[role]
            out.append(blob[t.offset:t.offset + t.length].view(_TORCH_DTYPES[t.dtype]).view(t.shape))
        return tuple(out)

    def _fetch_to_device(self, key: Key, tiers: list | None = None) -> _Resident:
        t0 = time.perf_counter()
        view, tier = self._read_blob(key, tiers)  # uint8 numpy, mapped read-only from the node's object store
        n = view.nbytes
        dev = torch.empty(n, dtype=torch.uint8, device=self.device)
        ready = None
        if self.device.type == "cuda":
            stage = self._staging.get()
            try:
                np.copyto(stage[:n].numpy(), view)                             # object store -> pinned host
                with torch.cuda.stream(self._stream):
                    dev.copy_(stage[:n], non_blocking=True)                    # pinned host -> HBM, async
                    ready = torch.cuda.Event()
                    ready.record(self._stream)
                ready.synchronize()  # the staging buffer is reusable only once copied
            finally:
                self._staging.put(stage)
        else:
            np.copyto(dev.numpy(), view)
        del view
        dt = time.perf_counter() - t0
        self._count(loads=1, bytes_loaded=n, load_seconds=dt)
        if self.miss_rates is not None and self._measure:
            with self._lock:
                self._link_meter.observe(n, dt)
        with self._lock:
            tb = self.counters["tier_bytes"]
            tb[tier] = tb.get(tier, 0) + n
        return _Resident(dev, self._views(key, dev), ready, tier=tier)

    def _read_blob(self, key: Key, tiers: list | None = None, first_error: BaseException | None = None) -> tuple:
        """(blob view, tier) through a storage actor. A storage actor that dies mid-read (RayActorError), or whose
        reply object died with it (ObjectLostError: the blob's ref was owned by the dead incarnation), is asked
        again: first our own (Ray restarts it, cluster/storage_tier.py), then every other node's actor (ours may
        be gone for good with its node). Storage errors (integrity, access) are not retried here: the store has
        already fallen back across tiers, and its error names the blob and the tiers."""
        others = [h for hs in self._storage_by_node.values() for h in hs if h is not self.storage]
        err = first_error
        for h in ([self.storage] if first_error is not None else [self.storage, self.storage]) + others:
            try:
                ref, tier = ray.get(h.get_tiered.remote(*key, tiers))
                return ray.get(ref), tier
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                if isinstance(e, ray.exceptions.RayTaskError):
                    raise  # the actor is alive and the read itself failed: its error goes up as is
                err = e
                self._count(storage_retries=1)
        raise RuntimeError(f"worker {self.worker_id}: blob {key}: no storage actor could serve it "
                           f"({len(others) + 1} tried): {type(err).__name__}: {err}") from err

    def _load(self, key: Key, prefetched: bool, request: str | None = None,
              pin: bool = False, victims: list | None = None, tiers: list | None = None) -> tuple[_Resident, bool]:
        """(entry, pinned) for key, loading it once however many threads ask (in-flight loads are shared).
        With pin, the thread that performs the load gets the entry pinned in the same locked step it is
        inserted, so no other load can evict it first; a thread that only waited on someone else's load gets
        pinned=False and pins it itself if it is still resident. victims (a coordinator's prefetch): evict only
        these to make room, never anything else (DoesNotFit otherwise)."""
        with self._lock:
            if key in self._res:
                return self._res[key], False
            fut = self._loading.get(key)
            mine = fut is None
            if mine:
                fut = self._loading[key] = Future()
        if not mine:
            try:
                return fut.result(), False
            except Exception:  # noqa: BLE001 - the other caller's load failed (its TierSet, its deadline...):
                pass          # that must not fail this one, which loads with its own tiers
            return self._load(key, prefetched, request, pin, victims, tiers)
        pinned = False
        try:
            res = self._fetch_to_device(key, tiers)
            with self._lock:
                try:
                    if victims is not None:
                        gone = self.cache.insert_evicting_only(key, res.blob.numel(), victims, request=request)
                    else:
                        gone = self.cache.insert(key, res.blob.numel(), prefetched=prefetched, request=request)
                    for victim in gone:
                        del self._res[victim]
                    self._res[key] = res
                    if pin:
                        self.cache.pin(key)
                        pinned = True
                except DoesNotFit:
                    res.cached = False
                    if not prefetched:
                        self.counters["uncached"] += 1  # every byte is pinned by computes in flight: use it once
                self.counters["peak_used_bytes"] = max(self.counters["peak_used_bytes"], self.cache.used)
            fut.set_result(res)  # a compute that waited on this load uses it even when a prefetch found no room
            if prefetched and not res.cached:
                raise DoesNotFit(f"prefetch of {key}: no room without evicting what the coordinator did not name")
            return res, pinned
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._loading[key]

    # -- compute ------------------------------------------------------------------------------------------------
    def compute(self, layer: int, experts: list[int], counts: list[int], x, with_stats: bool = False,
                tiers: list | None = None):
        """x [N, H] float32 (or pack_rows of it) holds the tokens of each expert in `experts`, grouped, `counts`
        rows each (sum = N). Returns [N, H] packed the same way: expert_e(x_rows) for each group, unweighted (the
        runtime applies router weights). with_stats: returns (that, (hits, misses, prefetch_hits, stall seconds,
        {tier: bytes loaded for this call})) — what the runtime's counters add up, at no extra round trip.
        tiers: the TierSet every request of this call allows; its misses never read a tier outside it."""
        packed = not isinstance(x, np.ndarray)
        x = unpack_rows(x, sum(counts))
        assert len(experts) == len(counts) and sum(counts) == x.shape[0], \
            f"worker {self.worker_id}: {len(experts)} experts / {sum(counts)} rows for x of shape {x.shape}"
        keys = [(layer, int(e)) for e in experts]
        uniq = list(dict.fromkeys(keys))
        res: dict[Key, _Resident] = {}
        pinned: list[Key] = []

        def grab(k: Key) -> None:  # under the lock: pin a resident entry for this compute
            r = self._res.get(k)
            if r is not None:
                self.cache.pin(k)
                pinned.append(k)
                res[k] = r

        hits = phits = 0
        with self._lock:  # resident experts are pinned first, so loading the others cannot evict them
            for k in uniq:
                if k in self._res:
                    hits += 1
                    phits += self.cache.entries[k].prefetched
                    grab(k)
                self._dequeue(k)  # a queued prefetch of an expert needed now becomes a demand load
            self.counters["hits"] += hits
            self.counters["prefetch_hits"] += phits
            self.counters["misses"] += len(uniq) - hits
        missed = [k for k in uniq if k not in res]
        t_wait = time.perf_counter()
        try:
            if missed and self.miss_rates is not None:
                rows = dict.fromkeys(uniq, 0)
                for k, n in zip(keys, counts):
                    rows[k] += n
                for k, r in self._cpu_misses(missed, rows, tiers).items():
                    res[k] = r   # computed on the CPU from the DRAM tier; not cached, nothing pinned
            last: dict[Key, _Resident] = {}
            for _ in range(3):  # a load we only waited on may be evicted before we pin it: load again
                missing = [k for k in uniq if k not in res]
                if not missing:
                    break
                self._count(demand_loads=len(missing))
                futs = [self._io.submit(self._load, k, False, None, True, None, tiers) for k in missing]
                got = [(k, f.exception() or f.result()) for k, f in zip(missing, futs)]  # waits for all
                with self._lock:
                    for k, g in got:
                        if isinstance(g, BaseException):
                            continue
                        r, did_pin = g  # record every pin, even if a sibling load failed, so finally unpins it
                        last[k] = r
                        if did_pin:
                            pinned.append(k)
                            res[k] = r
                        elif not r.cached:
                            res[k] = r  # no room (all pinned): used by this compute only
                        else:
                            grab(k)
                failed = next((g for _, g in got if isinstance(g, BaseException)), None)
                if failed is not None:
                    raise failed
            for k in uniq:
                if k not in res:
                    res[k] = last[k]  # still evicted after retries: use the loaded copy this once
            stall = time.perf_counter() - t_wait if missed else 0.0
            with self._lock:
                for k in pinned:
                    self.cache.access(k)
                self.counters["stall_seconds"] += stall
            out = self._compute_sync([res[k] for k in keys], counts, x)
        finally:
            self._release(pinned, int(x.shape[0]))
        out = out.tobytes() if packed else out
        if not with_stats:
            return out
        tb: dict[str, int] = {}
        for k in missed:
            r = res[k]
            tb[r.tier] = tb.get(r.tier, 0) + int(r.blob.numel())
        return out, (hits, len(uniq) - hits, phits, stall, tb)

    def _release(self, pinned: list[Key], rows: int) -> None:
        """A compute is done with its experts: unpin them and count it."""
        with self._lock:
            for k in pinned:
                self.cache.unpin(k)
            self.counters["compute_calls"] += 1
            self.counters["tokens"] += rows

    def compute_resident(self, payload):
        """Compiled-graph entry point (runs on the graph's own thread): payload is None (no work for this worker
        in this layer) or (layer, experts, counts, x) as for `compute`. Computes only when every expert is
        resident — the steady decode path; otherwise returns MISS and the runtime falls back to `compute`, which
        loads. Never waits on a load."""
        if payload is None:
            return None
        layer, experts, counts, x = payload
        packed = not isinstance(x, np.ndarray)
        x = unpack_rows(x, sum(counts))
        keys = [(layer, int(e)) for e in experts]
        with self._lock:
            if any(k not in self._res for k in keys):
                return MISS
            res = [self._res[k] for k in keys]
            pinned = list(dict.fromkeys(keys))
            for k in pinned:
                self.cache.pin(k)
                self.cache.access(k)
            self.counters["hits"] += len(pinned)
        try:
            out = self._compute_sync(res, counts, x)
        finally:
            self._release(pinned, int(x.shape[0]))
        return out.tobytes() if packed else out

    def _cpu_misses(self, missed: list[Key], rows: dict[Key, int], tiers: list | None = None) -> dict[Key, _Resident]:
        """The cost model's per-miss choice: for each missed expert, get its DRAM-tier copy (the host copy the
        transfer would start from) and compute it there when that beats copying it to the device and computing
        there. Returns the experts to compute on the CPU (host views, not cached)."""
        rates = self.miss_rates
        if self._measure:
            rates = Rates(self._link_meter.value, rates.link_latency_s, rates.device_flops, rates.cpu_flops)
        out = {}
        cpu = []
        for k in missed:   # every blob reaches the device through the node's DRAM tier: a host copy exists
            b = self.manifest.blob(*k)
            I, H = b.tensors["gate"].shape
            if decide_miss(rates, nbytes=b.size, tokens=rows[k], hidden=H, intermediate=I).choice == "cpu":
                cpu.append(k)
        refs = {k: self.storage.get_tiered.remote(*k, tiers) for k in cpu}
        for k, call in refs.items():
            try:
                ref, tier = ray.get(call)
                view = ray.get(ref)                               # uint8, zero-copy from the object store
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                if isinstance(e, ray.exceptions.RayTaskError):
                    raise
                view, tier = self._read_blob(k, tiers, first_error=e)  # our storage actor died: retried
            blob = torch.from_numpy(view)
            out[k] = _Resident(blob, self._views(k, blob), None, cached=False, tier=tier)
        if out:
            self._count(cpu_computes=len(out))
        return out

    def _compute_sync(self, residents: list[_Resident], counts: list[int], x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)
        dt = residents[0].tensors[0].dtype
        xt = xt.to(dt)
        out = torch.empty_like(xt)
        start = 0
        for r, n in zip(residents, counts):
            if r.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(r.ready)
            g, u, d = r.tensors
            if g.device != xt.device:   # a host copy the cost model chose to compute in place
                out[start:start + n] = expert_ffn(xt[start:start + n].cpu(), g, u, d).to(xt.device)
            else:
                out[start:start + n] = expert_ffn(xt[start:start + n], g, u, d)
            start += n
        return out.to(torch.float32 if x.dtype == np.float32 else out.dtype).cpu().numpy()

    # -- prefetch -----------------------------------------------------------------------------------------------
    def prefetch(self, items: list[tuple], cancel: list[tuple] | None = None) -> int:
        """Queue (layer, expert, priority, request_id[, victims[, tiers]]) loads, highest priority first; returns
        how many were queued (resident, loading or already-queued experts are skipped, a higher priority is kept).
        victims (the PrefetchCoordinator's orders): the load may evict only these residents — the ones the
        coordinator valued lower — and is dropped if they do not make room; without it the cache's policy picks.
        tiers: the request's TierSet; the load never reads a tier outside it. cancel: (layer, expert) items to
        cancel first (as `cancel(items=...)`), so that a coordinator step is one call per worker."""
        if cancel:
            self.cancel(items=cancel)
        n = 0
        with self._lock:
            for item in items:
                layer, expert, priority, request = item[:4]
                victims = [(int(a), int(b)) for a, b in item[4]] if len(item) > 4 and item[4] is not None else None
                tiers = list(item[5]) if len(item) > 5 and item[5] is not None else None
                key = (int(layer), int(expert))
                if key in self._res or key in self._loading:
                    continue
                q = self._queued.get(key)
                if q is not None:
                    if -q.neg_priority >= priority:
                        continue
                    q.key = None  # superseded; the heap drops it when popped
                q = _Queued(-float(priority), next(self._seq), key, request, victims, tiers)
                self._queued[key] = q
                heapq.heappush(self._queue, q)
                n += 1
            self._wake.notify_all()
        return n

    def _dequeue(self, key: Key) -> None:  # under the lock
        q = self._queued.pop(key, None)
        if q is not None:
            q.key = None

    def _prefetch_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    while not self._queue:
                        self._wake.wait()
                    q = heapq.heappop(self._queue)
                    if q.key is not None:
                        break
                self._queued.pop(q.key, None)
            try:
                self._load(q.key, prefetched=True, request=q.request, victims=q.victims, tiers=q.tiers)
                self._count(prefetch_loads=1)
            except Exception:  # noqa: BLE001 - a failed prefetch must not fail anyone: demand retries it
                self._count(prefetch_dropped=1)

    def cancel(self, request: str | None = None, items: list[tuple] | None = None,
               requests: list | None = None) -> int:
        """Drop queued prefetches of a request (or of several `requests`, or of given (layer, expert) items);
        resident experts they loaded and nobody used become first to evict. Returns how many queued prefetches
        were dropped."""
        keys = {(int(i[0]), int(i[1])) for i in items} if items else None
        reqs = set(requests or ()) | ({request} if request is not None else set())
        n = 0
        with self._lock:
            for key, q in list(self._queued.items()):
                if q.request in reqs or (keys and key in keys):
                    self._dequeue(key)
                    n += 1
            for r in reqs:
                self.cache.mark_stale(request=r)
            if keys:
                self.cache.mark_stale(keys=keys)
            self.counters["cancelled"] += n
        return n

    # -- introspection ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            s = dict(self.counters)
            s["tier_bytes"] = dict(self.counters["tier_bytes"])
            s.update(worker_id=self.worker_id, device=str(self.device), node_id=self.node_id,
                     used_bytes=self.cache.used, budget_bytes=self.cache.budget, resident=len(self.cache),
                     evictions=self.cache.evictions, wasted_prefetches=self.cache.wasted_prefetches,
                     queued_prefetches=len(self._queued), policy=self.cache.policy.name,
                     local_storage=self.local_storage,
                     peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            assert self.cache.used <= self.cache.budget, f"worker {self.worker_id}: cache over budget"
        return s

    def resident(self) -> list[Key]:
        with self._lock:
            return list(self.cache.keys())

    def snapshot(self) -> tuple:
        """(resident keys, keys queued or loading, bytes used, budget): the coordinator's view, in one call."""
        with self._lock:
            return (list(self.cache.keys()), list(self._queued) + list(self._loading), self.cache.used,
                    self.cache.budget)

    def drop(self, keys: list[tuple]) -> int:
        """Evict experts this worker no longer owns (re-placement); pinned ones stay until their compute ends."""
        n = 0
        with self._lock:
            for k in keys:
                k = (int(k[0]), int(k[1]))
                if k in self.cache and not self.cache.entries[k].pins:
                    self.cache.remove(k)
                    self._res.pop(k, None)
                    n += 1
        return n

    def ping(self) -> int:
        return self.worker_id
