"""What one expert load costs the CPU, by process: `python -m jobs.bench_load_cpu --json OUT`.

On a machine whose cores also run the decode loop (this 2-core one), a prefetch that saves a stall still spends
CPU: the worker's Ray call to its node's StorageActor, the actor's read and reply, the worker's copy into its cache.
This measures that cost against the floor of the same machine, in one command, on the store of a real checkpoint
(default: the embedded model) behind an emulated link with no latency (so wall times are the software path):

  ping          a no-op call to the StorageActor from this driver: Ray's floor per call
  get_tiered    the StorageActor call a worker makes per load (read + verify + reply of one expert blob)
  worker_loads  every expert prefetched into empty worker caches (the path a fast-path or coordinator order takes);
                the driver's polls for completion are repeated with nothing loading and their CPU subtracted
                (so the driver's share, ~0, may come out slightly negative)

Per case: wall ms per call or load and CPU ms per call or load, for the driver, the StorageActor and the workers
(utime + stime from /proc, so every thread of the process, Ray's own included). Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_S = 0.01   # how often the driver asks whether a round's loads have landed


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def measure(pids: dict[str, list[int]], n: int, fn) -> dict:
    """Run fn(); wall and CPU per unit (n units) for each named group of processes."""
    before = {k: sum(cpu_s(p) for p in ps) for k, ps in pids.items()}
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    out = {"wall_ms": 1e3 * wall / n}
    for k, ps in pids.items():
        out[f"{k}_cpu_ms"] = 1e3 * (sum(cpu_s(p) for p in ps) - before[k]) / n
    out["total_cpu_ms"] = sum(v for k, v in out.items() if k.endswith("_cpu_ms"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_load_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=os.path.join(HERE, "jobs", "embedded_model"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "moe-benchmark"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--calls", type=int, default=400, help="calls per driver-side case")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of loading every expert into empty caches")
    ap.add_argument("--link-latency-ms", type=float, default=0.0, help="the emulated link's latency per read")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only
    import ray

    from actors.expert_worker import INLINE_BLOB_BYTES
    from cluster.expert_cluster import ExpertCluster
    from jobs.benchmark import cluster_config, model_store
    from storage_adapters.manifest import Manifest
    store, _, _ = model_store(a.work, a.model_dir)
    path = os.path.join(store, "manifest.json")
    with open(path) as f:
        man = Manifest.from_json(f.read(), path)
    sizes = [b.size for b in man.blobs]
    keys = sorted((b.layer, b.expert) for b in man.blobs)
    link = {"latency_s": a.link_latency_ms / 1e3, "bandwidth_Bps": 1e12, "channels": 8}
    # every expert fits: a round loads each once and evicts nothing
    cfg = cluster_config(store, workers=a.workers, hbm=2 * sum(sizes), dram=0, policy="on_demand", window=4,
                         ns=f"bench-load-cpu-{os.getpid()}", address=None, inflight=1 << 40, link=link,
                         worker_opts={"prefetch_concurrency": 2})
    res: dict = {"command": " ".join([sys.executable, "-m", "jobs.bench_load_cpu"] + (argv or sys.argv[1:])),
                 "cpus": os.cpu_count(), "expert_bytes": int(np.median(sizes)), "experts": len(keys),
                 "link_latency_ms": a.link_latency_ms}
    with ExpertCluster(cfg) as c:
        storage = next(iter(c.storage.values()))[0]
        getpid = lambda h: ray.get(h.__ray_call__.remote(lambda self: os.getpid()))   # noqa: E731
        pids = {"driver": [os.getpid()], "storage": [getpid(storage)],
                "workers": [getpid(h) for h in c.workers.values()]}
        ray.get(storage.ping.remote())
        res["ping"] = measure(pids, a.calls, lambda: [ray.get(storage.ping.remote()) for _ in range(a.calls)])
        ray.get(storage.get_tiered.remote(*keys[0], None, True, INLINE_BLOB_BYTES))
        res["get_tiered"] = measure(pids, a.calls, lambda: [
            ray.get(storage.get_tiered.remote(*keys[i % len(keys)], None, True, INLINE_BLOB_BYTES))
            for i in range(a.calls)])
        owner = {k: int(c.experts._owner_np[k[0]][k[1]]) for k in keys}

        def resident() -> int:
            return sum(len(r) for r in ray.get([h.resident.remote() for h in c.workers.values()]))

        def one_round():
            for w, h in c.workers.items():
                h.prefetch.remote([(l, e, 1.0, None) for (l, e) in keys if owner[(l, e)] == w])
            polls, deadline = 0, time.time() + 60
            while resident() < len(keys):
                if time.time() > deadline:   # a prefetch dropped (a read failed): it would never land
                    raise RuntimeError(f"{len(keys) - resident()} of {len(keys)} prefetched experts never "
                                       "became resident within 60 s (see the workers' prefetch_dropped)")
                time.sleep(POLL_S)
                polls += 1
            last["polls"] = polls

        def polls_only():   # the same number of polls with nothing loading: their cost, subtracted below
            for _ in range(last["polls"] + 1):
                resident()
                time.sleep(POLL_S)

        runs, last = [], {}
        for _ in range(a.rounds):
            ray.get([h.drop.remote(keys) for h in c.workers.values()])
            r = measure(pids, len(keys), one_round)
            idle = measure(pids, len(keys), polls_only)
            runs.append({k: (v if k == "wall_ms" else v - idle[k]) for k, v in r.items()})
        res["worker_loads"] = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        res["worker_loads"]["rounds"] = runs
    for case in ("ping", "get_tiered", "worker_loads"):
        r = res[case]
        print(f"{case:13s} wall {r['wall_ms']:6.2f} ms  CPU ms: total {r['total_cpu_ms']:5.2f} = driver "
              f"{r['driver_cpu_ms']:.2f} + storage {r['storage_cpu_ms']:.2f} + workers {r['workers_cpu_ms']:.2f}")
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
