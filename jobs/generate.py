"""python -m jobs.generate --store URI (--prompt TEXT | --prompt-ids 1,2,3) --max-tokens N [--greedy] [--json OUT]

One generation on a local expert cluster: storage actors over the given store (file:///path or s3://bucket/prefix
with --endpoint-url), ExpertWorkers with HBM caches, the model runtime. Writes
{"token_ids": [generated ids only], "text": ...} (text when the store carries a tokenizer.json) and cache stats.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_config(args):
    from cluster.config import ConfigError, load_config
    base = load_config(args.config)
    tiers = [t.model_dump() for t in base.tiers if t.kind == "dram"]
    if args.store.startswith("file://"):
        tiers.append({"kind": "nvme", "name": "nvme", "path": args.store[len("file://"):]})
    elif args.store.startswith("s3://"):
        tiers.append({"kind": "s3", "name": "s3", "uri": args.store, "endpoint_url": args.endpoint_url})
    else:
        raise ConfigError(f"--store {args.store!r}: expected file:///path or s3://bucket/prefix")
    workers = base.workers.model_dump()
    if args.workers:
        workers["count"] = args.workers
    if args.hbm_budget:
        workers["hbm_budget_bytes"] = args.hbm_budget
    return base.model_validate({**base.model_dump(), "tiers": tiers, "tier_sets": {},
                                "active_tier_set": "default", "workers": workers})


def check_store(cfg) -> None:
    """Read the store's manifest here, before Ray starts: a store without one (or unreadable) is then a one-line
    error (ManifestError, StoreError naming each tier tried) instead of a storage actor's remote traceback."""
    import asyncio

    from storage_adapters.store import load_manifest
    from storage_adapters.tiers import adapter_for

    async def read():
        adapters = [adapter_for(t) for t in cfg.storage_tiers]
        try:
            await load_manifest(adapters)
        finally:
            for ad in adapters:
                await ad.close()
    asyncio.run(read())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.split("\n\n")[1])
    ap.add_argument("--store", required=True)
    ap.add_argument("--endpoint-url", default=None)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-ids")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--hbm-budget", default=None, help="per worker, e.g. 8MiB (default: ray_config.yaml)")
    ap.add_argument("--config", default="ray_config.yaml")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import ray
    from tokenizers import Tokenizer

    from cluster.config import ConfigError
    from cluster.expert_cluster import ExpertCluster
    prompt_ids = None
    if args.prompt_ids is not None:  # checked before anything starts
        try:
            prompt_ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            print(f"generate: error: --prompt-ids {args.prompt_ids!r}: expected integers like 1,2,3", file=sys.stderr)
            return 2
    from storage_adapters.errors import StoreError
    try:
        cfg = build_config(args)
        check_store(cfg)
    except (ConfigError, StoreError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    with ExpertCluster(cfg) as c:
        storage = next(iter(c.storage.values()))[0]
        tok_json = ray.get(storage.aux.remote("tokenizer.json"))
        tok = Tokenizer.from_str(tok_json.decode()) if tok_json else None
        if args.prompt is not None:
            if tok is None:
                print("generate: error: the store has no tokenizer.json; pass --prompt-ids", file=sys.stderr)
                return 2
            ids = tok.encode(args.prompt).ids
        else:
            ids = prompt_ids
        t0 = time.perf_counter()
        try:
            [out] = c.generate([ids], args.max_tokens, temperature=0.0 if args.greedy else args.temperature,
                               top_p=args.top_p, seeds=args.seed)
        except ValueError as e:
            print(f"generate: error: {e}", file=sys.stderr)
            return 2
        dt = time.perf_counter() - t0
        st = c.stats()
    result = {"token_ids": out, "text": tok.decode(out) if tok else None, "prompt_ids": ids,
              "seconds": round(dt, 3), "tokens_per_s": round(len(out) / dt, 2), "hits": st["hits"],
              "misses": st["misses"], "bytes_by_tier": st["bytes_by_tier"]}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
