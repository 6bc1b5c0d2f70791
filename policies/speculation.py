"""Next-gate speculation: a training-free hidden-state predictor (the mixtral-offloading report, AdapMoE, HOBBIT).

At MoE layer l the router saw x_l (the event's `hidden`: what `jobs.collect_traces --hidden` records, the
post-attention-RMSNorm hidden state, x_l = w_l * h_l / rms(h_l) with h_l the residual stream and w_l layer l's
post_attention_layernorm weight). The router of layer l+d will see x_{l+d} = w_{l+d} * h_{l+d} / rms(h_{l+d}), where
h_{l+d} = h_l + (layer l's MoE output) + (the attention and MoE updates of layers l+1..l+d-1) + (layer l+d's
attention). Speculation assumes the residual stream changes little and scores layer l+d's router on what is known:

  plain (norms=None)        logits_{l+d} = G_{l+d} x_l              (the published recipe: the next gate applied to
                                                                      this layer's router input as is)
  norm-corrected (norms=..) logits_{l+d} = G_{l+d} (w_{l+d} * x_l / w_l)
                                                                    = what layer l+d's router would see if h did not
                                                                      change: x_l / w_l = h_l / rms(h_l) recovers the
                                                                      normalised residual (exactly: RMSNorm is
                                                                      scale-free), then layer l+d's own norm weight is
                                                                      applied. The w_{l+d} factor is folded into the
                                                                      stored gate, so both cost the same.

On the embedded model (docs/benchmarks.md, "Prediction (issue #4 groundwork)") the correction changes next-layer
recall by less than the run-to-run noise; it is kept as an option because on models whose norm weights differ more
between layers it removes a systematic per-dimension rescaling. What the router input lacks is layer l's own MoE
output, which the runtime has only after layer l's experts ran (less lead time); see the benchmarks section.

Probabilities. The router picks top-k of softmax(logits); the predicted logits are the true ones plus an error that
grows with the distance. Modelled as Gumbel noise of scale tau, the true top-k is a Plackett-Luce sample without
replacement from p = softmax(logits / tau), so P(e in top-k) is that sample's inclusion probability:
  k = 1   p_e
  k = 2   p_e (1 + sum_{j != e} p_j / (1 - p_j))                 (exact)
  k > 2   1 - exp(-lambda p_e), sum_e (...) = k                     (Rosen's approximation for successive sampling;
                                                                      within ~0.01-0.02 of Monte Carlo for E = 16-128)
Mixtral's renormalisation of the top-k weights does not change which experts are in the top-k, so it plays no role:
the estimate is of membership, from the full softmax. tau is either fixed (`temperature=`) or calibrated online
(`temperature=None`, the default): the true routing of every layer arrives right after, so the predictions made for
it at distances 1..calib_horizon are scored (Brier score of the inclusion probabilities against the true top-k,
decayed with `half_life`) for each tau of a fixed grid, per (distance, target layer), and the best is used
(tau = 1, the router's own softmax, until `min_evidence` scores exist). Distances beyond calib_horizon use the
calibration of calib_horizon.

Wrapping: a target past the last layer is the next token's layer (l + d) mod L, scored with that layer's gate on this
token's hidden state (weak: a different token enters the model; the calibration learns that it is weak and flattens
those probabilities). max_horizon <= L: speculation does not reach past one token ahead; predict(request, horizon)
with a larger horizon predicts distances up to max_horizon only.

Cost: observe() does one matmul [C*E, H] @ [H] for the distances 1..C (C = min(calib_horizon, max_horizon)) and
keeps the logits; predict() reuses them and adds one matmul (two where the targets wrap) only for distances > C.
Memory: shared, the gates [L, E, H] float32 and the calibration table [C, L, G]; per request the last router input
[H], the C forward logits [C, E] and the pending predictions [C, C, E], dropped by end().

Gate weights: `gates_from_dense(dense)` picks the routers (and post-attention norms) out of a checkpoint's dense
tensors (Mixtral `block_sparse_moe.gate`, Qwen2/3-MoE / OLMoE / DeepSeek `mlp.gate`). Softmax routers only:
DeepSeek-V3's sigmoid scores with a correction bias and group-limited selection are not modelled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .predictors import Candidates, Predictor, RoutingEvent, _decay_factor, _from_dense, _Req
from .traces import RoutingTrace

TEMPERATURES = 2.0 ** (np.arange(-5, 7) / 2.0)  # 0.18 .. 8 in steps of sqrt(2): the calibration grid

_GATE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")


def gates_from_dense(dense: Mapping[str, object]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(gates, norms) keyed by MoE layer index 0..L-1 (the decoder layers that have a router, in order): the router
    weights float32 [E, H] and that decoder layer's post_attention_layernorm weight float32 [H]. `dense` maps
    checkpoint names to numpy arrays or torch tensors (e.g. jobs.collect_traces.load_checkpoint's dense dict)."""
    layers = sorted(int(m["layer"]) for m in map(_GATE.match, dense) if m)
    if not layers:
        raise ValueError("no router weights (model.layers.N.block_sparse_moe.gate.weight or "
                         "model.layers.N.mlp.gate.weight) among the checkpoint's dense tensors")
    gates, norms = {}, {}
    for i, l in enumerate(layers):
        name = next(n for n in (f"model.layers.{l}.block_sparse_moe.gate.weight", f"model.layers.{l}.mlp.gate.weight")
                    if n in dense)
        gates[i] = _f32(dense[name])
        norm = dense.get(f"model.layers.{l}.post_attention_layernorm.weight")
        if norm is not None:
            norms[i] = _f32(norm)
    return gates, (norms if len(norms) == len(gates) else {})


def _f32(t) -> np.ndarray:
    if not isinstance(t, np.ndarray) and hasattr(t, "detach"):  # a torch tensor (bf16 has no numpy dtype)
        t = t.detach().float().cpu().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def topk_inclusion(p: np.ndarray, k: int) -> np.ndarray:
    """P(e among k draws without replacement from p), p [..., E] rows summing to 1 -> [..., E] in [0, 1] summing
    to k (k = 1, 2 exact; k > 2 Rosen's approximation, see the module docstring)."""
    if k == 1:
        return p
    E = p.shape[-1]
    if k >= E:
        return np.ones_like(p)
    if k == 2:
        q = np.minimum(p, 1.0 - 1e-12)
        r = q / (1.0 - q)
        return np.minimum(q * (1.0 + r.sum(-1, keepdims=True) - r), 1.0)
    q = np.maximum(p, 1e-300)
    lam = np.full(p.shape[:-1] + (1,), float(k))  # sum(1 - exp(-k p)) <= k: Newton on a concave increasing
    for _ in range(60):                           # function from the left stays left and rises monotonically
        e = np.exp(-lam * q)
        f = (1.0 - e).sum(-1, keepdims=True) - k
        if np.all(f > -1e-9):
            break
        lam = lam - f / (q * e).sum(-1, keepdims=True)
    return 1.0 - np.exp(-lam * q)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@dataclass
class _SpecReq(_Req):
    u: np.ndarray | None = None      # float32 [H]: the last router input, normalised residual if norm-corrected
    fwd: np.ndarray | None = None    # float32 [C, E]: logits for distances 1..C from the last event
    pend: np.ndarray | None = None   # float32 [C, C, E]: pending predictions, [target pos % C, distance - 1]
    ppos: np.ndarray | None = None   # int64 [C, C]: the target position of each pending prediction, -1 none


class NextGateSpeculation(Predictor):
    """Apply the routers of layers l+1..l+d to layer l's router input (see the module docstring).

    gates      {MoE layer 0..L-1: float [E, H]} router weights (nn.Linear's [out, in]).
    top_k      experts per token (the model's).
    norms      {MoE layer: float [H]} post_attention_layernorm weights: the norm-corrected variant; None: plain.
    max_horizon     the farthest distance predicted, 1..L (default L).
    temperature     fixed tau; None (default): calibrated online per (distance, target layer).
    calib_horizon   distances 1..C scored for calibration (and precomputed at observe).
    half_life       of the calibration scores, in scored predictions per (distance, layer); None: no decay.
    min_evidence    scored predictions per (distance, layer) before its calibrated tau replaces 1.
    """
    name = "speculation"
    needs_hidden = True  # observe() requires RoutingEvent.hidden

    def __init__(self, gates: Mapping[int, np.ndarray], top_k: int, *, norms: Mapping[int, np.ndarray] | None = None,
                 max_horizon: int | None = None, temperature: float | None = None, calib_horizon: int = 4,
                 half_life: float | None = 4096.0, min_evidence: int = 32, max_requests: int = 4096):
        if not gates:
            raise ValueError("gates is empty: need one router weight [E, H] per MoE layer")
        L = len(gates)
        if sorted(gates) != list(range(L)):
            raise ValueError(f"gates must be keyed by MoE layer index 0..{L - 1}, got {sorted(gates)}")
        G = [_f32(gates[l]) for l in range(L)]
        shapes = {g.shape for g in G}
        if len(shapes) != 1 or G[0].ndim != 2:
            raise ValueError(f"every gate must be [E, H] with one shape, got {[g.shape for g in G]}")
        E, H = G[0].shape
        super().__init__(L, E, top_k, max_requests=max_requests)
        self.H = H
        self.G = np.stack(G)  # [L, E, H], norm weight of the target layer folded in when norm-corrected
        self.inv_w = None     # [L, H] 1 / w_l: router input -> normalised residual
        if norms is not None:
            if sorted(norms) != list(range(L)):
                raise ValueError(f"norms must be keyed like gates, 0..{L - 1}, got {sorted(norms)}")
            ws = [_f32(norms[l]) for l in range(L)]
            if any(w.shape != (H,) for w in ws):
                raise ValueError(f"every norm weight must be [H] = [{H}], got {[w.shape for w in ws]}")
            W = np.stack(ws)                                                  # [L, H]
            self.G = self.G * W[:, None, :]
            safe = np.abs(W) > 1e-12                                          # a zero weight: that input is lost
            self.inv_w = np.where(safe, 1.0 / np.where(safe, W, 1.0), 0.0).astype(np.float32)
        self.G_flat = self.G.reshape(L * E, H)  # a view: rows of layer m are m*E:(m+1)*E
        self.max_horizon = L if max_horizon is None else int(max_horizon)
        if not 1 <= self.max_horizon <= L:
            raise ValueError(f"max_horizon must lie in [1, L={L}], got {max_horizon}")
        self.C = max(1, min(int(calib_horizon), self.max_horizon))
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be positive or None (calibrated), got {temperature}")
        self.temperature = temperature
        self.decay = _decay_factor(half_life)
        self.min_evidence = min_evidence
        self.taus = TEMPERATURES
        self.loss = np.zeros((self.C, L, len(self.taus)))  # decayed Brier sums per (distance, target layer, tau)
        self.n = np.zeros((self.C, L))                      # decayed number of scored predictions

    # -- validation --------------------------------------------------------------------------------------------
    def check_trace(self, trace: RoutingTrace) -> None:
        """Raise ValueError unless `trace` has hidden states and the geometry of these gates."""
        got = (trace.num_layers, trace.num_experts, trace.top_k)
        if got != (self.L, self.E, self.K):
            raise ValueError(f"{trace.origin}: trace has L={got[0]} MoE layers, E={got[1]} experts, top_k={got[2]}; "
                             f"the gates are L={self.L}, E={self.E}, top_k={self.K}")
        if trace.hidden is None:
            raise ValueError(f"{trace.origin}: trace has no hidden states; next-gate speculation needs them "
                             f"(python -m jobs.collect_traces --hidden)")
        if trace.hidden.shape[-1] != self.H:
            raise ValueError(f"{trace.origin}: hidden states have H={trace.hidden.shape[-1]}, the gates are "
                             f"[E={self.E}, H={self.H}]")

    def observe(self, event: RoutingEvent) -> None:
        h = event.hidden
        if h is None:
            raise ValueError(f"next-gate speculation needs the hidden state entering the router: event (request "
                             f"{event.request!r}, token {event.token}, layer {event.layer}) has none (collect traces "
                             f"with --hidden)")
        if np.shape(h) != (self.H,):
            raise ValueError(f"event (request {event.request!r}, token {event.token}, layer {event.layer}): hidden "
                             f"state has shape {np.shape(h)}, the gates expect [{self.H}]")
        super().observe(event)

    # -- the math (public for offline use and the distance-0 check) --------------------------------------------
    def logits(self, hidden: np.ndarray, layer: int, distances) -> np.ndarray:
        """Speculated router logits [..., D, E] for the targets `distances` (>= 0; 0 = layer's own router, the
        exact logits) after `layer`, from router inputs hidden [..., H] at `layer` (wrapping mod L)."""
        u = self._residual(np.asarray(hidden, np.float32), layer)
        tgt = (layer + np.asarray(distances, np.int64)) % self.L
        return np.einsum("...h,deh->...de", u, self.G[tgt])

    def probs(self, logits: np.ndarray, tau: np.ndarray | float = 1.0) -> np.ndarray:
        """P(expert in the top-k) [..., E] from logits [..., E] at noise scale tau (broadcast over [...])."""
        tau = np.asarray(tau, np.float64)
        return topk_inclusion(_softmax(logits.astype(np.float64) / tau[..., None]), self.K)

    def temperatures(self) -> np.ndarray:
        """float [C, L]: tau in use per (distance 1..C, target layer)."""
        if self.temperature is not None:
            return np.full((self.C, self.L), self.temperature)
        best = self.taus[np.argmin(self.loss, axis=-1)]
        return np.where(self.n >= self.min_evidence, best, 1.0)

    def _residual(self, x: np.ndarray, layer: int) -> np.ndarray:
        return x if self.inv_w is None else x * self.inv_w[layer]

    def _matmul(self, u: np.ndarray, first: int, count: int) -> np.ndarray:
        """[count, E] logits of layers first, first+1, ... (mod L), count <= L: one matmul, two if it wraps."""
        E = self.E
        a = min(count, self.L - first)
        out = self.G_flat[first * E:(first + a) * E] @ u
        if a < count:
            out = np.concatenate([out, self.G_flat[:(count - a) * E] @ u])
        return out.reshape(count, E)

    # -- Predictor hooks ---------------------------------------------------------------------------------------
    def _new_request(self) -> _SpecReq:
        C = self.C
        if self.temperature is not None:  # nothing to calibrate: no pending predictions
            return _SpecReq()
        return _SpecReq(pend=np.zeros((C, C, self.E), np.float32), ppos=np.full((C, C), -1, np.int64))

    def _observe(self, st: _SpecReq, ev: RoutingEvent, experts: np.ndarray, adjacent: bool) -> None:
        C, L = self.C, self.L
        q = ev.token * L + ev.layer  # flat position
        if self.temperature is None:  # score what was predicted for this position at distances 1..C
            slot = q % C
            m = st.ppos[slot] == q                               # [C] distances with a pending prediction
            if m.any():
                d = np.flatnonzero(m)                            # distance - 1
                P = self.probs(st.pend[slot, d][:, None, :], self.taus[None, :])   # [m, G, E]
                y = np.zeros(self.E)
                y[experts] = 1.0
                brier = ((P - y) ** 2).sum(-1)                   # [m, G]
                self.loss[d, ev.layer] = self.loss[d, ev.layer] * self.decay + brier
                self.n[d, ev.layer] = self.n[d, ev.layer] * self.decay + 1.0
        st.u = self._residual(np.array(ev.hidden, np.float32), ev.layer)  # a copy: the caller may reuse its buffer
        st.fwd = self._matmul(st.u, (ev.layer + 1) % L, C).astype(np.float32)   # [C, E] distances 1..C
        if self.temperature is None:
            tgt = q + np.arange(1, C + 1)
            st.pend[tgt % C, np.arange(C)] = st.fwd
            st.ppos[tgt % C, np.arange(C)] = tgt

    def _predict(self, request, st: _SpecReq, tokens: np.ndarray, layers: np.ndarray) -> Candidates:
        if getattr(st, "u", None) is None:  # nothing observed (the base hands a bare _Req for unknown requests)
            return Candidates.empty()
        D = min(len(layers), self.max_horizon)
        Z = st.fwd[:D]
        if D > self.C:
            Z = np.concatenate([Z, self._matmul(st.u, int(layers[self.C]), D - self.C)])
        taus = self.temperatures()[np.minimum(np.arange(D), self.C - 1), layers[:D]]   # [D]
        return _from_dense(self.probs(Z, taus), layers[:D])

    def _arrays(self):
        return [self.G] + ([] if self.inv_w is None else [self.inv_w]) + [self.loss, self.n]

    def _req_nbytes(self, st: _SpecReq) -> int:
        return sum(a.nbytes for a in (st.u, st.fwd, st.pend, st.ppos) if a is not None)
