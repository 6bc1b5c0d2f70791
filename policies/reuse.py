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


class TransitionReuse:
    """P(the next token of a sequence selects expert e at layer l), from the experts its current token selected
    there: per MoE layer a same-layer transition matrix C[l] (decayed counts, half-life `half_life` transitions of
    that layer, on top of a uniform `prior`) between a sequence's consecutive tokens. What the runtime values its
    workers' residents by (prefetch.reuse_values): the eviction order that keeps what the next token will reuse,
    where LRU keeps what the last layers used. Replayed offline on the shared traces (the benchmark's cut: first 8
    MoE layers, 4 requests, 384 rows; 2 workers caching 25%; demand loads only) it hits 0.313 / 0.623 / 0.462 of
    expert uses where LRU hits 0.208 / 0.539 / 0.413 (Mixtral / gpt-oss / DeepSeek; docs/benchmarks.md session 9).

    Sequences are slots (the runtime's KV-cache rows); a slot whose position does not move forward starts a new
    sequence, and `reset(slots)` says so explicitly. A slot's prediction is K x its selected experts' mean transition
    row (clipped to 1); over the slots of one step, P(any selects e) = 1 - prod(1 - p_slot). Pure numpy, no per-row
    Python, ~20 numpy calls per step (the runtime calls it at every MoE layer); memory O(L x E^2 + slots x L x K)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, half_life: float = 70.0,
                 prior: float = 0.1):
        assert num_layers > 0 and num_experts > 0 and 0 < top_k <= num_experts, \
            f"bad geometry L={num_layers} E={num_experts} K={top_k}"
        assert half_life > 0 and prior > 0, "half_life and prior must be > 0"
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.decay, self.prior = 0.5 ** (1.0 / half_life), prior
        # counts above the prior, stored undecayed: the decayed count is A[l] * scale[l] (one multiply per step
        # instead of one per matrix entry; A is rescaled when scale underflows toward 1e-200)
        self.A = np.zeros((num_layers, num_experts * num_experts))        # float64 [L, E*E]: from * E + to
        self.scale = np.ones(num_layers)
        self.last = np.full((0, num_layers, top_k), -1, np.int64)         # [slots, L, K] last token's ids, -1 none
        self.pos = np.full((0, num_layers), -1, np.int64)                 # [slots, L] last token's position

    @property
    def C(self) -> np.ndarray:
        """float64 [L, E, E]: the decayed transition counts from -> to, the prior included."""
        return self.prior + (self.A * self.scale[:, None]).reshape(self.L, self.E, self.E)

    def reset(self, slots) -> None:
        """These slots start new sequences: their next tokens have no previous one."""
        s = np.asarray(slots, np.int64).reshape(-1)
        s = s[s < len(self.last)]
        self.last[s] = -1
        self.pos[s] = -1

    def _grow(self, n: int) -> None:
        grow = n - len(self.last)
        self.last = np.concatenate([self.last, np.full((grow, self.L, self.K), -1, np.int64)])
        self.pos = np.concatenate([self.pos, np.full((grow, self.L), -1, np.int64)])

    def observe(self, layer: int, slots, experts, pos=None) -> np.ndarray:
        """One step's routing at MoE layer index `layer`: slots int [N] (a slot may have several rows: prefill; they
        go in `pos` order, else in the order given), experts int [N, k] (ids < 0 or >= E ignored), pos int [N] the
        rows' token positions. Learns each slot's transitions from its previous token and returns float64 [E]:
        P(at least one of these slots selects each expert at layer `layer` of its next token)."""
        slots = np.asarray(slots, np.int64).reshape(-1)
        N, E = len(slots), self.E
        if N == 0:
            return np.zeros(E)
        ids = np.asarray(experts, np.int64).reshape(N, -1)[:, :self.K]
        bad = (ids < 0) | (ids >= E)
        if bad.any():
            ids = np.where(bad, -1, ids)
        if ids.shape[1] < self.K:
            ids = np.concatenate([ids, np.full((N, self.K - ids.shape[1]), -1, np.int64)], 1)
        pos = np.arange(N) if pos is None else np.asarray(pos, np.int64).reshape(-1)
        if slots.max() >= len(self.last):
            self._grow(int(slots.max()) + 1)
        if N > 1 and len(np.unique(slots)) < N:   # prefill: a slot's rows chain in position order
            order = np.lexsort((pos, slots))
            slots, ids, pos = slots[order], ids[order], pos[order]
            first = np.ones(N, bool)
            first[1:] = slots[1:] != slots[:-1]
            prev = np.empty_like(ids)                                   # [N, K] each row's previous token's ids
            fs = slots[first]
            prev[first] = np.where((pos[first] > self.pos[fs, layer])[:, None], self.last[fs, layer], -1)
            prev[~first] = ids[np.flatnonzero(~first) - 1]
            end = np.ones(N, bool)
            end[:-1] = first[1:]                                        # a slot's newest row
            cur, cs, cp = ids[end], slots[end], pos[end]
        else:                                      # decode: one row per slot
            prev = np.where((pos > self.pos[slots, layer])[:, None], self.last[slots, layer], -1)
            cur, cs, cp = ids, slots, pos
        self.last[cs, layer] = cur
        self.pos[cs, layer] = cp
        # learn every (from, to) pair of consecutive tokens; earlier counts decay by one factor per transition
        ok = (prev >= 0)[:, :, None] & (ids >= 0)[:, None, :]           # [N, K, K]
        n_tr = int(ok.any((1, 2)).sum())
        if n_tr:
            s = self.scale[layer] * self.decay ** n_tr
            if s < 1e-200:
                self.A[layer] *= s
                s = 1.0
            self.scale[layer] = s
            np.add.at(self.A[layer], (prev[:, :, None] * E + ids[:, None, :])[ok], 1.0 / s)
        # predict from each slot's newest token: rows of the decayed counts, the prior included
        A = self.A[layer].reshape(E, E)
        known = cur >= 0                                                # [S, K]
        g = A[np.maximum(cur, 0)]                                       # [S, K, E]
        if not known.all():
            g = g * known[:, :, None]
        rows = self.prior * known.sum(1, keepdims=True) + self.scale[layer] * g.sum(1)   # [S, E]
        norm = rows.sum(1, keepdims=True)                               # [S, 1]
        p = np.minimum(self.K * rows / np.maximum(norm, 1e-300), 1 - 1e-12)   # a slot with nothing known: 0 / 1e-300
        return -np.expm1(np.log1p(-p).sum(0))
