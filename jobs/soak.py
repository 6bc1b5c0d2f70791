"""python -m jobs.soak [--config ray_config.yaml] [--phase-seconds 10] [--clients 4] [--max-tokens 16] [--json OUT]

A soak run with a fault in the middle: the Serve app (jobs/serve_app.py) on 127.0.0.1 under jobs.load_test's
closed-loop clients for three phases of equal length — before, during, after — and during the middle phase one
ExpertWorker of the replica's cluster is killed (`ray.kill`, no restart). The cluster re-places the dead worker's
experts on the survivors at the next MoE layer that finds it dead and the request in flight goes on; Serve's health
check keeps the replica (some workers live). Reports per phase the requests answered, the errors and p50/p95/p99
latency, and overall the requests lost (every request not answered with a 200: the target is zero), the faults
injected and whether the replica survived them. Exit status 1 when a request was lost or the fault was not seen.

Without --config it converts the embedded model (jobs/embedded_model) into a temporary NVMe store and serves it with
--workers workers whose HBM caches hold a fraction of the experts (misses and evictions throughout). It starts its
own local Ray (address="local") and stops it at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # before Ray is imported: 127.0.0.1 only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(ROOT, "jobs", "embedded_model")
PHASES = ("before", "during", "after")


def make_store(workdir: str, workers: int, hbm: str) -> str:
    """Convert the embedded model into workdir/store; returns the path of a cluster config serving it."""
    from storage_adapters.converter import convert, open_target, plan_conversion
    store = os.path.join(workdir, "store")
    target = open_target(f"file://{store}")

    async def go():
        try:
            await convert(plan_conversion(EMBEDDED), [target], progress=False)
        finally:
            await target.adapter.close()
    asyncio.run(go())
    cfg = os.path.join(workdir, "cluster.yaml")
    with open(cfg, "w") as f:
        f.write(f"ray: {{namespace: soak}}\n"
                f"workers: {{count: {workers}, hbm_budget_bytes: {hbm}}}\n"
                f"tiers:\n  - {{kind: dram, budget_bytes: 64MiB}}\n  - {{kind: nvme, path: {store}}}\n")
    return cfg


def get_json(url: str) -> dict:
    import requests
    return requests.get(url, timeout=30).json()


def kill_worker(url: str, after_s: float, out: dict) -> None:
    """After after_s seconds, kill the replica cluster's lowest-numbered ExpertWorker (found by its name in the
    replica's namespace, as /v1/stats reports it)."""
    import ray
    time.sleep(after_s)
    st = get_json(f"{url}/v1/stats")
    out["workers_before"] = st["workers"]
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == st["namespace"] and a["name"].startswith("expert-worker-"))
    victim = names[0]
    ray.kill(ray.get_actor(victim, namespace=st["namespace"]))
    out.update(killed=victim, killed_at_s=round(time.perf_counter() - out["phase_t0"], 3))


def soak(a) -> dict:
    import ray
    from ray import serve

    from jobs.load_test import run
    from jobs.serve_app import build_app
    from storage_adapters.local_s3 import free_port

    workdir = tempfile.mkdtemp(prefix="soak-")
    try:
        cfg = a.config or make_store(workdir, a.workers, a.hbm_budget)
        ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, namespace="soak-driver",
                 object_store_memory=256 << 20, logging_level="ERROR")
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"config": cfg, "max_batch": a.clients, "max_queue": 4 * a.clients,
                                 "num_cpus": 0, "torch_threads": 1, "health_check_period_s": 2}),
                      name="soak", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            import requests
            r = requests.post(f"{url}/v1/completions", json={"prompt": "def ", "max_tokens": 2}, timeout=120)
            assert r.status_code == 200, f"warm-up request failed: {r.status_code} {r.text}"
            report: dict = {"phase_seconds": a.phase_seconds, "clients": a.clients, "max_tokens": a.max_tokens,
                            "phases": {}}
            fault: dict = {}
            for phase in PHASES:
                killer = None
                if phase == "during":
                    fault["phase_t0"] = time.perf_counter()
                    killer = threading.Thread(target=kill_worker, args=(url, a.phase_seconds / 4, fault))
                    killer.start()
                rep = asyncio.run(run(url, a.clients, a.phase_seconds, a.max_tokens, 10**7, 0.0, a.timeout))
                if killer is not None:
                    killer.join()
                report["phases"][phase] = {k: rep.get(k) for k in (
                    "requests", "errors", "errors_by_kind", "p50_s", "p95_s", "p99_s", "tokens_per_s")}
            st = get_json(f"{url}/v1/stats")
            health = requests.get(f"{url}/health", timeout=30)
            fault.pop("phase_t0", None)
            lost = sum(p["errors"] for p in report["phases"].values())
            report.update(
                requests=sum(p["requests"] for p in report["phases"].values()), lost_requests=lost,
                faults_injected=1 if "killed" in fault else 0, fault=fault,
                workers_after=st["workers"], lost_workers=st["lost_workers"], health_after=health.status_code,
                fault_survived=bool("killed" in fault and st["lost_workers"] and health.status_code == 200
                                    and report["phases"]["after"]["requests"] > 0))
            return report
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.soak", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", default=None, help="cluster config to serve (default: the embedded model)")
    ap.add_argument("--phase-seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--workers", type=int, default=3, help="without --config: expert workers")
    ap.add_argument("--hbm-budget", default="1MiB", help="without --config: HBM budget per worker")
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray")
    ap.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    for name, v, lo, hi in (("--phase-seconds", a.phase_seconds, 1, 3600), ("--clients", a.clients, 1, 256),
                            ("--max-tokens", a.max_tokens, 1, 4096), ("--workers", a.workers, 2, 64)):
        if not lo <= v <= hi:
            print(f"soak: error: {name} {v} must lie in [{lo}, {hi}] (--workers >= 2: one is killed)",
                  file=sys.stderr)
            return 2
    if a.config and not os.path.exists(a.config):
        print(f"soak: error: --config {a.config!r} does not exist", file=sys.stderr)
        return 2
    rep = soak(a)
    for phase in PHASES:
        p = rep["phases"][phase]
        lat = (f"p50 {p['p50_s'] * 1e3:.0f} ms, p95 {p['p95_s'] * 1e3:.0f} ms, p99 {p['p99_s'] * 1e3:.0f} ms"
               if p["requests"] else "no successful request")
        print(f"{phase:>6}: {p['requests']} answered, {p['errors']} errors; {lat}")
    print(f"faults injected {rep['faults_injected']} ({rep['fault'].get('killed')}), survived: "
          f"{rep['fault_survived']}; requests lost {rep['lost_requests']} of {rep['requests'] + rep['lost_requests']}",
          flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0 if rep["lost_requests"] == 0 and rep["fault_survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
