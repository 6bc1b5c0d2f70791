"""python -m jobs.benchmark policies --trace PATH [--expert-mib N] [--cache-fraction F] [--quick]
                                   [--policies a,b,...] [--workers W] [--gpus-per-worker G] [--batch B]
                                   --json OUT   (+ OUT's .png)
                                   [--prefetch-ratio full,0.8,0.5,0.25]   (partial prefetch, docs/weight_prefetch.md)
                                   [--tier s3 --s3-latency-ms MS --s3-mbps MBPS]   (I/O-bound: loads from shaped S3)
                                   [--tier link --link-latency-ms MS --link-mbps MBPS --link-channels N
                                    --link-split-kib K]
                                   [--prefetch-concurrency N] [--placement balanced|by_layer]
                                   [--model-dir CKPT] [--predictor-dir DIR] [--threshold P] [--hbm-confirm-prob P]
                                   [--lookahead-tokens N] [--planner-engine compiled|numpy]
                                   [--cache-policy lru|slru|...] [--repeat N]

Replays a routing trace through the REAL cluster, per policy: a store generated on local disk with the trace's
geometry (layers x experts, top-k) and experts of `--expert-mib` MiB (jobs.make_checkpoint + the converter), real
StorageActor reads, real ExpertWorker caches and expert compute on random activations; the routing is the trace's
top-k ids, handed to `ClusterExperts.moe` instead of a router's, and published to the PrefetchCoordinator by the
runtime's own RoutePublisher (the model's on_route hook) exactly as a forward pass does. Requests run in
continuous batches of `--batch` slots, one token per slot per step, every MoE layer in order. The dense part of
the model (attention) is not run: the benchmark times the MoE layers, where the policies act.

Policies: on_demand (no coordinator: the workers' LRU caches alone), slru (the same with segmented-LRU caches),
any registry name through the coordinator
(`prefetch.policy`), and oracle, which the coordinator cannot run (it reads the future from the trace): the
benchmark itself sends each worker the exact experts of the next `--window` MoE layers (an upper bound), and
`resident` (every expert cached and warm: the compute + dispatch floor, for the stall reference).
Per policy: hit rate, stall time, tokens/s, prefetch precision (prefetched experts used / prefetch loads) and
recall (uses served by a prefetch / (those + misses)), bytes moved per tier, cross-node bytes,
fraction_of_oracle = (policy speedup over on_demand) / (oracle speedup over on_demand).

Defaults: cache 25% of all experts; the DRAM tier holds every expert (loads are object store -> worker copies,
the regime of host-RAM offloading). `--tier s3`: the store is also written to a local moto S3 server behind the
shaping proxy (storage_adapters/s3_proxy.py: first-byte latency per GET, bandwidth cap per connection) and every load
reads it there, with no DRAM tier unless --dram-fraction says so: a load waits on a socket (the I/O-bound regime of
offloading to slow storage); `--tier link`: loads read the local store through an emulated link (storage_adapters/
emulated.py: each read a WAIT of latency + bytes / bandwidth on one of --link-channels, the CPU left free, as a DMA
or a remote read leaves it; with --link-split-kib a read also takes the channels idle when it starts, one part per K
KiB at least, as the NVMe and S3 adapters split a real expert), no DRAM tier by default; the planner gets the shaping as its tier costs; the JSON's `regime` says whether loading one expert took at least as long as
computing one layer (I/O-bound). `calibration` holds this machine's measured figures for
`python -m jobs.simulate --hardware local --calib OUT`, and `simulated` the simulator's prediction for this very
run next to the measurement (tokens/s and hit rate ratios). On a multi-node Ray cluster (`ray job submit`,
`--address auto`) workers spread over the nodes, each node's storage actor serves its workers, and the JSON
reports the bytes that crossed nodes.
"""
from __future__ import annotations

import argparse
from collections import Counter
import asyncio
import json
import os
import sys
import tempfile
import time

import numpy as np

from jobs._cli import at_least, check_out_file, fraction, load_trace_or_error, one_line, real_in

HIDDEN = 512                     # hidden size of the generated model; the intermediate size sets the expert size
# policies the benchmark runs without a PrefetchCoordinator (the oracle prefetches from the driver, resident warms
# every cache, slru is the cache alone)
NO_COORDINATOR = ("on_demand", "oracle", "resident", "slru")
# the seed document's strategies run as published: their workers' caches evict by LRU, without the runtime's reuse
# values (prefetch.reuse_values); `NAME+reuse` runs one with them, `NAME+lru` any policy without
SEED_STRATEGIES = ("multi_lookahead", "topk_frequency", "intelligent_adaptive")
# the runtime's fast path alone, no coordinator (policy on_demand with prefetch.speculate_source): from the trained
# predictor (--predictor-dir), else the routers (next_gate), on a replay of the model's hidden states; else from the
# routing history (transition). The runtime's reuse values as configured (default on)
FAST_PATH = "fast_path"
# what may follow NAME+ (run_policy): the cache's eviction by the runtime's reuse values, or plain LRU
EVICT_SUFFIXES = ("reuse", "reuse_fast", "lru")


def ratio_list(s: str) -> list:
    """type= of --prefetch-ratio: a comma list of 'full' (None: whole experts) and gate_up ratios in [0, 1]."""
    frac = real_in(0.0, 1.0)
    return [None if r.strip() == "full" else frac(r.strip()) for r in s.split(",")]


def policy_error(name: str) -> str | None:
    """Why `name` is not a benchmark policy (run_policy's reading of it), or None: NAME or NAME+SUFFIX where NAME is
    a baseline, fast_path or a registry predictor the coordinator runs (cluster/config.py PrefetchConfig.policy)."""
    from policies.registry import PREDICTOR_NAMES
    base, _, evict = name.partition("+")
    valid = dict.fromkeys(NO_COORDINATOR + (FAST_PATH,) + PREDICTOR_NAMES)
    if base not in valid:
        return f"unknown policy {base!r}; valid: {', '.join(valid)}"
    if evict not in ("",) + EVICT_SUFFIXES:
        return f"policy {name!r}: the suffix after '+' must be {', '.join(map(repr, EVICT_SUFFIXES))}"
    return None


def fast_path_source(tr, a) -> str:
    if replays_hidden(tr, a):
        return "learned" if getattr(a, "predictor_dir", None) else "next_gate"
    return "learned" if routing_only_predictor(a) else "transition"


def routing_only_predictor(a) -> bool:
    """Whether --predictor-dir (or --predictor-from-trace) gives a routing-only learned predictor: one that needs no
    hidden state, so it predicts in a replay without one too."""
    from policies.learned import is_routing_only
    return is_routing_only(getattr(a, "predictor_dir", None))


def _say(msg):
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


# -- the trace and the store -------------------------------------------------------------------------------------
def cut_trace(tr, layers: int | None, tokens: int | None, requests: int | None = None):
    """A deterministic piece of a trace: the first `requests` requests, each cut to tokens // requests rows (all
    rows when tokens is None), and the first `layers` MoE layers."""
    from policies.traces import RoutingTrace
    R = min(requests or tr.num_requests, tr.num_requests)
    per = (tokens // R) if tokens else None
    rows = np.concatenate([np.arange(tr.offsets[r], tr.offsets[r + 1])[:per] for r in range(R)])
    x = tr.experts[rows][:, :layers] if layers else tr.experts[rows]
    keep = (x[..., 0] >= 0).any(1)                              # rows with nothing known left are dropped
    rows, x = rows[keep], x[keep]
    req = tr.request_of_rows()[rows]
    counts = np.bincount(req, minlength=tr.num_requests)
    offs = np.r_[0, np.cumsum(counts[counts > 0])]
    Lc = x.shape[1]
    # the source requests it covers, one whose rows were all dropped included (replayed_requests)
    meta = dict(tr.meta, cut_requests=R)
    return RoutingTrace(x, tr.weights[rows][:, :Lc], offs, Lc, tr.num_experts, tr.top_k, tr.model, tr.phase,
                        None if tr.hidden is None else tr.hidden[rows][:, :Lc], meta,
                        f"{tr.origin}[{R} requests, <= {per} rows each, {Lc} layers]")


def replayed_requests(cut) -> int:
    """How many of its source trace's first requests a piece covers: cut_trace's count (a request with no known
    routing in the kept layers is dropped from the piece but is still not "another" request), else its own."""
    # a piece cut further (head) keeps the larger count: it may skip more than needed, never train on a replayed one
    return max(int(cut.meta.get("cut_requests", 0)), cut.num_requests)


def prior_from_trace(full, cut, work: str) -> tuple[str, dict]:
    """(path, meta): a routing prior (policies/reuse.py) counted from the requests of trace `full` that its
    replayed cut `cut` (cut_trace: its first requests) leaves out, over the cut's layers, written under `work`."""
    from policies.reuse import save_routing_prior, transition_counts
    R, L, o = replayed_requests(cut), cut.num_layers, full.offsets
    if full.num_requests <= R:
        raise ValueError(f"--routing-prior-from-trace: {full.origin} has {full.num_requests} requests and the replay "
                         f"uses all of them (--requests {R}): no other request to learn a prior from")
    counts = transition_counts(full.experts[o[R]:, :L], o[R:] - o[R], full.num_experts)
    meta = {"top_k": full.top_k, "rows": int(o[-1] - o[R]), "requests": full.num_requests - R,
            "source": f"{full.origin} requests {R}..{full.num_requests - 1}, first {L} layers"}
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, f"routing_prior-{os.path.basename(full.origin)}-from{R}-L{L}.npz")
    save_routing_prior(path, counts, **meta)
    return path, meta


def predictor_from_trace(full, cut, work: str, horizon: int = 2, seed: int = 0, say=None) -> str:
    """A routing-only learned predictor (policies/learned.py) trained on the requests of trace `full` that its
    replayed cut `cut` (cut_trace or head: its first requests) leaves out, over the cut's layers: other prompts of
    the same workload, never the replayed ones. Written under `work` and reused from there when trained on the same
    routing with the same settings; its dir."""
    import hashlib
    import inspect

    from jobs.train_predictor import cut as skip_cut, train
    from policies.learned import PREDICTOR_META, LearnedPredictor, has_trained_predictor
    R, L = replayed_requests(cut), cut.num_layers
    if full.num_requests <= R:
        raise ValueError(f"--predictor-from-trace: {full.origin} has {full.num_requests} requests and the replay "
                         f"uses all of them (--requests {R}): no other request to train on")
    horizon = max(1, min(int(horizon), L))
    o = full.offsets
    data = hashlib.sha256(np.ascontiguousarray(full.experts[o[R]:, :L]).tobytes())
    data.update(np.asarray(o[R:] - o[R], np.int64).tobytes())
    training = {"source": f"{full.origin} requests {R}..{full.num_requests - 1}, first {L} layers",
                "routing_only": True, "horizon": horizon, "seed": int(seed), "routing_sha256": data.hexdigest(),
                "num_experts": int(full.num_experts), "top_k": int(full.top_k),
                # jobs.train_predictor's defaults it trains with: a predictor trained with other ones is not reused
                **{k: v.default for k, v in inspect.signature(train).parameters.items()
                   if k in ("hidden_units", "epochs", "batch", "lr")}}
    d = os.path.join(work, f"predictor-{os.path.basename(full.origin)}-from{R}-L{L}-D{horizon}-"
                           f"{data.hexdigest()[:12]}")
    mpath = os.path.join(d, PREDICTOR_META)
    try:
        with open(mpath) as f:
            meta = json.load(f)
        if has_trained_predictor(d) and isinstance(meta, dict) and meta.get("training") == training:
            return d
    except (OSError, ValueError):   # none yet, or unreadable: trained (again) below
        pass
    if os.path.exists(mpath):   # first: a save cut short must not leave this json beside other weights
        os.remove(mpath)
    t0 = time.perf_counter()
    w = train(skip_cut(full, R, L), horizon=horizon, seed=seed, routing_only=True)
    (say or _say)(f"routing-only predictor trained on {full.num_requests - R} other requests in "
                  f"{time.perf_counter() - t0:.0f} s")
    LearnedPredictor(w, full.top_k, meta={"training": training}).save(d)
    return d


def build_store(work: str, L: int, E: int, K: int, expert_bytes: int) -> tuple[str, object]:
    """A random Mixtral-layout checkpoint of the trace's geometry converted into work/store (reused when there)."""
    from jobs.make_checkpoint import Preset, write_checkpoint
    from storage_adapters.converter import convert, open_target, plan_conversion
    inter = max(8, int(round(expert_bytes / (3 * HIDDEN * 2))))
    tag = f"L{L}xE{E}k{K}-h{HIDDEN}-i{inter}"
    root = os.path.join(work, tag)
    store = os.path.join(root, "store")
    if not os.path.exists(os.path.join(store, "manifest.json")):
        _say(f"writing a {L} x {E} checkpoint ({3 * HIDDEN * inter * 2 / 2**20:.2f} MiB experts) and converting it")
        ckpt = write_checkpoint(os.path.join(root, "ckpt"), Preset(256, HIDDEN, inter, L, 4, 2, E, K),
                                dtype=np.float16)
        asyncio.run(convert(plan_conversion(ckpt), [open_target("file://" + store)], progress=False))
    return store, inter


def model_store(work: str, model_dir: str) -> tuple[str, int, int]:
    """A real checkpoint (e.g. jobs/embedded_model) converted into work/<name>/store: its experts and routers, so the
    hidden-state predictors (next_gate, learned) see the model they were built for. (store, inter, hidden)."""
    from storage_adapters.converter import convert, open_target, plan_conversion
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    store = os.path.join(work, "model-" + os.path.basename(os.path.normpath(model_dir)), "store")
    if not os.path.exists(os.path.join(store, "manifest.json")):
        _say(f"converting {model_dir} into {store}")
        asyncio.run(convert(plan_conversion(model_dir), [open_target("file://" + store)], progress=False))
    return store, int(hf["intermediate_size"]), int(hf["hidden_size"])


class ShapedS3:
    """The S3 tier of an I/O-bound run: a moto server on 127.0.0.1 holding a copy of the store, behind the shaping
    proxy (first-byte latency per request + a bandwidth cap per connection). A load from it is a WAIT of the
    storage actor's event loop on a socket, not CPU work. Started and stopped by this process (by pid)."""

    def __init__(self, ckpt: str, tag: str, work: str, latency_s: float, bandwidth_Bps: float | None):
        self.ckpt, self.tag, self.work = ckpt, tag, work
        self.latency_s, self.bandwidth_Bps = latency_s, bandwidth_Bps

    def __enter__(self):
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)                       # throwaway credentials of the local server
        os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
        from storage_adapters.converter import convert, open_target, plan_conversion
        from storage_adapters.local_s3 import MotoServer, ShapingProxy, make_bucket
        self.moto = MotoServer().start()
        try:
            make_bucket(self.moto.endpoint_url, "experts")
            # one conversion writes both copies, so the manifest knows both tiers; the file copy is the nvme
            # fallback (listed after s3: never read while S3 answers) and the directory the learned predictor's
            # files sit in (make_predictor(store_dir=) = the nvme tier's path)
            self.store = os.path.join(self.work, self.tag, "store-s3")
            self.uri = f"s3://experts/{self.tag}"
            t0 = time.perf_counter()
            asyncio.run(convert(plan_conversion(self.ckpt),
                                [open_target("file://" + self.store),
                                 open_target(self.uri, endpoint_url=self.moto.endpoint_url)], progress=False))
            _say(f"store uploaded to {self.uri} on moto {self.moto.endpoint_url} in {time.perf_counter() - t0:.1f} s")
            self.proxy = ShapingProxy(self.moto.endpoint_url, bandwidth_bps=self.bandwidth_Bps,
                                      first_byte_latency_s=self.latency_s).start()
        except BaseException:
            self.moto.stop()
            raise
        self.endpoint_url = self.proxy.endpoint_url
        return self

    def __exit__(self, *exc):
        try:
            self.proxy.stop()
        finally:
            self.moto.stop()


def cluster_config(store: str, *, workers: int, hbm: int, dram: int, policy: str, window: int, ns: str,
                   address: str | None, inflight: int, ratio: float | None = None, s3: ShapedS3 | None = None,
                   planner: dict | None = None, link: dict | None = None, worker_opts: dict | None = None):
    """ratio: weight_prefetch_config.prefetch_ratio.moe.gate_up (partial prefetch); None: whole experts.
    s3: serve loads from the shaped S3 tier (the DRAM tier only when dram > 0; the nvme copy a never-read fallback).
    planner: extra `prefetch` settings (threshold, hbm_confirm_prob, lookahead_tokens, tier_costs, ...).
    link: the nvme tier's `emulate` ({latency_s, bandwidth_Bps, channels}); the DRAM tier only when dram > 0.
    worker_opts: extra `workers` settings (prefetch_concurrency, placement)."""
    from cluster.config import ClusterConfig
    if link is not None:
        tiers = ([{"kind": "dram", "budget_bytes": dram}] if dram > 0 else []) + [
            {"kind": "nvme", "path": store, "emulate": link}]
    elif s3 is None:
        tiers = [{"kind": "dram", "budget_bytes": dram}, {"kind": "nvme", "path": store}]
    else:
        tiers = ([{"kind": "dram", "budget_bytes": dram}] if dram > 0 else []) + [
            {"kind": "s3", "uri": s3.uri, "endpoint_url": s3.endpoint_url, "adaptive_parts": False,
             "part_bytes": 64 << 20, "max_connections": 64},   # one GET per expert: one latency per load
            {"kind": "nvme", "path": s3.store}]
    raw = {"ray": {"namespace": ns},
           "weight_prefetch_config": {"enabled": ratio is not None,
                                      "prefetch_ratio": {"moe": {"gate_up": 1.0 if ratio is None else ratio}}},
           "workers": {"count": workers, "hbm_budget_bytes": hbm, **(worker_opts or {})},
           "tiers": tiers,
           "prefetch": {"policy": policy, "lookahead_layers": window, "max_inflight_bytes": inflight,
                        **(planner or {})}}
    return ClusterConfig.model_validate(raw)


# -- one policy --------------------------------------------------------------------------------------------------
def reuse_values_on(policy: str, a) -> bool:
    """Whether the run of benchmark policy `policy` has the runtime's reuse values (run_policy): NAME+reuse yes,
    NAME+lru no, the baselines and seed strategies no; any other as configured (--reuse-values, default on; off
    with --eviction-hints, when the coordinator's values decide)."""
    base, _, evict = policy.partition("+")
    if evict or base in SEED_STRATEGIES or base in NO_COORDINATOR:
        return evict in ("reuse", "reuse_fast")
    if getattr(a, "eviction_hints", False):
        return False
    on = getattr(a, "reuse_values", None)
    if on is None:
        from cluster.config import PrefetchConfig
        on = PrefetchConfig().reuse_values
    return bool(on)


def run_policy(policy: str, tr, store: str, a, *, hbm: int, dram: int, inflight: int,
               ratio: float | None = None, s3: ShapedS3 | None = None, planner: dict | None = None) -> dict:
    import ray
    import torch
    from cluster.expert_cluster import ExpertCluster
    from policies.traces import TraceSlots
    out: dict = {"policy": policy}
    policy, _, evict = policy.partition("+")
    if evict not in ("",) + EVICT_SUFFIXES:
        raise ValueError(f"policy {out['policy']!r}: the suffix after '+' must be 'reuse', 'reuse_fast' or 'lru'")
    # the baselines and seed strategies: LRU (slru: SLRU) caches, no reuse values unless NAME+reuse
    planner = {**(planner or {}), "reuse_values": reuse_values_on(out["policy"], a)}
    if evict == "reuse_fast":   # the request's own transitions alone: no long-memory table, no routing prior
        planner["reuse_memory"] = False
        planner.pop("routing_prior", None)
    if not planner["reuse_values"]:
        planner.pop("routing_prior", None)   # nothing here would read it
    if policy == FAST_PATH:
        planner["speculate_source"] = fast_path_source(tr, a)
        if getattr(a, "speculate_layers", None) is None:
            planner.pop("speculate_layers", None)   # the configured depth, on a routing-only trace too
    if policy == "learned" and routing_only_predictor(a) and getattr(a, "speculate_layers", None) is None:
        planner.pop("speculate_layers", None)       # its fast path reads routing alone: no noise to speculate from
    coord_policy = policy if policy not in NO_COORDINATOR + (FAST_PATH,) else "on_demand"
    cfg = cluster_config(store, workers=a.workers, hbm=hbm, dram=dram, policy=coord_policy, window=a.window,
                         ns=f"bench-{policy}-{ratio}-{os.getpid()}", address=a.address, inflight=inflight,
                         ratio=ratio, s3=s3, planner=planner, link=link_settings(a), worker_opts=worker_settings(a))
    L, K = tr.num_layers, tr.top_k
    rng = np.random.default_rng(a.seed)
    # slru: no prediction, the workers' caches evict by segmented LRU (the "SLRU cache alone" baseline)
    with ExpertCluster(cfg, policy="slru" if policy == "slru" else a.cache_policy) as c:
        ex = c.experts
        layers = list(c.model.args.moe_layers)
        assert len(layers) == L, f"store has {len(layers)} MoE layers, trace {L}"
        pub = getattr(c, "publisher", None)   # on_demand+reuse: the routing hook without a coordinator
        out["reuse_values"] = pub is not None and pub.reuse is not None
        if coord_policy != "on_demand" and pub is None:
            raise RuntimeError(f"policy {policy}: this ExpertCluster has no PrefetchCoordinator integration")
        owner = {l: ex._owner_np[layers[l]] for l in range(L)}
        workers = c.workers
        if policy == "resident":                                   # warm every expert into its owner's cache
            t_warm = time.perf_counter()
            for l in range(L):
                for w, h in workers.items():
                    mine = [(layers[l], int(e), 1.0, None) for e in np.flatnonzero(owner[l] == w)]
                    h.prefetch.remote(mine)
            wait_resident(workers, L * tr.num_experts)
            out["warm_s"] = time.perf_counter() - t_warm
            # the machine's load throughput from the (now warm) DRAM tier, apart from any replay: drop every
            # expert, then per layer one compute call per worker needing all its experts (the demand path, its
            # loads in parallel), timed; minus the same calls once everything is resident again
            out["reload_s"], out["reload_loads"] = reload_time(workers, owner, layers, tr.num_experts, a.hidden)
            out["warm_s"] += warm_all(workers, owner, layers, tr.num_experts)
        base = c.stats()
        # workers on another node than this driver: their activations cross the network both ways
        here = ray.get_runtime_context().get_node_id()
        wids = sorted(workers)
        remote = np.zeros(max(wids) + 1, bool)
        for w in base["workers"]:
            remote[w["worker_id"]] = w.get("node_id") != here
        act_bytes = 0
        slots = TraceSlots(tr, a.batch)
        tokens = steps = 0
        moe_s = 0.0
        H = a.hidden
        xs = torch.from_numpy(rng.standard_normal((64, H)).astype(np.float32) * 0.1)
        hid = tr.hidden if replays_hidden(tr, a) else None
        t_start = time.perf_counter()
        while True:
            live = slots.admit()
            if not len(live):
                break
            reqs, toks, rows = slots.req[live], slots.tok[live], slots.rows(live)
            if pub is not None:
                pub.row_requests = slots.req.tolist()               # cache row (slot) -> request id
            for l in range(L):
                ids = tr.experts[rows, l].astype(np.int64)          # [b, K]
                known = ids[:, 0] >= 0
                if not known.any():
                    continue
                w8 = tr.weights[rows, l].astype(np.float32)
                w8 = np.where(np.isnan(w8), 1.0 / K, w8)
                ids_t = torch.from_numpy(ids[known])
                w_t = torch.from_numpy(w8[known])
                x = xs[(np.flatnonzero(known) + steps) % len(xs)] if hid is None else \
                    torch.from_numpy(hid[rows[known], l].astype(np.float32))
                if pub is not None:                                 # what the model's forward does before moe
                    c.model.route_rows = torch.from_numpy(live[known].astype(np.int64))
                    c.model.route_pos = torch.from_numpy(toks[known].astype(np.int64))
                    pub(layers[l], ids_t, w_t, x)
                if policy == "oracle":
                    oracle_prefetch(tr, reqs[known], toks[known], l, a.window, owner, layers, workers)
                act_bytes += 2 * int(remote[owner[l][ids[known]]].sum()) * H * 4   # f32 rows, there and back
                t0 = time.perf_counter()
                ex.moe(layers[l], x, ids_t, w_t)
                moe_s += time.perf_counter() - t0
            tokens += len(live)
            steps += 1
            ended = slots.advance(live)
            if ended and hasattr(c, "end_requests"):
                c.end_requests(ended)
        wall = time.perf_counter() - t_start
        st = c.stats()
        coord = None
        if getattr(c, "coordinator", None) is not None:
            try:
                coord = ray.get(c.coordinator.stats.remote())
                times = ray.get(c.coordinator.step_times_s.remote())
                coord = {"step_ms_p50": 1e3 * float(np.median(times)) if times else None,
                         "step_ms_p99": 1e3 * float(np.percentile(times, 99)) if times else None,
                         "steps": len(times), **{k: coord[k] for k in ("prefetches", "window_growths_undone")
                                                 if k in coord},
                         "window_mean": float(np.mean([w for _, w in coord["window_history"]]))
                         if coord.get("window_history") else None,
                         **{k: coord.get("telemetry", coord).get(k) for k in
                            ("recall_at_k", "timely_recall", "window") if k in coord.get("telemetry", coord)}}
            except Exception as e:  # noqa: BLE001 - stats are a report, not the measurement
                coord = {"error": f"{type(e).__name__}: {e}"}
    out.update(summarize(base, st, wall, moe_s, tokens, steps))
    out.update(prefetch_bytes(base, st, max(s for s in c.sizes.values())), prefetch_ratio=ratio)
    out["cross_node_activation_bytes"] = act_bytes
    out["coordinator"] = coord
    # routing batches the runtime sent, dropped (layer events) and coalesced into a later call (RouteOutbox)
    out["publish"] = {k: st["prefetch"].get(k) for k in ("published", "dropped", "coalesced")}
    out["fast_path_orders"] = getattr(pub, "speculated", 0) if pub is not None else 0
    rv = st["prefetch"].get("reuse_values")
    if rv is not None and rv["weight_memory"] is not None:   # how much the long-memory table was trusted
        out["reuse_weight_memory"] = rv["weight_memory"]
    return out


def replays_hidden(tr, a) -> bool:
    """Whether the replay feeds the trace's hidden states (the router inputs the model saw): it has them and the
    store is that model, so next_gate / learned predict from what they would see in a forward pass. Otherwise the
    workers get random activations."""
    return tr.hidden is not None and bool(a.model_dir) and tr.hidden.shape[2] == a.hidden


def prefetch_bytes(base: dict, st: dict, expert_bytes: int) -> dict:
    """Bytes moved by prefetches over the replay and the part wasted on mispredictions (prefetches never used by a
    compute: evicted unused or still unused at the end). A partial prefetch moves partial_bytes / partial_prefetches
    (its ratio's share of gate+up); a whole one the expert's bytes (the benchmark's experts are all one size)."""
    def d(k):
        return sum(w.get(k, 0) for w in st["workers"]) - sum(w.get(k, 0) for w in base["workers"])
    loads, used, parts = d("prefetch_loads"), d("prefetch_hits"), d("partial_prefetches")
    each = d("partial_bytes") / parts if parts else expert_bytes
    return {"prefetch_bytes": int(loads * each), "prefetch_bytes_wasted": int(max(loads - used, 0) * each),
            "partial_completions": d("partial_completions"),
            # the pipelined completion (docs/weight_prefetch.md): seconds gate/up computed while down was in flight,
            # and the summed issue-to-arrival seconds of the rest's two reads
            **{k: d(k) for k in ("partial_down_overlap_s", "partial_rest_read_s", "partial_down_read_s")}}


def wait_resident(workers, total: int, timeout_s: float = 120) -> None:
    import ray
    deadline = time.time() + timeout_s
    while sum(len(r) for r in ray.get([h.resident.remote() for h in workers.values()])) < total:
        assert time.time() < deadline, "resident: warming the caches timed out"
        time.sleep(0.01)


def warm_all(workers, owner, layers, E: int) -> float:
    t0 = time.perf_counter()
    for l in range(len(layers)):
        for w, h in workers.items():
            h.prefetch.remote([(layers[l], int(e), 1.0, None) for e in np.flatnonzero(owner[l] == w)])
    wait_resident(workers, len(layers) * E)
    return time.perf_counter() - t0


def reload_time(workers, owner, layers, E: int, hidden: int = HIDDEN) -> tuple[float, int]:
    """Wall seconds to demand-load every expert once from its tier (compute excluded), and the load count."""
    import ray
    from actors.expert_worker import pack_rows

    def layer_calls():
        t = 0.0
        for l in range(len(layers)):
            calls = []
            t0 = time.perf_counter()
            for w, h in workers.items():
                mine = [int(e) for e in np.flatnonzero(owner[l] == w)]
                if mine:
                    x = pack_rows(np.zeros((len(mine), hidden), np.float32))
                    calls.append(h.compute.remote(layers[l], mine, [1] * len(mine), x))
            ray.get(calls)
            t += time.perf_counter() - t0
        return t
    keys = {w: [(layers[l], int(e)) for l in range(len(layers)) for e in np.flatnonzero(owner[l] == w)]
            for w in workers}
    ray.get([h.drop.remote(keys[w]) for w, h in workers.items()])
    cold = layer_calls()
    warm = layer_calls()                                  # everything resident now: the calls without loads
    return max(cold - warm, 1e-9), len(layers) * E


def oracle_prefetch(tr, reqs, toks, l: int, window: int, owner, layers, workers) -> None:
    """The exact experts of the next `window` MoE layers of each live request, to their owners (nearest first)."""
    L = tr.num_layers
    per_w: dict[int, list] = {}
    for r, t in zip(reqs.tolist(), toks.tolist()):
        a, b = tr.offsets[r], tr.offsets[r + 1]
        for d in range(1, window + 1):
            tt, ll = t + (l + d) // L, (l + d) % L
            if a + tt >= b:
                break
            for e in tr.experts[a + tt, ll].tolist():
                if e >= 0:
                    per_w.setdefault(int(owner[ll][e]), []).append((layers[ll], int(e), float(window - d + 1), r))
    for w, items in per_w.items():
        workers[w].prefetch.remote(items)


def summarize(base: dict, st: dict, wall: float, moe_s: float, tokens: int, steps: int) -> dict:
    """Deltas of the cluster's counters over the timed replay."""
    def tot(s, k):
        return sum(w.get(k, 0) for w in s["workers"])
    d = {k: tot(st, k) - tot(base, k) for k in ("hits", "misses", "prefetch_hits", "loads", "demand_loads",
                                                "prefetch_loads", "bytes_loaded", "load_seconds",
                                                "stall_seconds", "wasted_prefetches", "prefetch_declined")}
    uses = d["hits"] + d["misses"]
    causes = Counter()   # why the misses missed (actors/expert_worker.py _miss_cause)
    for s, sign in ((st, 1), (base, -1)):
        for w in s["workers"]:
            for k, v in (w.get("miss_causes") or {}).items():
                causes[k] += sign * v
    cross = sum(w.get("bytes_loaded", 0) for w in st["workers"] if not w.get("local_storage", True)) - \
        sum(w.get("bytes_loaded", 0) for w in base["workers"] if not w.get("local_storage", True))
    tier = {}
    for s in st["storage"]:
        for k, v in (s.get("tier_bytes") or {}).items():
            tier[k] = tier.get(k, 0) + v
    for s in base["storage"]:
        for k, v in (s.get("tier_bytes") or {}).items():
            tier[k] = tier.get(k, 0) - v
    return {"tokens": tokens, "steps": steps, "wall_s": wall, "moe_s": moe_s, "tokens_per_s": tokens / wall,
            "hit_rate": d["hits"] / max(uses, 1), "uses": uses, **d, "miss_causes": dict(causes),
            "stall_s": d["stall_seconds"], "stall_ms_per_token": 1e3 * d["stall_seconds"] / max(tokens, 1),
            "prefetch_precision": d["prefetch_hits"] / d["prefetch_loads"] if d["prefetch_loads"] else None,
            "prefetch_recall": d["prefetch_hits"] / max(d["prefetch_hits"] + d["misses"], 1),
            "bytes_moved": d["bytes_loaded"], "bytes_by_storage_tier": tier, "cross_node_bytes": cross,
            "load_ms_per_expert": 1e3 * d["load_seconds"] / d["loads"] if d["loads"] else None,
            # the runtime's routing hook, per MoE layer it saw: microseconds the decode loop waited on it (the fast
            # path) and microseconds deferred into the wait for the layer's replies (reuse values, publishing)
            **hook_us(base, st),
            "nodes": len({w.get("node_id") for w in st["workers"]}),
            "storage_actors_per_node": dict(Counter(s.get("node_id") for s in st["storage"]))}


def hook_us(base: dict, st: dict) -> dict:
    r0, r1 = base.get("runtime") or {}, st.get("runtime") or {}
    n = r1.get("hook_layers", 0) - r0.get("hook_layers", 0)
    if n <= 0:
        return {"hook_us_per_layer": None, "hook_deferred_us_per_layer": None}
    return {"hook_us_per_layer": 1e6 * (r1["hook_s"] - r0["hook_s"]) / n,
            "hook_deferred_us_per_layer": 1e6 * (r1["hook_deferred_s"] - r0["hook_deferred_s"]) / n}


# -- calibration -------------------------------------------------------------------------------------------------
def expert_compute_s(inter: int, rows: int, reps: int = 50, hidden: int = HIDDEN) -> float:
    """One expert (fp16 weights as stored) on `rows` tokens, in this process with one thread: the workers' op."""
    import torch
    from actors.expert_worker import expert_ffn
    torch.manual_seed(0)
    g, u = (torch.randn(inter, hidden).half() for _ in range(2))
    d = torch.randn(hidden, inter).half()
    x = torch.randn(rows, hidden).half()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expert_ffn(x, g, u, d)
        t0 = time.perf_counter()
        for _ in range(reps):
            expert_ffn(x, g, u, d)
        return (time.perf_counter() - t0) / reps
    finally:
        torch.set_num_threads(n)


def calibrate(res: dict, tr, inter: int, a, expert_bytes: int, hbm: int) -> dict:
    """This machine as a simulator profile, from the runs just made (policies/profiles.py local_hardware)."""
    od, resident = res["on_demand"], res.get("resident")
    rows = max(1, round(a.batch * tr.top_k / max(1, min(tr.num_experts, a.batch * tr.top_k))))
    e_s = expert_compute_s(inter, rows, hidden=a.hidden)
    # one worker's link: the workers share this machine's cores, so each gets 1/W of the load throughput the
    # warm-up measured (all workers loading at once); without a resident run, the replay's in-worker load time
    if resident and resident.get("reload_loads"):
        load_s = resident["reload_s"] / resident["reload_loads"] * a.workers
        src = "reload of every expert from the DRAM tier (resident run)"
    else:
        load_s = od["load_seconds"] / max(od["loads"], 1)
        src = "on_demand in-worker load time"
    # per MoE layer: the resident run's time minus its expert compute = dispatch, grouping, combine, Ray calls
    per_layer = (resident or od)["moe_s"] / max((resident or od)["steps"] * tr.num_layers, 1)
    uses_per_layer = (resident or od)["uses"] / max((resident or od)["steps"] * tr.num_layers, 1)
    busiest = uses_per_layer / a.workers * e_s
    overhead = max(per_layer - busiest, 0.0)
    # the coordinator's reaction time: its measured step time (routing batch in -> orders out)
    steps = [m["coordinator"]["step_ms_p50"] for m in res.values()
             if isinstance(m.get("coordinator"), dict) and m["coordinator"].get("step_ms_p50")]
    link, handoff, loads_at_once, load_cpu = link_settings(a), None, 1, 0.0
    if link:
        # --tier link: the storage link is the emulated one, known exactly; what a load costs beyond it (storage
        # actor -> object store -> copy into the worker) is on_demand's in-worker time per load minus the link's
        # modelled time (its demand reads never queue: a layer's misses fit the link's channels)
        from storage_adapters.emulated import split_parts
        # a lone demand read takes this many parts of the idle link
        parts = split_parts(expert_bytes, link.get("split_min_bytes"), link["channels"])
        wire = link["latency_s"] + expert_bytes / (parts * link["bandwidth_Bps"])
        handoff = max(od["load_seconds"] / max(od["loads"], 1) - wire, 0.0)
        load_s, src = wire + handoff, "emulated link's model + on_demand's measured hand-off per load"
        loads_at_once = 8          # ExpertWorker's I/O pool (io_threads): its demand loads of one call in parallel
        # a prefetch load's hand-off is CPU work on the cores that compute (2 Ray calls: get_tiered and the object
        # fetch), priced at what one worker call costs in the resident replay (its per-layer overhead / workers)
        load_cpu = 2 * overhead / a.workers
    return {"load_s_per_expert": load_s, "load_source": src, "expert_bytes": expert_bytes, "expert_s": e_s,
            "hbm_bytes_per_worker": hbm, "link": link, "handoff_s": handoff, "load_cpu_s": load_cpu,
            "dram_fraction": a.dram_fraction,
            "prefetch_concurrency": getattr(a, "prefetch_concurrency", None) or 2,   # workers.prefetch_concurrency
            "layer_overhead_s": overhead, "concurrent_loads": loads_at_once, "workers_per_node": 64,
            "decision_latency_s": 1e-3 * float(np.median(steps)) if steps else 1e-3,
            "model": {"name": f"bench:{tr.model}", "num_layers": tr.num_layers, "num_experts": tr.num_experts,
                      "top_k": tr.top_k, "hidden": a.hidden, "expert_inter": inter, "bytes_per_param": 2.0,
                      "blob_bytes": expert_bytes}}


def simulate_same(calib: dict, tr, a, policies: list[str]) -> dict:
    from policies import profiles as P
    from policies.registry import make_predictor
    from policies.simulator import SimConfig, Simulator, add_relative
    hw = P.local_hardware(calib)
    model = P.Model(**calib["model"])
    link = calib.get("link")
    store = P.local_storage(calib) if link else P.storage("nvme-gen4")
    # the real worker's limits: its prefetch threads, no re-prioritising of a read already queued on the link, and
    # one compute once every miss of the call has landed (ExpertWorker.compute)
    # the run's planner settings: its in-flight cap (main's formula), threshold and confirm probability; a policy the
    # coordinator runs adapts its window as the coordinator does (every adapt_every=16 decisions, up to
    # lookahead_tokens x layers: cluster/config.py PrefetchConfig); the oracle is the benchmark's, fixed window
    eb, K = calib["expert_bytes"], tr.top_k
    base = dict(workers=a.workers, batch=a.batch, cache_fraction=a.cache_fraction, window=a.window,
                decision_latency=calib["decision_latency_s"], hbm_bytes_per_worker=calib["hbm_bytes_per_worker"],
                dram_fraction=calib["dram_fraction"] if link else 1.0,
                prefetch_concurrency=calib.get("prefetch_concurrency"), promote_queued=False,
                compute_after_loads=True, max_inflight_bytes=max(a.window * K * a.batch * eb, 8 * eb),
                **{k: v for k, v in (("threshold", getattr(a, "threshold", None)),
                                     ("confirm_prob", getattr(a, "hbm_confirm_prob", None))) if v is not None},
                value_residents=getattr(a, "value_residents", True),
                eviction_hints=getattr(a, "eviction_hints", False))
    max_window = float(max(a.window, (getattr(a, "lookahead_tokens", None) or 3) * tr.num_layers, 1))
    from cluster.config import PrefetchConfig
    publish = getattr(a, "publish_every", None) or PrefetchConfig().publish_every_layers
    prior = None
    if getattr(a, "routing_prior", None):   # the routing prior the runtime's reuse values started from
        from policies.reuse import load_routing_prior
        prior = load_routing_prior(a.routing_prior, tr.num_layers, tr.num_experts, tr.top_k)[0]
    out = {}
    for p in policies:
        name, p = p, p.partition("+")[0]   # NAME+reuse / NAME+lru: the same predictor, with or without the values
        if p == FAST_PATH:
            out[name] = {"unavailable": "the simulator has no runtime fast path (policies/fast_path.py)"}
            continue
        try:
            pred = make_predictor(p, num_layers=tr.num_layers, num_experts=tr.num_experts, top_k=tr.top_k,
                                  trace=tr if p == "oracle" else None,
                                  store_dir=getattr(a, "predictor_dir", None) if p in ("learned", "ensemble") else None)
        except (ValueError, ImportError, FileNotFoundError) as e:
            out[name] = {"unavailable": str(e)}
            continue
        adapt = p not in NO_COORDINATOR   # the policies the coordinator actor runs
        # on this machine the coordinator shares the decode loop's 2 cores: each of its steps (its measured time)
        # comes off the layer that published it, as a prefetch's hand-off does (docs/simulator.md)
        # the coordinator decides once per routing batch of `publish` MoE layers; its adapt_every and expiry count
        # batches (cluster/config.py PrefetchConfig), the simulator's layer steps
        cfg = SimConfig(**base, adapt_every=16 * publish if adapt else None,
                        max_window=max_window if adapt else None, publish_every=publish if adapt else 1,
                        expiry_steps=64 * publish if adapt else 64,
                        coordinator_cpu_s=calib["decision_latency_s"] if adapt else 0.0,
                        reuse_values=reuse_values_on(name, a),
                        reuse_memory=False if name.endswith("+reuse_fast") else None,
                        reuse_prior=None if name.endswith("+reuse_fast") else prior)
        m = Simulator(hw, model, store, cfg, tr, pred).run()
        out[name] = {k: m[k] for k in ("tokens_per_s", "hit_rate", "stall_ms_per_token", "prefetch_precision",
                                    "prefetch_recall", "late_prefetches", "demand_loads", "hbm_loads",
                                    "load_ms_per_load", "worker_stall_s", "cpu_contention_ms_per_token",
                                    "window_final", "window_mean")}
    add_relative({k: v for k, v in out.items() if "unavailable" not in v})
    return out


# -- main --------------------------------------------------------------------------------------------------------
def plot(res: dict, png: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pols = [p for p, m in res.items() if "error" not in m]
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    for a_, key, lab in zip(ax, ("tokens_per_s", "hit_rate", "stall_ms_per_token", "fraction_of_oracle"),
                            ("tokens/s", "hit rate", "stall ms / token", "fraction of oracle")):
        a_.bar(pols, [res[p].get(key) or 0 for p in pols])
        a_.set_title(lab)
        a_.tick_params(axis="x", rotation=60)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("policies", help="replay a trace through the real cluster, per policy")
    p.add_argument("--trace", required=True)
    p.add_argument("--expert-mib", type=float, default=None, help="expert size (default 2, --quick 0.5)")
    p.add_argument("--cache-fraction", type=fraction, default=0.25)
    p.add_argument("--dram-fraction", type=float, default=None,
                   help="DRAM tier budget / all experts' bytes (default 1.0; with --tier s3 or link 0: no DRAM tier)")
    p.add_argument("--tier", choices=("dram", "s3", "link"), default="dram",
                   help="where loads come from: dram (the object store, a memcpy on the compute cores), s3 "
                        "(a local moto server behind the shaping proxy: each load waits --s3-latency-ms + "
                        "bytes / --s3-mbps, the I/O-bound regime, but moto costs CPU) or link (the local store "
                        "behind an emulated link: each load a pure wait of --link-latency-ms + bytes / --link-mbps)")
    p.add_argument("--s3-latency-ms", type=float, default=5.0, help="first-byte latency per S3 request")
    p.add_argument("--s3-mbps", type=float, default=200.0, help="S3 bandwidth cap per connection, MB/s (0: none)")
    p.add_argument("--link-latency-ms", type=float, default=5.0, help="--tier link: latency per read")
    p.add_argument("--link-mbps", type=float, default=200.0, help="--tier link: bandwidth per channel, MB/s")
    p.add_argument("--link-channels", type=int, default=8, help="--tier link: reads in flight at once per node")
    p.add_argument("--link-split-kib", type=float, default=None,
                   help="--tier link: split a read over the channels free when it starts, one part per this many "
                        "KiB at least, as the S3 and NVMe adapters split reads (default: a read holds one channel)")
    p.add_argument("--prefetch-concurrency", type=at_least(1), default=None,
                   help="workers.prefetch_concurrency: prefetch loads each worker runs at once (default 2)")
    p.add_argument("--placement", choices=("balanced", "by_layer"), default=None, help="workers.placement")
    p.add_argument("--model-dir", default=None,
                   help="a real checkpoint to serve (e.g. jobs/embedded_model) instead of a generated store; with a "
                        "trace of that model that has hidden states, they are what the routers and predictors see")
    p.add_argument("--predictor-dir", default=None,
                   help="a trained predictor (predictor.json + predictor.safetensors of jobs.train_predictor), "
                        "copied beside the store for the learned policy")
    p.add_argument("--predictor-from-trace", action="store_true",
                   help="train a routing-only learned predictor (jobs.train_predictor --routing-only) on the trace's "
                        "requests this run does not replay (those after the first --requests), its first --layers "
                        "layers, and use it as --predictor-dir: the learned policy and the fast path read it")
    p.add_argument("--predictor-horizon", type=int, default=2,
                   help="with --predictor-from-trace: distances 1..D it predicts (layers ahead)")
    p.add_argument("--threshold", type=fraction, default=None, help="prefetch.threshold (planner)")
    p.add_argument("--hbm-confirm-prob", type=fraction, default=None, help="prefetch.hbm_confirm_prob (planner)")
    p.add_argument("--lookahead-tokens", type=int, default=None, help="prefetch.lookahead_tokens (planner)")
    p.add_argument("--planner-engine", choices=("compiled", "numpy"), default=None,
                   help="prefetch.planner_engine: the ranking as one numba call (default) or its numpy reference")
    p.add_argument("--eviction-hints", action="store_true",
                   help="prefetch.eviction_hints true: a worker's demand miss evicts by the planner's resident "
                        "values (Plan.keep) instead of its own policy")
    p.add_argument("--no-value-residents", dest="value_residents", action="store_false", default=True,
                   help="prefetch.value_residents false: the planner values a resident nobody predicts at 0 "
                        "(before: residents keep their learned next-token reuse value, policies/reuse.py)")
    p.add_argument("--speculate-layers", type=int, default=None,
                   help="prefetch.speculate_layers: MoE layers the runtime's fast path predicts itself (0: off; "
                        "hidden-state policies only, policies/fast_path.py)")
    p.add_argument("--speculate-threshold", type=fraction, default=None, help="prefetch.speculate_threshold")
    p.add_argument("--speculate-values", action=argparse.BooleanOptionalAction, default=None,
                   help="prefetch.speculate_values: the fast path's P values decide the workers' evictions")
    p.add_argument("--reuse-values", action=argparse.BooleanOptionalAction, default=None,
                   help="prefetch.reuse_values: the runtime values each routed layer's experts by P(the next token "
                        "selects them) and the workers evict by it (the seed strategies never: NAME+reuse asks)")
    prior = p.add_mutually_exclusive_group()
    prior.add_argument("--routing-prior", default=None, metavar="NPZ",
                       help="prefetch.routing_prior: a routing prior (python -m jobs.train_predictor --routing-prior) "
                            "warm-starting the reuse values' long-memory table")
    prior.add_argument("--routing-prior-from-trace", action="store_true",
                       help="build that prior from the trace's requests this run does not replay (those after the "
                            "first --requests), its first --layers layers: other prompts of the same workload")
    p.add_argument("--speculate-fanout", type=int, default=None,
                   help="prefetch.speculate_fanout: per row at most this many experts per layer "
                        "(default: the source's, policies/fast_path.py order_filter)")
    p.add_argument("--publish-every", type=int, default=None,
                   help="prefetch.publish_every_layers: MoE layers per routing batch the runtime sends")
    p.add_argument("--orders-ride", type=int, choices=(0, 1), default=None,
                   help="prefetch.orders_ride: 1 (the default) the coordinator's orders come back in its publish "
                        "replies and ride with the compute calls; 0: it calls each worker")
    p.add_argument("--cache-policy", default="lru", choices=("lru", "lfu", "slru", "prefetch_aware"),
                   help="the workers' eviction policy for every run but `slru` (policies/hbm_cache.py)")
    p.add_argument("--repeat", type=at_least(1), default=1,
                   help="replay every policy this many times (interleaved); the JSON keeps each run and the range")
    p.add_argument("--quick", action="store_true", help="few layers and tokens: under two minutes here")
    p.add_argument("--policies", default=None, help="comma list (default: on_demand,oracle,resident + "
                                                    "the history predictors the coordinator can run; "
                                                    "fast_path: the runtime's fast path with no coordinator; "
                                                    "NAME+reuse / NAME+lru: with / without the reuse values; "
                                                    "NAME+reuse_fast: with them, without their long-memory table "
                                                    "and without a routing prior)")
    p.add_argument("--workers", type=at_least(1), default=2)
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs each worker asks Ray for (e.g. 0.5: two workers per GPU); > 0 puts the worker caches "
                        "in device memory and computes there (default 0: CPU workers)")
    p.add_argument("--batch", type=at_least(1), default=4)
    p.add_argument("--tokens", type=at_least(1), default=None, help="trace rows to replay (default 1024, --quick 160)")
    p.add_argument("--layers", type=at_least(1), default=None, help="first MoE layers only (default all, --quick 4)")
    p.add_argument("--requests", type=at_least(1), default=None,
                   help="first requests of the trace (default 2 x batch)")
    p.add_argument("--window", type=at_least(1), default=2, help="lookahead in MoE layers (coordinator and oracle)")
    p.add_argument("--address", default=None, help="Ray address (auto: the cluster `ray job submit` runs in)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "moe-benchmark"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-simulate", action="store_true", help="skip the simulator's prediction of this run")
    p.add_argument("--prefetch-ratio", type=ratio_list, default=None,
                   help="comma list of weight_prefetch_config moe.gate_up ratios, 'full' = whole-expert prefetch "
                        "(partial off), e.g. full,0.8,0.5,0.25: every prefetching policy runs once per ratio, same "
                        "cache budget and predictor (docs/weight_prefetch.md)")
    p.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from jobs.simulate import load_trace
    t_all = time.perf_counter()
    # every check before the store is built and Ray starts: a bad flag must not cost a conversion or a replay
    check_out_file(p, a.json, "--json")
    for name in (a.policies.split(",") if a.policies else []):
        if err := policy_error(name):
            p.error(f"--policies {a.policies}: {err}")
    if err := config_error(a):
        p.error(err)
    if a.gpus_per_worker > 0 and not a.address and (err := gpu_error(a.gpus_per_worker, a.workers)):
        p.error(f"--gpus-per-worker {a.gpus_per_worker:g}: {err}")
    mib = a.expert_mib or (0.5 if a.quick else 2.0)
    tokens = a.tokens or (160 if a.quick else 1024)
    layers = a.layers or (4 if a.quick else None)
    full = load_trace_or_error(p, a.trace, "--trace", loader=load_trace)
    tr = cut_trace(full, layers, tokens, a.requests or 2 * a.batch)
    L, E, K = tr.num_layers, tr.num_experts, tr.top_k
    replayed = f"the replayed trace ({a.trace}" + (f", cut to {layers} layers by --layers/--quick)" if layers else ")")
    if a.model_dir:
        ml, me = model_geometry(p, a.model_dir)
        if (ml, me) != (L, E):
            p.error(f"--model-dir {a.model_dir}: the model has {ml} MoE layers x {me} experts, {replayed} has "
                    f"{L} x {E}")
    if a.predictor_dir and a.predictor_from_trace:
        p.error("--predictor-dir and --predictor-from-trace: give one")
    if a.predictor_from_trace and not 1 <= a.predictor_horizon <= L:
        p.error(f"--predictor-horizon {a.predictor_horizon}: must lie in [1, {L}] (the replay's MoE layers)")
    if a.predictor_dir and (err := predictor_dir_error(a.predictor_dir, (L, E, K), replayed)):
        p.error(f"--predictor-dir {a.predictor_dir}: {err}")
    if a.predictor_from_trace:
        try:
            a.predictor_dir = predictor_from_trace(full, tr, a.work, a.predictor_horizon)
        except ValueError as e:
            print(f"benchmark: error: {e}", file=sys.stderr)
            return 2
    a.routing_prior_meta = None
    if a.routing_prior_from_trace:
        try:
            a.routing_prior, a.routing_prior_meta = prior_from_trace(full, tr, a.work)
        except ValueError as e:
            print(f"benchmark: error: {e}", file=sys.stderr)
            return 2
    del full
    if a.model_dir:
        store, inter, a.hidden = model_store(a.work, a.model_dir)
        ckpt, tag = a.model_dir, "model-" + os.path.basename(os.path.normpath(a.model_dir))
    else:
        store, inter = build_store(a.work, L, E, K, int(mib * 2**20))
        a.hidden = HIDDEN
        ckpt, tag = os.path.join(os.path.dirname(store), "ckpt"), os.path.basename(os.path.dirname(store))
    if a.dram_fraction is None:
        a.dram_fraction = 0.0 if a.tier in ("s3", "link") else 1.0
    from storage_adapters.manifest import Manifest
    with open(os.path.join(store, "manifest.json"), "rb") as f:
        eb = Manifest.from_json(f.read(), store).expert_bytes
    total = L * E * eb
    # a worker must hold one layer's experts of the whole batch (they are pinned while computing)
    hbm = max(int(a.cache_fraction * total / a.workers), eb * K * a.batch)
    dram = max(int(a.dram_fraction * total) + (8 << 20), 16 << 20)
    if a.tier in ("s3", "link"):
        dram = int(a.dram_fraction * total)                    # 0: no DRAM tier, every load goes to the slow tier
    inflight = max(a.window * K * a.batch * eb, 8 * eb)
    if a.policies:
        pols = a.policies.split(",")
    else:
        pols = ["on_demand", "oracle", "resident", "cross_layer"]
        if not a.quick:
            pols += ["previous_token", "topk_frequency", "multi_lookahead", "intelligent_adaptive", "ensemble"]
    for need in ("on_demand",):
        if need not in pols:
            pols.insert(0, need)
    _say(f"trace {tr.origin}: {tr.num_tokens} rows, {tr.num_requests} requests, {L} x {E} top-{K}; experts "
         f"{eb / 2**20:.2f} MiB, cache {hbm * a.workers / 2**20:.0f} MiB over {a.workers} workers "
         f"({hbm * a.workers / total:.0%} of all experts; asked {a.cache_fraction:.0%}), batch {a.batch}")
    s3 = None
    if a.tier == "s3":
        s3 = ShapedS3(ckpt, tag, a.work, a.s3_latency_ms / 1e3, a.s3_mbps * 1e6 if a.s3_mbps else None).__enter__()
    try:
        return _run_all(a, argv, tr, store, inter, eb, total, hbm, dram, inflight, pols, s3, t_all)
    finally:
        if s3 is not None:
            s3.__exit__(None, None, None)


# the flag behind each config setting the flags fill in (cluster_config), by the setting's last key
_FLAG_OF = {"prefetch_concurrency": "--prefetch-concurrency", "placement": "--placement", "threshold": "--threshold",
            "hbm_confirm_prob": "--hbm-confirm-prob", "lookahead_tokens": "--lookahead-tokens",
            "lookahead_layers": "--window", "publish_every_layers": "--publish-every",
            "speculate_layers": "--speculate-layers", "speculate_threshold": "--speculate-threshold",
            "speculate_fanout": "--speculate-fanout", "routing_prior": "--routing-prior", "count": "--workers",
            "num_gpus_per_worker": "--gpus-per-worker",
            "channels": "--link-channels", "split_min_bytes": "--link-split-kib"}


def gpu_error(per_worker: float, workers: int) -> str | None:
    """Why this machine cannot place `workers` workers of `per_worker` GPUs each, or None (a local run only: a
    cluster's GPUs are Ray's to count)."""
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return "no CUDA GPU on this machine"
    if per_worker > 1 and per_worker != int(per_worker):
        return "above 1 it must be a whole number of GPUs (Ray's rule)"
    if per_worker * workers > n:
        return f"{workers} workers x {per_worker:g} GPUs need {per_worker * workers:g}; this machine has {n}"
    return None


def config_error(a) -> str | None:
    """Why the cluster config the flags make would be refused (cluster/config.py), or None: checked before the store
    is built and Ray starts, where it used to fail each policy's run after both. The message names the flag."""
    from pydantic import ValidationError
    try:
        cluster_config(os.path.join(a.work, "store"), workers=a.workers, hbm=1 << 20, dram=0, policy="on_demand",
                       window=a.window, ns="check", address=None, inflight=1 << 20, planner=planner_settings(a, 0),
                       link=link_settings(a), worker_opts=worker_settings(a))
    except ValidationError as e:
        err = e.errors()[0]
        loc = [k for k in err["loc"] if isinstance(k, str)]
        key = loc[-1] if loc else "?"
        if key in ("bandwidth_Bps", "latency_s"):   # the link's emulation or the tier cost made of the same flags
            flag = ("--s3-mbps" if a.tier == "s3" else "--link-mbps") if key == "bandwidth_Bps" else (
                "--s3-latency-ms" if a.tier == "s3" else "--link-latency-ms")
        else:
            flag = _FLAG_OF.get(key, "a flag")
        value = getattr(a, flag.lstrip("-").replace("-", "_"), None) if flag.startswith("--") else None
        return f"{flag} {value}: {err['msg'].lower()} (the cluster config's {'.'.join(loc)})"
    return None


def model_geometry(parser, model_dir: str) -> tuple[int, int]:
    """(MoE layers, experts) of the checkpoint at model_dir, read as the converter reads it; else a parser error."""
    from storage_adapters.errors import StoreError
    from storage_adapters.families import geometry
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        parser.error(f"--model-dir {model_dir}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(path) as f:
            g = geometry(json.load(f), path)
    except (OSError, ValueError, StoreError) as e:   # unreadable, not JSON, unsupported family or missing keys
        parser.error(f"--model-dir {model_dir}: {one_line(e)}")
    return len(g.moe_layers), g.num_experts


def predictor_dir_error(d: str, geo: tuple[int, int, int], replayed: str = "the replay") -> str | None:
    """Why the trained predictor in d cannot serve a replay of geometry (L, E, K) (checked before it is copied
    beside the store), or None. The geometry is predictor.json's, which LearnedPredictor.save writes."""
    from policies.learned import FORMAT, PREDICTOR_FILE, PREDICTOR_META
    missing = [f for f in (PREDICTOR_META, PREDICTOR_FILE) if not os.path.isfile(os.path.join(d, f))]
    if missing:
        return f"no {' or '.join(missing)} there (python -m jobs.train_predictor --out DIR writes them)"
    try:
        with open(os.path.join(d, PREDICTOR_META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return f"{PREDICTOR_META} is unreadable or not JSON ({one_line(e)})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"{PREDICTOR_META} is not a {FORMAT} file"
    got = tuple(meta.get(k) for k in ("num_layers", "num_experts", "top_k"))
    if got != tuple(geo):
        return f"the predictor is for L={got[0]} E={got[1]} K={got[2]}, {replayed} is L={geo[0]} E={geo[1]} K={geo[2]}"
    return None


def planner_settings(a, eb: int) -> dict:
    """The `prefetch` settings given by flags; with --tier s3 the planner is told what a load from the store's
    tiers costs (the nvme fallback is priced as S3: it is never read, but it is the fastest tier the manifest lists,
    so the planner would otherwise value a prefetch at an NVMe read's stall)."""
    out = {k: v for k, v in (("threshold", a.threshold), ("hbm_confirm_prob", a.hbm_confirm_prob),
                             ("lookahead_tokens", a.lookahead_tokens),
                             ("publish_every_layers", getattr(a, "publish_every", None)),
                             ("speculate_layers", getattr(a, "speculate_layers", None)),
                             ("speculate_threshold", getattr(a, "speculate_threshold", None)),
                             ("speculate_fanout", getattr(a, "speculate_fanout", None)),
                             ("speculate_values", getattr(a, "speculate_values", None)),
                             ("reuse_values", getattr(a, "reuse_values", None)),
                             ("routing_prior", getattr(a, "routing_prior", None)),
                             ("orders_ride", getattr(a, "orders_ride", None)),
                             ("planner_engine", getattr(a, "planner_engine", None))) if v is not None}
    if not getattr(a, "value_residents", True):
        out["value_residents"] = False
    if getattr(a, "eviction_hints", False):
        out["eviction_hints"] = True
    if a.tier == "s3":
        bw = a.s3_mbps * 1e6 if a.s3_mbps else 10e9
        cost = {"latency_s": a.s3_latency_ms / 1e3, "bandwidth_Bps": bw}
        out["tier_costs"] = {"s3": cost, "nvme": cost}
    if a.tier == "link":
        lk = link_settings(a)
        out["tier_costs"] = {"nvme": {"latency_s": lk["latency_s"], "bandwidth_Bps": lk["bandwidth_Bps"]}}
    return out


def link_settings(a) -> dict | None:
    """--tier link: the nvme tier's `emulate` block."""
    if getattr(a, "tier", None) != "link":
        return None
    out = {"latency_s": a.link_latency_ms / 1e3, "bandwidth_Bps": a.link_mbps * 1e6, "channels": a.link_channels}
    if getattr(a, "link_split_kib", None):
        out["split_min_bytes"] = int(a.link_split_kib * 1024)
    return out


def worker_settings(a) -> dict:
    out = {k: v for k, v in (("prefetch_concurrency", getattr(a, "prefetch_concurrency", None)),
                             ("placement", getattr(a, "placement", None))) if v is not None}
    if getattr(a, "gpus_per_worker", 0):   # workers on GPUs: their caches are device memory, compute on the device
        out.update(num_gpus_per_worker=a.gpus_per_worker, device="cuda")
    return out


def _run_all(a, argv, tr, store, inter, eb, total, hbm, dram, inflight, pols, s3, t_all) -> int:
    L, E, K = tr.num_layers, tr.num_experts, tr.top_k
    if a.predictor_dir:
        import shutil
        for f in ("predictor.json", "predictor.safetensors"):
            shutil.copy(os.path.join(a.predictor_dir, f), os.path.join(s3.store if s3 else store, f))
    planner = planner_settings(a, eb)
    if "speculate_layers" not in planner and not replays_hidden(tr, a):
        # no real router inputs in this replay (a routing-only trace: the workers see random activations), so the
        # runtime's hidden-state fast path would speculate from noise; off unless asked for (--speculate-layers)
        # (fast_path, and learned with a routing-only predictor, keep theirs: run_policy)
        planner["speculate_layers"] = 0
    import ray
    if a.address:
        ray.init(address=a.address)
    else:
        ray.init(address="local", num_cpus=4, object_store_memory=max(256 << 20, int(dram * 1.5)),
                 include_dashboard=False)  # "local": a fresh instance, never someone else's running cluster
    ratios = a.prefetch_ratio or [None]
    runs = [(p, r, p if r is None else f"{p}@{r}") for p in pols
            for r in (ratios if p not in ("on_demand", "resident") else [None])]
    res, reps = {}, {}
    for rep in range(a.repeat):                     # interleaved: a slow spell of the shared machine hits all
        for base_pol, ratio, pol in runs:
            if "error" in res.get(pol, {}):
                continue
            t0 = time.perf_counter()
            try:
                m = run_policy(base_pol, tr, store, a, hbm=(L * E * eb if pol == "resident" else hbm), dram=dram,
                               inflight=inflight, ratio=ratio, s3=s3, planner=planner)
            except Exception as e:  # noqa: BLE001 - one policy failing (e.g. not available) must not lose the others
                res[pol] = {"error": f"{type(e).__name__}: {e}"}
                _say(f"{pol}: FAILED {res[pol]['error']}")
                continue
            reps.setdefault(pol, []).append(m)
            _say(f"{pol:22s} {m['tokens_per_s']:8.1f} tok/s  hit {m['hit_rate']:.3f}  stall "
                 f"{m['stall_ms_per_token']:.2f} ms/tok  precision {m['prefetch_precision']}  "
                 f"({time.perf_counter() - t0:.1f} s, run {rep + 1}/{a.repeat})")
    for pol, ms in reps.items():                    # the median run by tokens/s is the policy's figure
        m = dict(sorted(ms, key=lambda m: m["tokens_per_s"])[len(ms) // 2])
        if len(ms) > 1:
            m["runs_tokens_per_s"] = [x["tokens_per_s"] for x in ms]
            m["runs_hit_rate"] = [x["hit_rate"] for x in ms]
            m["runs_stall_s"] = [x["stall_s"] for x in ms]
        res[pol] = m
    ray.shutdown()
    ok = {p: m for p, m in res.items() if "error" not in m}
    base, orc = ok.get("on_demand"), ok.get("oracle")
    for p, m in ok.items():
        if base:
            m["speedup"] = m["tokens_per_s"] / base["tokens_per_s"]
        if base and orc and orc["tokens_per_s"] > base["tokens_per_s"]:
            m["fraction_of_oracle"] = m["speedup"] / (orc["tokens_per_s"] / base["tokens_per_s"])
            # the share of the oracle's GAIN over on_demand (0: no better than on_demand, 1: the oracle's)
            m["oracle_gain_share"] = (m["tokens_per_s"] - base["tokens_per_s"]) / \
                (orc["tokens_per_s"] - base["tokens_per_s"])
            if "runs_tokens_per_s" in m and "runs_tokens_per_s" in base and "runs_tokens_per_s" in orc:
                # the same ratios per repetition (run i of every policy against run i of on_demand and oracle)
                rr = list(zip(m["runs_tokens_per_s"], base["runs_tokens_per_s"], orc["runs_tokens_per_s"]))
                m["runs_fraction_of_oracle"] = [t / o for t, b, o in rr]
                m["runs_oracle_gain_share"] = [(t - b) / (o - b) if o > b else None for t, b, o in rr]
    out = {"command": "python -m jobs.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
           "trace": {"path": os.path.abspath(a.trace), "rows": tr.num_tokens, "requests": tr.num_requests,
                     "layers": L, "experts": E, "top_k": K},
           "expert_bytes": eb, "hbm_bytes_per_worker": hbm,
           "cache_fraction_effective": hbm * a.workers / total, "dram_bytes": dram, "workers": a.workers,
           "batch": a.batch, "window": a.window, "tier": a.tier, "planner": planner,
           "s3_shaping": {"latency_ms": a.s3_latency_ms, "MBps": a.s3_mbps} if a.tier == "s3" else None,
           "link": link_settings(a), "worker_settings": worker_settings(a),
           "routing_prior": getattr(a, "routing_prior_meta", None) or getattr(a, "routing_prior", None),
           "policies": res}
    if base:
        calib = calibrate(ok, tr, inter, a, eb, hbm)   # runs that failed (their "error") are left out
        out["calibration"] = calib
        # the regime: one expert load vs one layer's compute on the busiest worker
        layer_compute = base["uses"] / max(base["steps"] * L, 1) / a.workers * calib["expert_s"]
        out["regime"] = {"load_ms_per_expert": 1e3 * calib["load_s_per_expert"],
                         "compute_ms_per_layer": 1e3 * layer_compute,
                         "io_bound": calib["load_s_per_expert"] >= layer_compute}
        if not a.no_simulate:
            sim_pols = [p for p in ok if p != "resident"]

            def predict(cal):
                sim = simulate_same(cal, tr, a, sim_pols)
                return {"calibration": cal, "policies": sim, "ratio_sim_over_measured": {
                    p: {"tokens_per_s": sim[p]["tokens_per_s"] / ok[p]["tokens_per_s"],
                        "hit_rate": sim[p]["hit_rate"] / ok[p]["hit_rate"] if ok[p]["hit_rate"] else None}
                    for p in sim if "unavailable" not in sim[p]}}
            out["simulated"] = predict(calib)
            res_run = ok.get("resident")
            if calib.get("link") and base["loads"] and calib["handoff_s"]:
                # --tier link: fit the hand-off so that the simulated workers wait for their misses as long as the
                # measured ones did (on_demand's summed stall_seconds: the slowest of each call's loads, so the
                # loads' spread counts, which the mean load time leaves out). The wait is linear in the hand-off
                # when demand reads do not queue: two simulations of on_demand give the line.
                def od_stall(h):
                    return simulate_same(dict(calib, handoff_s=h), tr, a, ["on_demand"])["on_demand"]["worker_stall_s"]
                h1 = calib["handoff_s"]
                s0, s1 = od_stall(0.0), od_stall(h1)
                h_fit = max(h1 + (base["stall_s"] - s1) * h1 / max(s1 - s0, 1e-12), 0.0)
                out["simulated_fit_on_demand"] = predict(dict(
                    calib, handoff_s=h_fit, load_source="hand-off fitted to on_demand's measured worker stall"))
            elif res_run and base["loads"]:
                # the same with the load time fitted to this on_demand replay (its extra time per load over the
                # resident replay): on_demand then matches by construction; the other policies test the model
                extra = base["moe_s"] - res_run["moe_s"] * base["steps"] / max(res_run["steps"], 1)
                fitted = dict(calib, load_s_per_expert=max(extra, 1e-6) / base["loads"] * a.workers,
                              load_source="fitted to the on_demand replay")
                out["simulated_fit_on_demand"] = predict(fitted)
            if calib.get("link"):
                # a diagnostic, not a prediction: each policy simulated with the hand-off ITS run measured (its
                # in-worker time per load, matched by the simulated one: the hand-off grows with the prefetch
                # traffic and drifts between runs on a shared machine, which one profile cannot know); what is
                # left is the model's structure (link, prefetch slots, window, CPU cost of prefetches)
                own = {}
                for p, f in out["simulated"]["policies"].items():
                    if "unavailable" in f or not ok[p].get("load_ms_per_expert"):
                        continue
                    h = max(calib["handoff_s"] + (ok[p]["load_ms_per_expert"] - f["load_ms_per_load"]) / 1e3, 0.0)
                    own[p] = dict(simulate_same(dict(calib, handoff_s=h), tr, a, [p])[p], handoff_s=h)
                out["simulated_own_load_time"] = {"policies": own, "ratio_sim_over_measured": {
                    p: {"tokens_per_s": m["tokens_per_s"] / ok[p]["tokens_per_s"],
                        "hit_rate": m["hit_rate"] / ok[p]["hit_rate"] if ok[p]["hit_rate"] else None}
                    for p, m in own.items()}}
            for k in ("simulated", "simulated_fit_on_demand", "simulated_own_load_time"):
                if k in out:
                    _say(f"{k}: sim/measured tokens/s, hit rate: " + ", ".join(
                        f"{p} {r['tokens_per_s']:.2f}, {r['hit_rate'] or float('nan'):.2f}"
                        for p, r in out[k]["ratio_sim_over_measured"].items()))
    out["wall_s"] = time.perf_counter() - t_all
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1, default=float)
    png = os.path.splitext(a.json)[0] + ".png"
    plot(res, png, f"{os.path.basename(a.trace)}: {L} x {E} top-{K}, {eb / 2**20:.2f} MiB experts, "
                   f"cache {a.cache_fraction:.0%}, batch {a.batch}, {a.workers} workers")
    _say(f"wrote {a.json} and {png} in {out['wall_s']:.0f} s")
    if res and not ok:   # nothing was measured: a caller (a script, CI) must not take this for a result
        print(f"benchmark: error: every policy run failed ({', '.join(res)}); their errors are in {a.json}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
