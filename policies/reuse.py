"""How likely a resident expert is to be used again soon, learned online from routing: what lets the planner weigh
"keep what is here" against "bring in what is predicted" (policies/ranking.py step 6).

Without it a resident expert that no predictor names is worth 0 to the planner, so any prediction may displace it,
even one the next token would have reused: LRU's whole strength (token-to-token reuse: 0.27-0.44 of a token's
experts at a layer come back at the next token on the shared traces) is thrown away by every prefetch.

Model: per (layer, expert) a two-state Markov chain over a request's consecutive tokens. The chance that the next
token of a request selects expert e at layer l is p11[l, e] if the request's last token selected it there, p01[l, e]
if not; both are decayed counts (half-life `half_life` tokens of that layer) with a Beta prior whose mean is the
chance rate K/E. Over the live requests R, P(used at the next token) = 1 - prod_r (1 - p_r[l, e]).
Pure numpy, no clock; memory O(L x E) plus one bool [L, E] per live request (callers end requests).
"""
from __future__ import annotations

from typing import Hashable, Iterable

import numpy as np


class ReuseEstimator:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, half_life: float = 512.0,
                 prior_weight: float = 2.0):
        assert num_layers > 0 and num_experts > 0 and 0 < top_k <= num_experts, \
            f"bad geometry L={num_layers} E={num_experts} K={top_k}"
        assert half_life > 0 and prior_weight > 0, "half_life and prior_weight must be > 0"
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.decay = 0.5 ** (1.0 / half_life)
        base = top_k / num_experts
        # decayed counts per (layer, expert): transitions out of "used" / "not used", and how many went to "used"
        self.n1 = np.full((num_layers, num_experts), prior_weight)         # float64 [L, E]
        self.n11 = np.full((num_layers, num_experts), prior_weight * base)
        self.n0 = np.full((num_layers, num_experts), prior_weight)
        self.n01 = np.full((num_layers, num_experts), prior_weight * base)
        self.last: dict[Hashable, np.ndarray] = {}    # request -> bool [L, E] its last token's selection
        self.seen: dict[Hashable, np.ndarray] = {}    # request -> bool [L] a token has been seen at that layer

    def observe(self, request: Hashable, layer: int, experts) -> None:
        """Request `request`'s next token selected `experts` at MoE layer `layer` (ids < 0: unknown, ignored)."""
        self.observe_many([request], layer, np.asarray(experts).reshape(1, -1))

    def observe_many(self, requests: list, layer: int, experts) -> None:
        """One routing event's rows at once: requests [N], experts int [N, k] (ids < 0 ignored). The same as N
        `observe` calls when the requests are distinct (decode); a request with several rows (prefill, token after
        token) goes row by row."""
        ids = np.asarray(experts, np.int64).reshape(len(requests), -1)
        if len(set(requests)) < len(requests):
            for r, row in zip(requests, ids):
                self.observe_many([r], layer, row[None])
            return
        N = len(requests)
        cur = np.zeros((N, self.E), bool)                                 # [N, E]
        ok = (ids >= 0) & (ids < self.E)
        cur[np.nonzero(ok)[0], ids[ok]] = True
        lasts, seen = [], np.zeros(N, bool)
        for i, r in enumerate(requests):
            last = self.last.get(r)
            if last is None:
                last = self.last[r] = np.zeros((self.L, self.E), bool)
                self.seen[r] = np.zeros(self.L, bool)
            seen[i] = self.seen[r][layer]
            lasts.append(last)
        if seen.any():
            prev = np.stack([lasts[i][layer] for i in np.flatnonzero(seen)])   # [M, E]
            c = cur[seen]
            d = self.decay ** len(prev)      # the rows of one step decay together
            self.n1[layer] = d * self.n1[layer] + prev.sum(0)
            self.n11[layer] = d * self.n11[layer] + (prev & c).sum(0)
            self.n0[layer] = d * self.n0[layer] + (~prev).sum(0)
            self.n01[layer] = d * self.n01[layer] + (~prev & c).sum(0)
        for i, r in enumerate(requests):
            lasts[i][layer] = cur[i]
            self.seen[r][layer] = True

    def end(self, request: Hashable) -> None:
        self.last.pop(request, None)
        self.seen.pop(request, None)

    def p_next(self) -> tuple[np.ndarray, np.ndarray]:
        """(p11, p01) float64 [L, E]: P(selected at the next token | selected / not selected at this one)."""
        return self.n11 / self.n1, self.n01 / self.n0

    def reuse(self, requests: Iterable[Hashable] | None = None) -> np.ndarray:
        """float64 [L, E]: P(at least one of `requests` (default: every live one) selects the expert at its next
        token). A request not seen yet at a layer counts as "not selected" there."""
        reqs = list(self.last) if requests is None else [r for r in requests if r in self.last]
        p11, p01 = self.p_next()
        if not reqs:
            return np.zeros((self.L, self.E))
        used = np.stack([self.last[r] for r in reqs])                       # bool [R, L, E]
        n_used = used.sum(0)                                                 # [L, E]
        # 1 - (1 - p11)^n_used (1 - p01)^(R - n_used), in logs
        log_miss = n_used * np.log1p(-np.minimum(p11, 1 - 1e-12)) + \
            (len(reqs) - n_used) * np.log1p(-np.minimum(p01, 1 - 1e-12))
        return -np.expm1(log_miss)
