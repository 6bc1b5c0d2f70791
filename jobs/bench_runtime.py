"""python -m jobs.bench_runtime [--checkpoint DIR] [--batch B] [--steps S] --json OUT

The cost of distribution, measured against the same model run in one process with every expert resident:
  dispatch_ms_{plain,compiled}   per MoE layer on the decode path: the cluster's moe() (grouping, worker calls,
                                 combine) minus the in-process moe() on the very same routing event (so expert
                                 compute is excluded); experts are resident (loads excluded). Median and p99
                                 over --passes passes of the recorded decode routing events.
  floor_ms                       Ray's floor for the same mode, timed right after each dispatch (same load): a
                                 no-op call to every worker at once / a pass of the compiled graph with no work.
  tokens_per_s                   greedy decode of B prompts: in-process vs the cluster with plain calls and with
                                 the Compiled Graph (tokens asserted identical).
Each mode runs with the default placement (each layer's experts spread over the workers: one call per worker per
layer) and with `+by_layer` (whole layers per worker: one call per layer).
Defaults: the embedded model (jobs/embedded_model), 2 workers on this node.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import numpy as np


def _say(msg):
    print(f"[bench_runtime] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="HF checkpoint dir (default: the embedded model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3, help="passes over the recorded decode routing events")
    ap.add_argument("--json", required=True)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the dispatch loop to stderr")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only

    import ray
    import torch

    from cluster.config import ClusterConfig
    from cluster.expert_cluster import ExpertCluster
    from cluster.model import LocalExperts, MoEModel, generate, load_dense_from_bytes
    from storage_adapters.converter import convert, open_target, plan_conversion
    from storage_adapters.nvme import NvmeAdapter
    from storage_adapters.store import ExpertStore

    torch.set_num_threads(1)
    ckpt = a.checkpoint or os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_model")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        from jobs.make_checkpoint import PRESETS, write_checkpoint
        ckpt = write_checkpoint(tempfile.mkdtemp(prefix="bench-runtime-ckpt-"), PRESETS["demo"])
    work = tempfile.mkdtemp(prefix="bench-runtime-")
    store = os.path.join(work, "store")
    man = asyncio.run(convert(plan_conversion(ckpt), [open_target("file://" + store)], progress=False)).manifest

    async def read_all():
        s = await ExpertStore.open([NvmeAdapter(store)])
        blobs = {(b.layer, b.expert): (await s.read_blob(b.layer, b.expert))[0] for b in man.blobs}
        dense = (await s.read_dense())[0]
        await s.close()
        return blobs, dense
    blobs, dense_raw = asyncio.run(read_all())
    dense = load_dense_from_bytes(dense_raw)
    local = LocalExperts.from_blobs(man, blobs, dtype=torch.float32)
    events = []

    def record(layer, ids, w, x):
        events.append((layer, x.clone(), ids.clone(), w.clone()))
    ref_model = MoEModel.from_dense(man.model.config, dense, local, dtype=torch.float32)
    V = ref_model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, min(V, 256), (n,), generator=g).tolist() for n in (12, 7, 20, 15)[:a.batch]]
    while len(prompts) < a.batch:
        prompts.append(prompts[-1][:-1] or [3])
    t0 = time.perf_counter()
    ref = generate(ref_model, prompts, a.steps, eos_token_id=None)
    t_local = time.perf_counter() - t0
    ref_model.on_route = record
    generate(ref_model, prompts, a.steps, eos_token_id=None)
    decode_events = [e for e in events if e[1].shape[0] <= a.batch]  # one token per request: the decode path
    out = {"model": {"family": man.model.family, "moe_layers": len(man.model.moe_layers),
                     "experts": man.model.num_experts, "expert_bytes": man.expert_bytes},
           "batch": a.batch, "steps": a.steps, "workers": a.workers,
           "in_process_tokens_per_s": a.batch * a.steps / t_local, "modes": {},
           "command": "python -m jobs.bench_runtime " + " ".join(argv or sys.argv[1:])}

    def local_time(ev, reps=3):
        layer, x, ids, w = ev
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            local.moe(layer, x, ids, w)
            ts.append(time.perf_counter() - t)
        return min(ts)
    local_ms = [local_time(e) * 1e3 for e in decode_events]

    for mode in ("plain", "compiled", "plain+by_layer", "compiled+by_layer"):
        dispatch, _, placement = mode.partition("+")
        cfg = ClusterConfig.model_validate({
            "ray": {"namespace": f"bench-runtime-{dispatch}", "num_cpus": 4, "object_store_memory": 512 << 20},
            "workers": {"count": a.workers, "hbm_budget_bytes": len(man.blobs) * man.expert_bytes,
                        "dispatch": dispatch, "placement": placement or "balanced"},
            "tiers": [{"kind": "dram", "budget_bytes": 256 << 20}, {"kind": "nvme", "path": store}]})
        with ExpertCluster(cfg) as c:
            got = c.generate(prompts, a.steps, eos_token_id=None)  # warm: every expert resident afterwards
            assert got == ref, f"{mode}: cluster tokens differ from the in-process run"
            t0 = time.perf_counter()
            got = c.generate(prompts, a.steps, eos_token_id=None)
            tps = a.batch * a.steps / (time.perf_counter() - t0)
            assert got == ref
            handles = list(c.workers.values())
            graph = c.experts._graph   # compiled mode: built during the warm-up generate

            called = handles if placement != "by_layer" else handles[:1]   # by_layer: one worker per layer

            def noop():  # Ray's floor for this mode, no payload: a no-op call to each worker a layer calls / a graph pass
                if graph is not None:
                    ray.get(graph.execute(*[None] * len(handles)))   # compute_resident(None) returns at once
                else:
                    ray.get([h.ping.remote() for h in called])
            over, floor = [], []
            for _ in range(a.passes):  # the floor interleaved with the dispatches: both see the same load
                for ev, lm in zip(decode_events, local_ms):
                    layer, x, ids, w = ev
                    t = time.perf_counter()
                    c.experts.moe(layer, x, ids, w)
                    over.append((time.perf_counter() - t) * 1e3 - lm)
                    t = time.perf_counter()
                    noop()
                    floor.append((time.perf_counter() - t) * 1e3)
            if a.profile:  # where the driver's time goes (the workers' side shows up as time in ray.get)
                import cProfile
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(5):
                    for layer, x, ids, w in decode_events:
                        c.experts.moe(layer, x, ids, w)
                prof.disable()
                _say(f"{mode}: cProfile of {5 * len(decode_events)} moe() calls")
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            st = c.stats()
            if mode == "plain":
                out["noop_calls_to_all_workers_ms_median"] = float(np.median(floor))
        out["modes"][mode] = {"dispatch_ms_median": float(np.median(over)), "dispatch_ms_p99": float(np.percentile(over, 99)),
                              "floor_ms_median": float(np.median(floor)),
                              "above_floor_ms_median": float(np.median(over) - np.median(floor)),
                              "tokens_per_s": tps, "calls": st["dispatch"]["calls"],
                              "plain_calls": st["dispatch"]["plain_calls"], "misses": st["misses"]}
        _say(f"{mode}: dispatch {np.median(over):.3f} ms median / {np.percentile(over, 99):.3f} p99 per MoE layer, "
             f"{tps:.1f} tokens/s")
        ray.shutdown()
    out["local_moe_ms_median"] = float(np.median(local_ms))
    print(f"bench_runtime: {man.model.family}, {len(man.model.moe_layers)} MoE layers x {man.model.num_experts} "
          f"experts, batch {a.batch}, {a.steps} decode steps, {a.workers} workers")
    print(f"  in-process (every expert resident): {out['in_process_tokens_per_s']:.1f} tokens/s; "
          f"in-process moe() {out['local_moe_ms_median']:.3f} ms")
    print(f"  Ray floor: one no-op call to each of the {a.workers} workers at once "
          f"{out['noop_calls_to_all_workers_ms_median']:.3f} ms median")
    for mode, r in out["modes"].items():
        target = 1.5 if mode.startswith("plain") else 0.3
        print(f"  {mode:17s} dispatch {r['dispatch_ms_median']:.3f} ms median (p99 {r['dispatch_ms_p99']:.3f}) per MoE "
              f"layer [target <= {target}: {'yes' if r['dispatch_ms_median'] <= target else 'NO'}; "
              f"floor {r['floor_ms_median']:.3f}], "
              f"{r['tokens_per_s']:.1f} tokens/s ({r['tokens_per_s'] / out['in_process_tokens_per_s']:.2f}x "
              f"in-process)")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
