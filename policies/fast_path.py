"""Runtime-side speculation: the next MoE layers' experts, predicted where the hidden state is, with no hop.

The PrefetchCoordinator sees a routing event only after it crossed to its actor and waited its turn there (a step
takes 2-3 ms on the machines measured, docs/benchmarks.md), so its orders for the very next layer leave late: on
the embedded model its timely recall stayed ~0.45 while its distance-1 recall was ~0.81. The published offloaders
that reach high timely recall (mixtral-offloading, AdapMoE, HOBBIT, Pre-gated MoE) all speculate in the forward
pass itself. `NextLayerSpeculator` is that fast path: at MoE layer l, from the batch's router inputs, it returns
P(expert selected) at layers l+1..l+depth for every cache row, batched (a few matmuls for all distances, no
per-row Python), and the runtime (cluster/expert_cluster.py RoutePublisher) sends the likely ones straight to their
owner workers before layer l computes. The coordinator keeps the longer range: windows, dedup across runtimes,
staging, ranking by value and the byte caps.

Sources, best first (`from_sources`):
  learned     the trained auxiliary predictor beside the store (policies/learned.py), a routing-only one included
              (it reads no hidden state, so it serves routing-only replays too): the same features and
              weights as LearnedPredictor; per cache row it keeps what the row's latest state at each layer adds to
              the MLPs' input layer ([rows, L, D, U]: `_split_input_layer`). Equal
              to LearnedPredictor's prediction for the same events (tests/test_fast_path.py); not fine-tuned here:
              the runtime copies in the output layer the coordinator fine-tunes online
              (cluster/expert_cluster.py RoutePublisher._sync_head).
  pre_gated   a checkpoint's pre-gates (distance 1 only: what they are trained for).
  next_gate   the next layers' routers applied to this layer's router input (training-free), P by the top-k
              inclusion probability of their softmax at tau 1.
  transition  no hidden state needed (routing-only models, the shared traces): the cross-layer transition counts
              of policies/predictors.py CrossLayerTransition, learned online here from each row's consecutive
              layers, chained for distance > 1. Equal to that predictor on decode steps.

Rows: a cache row's state is reset when it starts a request (token position 0 at the first MoE layer); a prefill
routes many positions of one row at once, and only the row's last position is predicted (the decode step's).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .learned import LearnedPredictor, compress, has_pre_gates, has_trained_predictor, pre_gates_from_dense
from .speculation import _softmax, topk_inclusion


class NextLayerSpeculator:
    """Batched per-row P(selected) at the next `depth` MoE layers (see the module docstring)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, depth: int = 1,
                 learned: LearnedPredictor | None = None, gates: np.ndarray | None = None,
                 pre_gates: Mapping[int, np.ndarray] | None = None, transition: bool = False, rows: int = 16):
        self.L, self.E, self.K = int(num_layers), int(num_experts), int(top_k)
        sources = [s for s in (learned, gates, pre_gates, transition or None) if s is not None]
        assert len(sources) == 1, \
            "NextLayerSpeculator needs exactly one of learned=, gates=, pre_gates=, transition=True"
        self.learned, self.gates = learned, None
        # whether step() reads `hidden`: not for the routing history, nor for a routing-only learned predictor
        self.hidden = not transition and (learned is None or learned.needs_hidden)
        if transition:
            self.source, self.depth = "transition", max(1, min(int(depth), self.L))
            self.counts = np.zeros((self.L, self.E, self.E))                # [L, E, E] as CrossLayerTransition
            self.rowsum = np.zeros((self.L, self.E))                        # [L, E]
            self.prev = np.zeros((rows, self.K), np.int64)                  # each row's last experts
            self.prev_q = np.full(rows, -2, np.int64)                       # and its flat position (token*L+layer)
        elif learned is not None:
            assert (learned.L, learned.E) == (self.L, self.E), \
                f"learned predictor is for {learned.L} x {learned.E}, the model has {self.L} x {self.E}"
            self.source = "learned"
            self.depth = max(1, min(int(depth), learned.D))
            self.w = learned.w   # the arrays themselves: the coordinator's online updates of w2, b2 show here too
            self._split_input_layer(rows)
        elif gates is not None:
            g = np.asarray(gates, np.float32)
            assert g.shape[:2] == (self.L, self.E), f"gates must be [L={self.L}, E={self.E}, H], got {g.shape}"
            self.source, self.gates = "next_gate", g
            self.depth = max(1, min(int(depth), self.L))
        else:
            assert pre_gates and set(pre_gates) <= set(range(self.L)), \
                f"pre_gates must be keyed by MoE layer in [0, {self.L}), got {sorted(pre_gates or ())}"
            H = next(iter(pre_gates.values())).shape[1]
            self.source, self.depth = "pre_gated", 1
            # pre_gates[m] applies to the router input of layer m-1; a layer without one predicts nothing
            self.gates = np.zeros((self.L, self.E, H), np.float32)
            self.has = np.zeros(self.L, bool)
            for m, g in pre_gates.items():
                self.gates[m], self.has[m] = np.asarray(g, np.float32), True

    @classmethod
    def from_sources(cls, num_layers: int, num_experts: int, top_k: int, *, store_dir: str | None = None,
                     dense: Mapping | None = None, depth: int = 1, prefer: str = "auto"):
        """The best source available (module docstring), or None when there is none. prefer: auto | learned |
        pre_gated | next_gate | transition (auto: learned, else pre_gated, else next_gate)."""
        order = ("learned", "pre_gated", "next_gate") if prefer == "auto" else (prefer,)
        for name in order:
            if name == "transition":
                return cls(num_layers, num_experts, top_k, depth=depth, transition=True)
            if name == "learned" and store_dir is not None and has_trained_predictor(store_dir):
                p = LearnedPredictor.load(store_dir, finetune=False)
                if (p.L, p.E) == (num_layers, num_experts):
                    return cls(num_layers, num_experts, top_k, depth=depth, learned=p)
            if name == "pre_gated" and dense is not None and has_pre_gates(dense):
                return cls(num_layers, num_experts, top_k, pre_gates=pre_gates_from_dense(dense))
            if name == "next_gate" and dense is not None:
                from .speculation import gates_from_dense
                gates, norms = gates_from_dense(dense)
                if sorted(gates) == list(range(num_layers)):
                    G = np.stack([np.asarray(gates[l], np.float32) for l in range(num_layers)])
                    return cls(num_layers, num_experts, top_k, depth=depth, gates=G)
        return None

    def _grow(self, rows: int) -> None:
        if self.source == "transition" and rows > len(self.prev):
            n = max(rows, 2 * len(self.prev))
            self.prev = np.concatenate([self.prev, np.zeros((n - len(self.prev), self.K), np.int64)])
            self.prev_q = np.concatenate([self.prev_q, np.full(n - len(self.prev_q), -2, np.int64)])
        if self.learned is None or rows <= len(self.hist):
            return
        n = max(rows, 2 * len(self.hist))
        self.hist = np.concatenate([self.hist, np.broadcast_to(self._hist0, (n - len(self.hist),) + self._hist0.shape)])

    def step(self, layer: int, rows: np.ndarray, pos: np.ndarray, ids: np.ndarray,
             hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MoE layer `layer` (0..L-1) just routed rows [N] (cache row of each entry; a row may repeat in a prefill)
        at token positions pos [N] to experts ids [N, K] from router inputs hidden [N, H].
        Returns (urows [n] the distinct rows, P [depth, n, E] float32: P(selected) at layers layer+1..layer+depth
        (mod L: wrapping into the row's next token) for each row's last position)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) == 1 or bool((rows[1:] > rows[:-1]).all()):
            sel = None                                      # a decode step: each row once, its only position
            urows, top = rows.copy(), np.array(ids, np.int64)   # copies: absorb reads them after the caller
        else:
            last = np.lexsort((np.asarray(pos), rows))      # by row, then position
            keep = np.ones(len(last), bool)
            keep[:-1] = rows[last[1:]] != rows[last[:-1]]  # the last position of each row
            sel = last[keep]
            urows, top = rows[sel], np.asarray(ids, np.int64)[sel]
        if self.source == "transition":
            return urows, self._transition(layer, urows, np.asarray(pos, np.int64) if sel is None
                                           else np.asarray(pos, np.int64)[sel], top)
        if self.hidden:                                     # (a routing-only learned predictor reads none)
            x = np.asarray(hidden, np.float32)
            x = x if sel is None else x[sel]                # [n, H]
        if self.learned is None:
            tgt = (layer + np.arange(1, self.depth + 1)) % self.L
            logits = np.einsum("nh,deh->dne", x, self.gates[tgt])           # [depth, n, E]
            P = topk_inclusion(_softmax(logits.astype(np.float64)), self.K).astype(np.float32)
            if self.source == "pre_gated" and not self.has[tgt[0]]:
                P[:] = 0.0
            return urows, P
        self.absorb()                                       # the previous layer's state, if not absorbed yet
        w, D, U = self.w, self.depth, self.hist.shape[-1]
        self._grow(int(urows.max(initial=-1)) + 1)
        if layer == 0:   # a row at its request's first token starts afresh (a prefill: any of its positions is 0)
            self.hist[rows[np.asarray(pos) == 0]] = self._hist0
        # the input layer's pre-activations: this layer's part, its experts' rows, and the history part absorbed
        # earlier (with the biases). u: the products' input, x - mean where the compression folds in, else z; None
        # for a routing-only predictor, whose input layer has no such part
        if self.hidden:
            u = x - w["mean"] if self._folded else compress(x, w["mean"], w["proj"])    # [n, H] or [n, R], new
            pre = (u @ self._now_in[layer]).reshape(len(urows), D, U)                     # [n, D, U]
            pre += self._now_m[layer][top].sum(1) + self.hist[urows, layer]
        else:
            u, pre = None, self._now_m[layer][top].sum(1) + self.hist[urows, layer]
        a = np.maximum(pre, 0.0)
        logit = np.matmul(a.transpose(1, 0, 2), w["w2"][layer, :D]) + w["b2"][layer, :D, None]   # [D, n, E]
        P = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32, copy=False)
        self._pending = (layer, urows, u, top)
        return urows, P

    def _split_input_layer(self, rows: int) -> None:
        """The learned MLPs' input layer (w1 [L, D, F, U] over f = [z_l, ex_l, ex_m', z_m'], policies/learned.py),
        split by when each part of f is known. z_l and ex_l arrive with layer l's routing: their rows, for all
        distances at once, are `_now_in` [L, R, D*U] (one matmul) and `_now_m` [L, E, D, U] (a gather of the K
        selected rows). ex_m' and z_m' are the row's latest state at the target layer m: fixed once m has routed,
        so their product is computed then (`absorb`, off the decode loop: RoutePublisher defers it) into `hist`
        [rows, L, D, U] (the input layer's biases at a request's start), and the step reads it back. A distance
        that is a multiple of L targets l itself (its next token), whose latest state is this very step's: those
        rows fold into `_now_*`. Where the router input is no wider than its compression (H <= R), `proj` folds
        into both products, which then start from x - mean ([H, ...] rows). w1 is not fine-tuned online (only w2,
        b2), so these copies stay right."""
        L, E, R, D = self.L, self.E, self.w["proj"].shape[1], self.depth
        w1 = np.asarray(self.w["w1"][:, :D], np.float32)                     # [L, D, F, U]
        U = w1.shape[-1]
        z_now, m_now, m_then, z_then = (w1[:, :, :R], w1[:, :, R:R + E], w1[:, :, R + E:R + 2 * E],
                                        w1[:, :, R + 2 * E:])
        itself = (np.arange(1, D + 1) % L == 0)[None, :, None, None]         # [1, D, 1, 1] targets layer l itself
        z_now = z_now + np.where(itself, z_then, 0.0)
        m_now = m_now + np.where(itself, m_then, 0.0)
        # z_l @ Z = (x - mean) @ (proj @ Z): folded, the step does one product, not two (the mean is subtracted
        # first, not folded into a constant: a large mean would cancel in float32)
        proj = np.asarray(self.w["proj"], np.float64)
        self._folded = proj.shape[0] <= R
        now_z = np.ascontiguousarray(z_now.transpose(0, 2, 1, 3).reshape(L, R, D * U))
        self._now_in = np.matmul(proj, now_z.astype(np.float64)).astype(np.float32) if self._folded else now_z
        self._now_m = np.ascontiguousarray(m_now.transpose(0, 2, 1, 3))    # [L, E, D, U]
        # the input layer's biases ride in hist: a row starts at them, and absorb adds its part to them
        self._hist0 = np.array(self.w["b1"][:, :D], np.float32)             # [L, D, U]
        # per target layer m: the (source l, distance d) pairs that read m's latest state, their rows side by side
        self._then = []
        for m in range(L):
            pairs = [(l, d) for l in range(L) for d in range(D) if (l + d + 1) % L == m and (d + 1) % L]
            ls = np.array([p[0] for p in pairs], np.int64)
            ds = np.array([p[1] for p in pairs], np.int64)
            zt = np.ascontiguousarray(z_then[ls, ds].transpose(1, 0, 2).reshape(R, len(pairs) * U))
            if self._folded:   # [H, pairs*U]: absorb's product starts from x - mean too
                zt = (proj @ zt.astype(np.float64)).astype(np.float32)
            mt = np.ascontiguousarray(m_then[ls, ds].transpose(1, 0, 2))        # [E, pairs, U]
            self._then.append((ls, ds, zt, mt, self._hist0[ls, ds]))
        self.hist = np.broadcast_to(self._hist0, (rows, L, D, U)).copy()
        self._pending = None

    def absorb(self) -> None:
        """The last step's routed state (its layer's z and experts per row): its part of the input layer for every
        (source, distance) pair that will read it (`_split_input_layer`). Idempotent; the runtime runs it in the
        wait for the layer's replies, and the next step runs it if nothing did."""
        if self.learned is None or self._pending is None:
            return
        m, urows, u, top = self._pending                     # u: the step's product input
        ls, ds, zt, mt, b = self._then[m]
        if len(ls):   # (top-k ids are distinct: the gathered rows sum to the multi-hot's product)
            part = mt[top].sum(1)                                                             # [n, pairs, U]
            if u is not None:
                part = (u @ zt).reshape(len(urows), len(ls), self.hist.shape[-1]) + part
            self.hist[urows[:, None], ls[None, :], ds[None, :]] = part + b
        self._pending = None   # only once all is written: a failure above leaves it to be absorbed again

    def _transition(self, layer: int, urows: np.ndarray, pos: np.ndarray, ids: np.ndarray) -> np.ndarray:
        L, K = self.L, self.K
        self._grow(int(urows.max(initial=-1)) + 1)
        q = pos * L + layer
        adj = self.prev_q[urows] == q - 1                   # the row's previous event is the position just before
        if adj.any():                                       # count (previous experts -> these), as the predictor
            src = (layer - 1) % L
            a, b = self.prev[urows[adj]], ids[adj]          # [m, K] each
            np.add.at(self.counts[src], (np.repeat(a, K, 1).reshape(-1), np.tile(b, (1, K)).reshape(-1)), 1.0)
            np.add.at(self.rowsum[src], a.reshape(-1), float(K))
        self.prev[urows], self.prev_q[urows] = ids, q
        n = self.rowsum[layer][ids].sum(1)                  # [r] evidence of each row's experts
        p = self.counts[layer][ids].sum(1) / np.where(n > 0, n, 1.0)[:, None]   # [r, E] slot distribution
        P = np.empty((self.depth, len(urows), self.E), np.float32)
        P[0] = np.minimum(K * p, 1.0)
        for d in range(1, self.depth):                      # chained through the row-normalised tables
            l = (layer + d) % L
            rs = self.rowsum[l]
            p = p @ (self.counts[l] / np.where(rs > 0, rs, 1.0)[:, None])
            P[d] = np.minimum(K * p, 1.0)
        return P


def order_filter(source: str | None, top_k: int) -> tuple[float, int]:
    """The default (threshold, fanout) of the fast path's orders for a source (prefetch.speculate_threshold and
    speculate_fanout left unset). Hidden-state sources: P >= 0.35, up to top-k + 1 per row and layer; on the embedded
    model that cut stall ~10% against 0.5 / top-k for 16% more loads. transition: 0.5 / top-k; its counts spread P
    thinner, and 0.35 / top-k + 1 on the shared Mixtral trace loaded 56% more for the same stall (docs/benchmarks.md
    "Session 12")."""
    return (0.5, int(top_k)) if source == "transition" else (0.35, int(top_k) + 1)


def likely_experts(P: np.ndarray, threshold: float, fanout: int) -> np.ndarray:
    """P [..., n, E] -> bool [..., E]: experts some row ranks in its top `fanout` with P >= threshold (the orders to
    send), for every leading index at once (the fast path's distances)."""
    if P.shape[-2] == 0:
        return np.zeros(P.shape[:-2] + P.shape[-1:], bool)
    fan = min(int(fanout), P.shape[-1])
    if P.shape[-2] == 1:   # one row (batch-1 decode): fewer, smaller ops on the decode loop
        p = P[..., 0, :]
        kth = np.partition(p, p.shape[-1] - fan, axis=-1)[..., p.shape[-1] - fan, None]   # [..., 1] fanout-th
        return (p >= np.maximum(kth, threshold))
    kth = -np.partition(-P, fan - 1, axis=-1)[..., fan - 1:fan]     # [..., n, 1] each row's fanout-th largest
    return ((P >= kth) & (P >= threshold)).any(-2)
