"""python -m jobs.demo [--config ray_config.yaml] [--checkpoint DIR]

The main job on the embedded default — no download, no credentials, nothing beyond 127.0.0.1:
  1. convert the embedded model (jobs/embedded_model, trained by jobs.train_tiny_moe) into the expert store on
     the NVMe tier and on a local S3-compatible server started here, and again to show a re-run skips everything;
  2. start a local Ray cluster from ray_config.yaml: storage actors, ExpertWorkers whose HBM caches together
     hold at most half of the experts, the model runtime;
  3. read every expert back through the storage actors, verified against the checkpoint byte for byte;
  4. generate text for a handful of prompts and print tokens/s, cache hits and misses, bytes read per tier and
     peak memory of the runtime and of each worker.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from types import SimpleNamespace

import numpy as np

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_model")
PROMPTS = ["def ", "import os\n", "class ", "    for i in range("]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", default="ray_config.yaml")
    ap.add_argument("--checkpoint", default=EMBEDDED)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--cache-fraction", type=float, default=0.5, help="of all experts, over all workers' caches")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: 127.0.0.1 only
    from cluster.config import EMBEDDED as EMBEDDED_S3, ConfigError, load_config
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    _say(f"config {args.config}: tiers {[t.name for t in cfg.tiers]}, TierSet {cfg.active_tier_set}="
         f"{cfg.active_tiers}, {cfg.workers.count} workers")

    from jobs.convert import run as convert_run
    from storage_adapters.local_s3 import MotoServer, make_bucket
    from storage_adapters.s3 import parse_s3_uri
    from storage_adapters.safetensors_io import read_header, read_tensor_bytes

    ckpt = os.path.abspath(args.checkpoint)
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    _say(f"model {ckpt}: {size / 2**20:.1f} MiB of safetensors")

    servers, overrides = [], {}
    try:
        for t in cfg.storage_tiers:
            if t.kind == "s3" and t.endpoint_url == EMBEDDED_S3:
                m = MotoServer().start()
                servers.append(m)
                make_bucket(m.endpoint_url, parse_s3_uri(t.uri)[0])
                overrides[t.name] = m.endpoint_url
                _say(f"tier {t.name}: embedded S3 server on {m.endpoint_url} (pid {m.pid})")
        if overrides:
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # the embedded server takes any credentials
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        stores = [("file://" + t.path) if t.kind == "nvme" else t.uri for t in cfg.storage_tiers]
        endpoint = next(iter(overrides.values()), None) or next(
            (t.endpoint_url for t in cfg.storage_tiers if t.kind == "s3"), None)
        for attempt in ("convert", "re-run (idempotent)"):
            rep = asyncio.run(convert_run(SimpleNamespace(checkpoint=ckpt, store=stores, endpoint_url=endpoint,
                                                          checksum="xxh64", encrypt_key_file=None, max_inflight=4,
                                                          quiet=True)))
            _say(f"{attempt}: {rep['blobs']} expert blobs of {rep['expert_blob_bytes'] / 2**20:.2f} MiB + dense "
                 f"{rep['dense_bytes'] / 2**20:.2f} MiB into {list(rep['locations'].values())}; written "
                 f"{rep['written']}, skipped {rep['skipped']}, peak extra memory "
                 f"{rep['peak_anon_bytes'] / 2**20:.1f} MiB, {rep['seconds']:.2f} s")

        import ray

        from cluster.expert_cluster import ExpertCluster

        n_blobs, blob = rep["blobs"], rep["expert_blob_bytes"]
        per_worker = max(blob, int(args.cache_fraction * n_blobs * blob / cfg.workers.count) // blob * blob)
        cfg = cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"hbm_budget_bytes": per_worker})})
        cached = per_worker // blob * cfg.workers.count
        _say(f"cluster: {cfg.workers.count} workers x {per_worker / 2**20:.2f} MiB HBM cache = {cached} of "
             f"{n_blobs} experts at most")
        with ExpertCluster(cfg, endpoint_overrides=overrides) as c:
            storage = next(iter(c.storage.values()))[0]
            # every expert back through the storage actor, against the checkpoint's own bytes
            header = {}
            for f in os.listdir(ckpt):
                if f.endswith(".safetensors"):
                    header.update(read_header(os.path.join(ckpt, f)))
            items = [(b.layer, b.expert) for b in c.manifest.blobs]
            t0 = time.perf_counter()
            arrays = ray.get(ray.get(storage.get_many.remote(items)))
            bad = sum(not np.array_equal(a[te.offset:te.offset + te.length], read_tensor_bytes(header[te.source]))
                      for b, a in zip(c.manifest.blobs, arrays) for te in b.tensors.values())
            _say(f"storage read-back: {3 * len(items) - bad}/{3 * len(items)} expert tensors bit-exact vs the "
                 f"checkpoint ({(time.perf_counter() - t0) * 1e3:.0f} ms)")
            if bad:
                _say("ERROR: bytes differ from the checkpoint")
                return 1
            del arrays
            tok_json = ray.get(storage.aux.remote("tokenizer.json"))
            encode, decode = _codec(tok_json)
            prompts = [encode(p) for p in PROMPTS]
            t0 = time.perf_counter()
            outs = c.generate(prompts, args.max_tokens)
            dt = time.perf_counter() - t0
            n_tok = sum(len(o) for o in outs)
            for p, o in zip(PROMPTS, outs):
                _say(f"{p!r} -> {decode(o)!r}")
            st = c.stats()
            _say(f"generated {n_tok} tokens for {len(prompts)} prompts in {dt:.2f} s: {n_tok / dt:.1f} tokens/s")
            _say(f"expert cache: {st['hits']} hits, {st['misses']} misses "
                 f"({st['hits'] / max(1, st['hits'] + st['misses']):.0%} hit rate); bytes read per tier "
                 f"{st['bytes_by_tier']}; dispatch {st['dispatch']['calls']} worker calls over "
                 f"{st['dispatch']['moe_layers']} MoE layers")
            for w in st["workers"]:
                _say(f"worker {w['worker_id']}: {w['resident']} experts, {w['used_bytes'] / 2**20:.2f}/"
                     f"{w['budget_bytes'] / 2**20:.2f} MiB (peak {w['peak_used_bytes'] / 2**20:.2f}), "
                     f"{w['loads']} loads, {w['evictions']} evictions, peak RSS {w['peak_rss_bytes'] / 2**20:.0f} MiB")
            _say(f"runtime (this process) peak RSS "
                 f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        _say("done")
        return 0
    finally:
        for m in servers:
            m.stop()
            _say(f"stopped embedded S3 server (pid {m.pid})")


def _codec(tok_json: bytes | None):
    """(encode, decode) through the store's tokenizer; without one, prompts are bytes and outputs ids."""
    if tok_json:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(tok_json.decode())
        return (lambda s: tok.encode(s).ids), (lambda ids: tok.decode(ids))
    return (lambda s: list(s.encode())), (lambda ids: " ".join(map(str, ids)))


if __name__ == "__main__":
    sys.exit(main())
