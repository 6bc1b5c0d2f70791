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
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
import torch.nn.functional as F

from actors.h2d import HostToDevice
from policies.cost_model import RateMeter, Rates, decide_miss
from policies.hbm_cache import CacheIndex, DoesNotFit, make_policy
from policies.telemetry import MISS_CAUSES
from storage_adapters.checksum import algo_of, verify
from storage_adapters.manifest import Manifest

Key = tuple[int, int]  # (layer, expert)
# blobs up to this size come back inside the storage actor's reply (one round trip; Ray inlines replies under its
# 100 KiB max_direct_call_object_size); larger ones as object refs, mapped zero-copy from the node's object store
INLINE_BLOB_BYTES = 96 << 10


def _blob(got) -> np.ndarray:
    """A StorageActor.get_tiered reply's blob: the array itself (inline or uncached) or a ref to get."""
    return got if isinstance(got, np.ndarray) else ray.get(got)


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


def pack_call(layer: int, experts, counts, x: np.ndarray) -> bytes:
    """A small per-worker call as ONE bytes object: int32 [layer, U, rows, H, experts[U], counts[U]], then x as
    float32 [rows, H]. Ray moves a single bytes argument (and reply) ~0.1 ms faster each way than a tuple of
    lists and bytes (measured: docs/benchmarks.md, "The cost of distribution"), at one call per MoE layer."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    head = np.concatenate([[layer, len(experts), x.shape[0], x.shape[1]], experts, counts]).astype("<i4")
    return head.tobytes() + x.tobytes()


def unpack_call(b) -> tuple[int, list[int], list[int], np.ndarray]:
    """Inverse of pack_call: (layer, experts, counts, x [rows, H] float32, a read-only view of b)."""
    layer, u, rows, h = np.frombuffer(b, "<i4", 4).tolist()
    ec = np.frombuffer(b, "<i4", 2 * u, 16).tolist()
    return layer, ec[:u], ec[u:], np.frombuffer(b, np.float32, rows * h, 16 + 8 * u).reshape(rows, h)


def pack_orders(orders: list[tuple], cancels: list[tuple] = (), values: dict | None = None) -> bytes:
    """Prefetch orders (layer, expert, priority, ...), cancellations (layer, expert) and eviction values
    {(layer, expert): P} riding behind a pack_call (the runtime's fast path: no call of their own): int32 [n, m, v],
    int32 [n, 2] (layer, expert), float32 [n] priority, int32 [m, 2] (layer, expert), int32 [v, 2] (layer,
    expert), float32 [v] value. Appended to pack_call's bytes."""
    values = values or {}
    n, m, v = len(orders), len(cancels), len(values)
    le = np.array([(o[0], o[1]) for o in orders], "<i4").reshape(n, 2)
    pri = np.array([o[2] for o in orders], "<f4")
    ce = np.array([(c[0], c[1]) for c in cancels], "<i4").reshape(m, 2)
    ve = np.array(list(values), "<i4").reshape(v, 2)
    vv = np.array(list(values.values()), "<f4")
    return b"".join(a.tobytes() for a in (np.array([n, m, v], "<i4"), le, pri, ce, ve, vv))


def unpack_orders(b) -> tuple[list[tuple], list[tuple], dict]:
    """What pack_orders appended to a pack_call (nothing: [], [], {}): (prefetch() items (layer, expert, priority,
    None), cancel items (layer, expert), {(layer, expert): value})."""
    _, u, rows, h = np.frombuffer(b, "<i4", 4).tolist()
    off = 16 + 8 * u + 4 * rows * h
    if len(b) <= off:
        return [], [], {}
    n, m, v = np.frombuffer(b, "<i4", 3, off).tolist()
    off += 12
    le = np.frombuffer(b, "<i4", 2 * n, off).reshape(n, 2).tolist()
    pri = np.frombuffer(b, "<f4", n, off + 8 * n).tolist()
    off += 12 * n
    ce = np.frombuffer(b, "<i4", 2 * m, off).reshape(m, 2).tolist()
    off += 8 * m
    ve = np.frombuffer(b, "<i4", 2 * v, off).reshape(v, 2).tolist()
    vv = np.frombuffer(b, "<f4", v, off + 8 * v).tolist()
    return ([(l, e, p, None) for (l, e), p in zip(le, pri)], [tuple(c) for c in ce],
            {(l, e): x for (l, e), x in zip(ve, vv)})


def unpack_reply(r, rows: int) -> tuple[np.ndarray, int, int, int, float, dict, dict]:
    """compute_packed's (or compute_call's) reply -> (y [rows, H] float32, hits, misses, prefetch hits, stall
    seconds, {tier: bytes}, {miss cause: count})."""
    if isinstance(r, tuple):
        y, hits, misses, phits, stall, tb, why = r
        return unpack_rows(y, rows), hits, misses, phits, stall, tb, why
    hits, misses, phits, stall = np.frombuffer(r, "<f8", 4).tolist()
    return (np.frombuffer(r, np.float32, offset=32).reshape(rows, -1), int(hits), int(misses), int(phits), stall,
            {}, {})


def swiglu_in(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The expert's first half: x [n, H] -> h [n, I] = silu(x gate^T) * (x up^T); gate/up [I, H]."""
    return F.silu(F.linear(x, gate)) * F.linear(x, up)


def expert_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: x [n, H] -> [n, H]; weights in nn.Linear's [out, in] layout (gate/up [I, H], down [H, I]).
    Written as swiglu_in then down's GEMM so the pipelined partial completion (gate/up first, down once it has
    arrived) runs the very same ops: bit-for-bit equal."""
    return F.linear(swiglu_in(x, gate, up), down)


def _new_hash(checksum: str):
    """A fresh incremental hash of the checksum's algorithm (storage_adapters/checksum.py strings)."""
    import hashlib

    import xxhash
    return xxhash.xxh64() if algo_of(checksum) == "xxh64" else hashlib.sha256()


def _hexof(h, checksum: str) -> str:
    return f"{algo_of(checksum)}:{h.hexdigest()}"


@dataclass
class _Resident:
    blob: torch.Tensor                      # [size] uint8 on the device
    tensors: tuple[torch.Tensor, ...]       # gate, up, down views into blob
    ready: torch.cuda.Event | None = None   # set when the async H2D copy has landed
    cached: bool = True                     # False: no room (all pinned), used by one compute and dropped
    tier: str = "dram"                      # the tier its bytes came from (dram, nvme, s3)
    partial: "_Partial | None" = None       # partial prefetch: tensors = (gate rows [r, H], up rows [r, H], None)


@dataclass
class _Partial:
    """The first `rows` rows of gate and up, prefetched ahead of use (docs/weight_prefetch.md). Unverified until
    completed: the hashes have seen exactly the prefix bytes copied to the device; the rest's bytes finish them
    and each whole tensor must match its manifest checksum before any result computed from the rows is used."""
    rows: int
    row_bytes: int
    gate_hash: object                       # xxhash / hashlib state over the gate prefix bytes
    up_hash: object
    failed: bool = False                    # its completion did not verify: every use reads the whole blob


@dataclass
class _Completion:
    """A routed partial entry's rest in flight: two ranged reads issued together, (a) gate/up rows [rows:] and
    (b) all of down, consumed in two stages so gate/up verify and compute while down is still on the wire. Shared
    by every compute that routes the key meanwhile; whichever caller reaches a stage first does its work under
    `lock`, the others reuse its memo. Stage memos: a = ("rows", dev blob, gate, up, ready) or ("whole", _Resident)
    (a failed/fallback read: the verified whole blob); b = the whole _Resident (assembled, or that fallback)."""
    key: Key
    r: _Resident
    tiers: list | None
    t0: float                                  # perf_counter when both reads were issued
    rest: Future | None = None                 # (a): [uint8 host bytes, tier]; None: no rows left to read
    down: Future | None = None                 # (b): [uint8 host bytes, tier]
    arrived: dict = field(default_factory=dict)  # "rest"/"down" -> perf_counter of the reply's arrival
    lock: threading.RLock = field(default_factory=threading.RLock)
    a: tuple | None = None
    b: _Resident | None = None
    error: BaseException | None = None         # the fallback itself failed: every waiter sees this


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
                 io_threads: int = 8, miss_rates: dict | None = None, weight_prefetch: dict | None = None,
                 h2d: dict | None = None):
        """miss_rates: None — a miss always waits for the load into the cache. Otherwise policies/cost_model.py
        decides per missed expert between waiting for the transfer and computing it on the CPU straight from the
        DRAM tier (nothing cached then), from {link_Bps, link_latency_s, device_flops, cpu_flops} (configured
        priors) and, with measure=True, the rates this worker measures on its own loads. h2d: HostToDevice's
        {chunk_bytes, copy_threads} (actors/h2d.py) for loads into a GPU's memory."""
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
        self._stale_on_arrival: set[Key] = set()   # cancelled while on the wire: marked stale on landing
        # prefetches taken off the queue and not landed yet -> the request each is for (None: the fast path's), so
        # that a cancellation finds them from the moment they leave the queue, before their load is registered
        self._taken: dict[Key, str | None] = {}
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
        # host -> device copies: on CUDA chunked through pinned staging on a copy stream of their own (actors/h2d.py)
        # (h2d: {chunk_bytes, copy_threads}, config workers.h2d_*); staging never larger than one expert
        self._h2d = HostToDevice(self.device, slots=max(2, prefetch_concurrency), max_bytes=largest, **(h2d or {}))
        self.miss_rates = None
        if miss_rates is not None:
            r = dict(miss_rates)
            self._measure = bool(r.pop("measure", False))
            self.miss_rates = Rates(**r)
            self._link_meter = RateMeter(self.miss_rates.link_Bps)
        # weight_prefetch: cluster/config.py WeightPrefetchConfig as a dict; None: ask the storage actor (its cfg)
        if weight_prefetch is None:   # any storage actor holds the same validated config; ours may be restarting
            for i, h in enumerate([self.storage] + [h for hs in storage_by_node.values() for h in hs]):
                try:
                    weight_prefetch = ray.get(h.weight_prefetch_config.remote())
                    break
                except ray.exceptions.RayActorError:
                    if i == sum(map(len, storage_by_node.values())):
                        raise
        wp = weight_prefetch
        self.partial_ratio = float(wp["prefetch_ratio"]["moe"]["gate_up"]) if wp.get("enabled") else None
        self.partial_cap = int(wp.get("max_prefetch_bytes_per_layer", 18 << 20))
        self._partial_inflight: dict[int, int] = {}   # layer -> partial prefetch bytes being fetched
        self._completing: dict[Key, _Completion] = {}
        self.counters = dict(partial_prefetches=0, partial_bytes=0, partial_completions=0, partial_capped=0,
                             partial_verify_failures=0, cpu_computes=0, hits=0, misses=0, prefetch_hits=0, loads=0,
                             demand_loads=0, prefetch_loads=0,
                             bytes_loaded=0, load_seconds=0.0, compute_calls=0, tokens=0, uncached=0,
                             prefetch_dropped=0, prefetch_declined=0, cancelled=0, stale_marked=0, peak_used_bytes=0,
                             stall_seconds=0.0,
                             tier_bytes={})
        # why each miss missed (_miss_cause): the prediction came too late, or never, or its load was evicted
        self.counters["miss_causes"] = dict.fromkeys(MISS_CAUSES, 0)
        self.counters["storage_retries"] = 0   # blob reads re-asked after a storage actor died (see _read_blob)
        # the pipelined completion (docs/weight_prefetch.md): seconds of gate/up compute (h) during which the
        # down read was still in flight (a lower bound on CUDA, where the GEMMs only launch), and each read's
        # issue-to-arrival seconds, summed over completions
        self.counters.update(partial_down_overlap_s=0.0, partial_rest_read_s=0.0, partial_down_read_s=0.0)

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

    def _fetch_to_device(self, key: Key, tiers: list | None = None, prefetch: bool = False) -> _Resident:
        t0 = time.perf_counter()
        view, tier = self._read_blob(key, tiers, prefetch=prefetch)  # uint8 numpy, mapped read-only from the node's object store
        n = view.nbytes
        dev, ready = self._h2d.copy(view)   # object store -> (pinned, chunked) -> HBM; on CPU one memcpy
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

    def _read_blob(self, key: Key, tiers: list | None = None, first_error: BaseException | None = None,
                   prefetch: bool = False) -> tuple:
        """(blob view, tier) through a storage actor. A storage actor that dies mid-read (RayActorError), or whose
        reply object died with it (ObjectLostError: the blob's ref was owned by the dead incarnation), is asked
        again: first our own (Ray restarts it, cluster/storage_tier.py), then every other node's actor (ours may
        be gone for good with its node). Storage errors (integrity, access) are not retried here: the store has
        already fallen back across tiers, and its error names the blob and the tiers. prefetch: the read queues
        behind demand reads on a tier that orders them (StorageActor.get_tiered)."""
        others = [h for hs in self._storage_by_node.values() for h in hs if h is not self.storage]
        err = first_error
        for h in ([self.storage] if first_error is not None else [self.storage, self.storage]) + others:
            try:
                got, tier = ray.get(h.get_tiered.remote(*key, tiers, prefetch, INLINE_BLOB_BYTES))
                return _blob(got), tier
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
            res = self._fetch_partial(key, tiers) if prefetched and self.partial_ratio is not None \
                else self._fetch_to_device(key, tiers, prefetch=prefetched)
            with self._lock:
                if res.partial is not None:  # its reservation becomes a held entry (or nothing) in this section
                    self._partial_inflight[key[0]] -= 2 * res.partial.rows * res.partial.row_bytes
                try:
                    if victims is not None:
                        gone = self.cache.insert_evicting_only(key, res.blob.numel(), victims, request=request)
                    else:
                        gone = self.cache.insert(key, res.blob.numel(), prefetched=prefetched, request=request)
                    for victim in gone:
                        del self._res[victim]
                    self._res[key] = res
                    if prefetched and key in self._stale_on_arrival:   # cancelled while it was on the wire
                        self.counters["stale_marked"] += self.cache.mark_stale(keys=(key,))
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
                self._stale_on_arrival.discard(key)

    def _miss_cause(self, key: Key) -> str:  # under the lock, for a key not resident
        if key in self._loading or key in self._taken:
            return "in_flight"          # ordered (or another call's miss) and on the wire: too late, not wrong
        if key in self._queued:
            return "queued"            # ordered, still behind other loads
        was = self.cache.evicted.get(key)
        if was is None:   # never resident here (or dropped), and no order for it stands now: never ordered, or
            return "not_ordered"   # its order was cancelled or found no room before it loaded
        return "evicted_unused" if was else "evicted"   # a prefetch thrown out before its use / capacity

    # -- compute ------------------------------------------------------------------------------------------------
    def compute(self, layer: int, experts: list[int], counts: list[int], x, with_stats: bool = False,
                tiers: list | None = None):
        """x [N, H] float32 (or pack_rows of it) holds the tokens of each expert in `experts`, grouped, `counts`
        rows each (sum = N). Returns [N, H] packed the same way: expert_e(x_rows) for each group, unweighted (the
        runtime applies router weights). with_stats: returns (that, (hits, misses, prefetch_hits, stall seconds,
        {tier: bytes loaded for this call}, {miss cause: count})) — what the runtime's counters add up, at no
        extra round trip.
        tiers: the TierSet every request of this call allows; its misses never read a tier outside it. The
        stats end with {cause: misses} (_miss_cause: in_flight, queued, evicted_unused, evicted, not_ordered)."""
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
        why: dict[str, int] = {}   # this call's misses by cause (_miss_cause)
        with self._lock:  # resident experts are pinned first, so loading the others cannot evict them
            for k in uniq:
                if k in self._res:
                    hits += 1
                    phits += self.cache.entries[k].prefetched
                    grab(k)
                else:
                    c = self._miss_cause(k)
                    why[c] = why.get(c, 0) + 1
                self._dequeue(k)  # a queued prefetch of an expert needed now becomes a demand load
            mc = self.counters["miss_causes"]
            for c, n in why.items():
                mc[c] += n
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
            # partial prefetches: their rest is read now, while the rows already there compute
            rest = {k: self._io.submit(self._complete, k, r, tiers) for k, r in res.items() if r.partial is not None}
            if rest:
                out, waited = self._compute_completing([res[k] for k in keys], keys, counts, x, rest)
                stall += waited
            else:
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
        return out, (hits, len(uniq) - hits, phits, stall, tb, why)

    def _riders(self, orders=None, cancels=None, values=None, coordinator=None) -> None:
        """The runtime's fast-path orders riding with a compute call: first cancel what it no longer wants (superseded
        by a nearer prediction, or refuted by the router), then queue the new ones. values {(layer, expert): P}:
        the latest predictions of this worker's experts (prefetch.speculate_values); from now on the cache evicts
        the lowest first, and those it never valued last. coordinator: the PrefetchCoordinator's (items, cancel,
        keep) for this worker, as its `prefetch` call takes them (prefetch.orders_ride), applied before the fast
        path's."""
        if values:
            with self._lock:
                self.cache.update_hints(values)
        if coordinator is not None:   # first: the fast path's orders come from newer routing than the reply
            items, cancel, keep = coordinator   # they rode back in, so a stale coordinator cancel must not undo them
            self.prefetch(items, cancel or None, keep)
        if cancels:
            self.cancel(items=cancels, fast_path=True)
        if orders:
            self.prefetch(orders)

    def compute_call(self, req: tuple):
        """The runtime's per-layer call: req = (layer, experts, counts, x, tiers[, orders, cancels, values[,
        coordinator]]) as for `compute` with with_stats=True (orders / cancels / values: the fast path's, and the
        coordinator's (items, cancel, keep), applied first: `_riders`); returns (y, hits,
        misses, prefetch_hits, stall seconds, {tier: bytes}, {miss cause: count}) flat. One argument and a flat reply
        cost Ray ~0.3 ms less per call than compute's six arguments and nested reply (each argument is serialized and
        bound on its own; measured by jobs/bench_runtime)."""
        layer, experts, counts, x, tiers = req[:5]
        if len(req) > 5:   # the runtime's fast path: orders for the next layers (and those it no longer predicts)
            self._riders(*req[5:])
        y, (hits, misses, phits, stall, tb, why) = self.compute(layer, experts, counts, x, True, tiers)
        return y, hits, misses, phits, stall, tb, why

    def compute_packed(self, b: bytes):
        """The runtime's per-layer call on the decode path: b = pack_call(layer, experts, counts, x), optionally
        followed by pack_orders(fast-path orders, cancels, values), which are applied before computing. Replies with
        one bytes object, float64 [hits, misses, prefetch_hits, stall seconds] then y float32 [rows, H], when
        nothing missed (the steady state); otherwise compute_call's flat tuple, which carries {tier: bytes} and
        {miss cause: count}. Read with unpack_reply."""
        layer, experts, counts, x = unpack_call(b)
        self._riders(*unpack_orders(b))   # the fast path's orders for the next layers: load while this computes
        y, (hits, misses, phits, stall, tb, why) = self.compute(layer, experts, counts, x, True, None)
        if tb or why:
            return y.tobytes(), hits, misses, phits, stall, tb, why
        return np.array([hits, misses, phits, stall], "<f8").tobytes() + y.tobytes()

    def _release(self, pinned: list[Key], rows: int) -> None:
        """A compute is done with its experts: unpin them and count it."""
        with self._lock:
            for k in pinned:
                self.cache.unpin(k)
            self.counters["compute_calls"] += 1
            self.counters["tokens"] += rows

    def compute_resident(self, payload):
        """Compiled-graph entry point (runs on the graph's own thread): payload is None (no work for this worker
        in this layer), pack_call bytes (y comes back as bytes), or (layer, experts, counts, x) as for `compute`.
        Computes only when every expert is resident — the steady decode path; otherwise returns MISS and the
        runtime falls back to `compute`, which loads. Never waits on a load."""
        if payload is None:
            return None
        if isinstance(payload, bytes):
            layer, experts, counts, x = unpack_call(payload)
            packed = True
            self._riders(*unpack_orders(payload))
        else:
            layer, experts, counts, x = payload[:4]
            packed = not isinstance(x, np.ndarray)
            if len(payload) > 4:   # fast-path orders riding along (ClusterExperts.riders)
                self._riders(*payload[4:])
        x = unpack_rows(x, sum(counts))
        keys = [(layer, int(e)) for e in experts]
        with self._lock:
            if any(k not in self._res or self._res[k].partial is not None for k in keys):
                return MISS   # a partial entry needs its rest read: the plain path does that
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
                got, tier = ray.get(call)
                view = _blob(got)                                 # uint8, zero-copy from the object store
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

    # -- partial prefetch (weight_prefetch_config, docs/weight_prefetch.md) -------------------------------------
    def partial_rows(self, key: Key, reserve: bool = False) -> int:
        """Rows of gate/up a prefetch of key moves: moe.gate_up of them, rounded down to whole 4 KiB units where
        rows tile 4 KiB (so ranged reads stay page-aligned), at most the layer's cap left over."""
        g = self.manifest.blob(*key).tensors["gate"]
        I = g.shape[0]
        rb = g.length // I
        unit = int(np.lcm(rb, 4096) // rb)
        unit = unit if unit <= I else 1
        rows = int(self.partial_ratio * I) // unit * unit
        with self._lock:   # bytes this layer already holds as partial entries, or is fetching
            held = sum(r.blob.numel() for k, r in self._res.items() if k[0] == key[0] and r.partial is not None)
            free = self.partial_cap - held - self._partial_inflight.get(key[0], 0)
            rows = max(0, min(rows, free // (2 * rb) // unit * unit))
            if reserve and rows:  # in the same critical section: two prefetch threads cannot both take the room
                self._partial_inflight[key[0]] = self._partial_inflight.get(key[0], 0) + 2 * rows * rb
        return rows

    def _fetch_partial(self, key: Key, tiers: list | None = None) -> _Resident:
        """A prefetch under weight_prefetch_config: the first rows of gate and up, by ranged read."""
        b = self.manifest.blob(*key)
        g, u = b.tensors["gate"], b.tensors["up"]
        rb = g.length // g.shape[0]
        rows = self.partial_rows(key, reserve=True)   # reserved until _load inserts the entry (or on failure)
        n = rows * rb
        if rows == 0:
            self._count(partial_capped=1)
            raise DoesNotFit(f"prefetch of {key}: max_prefetch_bytes_per_layer reached for layer {key[0]}")
        try:
            t0 = time.perf_counter()
            host, tier = ray.get(self.storage.get_ranges.remote(*key, [(g.offset, n), (u.offset, n)], tiers, True))
            assert host.nbytes == 2 * n, f"{key}: ranged read gave {host.nbytes} bytes, asked {2 * n}"
            hg, hu = _new_hash(g.checksum), _new_hash(u.checksum)
            hg.update(memoryview(host[:n]))
            hu.update(memoryview(host[n:]))
            dev, ready = self._h2d.copy(host)
            dt = time.perf_counter() - t0
        except BaseException:
            with self._lock:
                self._partial_inflight[key[0]] -= 2 * n
            raise
        H = g.shape[1]
        tt = _TORCH_DTYPES[g.dtype]
        views = (dev[:n].view(tt).view(rows, H), dev[n:].view(tt).view(rows, H), None)
        with self._lock:
            c = self.counters
            c["loads"] += 1
            c["bytes_loaded"] += 2 * n
            c["load_seconds"] += dt
            c["partial_prefetches"] += 1
            c["partial_bytes"] += 2 * n
            c["tier_bytes"][tier] = c["tier_bytes"].get(tier, 0) + 2 * n
        return _Resident(dev, views, ready, tier=tier, partial=_Partial(rows, rb, hg, hu))

    def _complete(self, key: Key, r: _Resident, tiers: list | None = None) -> _Completion:
        """Start the rest of partial entry r and return at once: both ranged reads, (a) gate/up rows [rows:] and
        (b) down, are submitted before anything waits, so the storage actor serves them concurrently. The compute
        consumes the _Completion in two stages (_rest_stage, then _down_stage), each verifying its tensors against
        the manifest checksums BEFORE they are computed with. Computes that route the key while its rest is in
        flight share one _Completion: one pair of reads per key."""
        with self._lock:
            c = self._completing.get(key)
            if c is not None:
                return c
            c = _Completion(key, r, tiers, time.perf_counter())
            cur = self._res.get(key)
            if cur is not None and cur is not r and cur.partial is None:   # another compute completed it meanwhile
                c.a, c.b = ("whole", cur), cur
                return c
            self._completing[key] = c
            c.lock.acquire()   # fresh and not yet visible: the reads are set before any stage may look
        try:
            if not r.partial.failed:   # a failed entry reads the whole blob in _rest_stage instead
                b = self.manifest.blob(*key)
                g, u, d = (b.tensors[x] for x in ("gate", "up", "down"))
                p = r.partial
                off, n = p.rows * p.row_bytes, (g.shape[0] - p.rows) * p.row_bytes
                if n:
                    c.rest = self._ranged(c, "rest", [(g.offset + off, n), (u.offset + off, n)])
                c.down = self._ranged(c, "down", [(d.offset, d.length)])
        finally:
            c.lock.release()
        return c

    def _ranged(self, c: _Completion, name: str, spans: list[tuple[int, int]]) -> Future:
        """One StorageActor.get_ranges call as a Future ([uint8 host bytes, tier]); its arrival time is noted in
        c.arrived[name] by a callback, so overlap is measured against when the bytes came, not when we looked."""
        fut = self.storage.get_ranges.remote(*c.key, spans, c.tiers).future()
        fut.add_done_callback(lambda _f: c.arrived.setdefault(name, time.perf_counter()))
        return fut

    @staticmethod
    def _reply(c: _Completion, name: str) -> tuple[np.ndarray, str, float]:
        """(host bytes, tier, issue-to-arrival seconds) of read `name`; raises its error (RayError, OSError)."""
        got = (c.rest if name == "rest" else c.down).result()
        if isinstance(got, BaseException):   # Ray hands some failures over as the result object
            raise got
        host, tier = got
        return host, tier, c.arrived.get(name, time.perf_counter()) - c.t0

    def _settle(self, c: _Completion) -> None:
        """c is done (whole blob or error): later computes of its key start from the cache again."""
        with self._lock:
            if self._completing.get(c.key) is c:
                del self._completing[c.key]

    def _stage(self, c: _Completion, which: str, work) -> object:
        """Run stage `which` ('a' or 'b') of c once, under c.lock; every caller gets its memo (or its error)."""
        with c.lock:
            if getattr(c, which) is None and c.error is None:
                try:
                    setattr(c, which, work(c))
                except BaseException as e:
                    c.error = e
                    self._settle(c)
            if c.error is not None:
                raise c.error
            return getattr(c, which)

    def _rest_stage(self, c: _Completion) -> tuple:
        a = self._stage(c, "a", self._verify_rest)
        if a[0] == "whole":   # the fallback blob is the completion: nothing waits for stage b
            c.b = a[1]
            self._settle(c)
        return a

    def _down_stage(self, c: _Completion) -> _Resident:
        self._rest_stage(c)   # stage b completes the blob stage a began (or reuses its fallback)
        try:
            return self._stage(c, "b", self._verify_down)
        finally:
            if c.b is not None:
                self._settle(c)

    def _verify_rest(self, c: _Completion) -> tuple:
        """Stage a: wait for the gate/up rest, finish the prefix hashes with it and compare with the manifest
        checksums; only then build gate and up whole, in the stored layout, in a fresh device blob (prefix rows
        copied device-to-device, rest copied in from the host). ("rows", blob, gate [I, H], up [I, H], ready) or,
        on a mismatch or a failed read, ("whole", the verified whole blob read by _partial_failed)."""
        r, p, key = c.r, c.r.partial, c.key
        if p.failed:
            return "whole", self._partial_failed(key, r, [], c.tiers)
        b = self.manifest.blob(*key)
        g, u = b.tensors["gate"], b.tensors["up"]
        P, n = p.rows * p.row_bytes, (g.shape[0] - p.rows) * p.row_bytes
        host, tier, dt = np.empty(0, np.uint8), None, 0.0
        if c.rest is not None:
            try:
                host, tier, dt = self._reply(c, "rest")
            except (ray.exceptions.RayError, OSError):
                # the storage actor died or no tier served the ranges: the whole-blob path (with its retries across
                # storage actors and tiers) serves this compute instead of failing it
                return "whole", self._partial_failed(key, r, [], c.tiers)
        assert host.nbytes == 2 * n, f"{key}: rest read gave {host.nbytes} bytes, asked {2 * n}"
        hg, hu = p.gate_hash.copy(), p.up_hash.copy()   # the entry's states stay reusable
        hg.update(memoryview(host[:n]))
        hu.update(memoryview(host[n:]))
        bad = [role for role, h, t in (("gate", hg, g), ("up", hu, u)) if _hexof(h, t.checksum) != t.checksum]
        if bad:
            return "whole", self._partial_failed(key, r, bad, c.tiers)
        dev = torch.empty(b.size, dtype=torch.uint8, device=self.device)
        for t, pre, at in ((g, r.blob[:P], 0), (u, r.blob[P:], n)):
            dev[t.offset:t.offset + P].copy_(pre)
            if n:   # straight into the blob: no device temporary to free while copies from it are queued
                self._h2d.copy(host[at:at + n], dst=dev[t.offset + P:t.offset + t.length])
        with self._lock:
            cn = self.counters
            cn["bytes_loaded"] += host.nbytes
            cn["partial_rest_read_s"] += dt
            if tier is not None:
                cn["tier_bytes"][tier] = cn["tier_bytes"].get(tier, 0) + host.nbytes
        gv, uv, _ = self._views(key, dev)
        return "rows", dev, gv, uv, self._device_ready()

    def _verify_down(self, c: _Completion) -> _Resident:
        """Stage b: wait for down, verify it against its manifest checksum, copy it into stage a's blob: the whole
        expert, which replaces the partial entry in the cache (charged its extra bytes, evicting per policy; with
        no room it serves this compute only). A mismatch or failed read: the verified whole blob instead."""
        a, r, key = c.a, c.r, c.key
        if a[0] == "whole":
            return a[1]
        d = self.manifest.blob(*key).tensors["down"]
        try:
            host, tier, dt = self._reply(c, "down")
        except (ray.exceptions.RayError, OSError):
            return self._partial_failed(key, r, [], c.tiers)
        if not verify(host, d.checksum)[0]:
            return self._partial_failed(key, r, ["down"], c.tiers)
        dev = a[1]
        self._h2d.copy(host, dst=dev[d.offset:d.offset + d.length])   # straight into the blob's down slice
        full = _Resident(dev, self._views(key, dev), self._device_ready(), cached=False, tier=tier)
        with self._lock:
            cn = self.counters
            cn["bytes_loaded"] += host.nbytes
            cn["partial_down_read_s"] += dt
            cn["load_seconds"] += time.perf_counter() - c.t0
            cn["partial_completions"] += 1
            cn["tier_bytes"][tier] = cn["tier_bytes"].get(tier, 0) + host.nbytes
            self._replace(key, r, full, dev.numel() - r.blob.numel())   # prefix freed, whole blob charged
        return full

    def _device_ready(self) -> "torch.cuda.Event | None":
        """An event after the device copies just queued on this thread's current stream (computes on other
        threads' streams wait for it); None on CPU, where the copies are done when they return."""
        if self.device.type != "cuda":
            return None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return ready

    def _replace(self, key: Key, r: _Resident, full: _Resident, extra: int) -> bool:
        """Under the lock: the cache entry of partial r becomes `full`, charged `extra` more bytes (evicting per
        policy, never a pinned entry). False (nothing changed, full serves one compute) if r is no longer the
        entry or there is no room. CacheIndex has no resize: the entry's size grows after plan_room made room."""
        e = self.cache.entries.get(key)
        if e is None or self._res.get(key) is not r:
            return False
        try:
            victims = self.cache.plan_room(extra)
        except DoesNotFit:
            return False
        if key in victims:
            return False
        for v in victims:
            self.cache.remove(v, evicted=True)
            self._res.pop(v, None)
        e.size += extra
        self.cache.used += extra
        assert self.cache.used <= self.cache.budget, f"worker {self.worker_id}: cache over budget"
        self.counters["peak_used_bytes"] = max(self.counters["peak_used_bytes"], self.cache.used)
        full.cached = True
        self._res[key] = full
        return True

    def _partial_failed(self, key: Key, r: _Resident, bad: list[str], tiers: list | None) -> _Resident:
        """Tensors `bad` of a completed partial entry do not match their checksums: nothing computed from its rows
        is used; the whole blob is read verified instead (the store retries and falls back across tiers) and
        replaces the entry when it fits (else the entry stays marked failed and is evicted in policy order)."""
        if bad:
            with self._lock:
                self.counters["partial_verify_failures"] += 1
                r.partial.failed = True
        full = self._fetch_to_device(key, tiers)   # the storage actor verifies the whole blob, across tiers
        full.cached = False
        with self._lock:
            self._replace(key, r, full, full.blob.numel() - r.blob.numel())
        return full

    def _compute_completing(self, residents: list[_Resident], keys: list[Key], counts: list[int], x: np.ndarray,
                            rest: dict) -> tuple[np.ndarray, float]:
        """_compute_sync where some experts are partial (their two rest reads already issued by _complete): the
        experts already whole compute first; then each partial expert computes h = swiglu_in(x, gate, up) as soon
        as its gate/up rest arrived and verified, while its down read is still in flight; then, once down arrived
        and verified, y = F.linear(h, down). The same ops as expert_ffn over the same whole tensors: bit-for-bit
        _compute_sync's result. A failed verification or read computes from the verified whole blob instead.
        Returns (out, seconds waited on the rest reads)."""
        whole = [i for i, r in enumerate(residents) if r.partial is None]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        out = np.empty((x.shape[0], x.shape[1]), dtype=np.float32 if x.dtype == np.float32 else x.dtype)
        for idx in whole:   # one call per expert keeps each group's GEMM shapes (bit-for-bit as _compute_sync)
            a, b = starts[idx], starts[idx + 1]
            out[a:b] = self._compute_sync([residents[idx]], [counts[idx]], x[a:b])
        comps = {k: f.result() for k, f in rest.items()}   # _complete returns once its reads are submitted
        waited = overlap = 0.0
        hs = {}
        for idx in (i for i in range(len(residents)) if residents[i].partial is not None):
            a, b = starts[idx], starts[idx + 1]
            c = comps[keys[idx]]
            t0 = time.perf_counter()
            st = self._rest_stage(c)
            t1 = time.perf_counter()
            waited += t1 - t0
            if st[0] == "whole":
                out[a:b] = self._compute_sync([st[1]], [counts[idx]], x[a:b])
                continue
            hs[idx] = self._swiglu_rows(st, x[a:b]), st[1]
            t2 = time.perf_counter()
            overlap += max(0.0, min(c.arrived.get("down", t2), t2) - t1)   # down still on the wire meanwhile
        for idx, (h, blob) in hs.items():
            a, b = starts[idx], starts[idx + 1]
            t0 = time.perf_counter()
            full = self._down_stage(comps[keys[idx]])
            waited += time.perf_counter() - t0
            if full.blob is not blob:   # down failed: the verified whole blob computes the expert whole
                out[a:b] = self._compute_sync([full], [counts[idx]], x[a:b])
            else:
                out[a:b] = self._down_rows(full, h, x.dtype)
        with self._lock:
            self.counters["stall_seconds"] += waited
            self.counters["partial_down_overlap_s"] += overlap
        return out, waited

    def _swiglu_rows(self, st: tuple, x: np.ndarray) -> torch.Tensor:
        """h [n, I] = swiglu_in(x, gate, up) on stage a's verified whole gate/up, x converted exactly as
        _compute_sync converts it (so the result is its bit-for-bit intermediate)."""
        _, _, g, u, ready = st
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True).to(g.dtype)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        return swiglu_in(xt, g, u)

    def _down_rows(self, full: _Resident, h: torch.Tensor, xdtype) -> np.ndarray:
        """y [n, H] = F.linear(h, down) on the verified whole blob, returned as _compute_sync returns it."""
        if full.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(full.ready)
        y = F.linear(h, full.tensors[2])
        return y.to(torch.float32 if xdtype == np.float32 else y.dtype).cpu().numpy()

    # -- prefetch -----------------------------------------------------------------------------------------------
    def prefetch(self, items: list[tuple], cancel: list[tuple] | None = None, keep: list[tuple] | None = None,
                 fast_path: bool = False, values: dict | None = None) -> int:
        """Queue (layer, expert, priority, request_id[, victims[, tiers]]) loads, highest priority first; returns
        how many were queued (resident, loading or already-queued experts are skipped, a higher priority is kept).
        victims (the PrefetchCoordinator's orders): the load may evict only these residents — the ones the
        coordinator valued lower — and is dropped if they do not make room; without it the cache's policy picks.
        tiers: the request's TierSet; the load never reads a tier outside it. cancel: (layer, expert) items to
        cancel first (as `cancel(items=...)`), so that a coordinator step is one call per worker. keep: (layer,
        expert, value[, value once used]) of residents as the coordinator values them (policies/ranking.py Plan.keep,
        keep_used): from now on a demand miss evicts the lowest-valued first, and a use drops an expert to its
        value once used (replacing the previous values; [] clears them). fast_path: the runtime's fast path sends
        these (its orders carry no request): its cancellations touch only what it ordered itself. values
        {(layer, expert): P}: the runtime's eviction values, as they ride with a compute call (`_riders`), applied
        before anything else so that these loads already evict by them."""
        if values:
            with self._lock:
                self.cache.update_hints(values)
        if keep is not None:
            hints = {(int(k[0]), int(k[1])): float(k[2]) for k in keep}
            used = {(int(k[0]), int(k[1])): float(k[3]) for k in keep if len(k) > 3}
            with self._lock:
                self.cache.set_hints(hints, used)
        if cancel:
            self.cancel(items=cancel, fast_path=fast_path)
        n = 0
        with self._lock:
            for item in items:
                layer, expert, priority, request = item[:4]
                victims = [(int(a), int(b)) for a, b in item[4]] if len(item) > 4 and item[4] is not None else None
                tiers = list(item[5]) if len(item) > 5 and item[5] is not None else None
                key = (int(layer), int(expert))
                try:
                    self.manifest.blob(*key)
                except KeyError:   # an order for an expert the store does not hold: dropped, nothing else stops
                    self.counters["prefetch_dropped"] += 1
                    continue
                if key in self._res or key in self._loading or key in self._taken:
                    e = self.cache.entries.get(key)
                    if e is not None:   # predicted again: a cancelled (stale) resident is wanted after all
                        e.stale = False
                    self._stale_on_arrival.discard(key)
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
                # the fast path's orders name no victims: one loads only if what it would evict is valued below it
                # (the eviction values ride with the same calls), else it is declined before any byte moves
                if q.request is None and q.victims is None and \
                        not self.cache.admits(q.key, self.manifest.blob(*q.key).size):
                    self.counters["prefetch_declined"] += 1
                    continue
                self._taken[q.key] = q.request
            try:
                self._load(q.key, prefetched=True, request=q.request, victims=q.victims, tiers=q.tiers)
                self._count(prefetch_loads=1)
            except Exception:  # noqa: BLE001 - a failed prefetch must not fail anyone: demand retries it
                self._count(prefetch_dropped=1)
            finally:
                with self._lock:
                    self._taken.pop(q.key, None)
                    self._stale_on_arrival.discard(q.key)

    def cancel(self, request: str | None = None, items: list[tuple] | None = None,
               requests: list | None = None, fast_path: bool = False) -> int:
        """Drop queued prefetches of a request (or of several `requests`, or of given (layer, expert) items);
        resident experts they loaded and nobody used become first to evict. Returns how many queued prefetches
        were dropped. fast_path: items the runtime's fast path no longer wants touch only its own orders (those
        without a request), never a coordinator's."""
        keys = {(int(i[0]), int(i[1])) for i in items} if items else None
        reqs = set(requests or ()) | ({request} if request is not None else set())
        n = 0
        with self._lock:
            for key, q in list(self._queued.items()):
                if q.request in reqs or (keys and key in keys and not (fast_path and q.request is not None)):
                    self._dequeue(key)
                    n += 1
            marked = sum(self.cache.mark_stale(request=r) for r in reqs)
            if keys:
                marked += self.cache.mark_stale(keys=keys, unowned_only=fast_path)
            # prefetches on the wire now (taken off the queue, not landed): marked when they land, unless ordered
            # again first; the fast path's cancellations touch only its own (those without a request)
            self._stale_on_arrival.update(
                k for k, r in self._taken.items() if k not in self._res and
                (r in reqs or (keys and k in keys and not (fast_path and r is not None))))
            self.counters["cancelled"] += n
            self.counters["stale_marked"] += marked   # loaded, never used, now first to evict
        return n

    # -- introspection ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            s = dict(self.counters)
            s["tier_bytes"] = dict(self.counters["tier_bytes"])
            s["miss_causes"] = dict(self.counters["miss_causes"])
            s.update(worker_id=self.worker_id, device=str(self.device), node_id=self.node_id,
                     used_bytes=self.cache.used, budget_bytes=self.cache.budget, resident=len(self.cache),
                     evictions=self.cache.evictions, wasted_prefetches=self.cache.wasted_prefetches,
                     queued_prefetches=len(self._queued), loads_in_flight=len(self._loading),
                     eviction_values=len(self.cache.hints or ()),   # experts valued (coordinator or fast path)
                     policy=self.cache.policy.name,
                     local_storage=self.local_storage,
                     peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                     pinned_staging_bytes=self._h2d.pinned_bytes,
                     # device bytes the resident experts' tensors really hold (the index's used_bytes, measured)
                     device_resident_bytes=sum(r.blob.numel() for r in self._res.values()
                                               if r.blob.device.type == self.device.type),
                     # all live device tensors per the CUDA caching allocator: the residents, in-flight calls, and
                     # the runtime's own buffers (cuBLAS's workspace: 32 MiB on an H100 with torch 2.11)
                     device_allocated_bytes=torch.cuda.memory_allocated(self.device) if self._h2d.cuda else None)
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
