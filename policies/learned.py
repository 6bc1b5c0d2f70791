"""Learned hidden-state predictors: the PreScope-style auxiliary MLP (trained offline, fine-tuned online) and the
Pre-gated MoE pre-gates a checkpoint may ship. Neither changes the model's weights.

LearnedPredictor: for every source MoE layer l and distance d = 1..D, a one-hidden-layer MLP predicts which experts
the target layer m = (l + d) mod L selects (wrapping into the next token past the last layer). Its input, all known
when layer l's router fires:
  z_l      [R]  layer l's router input x_l (RoutingEvent.hidden), compressed: whitened PCA, z = (x - mean) @ proj
  ex_l     [E]  multi-hot of the experts layer l just selected
  ex_m'    [E]  multi-hot of the request's most recent experts at the target layer m (the previous token's for targets
                in this token, this token's for wrapped ones; zeros at the request's start)
  z_m'     [R]  the request's most recent compressed router input at layer m (same rule)
so F = 2R + 2E, and per (l, d): logits = relu(f @ w1 + b1) @ w2 + b2, [E]; P(e selected) = sigmoid(logit) (trained
with binary cross-entropy against the multi-hot truth, so the sigmoid estimates top-k membership directly). The
previous token's state matters: attention at layer m mixes in earlier tokens, and on the embedded model adding it
lifts next-layer recall@2 by ~0.04 over the hidden state alone.

Routing only (R = H = 0, `python -m jobs.train_predictor --routing-only`): the same MLPs on ex_l and ex_m' alone,
for models whose traces carry no hidden state (the shared traces) and runtimes that do not ship it. Trained on other
prompts' routing, it predicts the next layer of unseen prompts far better than the online tables: next-layer recall@k
0.66 against 0.56 for the cross-layer transition on gpt-oss-20b, 0.69 against 0.44 on DeepSeek-V2-Lite
(docs/benchmarks.md "Session 24"). Events need no hidden state then (`needs_hidden` is False).

Files, beside the store (`save(dir)` / `load(dir)`):
  predictor.safetensors   mean [H], proj [H, R], w1 [L, D, F, U], b1 [L, D, U], w2 [L, D, U, E], b2 [L, D, E] f32
  predictor.json          {"format": "learned-expert-predictor", "version": 1, num_layers, num_experts, top_k,
                           hidden_size, rank, horizon, hidden_units, features, training: {...}}
`python -m jobs.train_predictor --traces T.npz --out STORE_DIR` writes them; load/save round-trips bit-exactly.

Online fine-tuning (finetune=True, the default): the truth of every position arrives one layer after the last
prediction for it, so each observe() takes one SGD step on the output layer (w2, b2) of the (source layer, distance)
MLPs whose predictions for this position are pending, with the hidden activations kept from when they were made:
cost D * U * E multiply-adds per event, no backprop through w1. The input layer stays as trained. The step is
normalised (NLMS: lr / (1 + |a|^2)), so `lr` is how far the logits of that same input move, whatever the
activations' scale.

PreGated: a checkpoint may carry `model.layers.N.(block_sparse_moe|mlp).pre_gate.weight` [E, H] (Pre-gated MoE):
layer N's pre-gate, applied to the router input of the MoE layer before N, gives layer N's router logits one layer
early. Predicts distance 1 only (what pre-gates are trained for); probabilities are the top-k inclusion
probabilities of their softmax, as in next-gate speculation.

Cost per event (numpy, float32): LearnedPredictor D * (F * U + U * E) multiply-adds plus the H x R projection;
memory: the weights plus per request [L, R + K] recent state and [D, D, U] pending activations (end() drops them).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .predictors import Candidates, Predictor, RoutingEvent, _from_dense, _Req
from .speculation import _f32, _softmax, topk_inclusion
from .traces import RoutingTrace

PREDICTOR_FILE = "predictor.safetensors"
PREDICTOR_META = "predictor.json"
FORMAT = "learned-expert-predictor"
FEATURES = ("hidden", "experts", "recent_experts_at_target", "recent_hidden_at_target")
ROUTING_FEATURES = ("experts", "recent_experts_at_target")   # a routing-only predictor's (R = H = 0)
_PRE_GATE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.pre_gate\.weight$")
_GATE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
_TENSORS = ("mean", "proj", "w1", "b1", "w2", "b2")


def has_trained_predictor(store_dir) -> bool:
    return (os.path.isfile(os.path.join(store_dir, PREDICTOR_FILE)) and
            os.path.isfile(os.path.join(store_dir, PREDICTOR_META)))


def is_routing_only(store_dir) -> bool:
    """Whether store_dir holds a trained routing-only predictor (one that reads no hidden state)."""
    if not store_dir or not has_trained_predictor(store_dir):
        return False
    try:
        with open(os.path.join(store_dir, PREDICTOR_META)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("hidden_size") == 0


def has_pre_gates(dense: Mapping) -> bool:
    return any(_PRE_GATE.match(k) for k in dense)


# -- training examples (shared with jobs.train_predictor, so training sees exactly what serving computes) ----------

@dataclass
class Examples:
    """Index arrays into a trace's rows describing every (source row, source layer, distance) example."""
    z: np.ndarray        # float32 [T, L, R]: compressed router inputs
    multi: np.ndarray    # float32 [T, L, E]: multi-hot selected experts (zeros where unknown)
    known: np.ndarray    # bool [T, L]
    hist: np.ndarray     # int64 [T, L, D]: row of the recent state at the target layer, -1 none (request start)
    target: np.ndarray   # int64 [T, L, D]: row of the target, -1 none (past the request's end, or unknown)


def compress(hidden: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """[..., H] -> whitened principal components [..., R]."""
    return (hidden.astype(np.float32) - mean) @ proj


def fit_projection(hidden: np.ndarray, rank: int, *, max_rows: int = 200_000, seed: int = 0):
    """Whitened PCA of router inputs hidden [N, H] -> (mean [H], proj [H, R]) with R = min(rank, H)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    x = x.astype(np.float64)
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    w, v = np.linalg.eigh(cov)                    # ascending
    r = min(rank, x.shape[1])
    w, v = w[::-1][:r], v[:, ::-1][:, :r]
    proj = v / np.sqrt(np.maximum(w, 1e-8))[None, :]
    return mean.astype(np.float32), proj.astype(np.float32)


def routing_only_projection() -> tuple[np.ndarray, np.ndarray]:
    """(mean [0], proj [0, 0]): the compression of a routing-only predictor, which reads no hidden state."""
    return np.zeros(0, np.float32), np.zeros((0, 0), np.float32)


def examples(trace: RoutingTrace, mean: np.ndarray, proj: np.ndarray, horizon: int) -> Examples:
    """The training examples of a trace (vectorised; see the module docstring for the rule). It needs hidden states
    unless the projection is a routing-only one (R = 0)."""
    R = proj.shape[1]
    if trace.hidden is None and R:
        raise ValueError(f"{trace.origin}: no hidden states (collect with python -m jobs.collect_traces --hidden, "
                         f"or train a routing-only predictor: --routing-only)")
    T, L, K = trace.experts.shape
    E = trace.num_experts
    known = trace.known
    z = np.zeros((T, L, R), np.float32)
    for l in range(L if R else 0):  # per layer: bounded temporaries
        z[:, l] = compress(trace.hidden[:, l], mean, proj)
    z[~known] = 0.0
    multi = np.zeros((T, L, E), np.float32)
    ex = np.where(trace.experts >= 0, trace.experts, 0).astype(np.int64)
    np.put_along_axis(multi, ex, 1.0, axis=-1)
    multi[~known] = 0.0
    req = trace.request_of_rows()
    start, end = trace.offsets[req], trace.offsets[req + 1]    # [T]
    rows = np.arange(T)
    D = horizon
    hist = np.full((T, L, D), -1, np.int64)
    target = np.full((T, L, D), -1, np.int64)
    for l in range(L):
        for d in range(1, D + 1):
            m, wrap = (l + d) % L, (l + d) // L     # d <= L: wrap in {0, 1}
            hr = rows - 1 + wrap                    # the request's most recent row at layer m before the target
            ok = (hr >= start) & known[np.clip(hr, 0, T - 1), m]
            hist[:, l, d - 1] = np.where(ok, hr, -1)
            tr_ = rows + wrap
            ok = known[:, l] & (tr_ < end) & known[np.clip(tr_, 0, T - 1), m]
            target[:, l, d - 1] = np.where(ok, tr_, -1)
    return Examples(z, multi, known, hist, target)


# -- the predictor ---------------------------------------------------------------------------------------------

@dataclass
class _LReq(_Req):
    zh: np.ndarray | None = None     # float32 [L, R]: most recent compressed router input per layer
    mh: np.ndarray | None = None     # float32 [L, E]: most recent multi-hot per layer
    act: np.ndarray | None = None    # float32 [D, D, U]: hidden activations of pending predictions [pos % D, d-1]
    logit: np.ndarray | None = None  # float32 [D, D, E]: their logits (what predict() returns)
    src: np.ndarray | None = None    # int64 [D]: source layer of the position in each ring slot
    ppos: np.ndarray | None = None   # int64 [D]: source position in each ring slot, -1 none


class LearnedPredictor(Predictor):
    """The auxiliary MLPs (see the module docstring). `weights` maps the names of _TENSORS to arrays."""
    name = "learned"
    needs_hidden = True

    def __init__(self, weights: Mapping[str, np.ndarray], top_k: int, *, finetune: bool = True,
                 lr: float = 0.1, meta: dict | None = None, max_requests: int = 1024):
        w = {k: np.array(weights[k], dtype=np.float32, order="C") for k in _TENSORS}  # own copies: fine-tuned
        L, D, F, U = w["w1"].shape
        E = w["w2"].shape[-1]
        H, R = w["proj"].shape
        shapes = dict(mean=(H,), proj=(H, R), w1=(L, D, F, U), b1=(L, D, U), w2=(L, D, U, E), b2=(L, D, E))
        bad = {k: w[k].shape for k, s in shapes.items() if w[k].shape != s}
        if bad or F != 2 * R + 2 * E:
            raise ValueError(f"learned predictor weights do not fit together: {bad or ''} F={F}, expected "
                             f"{shapes} with F = 2R + 2E = {2 * R + 2 * E}")
        if not 1 <= D <= L:
            raise ValueError(f"horizon D={D} must lie in [1, L={L}]")
        if (H == 0) != (R == 0):
            raise ValueError(f"learned predictor weights: hidden size {H} with rank {R} (a routing-only predictor "
                             f"has both 0)")
        super().__init__(L, E, top_k, max_requests=max_requests)
        self.H, self.R, self.D, self.U = H, R, D, U
        self.needs_hidden = H > 0        # routing only: events need no hidden state (module docstring)
        self.w = w
        self.finetune, self.lr = finetune, float(lr)
        self.meta = dict(meta or {})
        self.updates = 0

    # -- files ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, store_dir, **kw) -> "LearnedPredictor":
        from safetensors.numpy import load_file
        path, mpath = os.path.join(store_dir, PREDICTOR_FILE), os.path.join(store_dir, PREDICTOR_META)
        if not has_trained_predictor(store_dir):
            raise FileNotFoundError(f"{store_dir}: no trained predictor ({PREDICTOR_FILE} + {PREDICTOR_META}); "
                                    f"train one with python -m jobs.train_predictor --out {store_dir}")
        with open(mpath) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("version") != 1:
            raise ValueError(f"{mpath}: not a {FORMAT} v1 file (format={meta.get('format')!r}, "
                             f"version={meta.get('version')!r})")
        t = load_file(path)
        missing = [k for k in _TENSORS if k not in t]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing}")
        return cls(t, int(meta["top_k"]), meta=meta, **kw)

    def save(self, store_dir) -> None:
        """Write predictor.safetensors + predictor.json into store_dir (each atomically: temp file + rename)."""
        from safetensors.numpy import save_file
        os.makedirs(store_dir, exist_ok=True)
        meta = dict(self.meta, format=FORMAT, version=1, num_layers=self.L, num_experts=self.E, top_k=self.K,
                    hidden_size=self.H, rank=self.R, horizon=self.D, hidden_units=self.U,
                    features=list(FEATURES if self.H else ROUTING_FEATURES),
                    online_updates=self.updates)
        path = os.path.join(store_dir, PREDICTOR_FILE)
        save_file({k: self.w[k] for k in _TENSORS}, path + ".tmp")
        os.replace(path + ".tmp", path)
        mpath = os.path.join(store_dir, PREDICTOR_META)
        with open(mpath + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(mpath + ".tmp", mpath)

    # -- Predictor hooks -----------------------------------------------------------------------------------
    def observe(self, event: RoutingEvent) -> None:
        if self.needs_hidden and (event.hidden is None or np.shape(event.hidden) != (self.H,)):
            raise ValueError(f"learned predictor needs the hidden state [{self.H}] entering the router: event "
                             f"(request {event.request!r}, token {event.token}, layer {event.layer}) has "
                             f"{None if event.hidden is None else np.shape(event.hidden)}")
        super().observe(event)

    def _new_request(self) -> _LReq:
        D, U, E, L = self.D, self.U, self.E, self.L
        return _LReq(zh=np.zeros((L, self.R), np.float32), mh=np.zeros((L, E), np.float32),
                     act=np.zeros((D, D, U), np.float32), logit=np.zeros((D, D, E), np.float32),
                     src=np.zeros(D, np.int64), ppos=np.full(D, -1, np.int64))

    def _observe(self, st: _LReq, ev: RoutingEvent, experts: np.ndarray, adjacent: bool) -> None:
        L, D, w = self.L, self.D, self.w
        q = ev.token * L + ev.layer
        if self.finetune:
            self._sgd(st, q, experts)
        l = ev.layer
        z = compress(np.asarray(ev.hidden), w["mean"], w["proj"]) if self.R else w["mean"]   # [R] ([0]: routing)
        st.zh[l] = z
        st.mh[l] = 0.0
        st.mh[l, experts] = 1.0
        m = (l + np.arange(1, D + 1)) % L                                # [D] target layers
        f = np.concatenate([np.broadcast_to(z, (D, self.R)), np.broadcast_to(st.mh[l], (D, self.E)),
                            st.mh[m], st.zh[m]], axis=1)                 # [D, F]
        a = np.maximum(np.einsum("df,dfu->du", f, w["w1"][l]) + w["b1"][l], 0.0)   # [D, U]
        slot = q % D
        st.act[slot] = a
        st.logit[slot] = np.einsum("du,due->de", a, w["w2"][l]) + w["b2"][l]       # [D, E]
        st.src[slot], st.ppos[slot] = l, q

    def _sgd(self, st: _LReq, q: int, experts: np.ndarray) -> None:
        """One SGD step on (w2, b2) of every pending prediction for position q (its truth: `experts`)."""
        d = np.arange(1, self.D + 1)
        slot = (q - d) % self.D
        ok = st.ppos[slot] == q - d                                      # [D] the source position is in its slot
        if not ok.any():
            return
        d, slot = d[ok], slot[ok]
        a = st.act[slot, d - 1]                                          # [n, U]
        y = np.zeros((len(d), self.E), np.float32)
        y[:, experts] = 1.0
        g = 1.0 / (1.0 + np.exp(-st.logit[slot, d - 1])) - y             # [n, E] d(BCE)/d(logit)
        l = st.src[slot]                                                 # (l, d) pairs are distinct
        # normalised step (NLMS): the logits of the same input move by lr * g whatever the activations' scale
        step = self.lr / (1.0 + (a * a).sum(1, keepdims=True))           # [n, 1]
        self.w["w2"][l, d - 1] -= (step * a)[:, :, None] * g[:, None, :]
        self.w["b2"][l, d - 1] -= step * g
        self.updates += len(d)

    def _predict(self, request, st, tokens, layers) -> Candidates:
        if getattr(st, "ppos", None) is None:
            return Candidates.empty()
        here = st.token * self.L + st.layer
        D = min(len(layers), self.D)
        z = st.logit[here % self.D, :D]                                  # [D, E]
        P = np.clip(1.0 / (1.0 + np.exp(-z.astype(np.float64))), 1e-6, 1.0)
        return _from_dense(P, layers[:D])

    def _arrays(self):
        return list(self.w.values())

    def _req_nbytes(self, st: _LReq) -> int:
        return sum(a.nbytes for a in (st.zh, st.mh, st.act, st.logit, st.src, st.ppos) if a is not None)


# -- pre-gated ---------------------------------------------------------------------------------------------------

def pre_gates_from_dense(dense: Mapping) -> dict[int, np.ndarray]:
    """{MoE layer index: pre_gate [E, H] float32} from a checkpoint's dense tensors (MoE layers = the decoder
    layers with a router, numbered in order)."""
    moe = sorted(int(m["layer"]) for m in map(_GATE.match, dense) if m)
    index = {l: i for i, l in enumerate(moe)}
    out = {}
    for k, t in dense.items():
        m = _PRE_GATE.match(k)
        if m:
            l = int(m["layer"])
            if l not in index:
                raise ValueError(f"{k}: decoder layer {l} has a pre_gate but no router")
            out[index[l]] = _f32(t)
    return out


class PreGated(Predictor):
    """Distance-1 prediction from the checkpoint's pre-gates (module docstring). pre_gates {MoE layer m: [E, H]}
    predicts layer m from layer m-1's router input (layer 0's, if present, from the previous token's last layer)."""
    name = "pre_gated"
    needs_hidden = True

    def __init__(self, pre_gates: Mapping[int, np.ndarray], num_layers: int, top_k: int, *,
                 max_requests: int = 4096):
        if not pre_gates:
            raise ValueError("no pre_gate tensors: this checkpoint is not pre-gated (use 'learned' or 'next_gate')")
        shapes = {np.shape(g) for g in pre_gates.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"every pre_gate must be [E, H] with one shape, got {sorted(shapes)}")
        if not all(0 <= m < num_layers for m in pre_gates):
            raise ValueError(f"pre_gate layers {sorted(pre_gates)} outside [0, {num_layers})")
        E, H = next(iter(shapes))
        super().__init__(num_layers, E, top_k, max_requests=max_requests)
        self.H = H
        self.G = np.zeros((num_layers, E, H), np.float32)   # [L, E, H], zeros where a layer has no pre-gate
        self.has = np.zeros(num_layers, bool)
        for m, g in pre_gates.items():
            self.G[m] = _f32(g)
            self.has[m] = True

    @classmethod
    def from_dense(cls, dense: Mapping, top_k: int, **kw) -> "PreGated":
        n = sum(1 for k in dense if _GATE.match(k))
        return cls(pre_gates_from_dense(dense), n, top_k, **kw)

    def observe(self, event: RoutingEvent) -> None:
        if event.hidden is None or np.shape(event.hidden) != (self.H,):
            raise ValueError(f"pre-gated predictor needs the hidden state [{self.H}] entering the router: event "
                             f"(request {event.request!r}, token {event.token}, layer {event.layer}) lacks it")
        super().observe(event)

    def _new_request(self):
        return _PGReq()

    def _observe(self, st, ev, experts, adjacent):
        m = (ev.layer + 1) % self.L
        st.p = (topk_inclusion(_softmax(self.G[m] @ np.asarray(ev.hidden, np.float32).astype(np.float64)), self.K)
                if self.has[m] else None)

    def _predict(self, request, st, tokens, layers):
        if getattr(st, "p", None) is None:
            return Candidates.empty()
        return _from_dense(np.maximum(st.p, 1e-9)[None, :], layers[:1])

    def _arrays(self):
        return [self.G, self.has]

    def _req_nbytes(self, st):
        return 0 if st.p is None else st.p.nbytes


@dataclass
class _PGReq(_Req):
    p: np.ndarray | None = None  # float64 [E]: P(selected) at the next layer
