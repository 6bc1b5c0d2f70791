"""python -m jobs.simulate --hardware H --model M --workers N --policy P|all [--trace PATH] [--batch B] [--seed S]
                         --json OUT                                            (+ OUT's .png beside it)
       python -m jobs.simulate --study seed-tables --json OUT                   the seed document's §7 tables
       python -m jobs.simulate --study scale --model M --json OUT               workers 1 -> 256, planner cost
       python -m jobs.simulate --study planner-cost --json OUT                  central vs batched vs sharded

Clusters larger than this machine, on a virtual clock (policies/simulator.py): the real predictors (registry),
the real PrefetchPlanner and the real cache bookkeeping, on hardware/storage/model presets (policies/profiles.py).
Routing: --trace PATH, else the model's shared trace (../shared/traces) when it has one, else the synthetic
generator (policies/synthetic.py) shaped like --fit-trace (default: the gpt-oss-20b decode trace) in the model's
geometry; the JSON's `routing` block reports how close the generator came. `--hardware local --calib JSON` is this
machine as measured by `python -m jobs.benchmark policies` (its `calibration` block). The learned policy runs with
`--predictor-dir DIR`, or `--predictor-from-trace`: a routing-only predictor trained on the trace's requests after
the simulated rows (as `jobs.benchmark --predictor-from-trace` does).

The JSON maps `policies` -> name -> metrics (speedup over on_demand, fraction_of_oracle, tokens_per_s,
latency_ms_per_token, hit_rate, stall, memory_mb_peak, bytes_per_link, prefetch precision/recall, planner cost).
Deterministic for a seed (only the `planner.wall_*` figures are measured wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

from jobs._cli import at_least, check_in_file, check_out_file, fraction, one_line, real_in
from policies.traces import TraceFormatError

TRACES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "traces")
SEED_FIVE = ("on_demand", "oracle", "multi_lookahead", "topk_frequency", "intelligent_adaptive")
EXTRA = ("cross_layer", "previous_token", "next_gate", "learned", "ensemble")
# the seed document's §7 (batch 1) for side-by-side: latency ms, speedup, hit rate
SEED_TABLE = {
    "switch-base-128": {"on_demand": (2281.5, 1.00, 0.0003), "oracle": (143.9, 15.85, 0.9982),
                        "multi_lookahead": (215.1, 10.61, 0.9905), "topk_frequency": (205.7, 11.09, 0.9942),
                        "intelligent_adaptive": (174.6, 13.07, 0.9943)},
    "qwen1.5-moe-a2.7b": {"on_demand": (2039.1, 1.00, 0.915), "oracle": (821.5, 2.48, 0.9994),
                          "multi_lookahead": (1378.8, 1.48, 0.961), "topk_frequency": (1337.1, 1.52, 0.964),
                          "intelligent_adaptive": (1258.3, 1.62, 0.969)},
}


def _say(msg: str) -> None:
    print(f"[simulate] {msg}", file=sys.stderr, flush=True)


# -- routing -----------------------------------------------------------------------------------------------------
def load_trace(path: str, model=None):
    from policies.traces import load
    kw = {}
    if path.endswith(".jsonl") and model is not None:
        kw = dict(num_experts=model.num_experts, num_layers=model.num_layers)
    return load(path, **kw)


def routing_for(model, *, trace_path: str | None, tokens: int, requests: int, seed: int,
                fit_trace: str | None = None) -> tuple[object, dict]:
    """(RoutingTrace, description) for a model: a given trace, its shared trace, or the fitted generator."""
    from policies import synthetic
    path = trace_path or (os.path.join(TRACES, model.trace) if model.trace else None)
    if path:
        tr = load_trace(path, model)
        if (tr.num_layers, tr.num_experts, tr.top_k) != (model.num_layers, model.num_experts, model.top_k):
            raise SystemExit(f"simulate: trace {path} is {tr.num_layers} x {tr.num_experts}, top-{tr.top_k}; model "
                             f"{model.name} is {model.num_layers} x {model.num_experts}, top-{model.top_k}")
        tr = tr.head(tokens or 2048)                   # a whole trace is 10^5 rows x L layers: opt in with --tokens
        return tr, {"source": "trace", "path": os.path.abspath(path), "tokens": tr.num_tokens,
                    "requests": tr.num_requests}
    src_path = fit_trace or os.path.join(TRACES, "gpt-oss-20b_decode.npz")
    src = load_trace(src_path).head(6000)
    st = synthetic.stats_of(src)
    p = synthetic.params_of(st, src.top_k)
    gen = synthetic.SyntheticRouter.from_params(model.num_layers, model.num_experts, model.top_k, p, seed=seed,
                                                name=f"synthetic:{model.name}")
    tr = gen.generate(tokens or 1024, max(1, requests), seed=seed)
    got = synthetic.params_of(synthetic.stats_of(tr), model.top_k)
    # fidelity at the source's own geometry: the fitted generator against the trace it was fitted on
    fit = synthetic.SyntheticRouter.fit(src, seed=seed)
    fid = synthetic.fidelity(st, synthetic.stats_of(fit.generate(3000, 30, seed=seed)), src.top_k)
    uni = synthetic.fidelity(st, synthetic.stats_of(synthetic.uniform_router(
        src.num_layers, src.num_experts, src.top_k).generate(3000, 30, seed=seed)), src.top_k)
    return tr, {"source": "synthetic", "fitted_on": os.path.abspath(src_path), "tokens": tr.num_tokens,
                "requests": tr.num_requests, "shape_target": p.as_dict(), "shape_generated": got.as_dict(),
                "fidelity_fit_vs_source": fid, "fidelity_uniform_vs_source": uni}


# -- running policies --------------------------------------------------------------------------------------------
def predictor_kw(policy: str, model, trace, store_dir: str | None = None) -> dict:
    """What a policy needs beyond geometry: router weights for next_gate (the embedded model's, when the trace
    carries hidden states of it); the trained predictor's directory for learned (and the ensemble's member)."""
    kw = {}
    if policy in ("next_gate", "ensemble") and model.name == "embedded" and trace.hidden is not None:
        from cluster.model import load_checkpoint
        from jobs.collect_traces import EMBEDDED
        kw["router_weights"] = load_checkpoint(EMBEDDED)[1]
    if policy in ("learned", "ensemble") and store_dir:
        kw["store_dir"] = store_dir
    return kw


def run_policies(hw, model, store, cfg, trace, policies, *, tier: str, store_dir: str | None = None) -> dict:
    from policies.simulator import Simulator, add_relative
    from policies.registry import make_predictor
    out: dict = {}
    for pol in policies:
        t0 = time.perf_counter()
        try:
            pred = make_predictor(pol, num_layers=trace.num_layers, num_experts=trace.num_experts,
                                  top_k=trace.top_k, trace=trace if pol in ("oracle",) else None,
                                  **predictor_kw(pol, model, trace, store_dir))
        except (ValueError, ImportError, FileNotFoundError) as e:
            out[pol] = {"unavailable": f"{type(e).__name__}: {e}"}
            _say(f"{pol}: unavailable ({e})")
            continue
        if pol == "next_gate" and trace.hidden is None:
            out[pol] = {"unavailable": "the routing has no hidden states (next-gate speculation needs them)"}
            continue
        m = Simulator(hw, model, store, cfg, trace, pred, tier=tier).run()
        m["sim_wall_s"] = time.perf_counter() - t0
        out[pol] = m
        _say(f"{pol:22s} {m['tokens_per_s']:10.1f} tok/s  hit {m['hit_rate']:.3f}  stall "
             f"{m['stall_ms_per_token']:.2f} ms/tok  ({m['sim_wall_s']:.1f} s)")
    ok = {k: v for k, v in out.items() if "unavailable" not in v}
    add_relative(ok)
    for m in ok.values():
        m["cost_per_mtok_usd"] = cost_per_mtok(hw, cfg.workers, m["tokens_per_s"])
    return out


def cost_per_mtok(hw, workers: int, tps: float) -> float:
    return hw.dollars_per_gpu_hour * workers / max(tps, 1e-12) / 3600 * 1e6


def all_policies(trace, store_dir: str | None = None) -> list[str]:
    from policies.learned import is_routing_only
    from policies.registry import PREDICTOR_NAMES
    skip = {"pre_gated", "request_level"}
    if trace.hidden is None:
        skip.add("next_gate")
    if trace.hidden is None and not is_routing_only(store_dir):   # else listed, "unavailable" without a predictor
        skip.add("learned")
    return [p for p in PREDICTOR_NAMES if p not in skip]


# -- plots -------------------------------------------------------------------------------------------------------
def plot_policies(res: dict, title: str, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [k for k, v in res.items() if "unavailable" not in v]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for a, key, lab in zip(ax, ("speedup", "hit_rate", "stall_ms_per_token"),
                           ("speedup over on_demand", "hit rate", "stall ms / token")):
        a.bar(names, [res[n].get(key, np.nan) for n in names], color="tab:blue")
        a.set_title(lab)
        a.tick_params(axis="x", rotation=60)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _png(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".png"


# -- studies -----------------------------------------------------------------------------------------------------
def study_seed_tables(a) -> dict:
    """§7 of the seed document: Switch and Qwen, batch 1..16, the five strategies + ours, on the rtx3090 profile."""
    from policies import profiles as P
    from policies.simulator import SimConfig
    hw, store = P.hardware(a.hardware or "rtx3090"), P.storage(a.storage)
    pols = list(SEED_FIVE) + [p for p in EXTRA if p not in ("next_gate", "learned")]
    out = {"hardware": P.describe(hw), "storage": P.describe(store), "models": {}}
    for mname in ("switch-base-128", "qwen1.5-moe-a2.7b"):
        model = P.model(mname)
        tr, info = routing_for(model, trace_path=None, tokens=a.tokens or 512, requests=a.requests, seed=a.seed,
                               fit_trace=a.fit_trace)
        out["models"][mname] = {"routing": info, "batches": {}, "seed_table_batch1": SEED_TABLE[mname],
                                "expert_mb": model.expert_bytes / 1e6}
        for b in a.batches:
            _say(f"{mname} batch {b}")
            cfg = SimConfig(workers=1, batch=b, cache_fraction=a.cache_fraction, window=a.window,
                            confirm_prob=a.confirm_prob,
                            planner_engine=a.planner_engine)
            rows = run_policies(hw, model, store, cfg, tr, pols, tier=a.tier)
            # the seed's On-Demand keeps no cache (only the active experts: hit rate ~0%); its speedups are over
            # that. The same here: on_demand with a cache of top_k experts, and every row's speedup over it
            nc = run_policies(hw, model, store, replace(cfg, cache_fraction=1e-9), tr, ["on_demand"],
                              tier=a.tier)["on_demand"]
            for m in rows.values():
                if "unavailable" not in m:
                    m["speedup_vs_no_cache"] = m["tokens_per_s"] / nc["tokens_per_s"]
            rows["on_demand_no_cache"] = dict(nc, speedup=nc["tokens_per_s"] / rows["on_demand"]["tokens_per_s"],
                                              speedup_vs_no_cache=1.0)
            out["models"][mname]["batches"][b] = rows
    out["embedded_next_gate"] = _embedded_rows(a)
    return out


def _embedded_rows(a) -> dict:
    """next-gate speculation needs hidden states: on a trace of the embedded model it applies in simulation."""
    from policies import profiles as P
    from policies.simulator import SimConfig
    path = a.embedded_trace
    if not path or not os.path.exists(path):
        return {"unavailable": f"no embedded-model trace with hidden states at {path!r} "
                               "(python -m jobs.collect_traces --hidden --out PATH)"}
    tr = load_trace(path)
    model = P.model("embedded")
    pols = list(SEED_FIVE) + ["cross_layer", "previous_token", "next_gate", "ensemble"]
    hw = P.hardware(a.hardware or "rtx3090")
    res = {}
    for b in (1, 4, 16):
        cfg = SimConfig(workers=1, batch=b, cache_fraction=a.cache_fraction, window=a.window,
                        max_tokens=a.tokens or 2000, confirm_prob=a.confirm_prob,
                        planner_engine=a.planner_engine)
        res[b] = run_policies(hw, model, P.storage(a.storage), cfg, tr, pols, tier=a.tier)
    return {"trace": os.path.abspath(path), "batches": res}


def planner_cost(sim, batch: int, shards: int = 1, every: int = 1, reps: int = 20, by: str = "request") -> dict:
    """Wall cost of one coordinator decision step for `batch` live requests, on a warm simulator: observe the
    batch's events of one layer, predict for every request, plan, with the coordinator's batched calls (one
    observe_many of the layer's rows, one predict_many of all requests). every: one decision per `every` layers with the
    window widened by as much (cost per layer = the call's / every). shards, by:
      "request"  requests split over that many coordinators running in parallel, each planning over the whole
                 cluster view (cost = the slowest shard's)
      "layer"    shard s owns the MoE layers l with l % shards == s and plans only for them, over a view of its
                 layers alone; at a layer step the shards owning the window's target layers act in parallel
                 (cost = the slowest of them), each observing the events and predicting for every request"""
    from policies.predictors import Candidates
    rng = np.random.default_rng(0)
    tr = sim.trace
    L = tr.num_layers
    rows = rng.integers(0, tr.num_tokens, batch)
    reqs = np.arange(batch) + 10_000_000                     # fresh ids: not the trace's (oracle is not timed)
    win = sim.cfg.window
    h = int(np.ceil(win * every))
    rk = sim._rk
    per_call = []
    for r in range(reps):
        l = r % L
        known = tr.experts[rows, l, 0] >= 0                    # [batch] rows routed at this layer
        ids = tr.experts[rows, l].astype(np.int64)              # [batch, K]
        worst = 0.0

        def observe(g):   # the layer's rows of requests g, in one call
            g = g[known[g]]
            if len(g):
                sim.pred.observe_many([int(x) for x in reqs[g]], np.full(len(g), r), l, ids[g])

        if by == "request":
            for g in np.array_split(np.arange(batch), shards):
                t0 = time.perf_counter()
                observe(g)
                names = [int(x) for x in reqs[g]]
                views = [rk.RequestView(q, c) for q, c in zip(names, sim.pred.predict_many(names, [h] * len(g)))
                         if len(c)]
                sim.planner.plan(views, sim._view(), win * every)
                worst = max(worst, time.perf_counter() - t0)
        else:
            targets = sorted({(l + d) % L for d in range(1, h + 1)})
            active = sorted({t % shards for t in targets})
            full = sim._view()
            for s in active:
                mine = np.arange(s, L, shards)                   # this shard's MoE layers
                local = np.full(L, -1)
                local[mine] = np.arange(len(mine))
                t0 = time.perf_counter()
                observe(np.arange(batch))
                views = []
                names = [int(x) for x in reqs]
                for q, c in zip(names, sim.pred.predict_many(names, [h] * batch)):
                    keep = local[c.layer] >= 0
                    if keep.any():
                        views.append(rk.RequestView(q, Candidates(
                            c.distance[keep], local[c.layer[keep]], c.expert[keep], c.prob[keep])))
                v = rk.ClusterView(full.owner[mine], full.node_of, full.present[:, mine], full.nbytes[mine],
                                   full.free_bytes, full.dram_free_bytes, full.inflight[mine], full.staging[mine],
                                   full.inflight_bytes)
                sim.planner.plan(views, v, win * every)
                worst = max(worst, time.perf_counter() - t0)
        per_call.append(worst)
    for i in range(batch):
        sim.pred.end(int(reqs[i]))
    pc = np.array(per_call)
    return {"batch": batch, "shards": shards, "by": by, "every": every,
            "call_ms_p50": 1e3 * float(np.median(pc)), "call_ms_p99": 1e3 * float(np.percentile(pc, 99)),
            "per_layer_ms_p50": 1e3 * float(np.median(pc)) / every}


def study_planner_cost(a) -> dict:
    """The coordinator's decision cost per MoE layer step against the virtual layer time, as the cluster grows:
    one central planner, batched events, sharding by request and by layer (h100-sxm, cross_layer by default)."""
    from policies import profiles as P
    from policies.registry import make_predictor
    from policies.simulator import SimConfig, Simulator
    model = P.model(a.model or "qwen3-30b-a3b")
    hw = P.hardware(a.hardware or "h100-sxm")
    pol = a.scale_policies[-1]
    workers = a.scale_workers
    tr, info = routing_for(model, trace_path=a.trace, tokens=max(workers) * a.per_worker_batch * (a.scale_steps + 1),
                           requests=max(workers) * a.per_worker_batch, seed=a.seed, fit_trace=a.fit_trace)
    rows = []
    for n in workers:
        b = n * a.per_worker_batch
        cfg = SimConfig(workers=n, batch=b, cache_fraction=a.cache_fraction, window=a.window,
                        max_tokens=b * a.scale_steps, confirm_prob=a.confirm_prob,
                        planner_engine=a.planner_engine)
        pred = make_predictor(pol, num_layers=model.num_layers, num_experts=model.num_experts, top_k=model.top_k)
        sim = Simulator(hw, model, P.storage(a.storage), cfg, tr, pred, tier=a.tier)
        m = sim.run()
        row = {"workers": n, "batch": b, "virtual_layer_ms": m["latency_ms_per_layer"], "variants": {}}
        for by, shards, every in (("request", 1, 1), ("request", 1, 4), ("request", 4, 1), ("request", 16, 1),
                                  ("layer", 4, 1), ("layer", 16, 1), ("layer", 16, 4)):
            if by == "request" and shards > b:
                continue
            pc = planner_cost(sim, b, shards, every, reps=a.cost_reps, by=by)
            pc["keeps_up"] = pc["per_layer_ms_p50"] <= row["virtual_layer_ms"]
            row["variants"][f"{by}{shards}_every{every}"] = pc
        _say(f"workers {n:4d} batch {b:5d} layer {row['virtual_layer_ms']:.2f} ms: " + ", ".join(
            f"{k} {v['per_layer_ms_p50']:.2f}" for k, v in row["variants"].items()))
        rows.append(row)
    return {"model": P.describe(model), "hardware": hw.name, "policy": pol, "rows": rows, "routing": info}


def plot_planner_cost(res: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    ws = [r["workers"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for k in rows[-1]["variants"]:
        ax.plot(ws, [r["variants"].get(k, {}).get("per_layer_ms_p50", np.nan) for r in rows], marker="o", label=k)
    ax.plot(ws, [r["virtual_layer_ms"] for r in rows], "k--", label="virtual layer time (budget)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers (4 requests each)")
    ax.set_ylabel("ms per MoE layer step (wall, p50)")
    ax.set_title(f"coordinator decision cost, {res['policy']}, {res['model']['name']} on {res['hardware']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def study_scale(a) -> dict:
    from policies import profiles as P
    from policies.registry import make_predictor
    from policies.simulator import SimConfig, Simulator
    model = P.model(a.model or "qwen3-30b-a3b")
    out = {"model": P.describe(model), "per_worker_batch": a.per_worker_batch, "profiles": {},
           "dollars_per_gpu_hour": {k: v.dollars_per_gpu_hour for k, v in P.HARDWARE.items()}}
    workers = a.scale_workers
    steps = a.scale_steps
    tr, info = routing_for(model, trace_path=a.trace, tokens=max(workers) * a.per_worker_batch * (steps + 1),
                           requests=max(workers) * a.per_worker_batch, seed=a.seed, fit_trace=a.fit_trace)
    out["routing"] = info
    for hname in a.scale_hardware:
        hw = P.hardware(hname)
        rows = []
        for n in workers:
            b = n * a.per_worker_batch
            cfg = SimConfig(workers=n, batch=b, cache_fraction=a.cache_fraction, window=a.window,
                            max_tokens=b * steps, confirm_prob=a.confirm_prob,
                            planner_engine=a.planner_engine)
            row = {"workers": n, "batch": b}
            for pol in a.scale_policies:
                pred = make_predictor(pol, num_layers=model.num_layers, num_experts=model.num_experts,
                                      top_k=model.top_k, trace=tr if pol == "oracle" else None)
                sim = Simulator(hw, model, P.storage(a.storage), cfg, tr, pred, tier=a.tier)
                t0 = time.perf_counter()
                m = sim.run()
                m["sim_wall_s"] = time.perf_counter() - t0
                m["cost_per_mtok_usd"] = cost_per_mtok(hw, n, m["tokens_per_s"])
                row[pol] = {k: m[k] for k in ("tokens_per_s", "hit_rate", "stall_ms_per_token",
                                              "latency_ms_per_token", "bytes_per_link", "cost_per_mtok_usd",
                                              "planner", "prefetch_precision", "prefetch_recall", "sim_wall_s")}
                if pol != "on_demand" and hname == a.scale_hardware[0]:
                    layer_ms = m["latency_ms_per_layer"]
                    cost = {}
                    for shards, every in ((1, 1), (1, 4), (4, 1), (16, 1)):
                        if shards > b:
                            continue
                        pc = planner_cost(sim, b, shards, every, reps=a.cost_reps)
                        pc["keeps_up"] = pc["per_layer_ms_p50"] <= layer_ms
                        cost[f"shards{shards}_every{every}"] = pc
                    row[pol]["planner_cost"] = cost
                    row[pol]["virtual_layer_ms"] = layer_ms
                _say(f"{hname} workers {n:4d} {pol:14s} {m['tokens_per_s']:10.0f} tok/s hit {m['hit_rate']:.3f} "
                     f"${row[pol]['cost_per_mtok_usd']:.3f}/Mtok ({m['sim_wall_s']:.1f} s)")
            rows.append(row)
        out["profiles"][hname] = rows
    return out


def plot_scale(res: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4))
    for hname, rows in res["profiles"].items():
        ws = [r["workers"] for r in rows]
        for pol in [k for k in rows[0] if k not in ("workers", "batch")]:
            ax[0].plot(ws, [r[pol]["tokens_per_s"] for r in rows], marker="o", label=f"{hname} {pol}")
            ax[1].plot(ws, [r[pol]["cost_per_mtok_usd"] for r in rows], marker="o", label=f"{hname} {pol}")
    first = next(iter(res["profiles"].values()))
    for pol in [k for k in first[0] if k not in ("workers", "batch")]:
        pcs = [r[pol].get("planner_cost") for r in first]
        if not pcs[0]:
            continue
        ws = [r["workers"] for r in first]
        for key in pcs[0]:
            ax[2].plot(ws, [p.get(key, {}).get("per_layer_ms_p50", np.nan) for p in pcs], marker="o",
                       label=f"{pol} {key}")
        ax[2].plot(ws, [r[pol]["virtual_layer_ms"] for r in first], "k--", label="virtual layer time")
    for a_, t in zip(ax, ("tokens/s", "$ per million tokens", "planner ms per layer step (wall) vs budget")):
        a_.set_xscale("log", base=2)
        a_.set_yscale("log")
        a_.set_title(t)
        a_.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def plot_seed(res: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(res["models"])
    fig, ax = plt.subplots(len(models), 2, figsize=(12, 4 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        bs = res["models"][m]["batches"]
        batches = sorted(bs, key=int)
        pols = [p for p in bs[batches[0]] if "unavailable" not in bs[batches[0]][p]]
        for p in pols:
            ax[i][0].plot(batches, [bs[b][p]["speedup"] for b in batches], marker="o", label=p)
            ax[i][1].plot(batches, [bs[b][p]["hit_rate"] for b in batches], marker="o", label=p)
        ax[i][0].set_title(f"{m}: speedup over on_demand")
        ax[i][1].set_title(f"{m}: hit rate")
        for a_ in ax[i]:
            a_.set_xlabel("batch")
            a_.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.simulate", description=__doc__.split("\n\n")[1])
    ap.add_argument("--study", choices=("policies", "seed-tables", "scale", "planner-cost"), default="policies")
    ap.add_argument("--hardware", default=None, help="rtx3090 | a100-80gb-pcie | h100-sxm | local (default h100-sxm)")
    ap.add_argument("--calib", default=None, help="calibration JSON for --hardware local (jobs.benchmark's output)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--storage", default="nvme-gen4", choices=("nvme-gen4", "s3"))
    ap.add_argument("--workers", type=at_least(1), default=1)
    ap.add_argument("--policy", default="all", help="a registry name, a comma list, or all")
    ap.add_argument("--trace", default=None)
    ap.add_argument("--fit-trace", default=None, help="trace the synthetic generator is shaped after")
    ap.add_argument("--embedded-trace", default="/tmp/embedded-hidden.npz")
    ap.add_argument("--batch", type=at_least(1), default=1)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--tokens", type=at_least(1), default=None,
                    help="rows of routing to simulate (default: a trace's first 2048, or 1024 synthetic)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--cache-fraction", type=fraction, default=0.25)
    ap.add_argument("--dram-fraction", type=real_in(0.0, 1.0), default=1.0)
    ap.add_argument("--window", type=real_in(0.0, lo_open=True), default=4.0)
    ap.add_argument("--confirm-prob", type=float, default=0.5, help="planner hbm_confirm_prob")
    ap.add_argument("--planner-engine", choices=("compiled", "numpy"), default="compiled",
                    help="the planner's ranking: one numba call, or its numpy reference (same orders)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale-workers", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 2, 4, 8, 16, 32, 64, 256])
    ap.add_argument("--scale-hardware", type=lambda s: s.split(","), default=["h100-sxm", "a100-80gb-pcie",
                                                                            "rtx3090"])
    ap.add_argument("--scale-policies", type=lambda s: s.split(","), default=["on_demand", "cross_layer"])
    ap.add_argument("--per-worker-batch", type=int, default=4)
    ap.add_argument("--scale-steps", type=int, default=4)
    ap.add_argument("--cost-reps", type=int, default=10)
    ap.add_argument("--predictor-dir", default=None,
                    help="a trained predictor (jobs.train_predictor's files) for the learned policy and the ensemble")
    ap.add_argument("--predictor-from-trace", action="store_true",
                    help="train a routing-only learned predictor on the trace's requests after the simulated rows "
                         "(jobs.benchmark --predictor-from-trace) and use it as --predictor-dir")
    ap.add_argument("--predictor-horizon", type=at_least(1), default=2,
                    help="with --predictor-from-trace: distances 1..D it predicts")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "moe-simulate"),
                    help="where --predictor-from-trace writes (and reuses) its predictor")
    ap.add_argument("--json", required=True)
    return ap


def parse(argv=None, ap: argparse.ArgumentParser | None = None):
    """The arguments, checked before any simulation: names, ranges and files each a one-line parser error."""
    ap = ap or make_parser()
    a = ap.parse_args(argv)
    a.tier = "s3" if a.storage == "s3" else "nvme"
    from policies.registry import PREDICTOR_NAMES
    # a typo is not a policy that does not apply ("unavailable" in the JSON): refuse it
    for flag, names, also in (("--policy", [] if a.policy == "all" else a.policy.split(","), "all or "),
                              ("--scale-policies", a.scale_policies, "")):
        bad = [p for p in names if p not in PREDICTOR_NAMES]
        if bad:
            ap.error(f"{flag} {','.join(names)}: unknown {', '.join(map(repr, bad))}; valid: {also}"
                     f"{', '.join(PREDICTOR_NAMES)}")
    for flag, path in (("--trace", a.trace), ("--fit-trace", a.fit_trace), ("--calib", a.calib)):
        if path is not None:
            check_in_file(ap, path, flag)
    if a.calib:
        try:
            with open(a.calib) as f:
                calib = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"--calib {a.calib}: not a readable JSON file ({one_line(e)})")
        if not isinstance(calib, dict):
            ap.error(f"--calib {a.calib}: expected a JSON object (jobs.benchmark's output or its calibration block)")
        a.calib_data = calib.get("calibration", calib)
    check_out_file(ap, a.json, "--json")
    if a.predictor_dir and a.predictor_from_trace:
        ap.error("--predictor-dir and --predictor-from-trace: give one")
    if a.predictor_dir:
        from policies.learned import has_trained_predictor
        if not has_trained_predictor(a.predictor_dir):
            ap.error(f"--predictor-dir {a.predictor_dir}: no predictor.json + predictor.safetensors there "
                     f"(python -m jobs.train_predictor --out DIR writes them)")
    return a


def main(argv=None) -> int:
    ap = make_parser()
    a = parse(argv, ap)
    try:
        return _main(a, argv, ap)
    except TraceFormatError as e:   # raised while loading, before any simulation; its message starts with the file
        msg = one_line(e)
        flag = next((f for f, p in (("--trace", a.trace), ("--fit-trace", a.fit_trace),
                                    ("--embedded-trace", a.embedded_trace)) if p and msg.startswith(p)), None)
        ap.error(f"{flag}: {msg}" if flag else msg)


def _main(a, argv, ap) -> int:
    from policies import profiles as P
    from policies.simulator import SimConfig
    cmd = "python -m jobs.simulate " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    if a.study == "seed-tables":
        res = study_seed_tables(a)
        plot = plot_seed
    elif a.study == "scale":
        res = study_scale(a)
        plot = plot_scale
    elif a.study == "planner-cost":
        res = study_planner_cost(a)
        plot = plot_planner_cost
    else:
        calib = getattr(a, "calib_data", None)
        hw = P.hardware(a.hardware or "h100-sxm", calib)
        if a.model is None and a.hardware == "local" and calib and "model" in calib:
            model = P.Model(**calib["model"])              # the benchmark's expert size, on this trace's geometry
            if a.trace:
                t = load_trace(a.trace)
                model = replace(model, num_layers=t.num_layers, num_experts=t.num_experts, top_k=t.top_k)
        else:
            model = P.model(a.model or "qwen1.5-moe-a2.7b")
        store = P.storage(a.storage)
        if a.predictor_from_trace and not (a.trace or model.trace):
            ap.error(f"--predictor-from-trace: {model.name} has no trace here to train on (give --trace)")
        tr, info = routing_for(model, trace_path=a.trace, tokens=a.tokens, requests=a.requests, seed=a.seed,
                               fit_trace=a.fit_trace)
        store_dir = a.predictor_dir
        if a.predictor_from_trace:
            from jobs.benchmark import predictor_from_trace
            try:
                store_dir = predictor_from_trace(load_trace(info["path"], model), tr, a.work, a.predictor_horizon,
                                                 say=_say)
            except ValueError as e:
                ap.error(str(e))
            info["predictor"] = store_dir
        pols = all_policies(tr, store_dir) if a.policy == "all" else a.policy.split(",")
        if "on_demand" not in pols:
            pols = ["on_demand"] + pols
        cfg = SimConfig(workers=a.workers, batch=a.batch, cache_fraction=a.cache_fraction,
                        dram_fraction=a.dram_fraction, window=a.window, confirm_prob=a.confirm_prob,
                        planner_engine=a.planner_engine)
        res = {"hardware": P.describe(hw), "model": P.describe(model), "storage": P.describe(store),
               "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "routing": info,
               "policies": run_policies(hw, model, store, cfg, tr, pols, tier=a.tier, store_dir=store_dir)}
        plot = lambda r, png: plot_policies(r["policies"], f"{model.name} on {hw.name} x{a.workers}, batch "  # noqa: E731
                                            f"{a.batch}", png)
    res["command"] = cmd
    res["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1, default=float)
    plot(res, _png(a.json))
    _say(f"wrote {a.json} and {_png(a.json)} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
