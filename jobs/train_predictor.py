"""python -m jobs.train_predictor --traces T.npz [T2.npz ...] --out STORE_DIR [--horizon D] [--rank R]
                                 [--hidden-units U] [--epochs N] [--batch B] [--lr LR] [--val-fraction F] [--seed S]
                                 [--routing-only] [--skip-requests N] [--layers N]

Train the learned (PreScope-style) expert predictor of policies/learned.py offline from traces with hidden states
(`python -m jobs.collect_traces --hidden --split train`), and write predictor.safetensors + predictor.json into
STORE_DIR (beside the expert store; `make_predictor("learned", store_dir=...)` loads them). The model's weights are
not touched. Training uses torch (CUDA when present, else CPU): a whitened PCA of the router inputs, then per
(source layer, distance) one-hidden-layer MLPs trained jointly with Adam on binary cross-entropy against the
multi-hot truth. A fraction of the requests is held out; the JSON line printed at the end (and the meta file)
reports their next-layer recall@k, measured by policies.replay.recall_at_k through the predictor itself.
--routing-only trains the same MLPs on routing alone (any trace format, no hidden state; policies/learned.py): for
models traced without hidden states, such as ../shared/traces. --skip-requests N leaves out the first N requests of
each trace (the ones `jobs.benchmark --requests N` replays), --layers N keeps the first N MoE layers.

python -m jobs.train_predictor --routing-prior --traces T [T2 ...] --out STORE_DIR [--layers N]
instead counts the traces' token-to-token routing transitions (any trace format, routing only) into
STORE_DIR/routing_prior.npz: the warm start of the runtime's long-memory reuse values (prefetch.reuse_memory;
policies/reuse.py MixedReuse), written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from jobs._cli import at_least


def _concat(traces, routing_only: bool = False):
    """One trace of all `traces` (one geometry). routing_only: their hidden states are dropped (none needed)."""
    from policies.traces import RoutingTrace
    for t in traces:
        if t.hidden is None and not routing_only:
            raise ValueError(f"{t.origin}: no hidden states (collect with python -m jobs.collect_traces --hidden, or "
                             f"train a routing-only predictor: --routing-only)")
    t0 = traces[0]

    def H(t):
        return 0 if routing_only else t.hidden.shape[-1]
    geo = (t0.num_layers, t0.num_experts, t0.top_k, H(t0))
    for t in traces:
        g = (t.num_layers, t.num_experts, t.top_k, H(t))
        if g != geo:
            raise ValueError(f"{t.origin}: geometry L, E, K, H = {g} differs from {t0.origin}'s {geo}")
    offs = [np.asarray(t.offsets[1:]) + s for t, s in zip(traces, np.cumsum([0] + [t.num_tokens for t in traces]))]
    return RoutingTrace(np.concatenate([t.experts for t in traces]), np.concatenate([t.weights for t in traces]),
                        np.r_[0, np.concatenate(offs)], *geo[:3], t0.model, t0.phase,
                        None if routing_only else np.concatenate([t.hidden for t in traces]), {},
                        "+".join(t.origin for t in traces))


def split_requests(trace, val_fraction: float, seed: int):
    """(train, val) traces: a random `val_fraction` of the requests held out (at least one when possible)."""
    from policies.traces import RoutingTrace
    R = trace.num_requests
    n_val = min(R - 1, max(1, int(round(val_fraction * R)))) if val_fraction > 0 and R > 1 else 0
    val = np.zeros(R, bool)
    val[np.random.default_rng(seed).choice(R, n_val, replace=False)] = True

    def pick(mask):
        rows = np.concatenate([np.arange(trace.offsets[r], trace.offsets[r + 1]) for r in np.flatnonzero(mask)])
        lens = np.diff(trace.offsets)[mask]
        return RoutingTrace(trace.experts[rows], trace.weights[rows], np.r_[0, np.cumsum(lens)], trace.num_layers,
                            trace.num_experts, trace.top_k, trace.model, trace.phase,
                            None if trace.hidden is None else trace.hidden[rows], {},
                            trace.origin)
    return pick(~val), (pick(val) if n_val else None)


def cut(trace, skip_requests: int = 0, layers: int | None = None):
    """The trace without its first `skip_requests` requests, cut to its first `layers` MoE layers (None: all)."""
    from policies.traces import RoutingTrace
    R, L = trace.num_requests, trace.num_layers
    if skip_requests >= R:
        raise ValueError(f"{trace.origin}: --skip-requests {skip_requests} leaves none of its {R} requests")
    if layers is not None and not 0 < layers <= L:
        raise ValueError(f"{trace.origin}: --layers {layers}: the trace has {L} MoE layers")
    if not skip_requests and layers in (None, L):
        return trace
    Lc = layers or L
    a = int(trace.offsets[skip_requests])
    return RoutingTrace(trace.experts[a:, :Lc], trace.weights[a:, :Lc], trace.offsets[skip_requests:] - a, Lc,
                        trace.num_experts, trace.top_k, trace.model, trace.phase,
                        None if trace.hidden is None else trace.hidden[a:, :Lc], dict(trace.meta),
                        f"{trace.origin}[requests {skip_requests}.., {Lc} layers]")


def train(trace, *, horizon: int = 2, rank: int = 128, hidden_units: int = 512, epochs: int = 6,
          batch: int = 1024, lr: float = 3e-3, seed: int = 0, device: str | None = None, log=None,
          routing_only: bool = False) -> dict:
    """-> the weights dict of policies.learned.LearnedPredictor (numpy float32). routing_only: no hidden state read
    (R = H = 0; the trace needs none)."""
    import torch

    from policies.learned import examples, fit_projection, routing_only_projection
    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    L, E = trace.num_layers, trace.num_experts
    D = min(horizon, L)
    mean, proj = routing_only_projection() if routing_only else fit_projection(trace.hidden[trace.known], rank,
                                                                               seed=seed)
    ex = examples(trace, mean, proj, D)
    R = proj.shape[1]
    F, U = 2 * R + 2 * E, hidden_units
    # one zero row appended at index T: hist/target -1 point there (features zero, masked out of the loss)
    z = torch.from_numpy(np.concatenate([ex.z, np.zeros((1, L, R), np.float32)])).to(dev, torch.float16)
    mh = torch.from_numpy(np.concatenate([ex.multi, np.zeros((1, L, E), np.float32)])).to(dev, torch.float16)
    T = ex.z.shape[0]
    hist = torch.from_numpy(np.where(ex.hist < 0, T, ex.hist)).to(dev)       # [T, L, D]
    tgt = torch.from_numpy(np.where(ex.target < 0, T, ex.target)).to(dev)
    valid = torch.from_numpy(ex.target >= 0).to(dev)
    rows = torch.from_numpy(np.flatnonzero((ex.target >= 0).any((1, 2)))).to(dev)
    m_of = torch.tensor([[(l + d) % L for d in range(1, D + 1)] for l in range(L)], device=dev)   # [L, D]

    def batch_of(b):  # b [B] rows -> features [B, L, D, F] f32, targets [B, L, D, E], mask [B, L, D]
        B = len(b)
        h = hist[b]                                                           # [B, L, D]
        zl = z[b].float()[:, :, None, :].expand(B, L, D, R)
        ml = mh[b].float()[:, :, None, :].expand(B, L, D, E)
        mm = mh[h, m_of[None].expand(B, L, D)].float()                        # [B, L, D, E]
        zm = z[h, m_of[None].expand(B, L, D)].float()
        y = mh[tgt[b], m_of[None].expand(B, L, D)].float()
        return torch.cat([zl, ml, mm, zm], -1), y, valid[b]

    g = torch.Generator(device="cpu").manual_seed(seed)
    w1 = (torch.randn(L, D, F, U, generator=g) * (2.0 / F) ** 0.5).to(dev).requires_grad_()
    b1 = torch.zeros(L, D, U, device=dev, requires_grad=True)
    w2 = (torch.randn(L, D, U, E, generator=g) * (1.0 / U) ** 0.5).to(dev).requires_grad_()
    b2 = torch.full((L, D, E), float(np.log(trace.top_k / (E - trace.top_k))), device=dev, requires_grad=True)
    params = [w1, b1, w2, b2]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * max(1, -(-len(rows) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for ep in range(epochs):
        perm = rows[torch.randperm(len(rows), generator=g).to(dev)]
        tot = n = 0.0
        for i in range(0, len(perm), batch):
            f, y, mask = batch_of(perm[i:i + batch])
            a = torch.relu(torch.einsum("bldf,ldfu->bldu", f, w1) + b1)
            logit = torch.einsum("bldu,ldue->blde", a, w2) + b2
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none").sum(-1)
            loss = (loss * mask).sum() / mask.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(f)
            n += len(f)
        if log:
            log(f"epoch {ep + 1}/{epochs}: loss {tot / max(n, 1):.4f} ({time.time() - t0:.0f} s)")
    out = dict(mean=mean, proj=proj)
    out.update({k: p.detach().float().cpu().numpy() for k, p in zip(("w1", "b1", "w2", "b2"), params)})
    return out


def routing_prior(traces, layers: int | None = None) -> tuple[dict, dict]:
    """(transition counts float64 [L, E, E], meta) of routing traces of one geometry (their first `layers` MoE
    layers), for policies/reuse.py save_routing_prior."""
    from policies.reuse import transition_counts
    t0 = traces[0]
    geo = (t0.num_layers, t0.num_experts, t0.top_k)
    for t in traces:
        if (t.num_layers, t.num_experts, t.top_k) != geo:
            raise ValueError(f"{t.origin}: geometry L, E, K = {(t.num_layers, t.num_experts, t.top_k)} differs "
                             f"from {t0.origin}'s {geo}")
    if layers is not None and not 0 < layers <= geo[0]:
        raise ValueError(f"--layers {layers}: the traces have {geo[0]} MoE layers")
    L = layers or geo[0]
    counts = sum(transition_counts(t.experts[:, :L], t.offsets, t.num_experts) for t in traces)
    meta = {"top_k": geo[2], "rows": sum(t.num_tokens for t in traces),
            "requests": sum(t.num_requests for t in traces), "source": "+".join(t.origin for t in traces)}
    return counts, meta


def routing_prior_main(a) -> int:
    import os
    from policies.reuse import PRIOR_FILE, save_routing_prior
    from policies.traces import load
    try:
        counts, meta = routing_prior([cut(load(p), a.skip_requests) for p in a.traces], a.layers)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_predictor: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, PRIOR_FILE)
    save_routing_prior(path, counts, **meta)
    print(json.dumps({"out": path, "layers": counts.shape[0], "experts": counts.shape[1],
                      "same_layer_pairs": int(counts.sum()), **meta}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.train_predictor", description=__doc__.split("\n\n")[1])
    ap.add_argument("--traces", nargs="+", required=True,
                    help="npz traces with hidden states (--routing-only, --routing-prior: any trace format "
                         "policies/traces.py reads)")
    ap.add_argument("--out", required=True, help="store directory: predictor.safetensors + predictor.json go there")
    # each >= 1, checked before the traces load: 0 gave torch errors, a ZeroDivisionError or a rank-0 predictor
    ap.add_argument("--horizon", type=at_least(1), default=2, help="distances 1..D predicted (layers ahead)")
    ap.add_argument("--rank", type=at_least(1), default=128, help="PCA components of the hidden state")
    ap.add_argument("--hidden-units", type=at_least(1), default=512)
    ap.add_argument("--epochs", type=at_least(1), default=6)
    ap.add_argument("--batch", type=at_least(1), default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--routing-only", action="store_true",
                    help="a predictor from routing alone (no hidden state: the experts a layer selected and the "
                         "request's latest at the target layer), for traces without hidden states")
    ap.add_argument("--skip-requests", type=at_least(0), default=0, metavar="N",
                    help="leave each trace's first N requests out of training (the ones a benchmark replays: "
                         "jobs.benchmark --requests N)")
    ap.add_argument("--layers", type=int, default=None,
                    help="the first N MoE layers only (a store cut to N layers; also with --routing-prior)")
    ap.add_argument("--routing-prior", action="store_true",
                    help="instead: count the traces' token-to-token routing transitions (routing only: npz or "
                         "Mixtral JSONL, no hidden states needed) into STORE_DIR/routing_prior.npz, the warm start of "
                         "the runtime's long-memory reuse values (prefetch.reuse_memory, policies/reuse.py)")
    a = ap.parse_args(argv)
    if a.routing_prior:
        return routing_prior_main(a)
    from policies.learned import LearnedPredictor
    from policies.replay import recall_at_k
    from policies.traces import load
    try:
        trace = _concat([cut(load(p), a.skip_requests, a.layers) for p in a.traces], a.routing_only)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_predictor: error: {e}", file=sys.stderr)
        return 2
    tr, val = split_requests(trace, a.val_fraction, a.seed)
    log = None if a.quiet else (lambda s: print(f"train_predictor: {s}", file=sys.stderr, flush=True))
    t0 = time.time()
    w = train(tr, horizon=a.horizon, rank=a.rank, hidden_units=a.hidden_units, epochs=a.epochs, batch=a.batch,
              lr=a.lr, seed=a.seed, device=a.device, log=log, routing_only=a.routing_only)
    train_s = time.time() - t0
    meta = {"training": {"traces": [str(p) for p in a.traces], "rows": tr.num_tokens, "requests": tr.num_requests,
                         "skipped_requests": a.skip_requests, "routing_only": a.routing_only,
                         "epochs": a.epochs, "lr": a.lr, "batch": a.batch, "seed": a.seed,
                         "seconds": round(train_s, 1)}}
    p = LearnedPredictor(w, trace.top_k, meta=meta, finetune=False)
    if val is not None:
        r = recall_at_k(p, val, 1)
        meta["training"].update(val_requests=val.num_requests, val_next_layer_recall=round(r.overall, 4))
        p = LearnedPredictor(w, trace.top_k, meta=meta)
    p.save(a.out)
    print(json.dumps({"out": a.out, **meta["training"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
