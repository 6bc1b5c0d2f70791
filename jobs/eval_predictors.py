"""python -m jobs.eval_predictors --trace PATH [--model-dir DIR] [--store-dir DIR] [--predictors a,b,...]
                                 [--distances 1,2] [--max-tokens N] --json OUT

Next-layer recall@k (k = the trace's top-k) and cost of every predictor of policies/registry.py that applies to a
trace: history-only ones on any trace; next_gate with --model-dir (the checkpoint whose routers made the trace);
learned with --store-dir holding a trained predictor (python -m jobs.train_predictor); pre_gated when the
checkpoint has pre_gate tensors; oracle as the upper bound; ensemble of the practical ones. Each predictor starts
fresh and replays the trace online (policies.replay.recall_at_k: observe every event, predict before each target is
revealed, targets in the source's token). Cost = the replay's wall time / events, i.e. one observe plus (for most
events) one predict, in microseconds, single-threaded: noisy on a shared machine, compare within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jobs._cli import at_least, check_out_file, int_list, load_trace_or_error, one_line

HIDDEN_STATE = ("next_gate", "learned", "pre_gated")   # predictors that read the router inputs (trace.hidden)


def reads_hidden(name: str, store_dir) -> bool:
    """Whether predictor `name` needs the trace's hidden states (a routing-only learned predictor does not)."""
    from policies.learned import is_routing_only
    return name in HIDDEN_STATE and not (name == "learned" and is_routing_only(store_dir))


def unavailable_reason(name: str, *, has_hidden: bool, model_dir, store_dir, dense) -> str:
    """Why predictor `name` cannot run on this trace with these flags (it is not in available_names)."""
    from policies.learned import has_pre_gates, has_trained_predictor
    from policies.registry import split_router_weights
    why = []
    if not has_hidden and reads_hidden(name, store_dir):
        why.append("the trace has no hidden states (collect with python -m jobs.collect_traces --hidden)")
    if name == "next_gate" and model_dir is None:
        why.append("it needs --model-dir (the checkpoint whose routers made the trace)")
    elif name == "next_gate" and not split_router_weights(dense)[0]:
        why.append(f"--model-dir {model_dir} has no router (gate) weights")
    if name == "learned" and store_dir is None:
        why.append("it needs --store-dir holding a trained predictor (python -m jobs.train_predictor --out DIR)")
    elif name == "learned" and not has_trained_predictor(store_dir):
        why.append(f"--store-dir {store_dir} has no predictor.safetensors + predictor.json "
                   f"(python -m jobs.train_predictor --out {store_dir})")
    if name == "pre_gated" and (model_dir is None or not has_pre_gates(dense)):
        why.append("it needs --model-dir with pre_gate weights" if model_dir is None else
                   f"--model-dir {model_dir} has no pre_gate weights")
    return "; ".join(why) or "not available for this trace"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.eval_predictors", description=__doc__.split("\n\n")[1])
    ap.add_argument("--trace", required=True, help=".npz or .jsonl trace")
    ap.add_argument("--model-dir", default=None, help="checkpoint directory (router / pre_gate weights)")
    ap.add_argument("--store-dir", default=None, help="directory with predictor.safetensors + predictor.json")
    ap.add_argument("--predictors", default=None, help="comma-separated names (default: all that apply)")
    ap.add_argument("--distances", type=int_list(1), default=[1, 2], help="layer distances scored (comma list)")
    ap.add_argument("--max-tokens", type=at_least(1), default=None, help="evaluate the first N token rows only")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    # the checks that need no trace or checkpoint first, then the ones that do; all before any replay
    check_out_file(ap, a.json, "--json")
    if a.model_dir and not os.path.isfile(os.path.join(a.model_dir, "config.json")):
        ap.error(f"--model-dir {a.model_dir}: no config.json (expected a checkpoint directory)")
    import numpy as np
    import torch

    from policies.registry import PREDICTOR_NAMES, available_names, make_predictor
    from policies.replay import recall_at_k
    want = a.predictors.split(",") if a.predictors else None
    bad = [n for n in want or [] if n not in PREDICTOR_NAMES]
    if bad:
        print(f"eval_predictors: error: unknown predictors {bad}; valid: {', '.join(PREDICTOR_NAMES)}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    trace = load_trace_or_error(ap, a.trace, "--trace")
    if a.max_tokens:
        trace = trace.head(a.max_tokens)
    dense = None
    if a.model_dir:
        from cluster.model import load_checkpoint
        try:
            dense = {k: v.float().numpy() for k, v in load_checkpoint(a.model_dir)[1].items()}
        except (OSError, ValueError) as e:   # an unreadable config.json or weights, an unsupported model
            ap.error(f"--model-dir {a.model_dir}: {one_line(e)}")
    has_hidden = trace.hidden is not None
    names = available_names(trace=trace, store_dir=a.store_dir, router_weights=dense, practical=False)
    if not has_hidden:
        names = tuple(n for n in names if not reads_hidden(n, a.store_dir))
    names = names + ("ensemble",)
    if want:
        # a predictor asked for by name runs or is an error: a result without it would pass for a complete one
        for n in want:
            if n not in names:
                why = unavailable_reason(n, has_hidden=has_hidden, model_dir=a.model_dir, store_dir=a.store_dir,
                                         dense=dense)
                ap.error(f"--predictors {a.predictors}: {n} cannot run: {why}")
        names = tuple(want)
    geo = dict(num_layers=trace.num_layers, num_experts=trace.num_experts, top_k=trace.top_k)
    dists = list(a.distances)
    events = int(trace.known.sum())
    out = {"trace": a.trace, "tokens": trace.num_tokens, "requests": trace.num_requests, "events": events,
           "k": trace.top_k, "num_layers": trace.num_layers, "num_experts": trace.num_experts,
           "chance": trace.top_k / trace.num_experts, "predictors": {}}
    for name in names:
        kw = {}
        if name == "ensemble" and not has_hidden:
            kw["members"] = [n for n in available_names(trace=trace, store_dir=a.store_dir)
                             if n != "request_level" and not reads_hidden(n, a.store_dir)]
        res = {}
        for d in dists:
            p = make_predictor(name, **geo, trace=trace, store_dir=a.store_dir, router_weights=dense, **kw)
            t0 = time.perf_counter()
            r = recall_at_k(p, trace, d)
            dt = time.perf_counter() - t0
            res[f"recall_at_k_d{d}"] = round(r.overall, 4)
            if d == dists[0]:
                res["us_per_event"] = round(dt / max(events, 1) * 1e6, 1)
                res["recall_by_target_layer"] = [None if np.isnan(x) else round(float(x), 4) for x in r.per_layer]
                res["state_bytes"] = int(p.state_nbytes())
                if name == "ensemble":
                    res["scores"] = p.scores()
        out["predictors"][name] = res
        print(f"{name:22s} " + " ".join(f"{k}={v}" for k, v in res.items()
                                         if k not in ("recall_by_target_layer", "scores")), file=sys.stderr,
              flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "predictors"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
