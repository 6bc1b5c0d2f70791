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

Also here: the runtime's reuse values (TransitionReuse: the workers' caches evict by them), MixedReuse (those values
mixed with a long-memory table by weights learned online), and routing priors (transition counts of past requests
that warm-start that table: transition_counts, save_routing_prior, load_routing_prior; routing_prior.npz beside the
store).
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
        # kept as the counts change (one layer per observe), so that reuse() of every live request is four
        # operations on [L, E] instead of a stack of them all and two logs: how many requests' last token selected
        # each expert, and log(1 - p11), log(1 - p01)
        self.n_used = np.zeros((num_layers, num_experts), np.int64)        # int64 [L, E]
        self.log_miss1 = np.zeros((num_layers, num_experts))
        self.log_miss0 = np.zeros((num_layers, num_experts))
        self.refresh()

    def refresh(self, layer=slice(None)) -> None:
        """Re-derive the logs of `layer` (default: all) from the counts; needed only after changing n1 / n11 / n0 /
        n01 directly."""
        p11, p01 = self.n11[layer] / self.n1[layer], self.n01[layer] / self.n0[layer]
        self.log_miss1[layer] = np.log1p(-np.minimum(p11, 1 - 1e-12))
        self.log_miss0[layer] = np.log1p(-np.minimum(p01, 1 - 1e-12))

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
        before = np.stack([x[layer] for x in lasts])                       # [N, E] (all False where not seen)
        if seen.any():
            prev = before[seen]                                              # [M, E]
            c = cur[seen]
            d = self.decay ** len(prev)      # the rows of one step decay together
            self.n1[layer] = d * self.n1[layer] + prev.sum(0)
            self.n11[layer] = d * self.n11[layer] + (prev & c).sum(0)
            self.n0[layer] = d * self.n0[layer] + (~prev).sum(0)
            self.n01[layer] = d * self.n01[layer] + (~prev & c).sum(0)
            self.refresh(layer)
        self.n_used[layer] += cur.sum(0) - before.sum(0)
        for i, r in enumerate(requests):
            lasts[i][layer] = cur[i]
            self.seen[r][layer] = True

    def end(self, request: Hashable) -> None:
        last = self.last.pop(request, None)
        if last is not None:
            self.n_used -= last
        self.seen.pop(request, None)

    def p_next(self) -> tuple[np.ndarray, np.ndarray]:
        """(p11, p01) float64 [L, E]: P(selected at the next token | selected / not selected at this one)."""
        return self.n11 / self.n1, self.n01 / self.n0

    def reuse(self, requests: Iterable[Hashable] | None = None) -> np.ndarray:
        """float64 [L, E]: P(at least one of `requests` (default: every live one) selects the expert at its next
        token). A request not seen yet at a layer counts as "not selected" there."""
        reqs = list(self.last) if requests is None else [r for r in requests if r in self.last]
        if not reqs:
            return np.zeros((self.L, self.E))
        if len(reqs) == len(self.last) and len(set(reqs)) == len(reqs):   # every live one, once: the running count
            n_used = self.n_used
        else:
            n_used = np.stack([self.last[r] for r in reqs]).sum(0)          # [L, E]
        # 1 - (1 - p11)^n_used (1 - p01)^(R - n_used), in logs
        return -np.expm1(n_used * self.log_miss1 + (len(reqs) - n_used) * self.log_miss0)


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

    def observe(self, layer: int, slots, experts, pos) -> np.ndarray:
        """One step's routing at MoE layer index `layer`: slots int [N] (a slot may have several rows: prefill; they
        go in `pos` order), experts int [N, k] (ids < 0 or >= E ignored), pos int [N] the rows' token positions
        (required: a slot's next token is one at a later position; a position not after the slot's last one at this
        layer starts a new sequence). Learns each slot's transitions from its previous token and returns float64 [E]:
        P(at least one of these slots selects each expert at layer `layer` of its next token)."""
        step = self._advance(layer, slots, experts, pos)
        return np.zeros(self.E) if step is None else self._learn_predict(layer, *step)

    def _advance(self, layer: int, slots, experts, pos):
        """The slots' bookkeeping of one step: None (no rows), or (prev [N, K] each row's previous token's ids (-1:
        none), ids [N, K] the rows' ids, cur [S, K] each slot's newest ids) after the slots' last tokens moved on."""
        slots = np.asarray(slots, np.int64).reshape(-1)
        N, E = len(slots), self.E
        if N == 0:
            return None
        ids = np.asarray(experts, np.int64).reshape(N, -1)[:, :self.K]
        bad = (ids < 0) | (ids >= E)
        if bad.any():
            ids = np.where(bad, -1, ids)
        if ids.shape[1] < self.K:
            ids = np.concatenate([ids, np.full((N, self.K - ids.shape[1]), -1, np.int64)], 1)
        pos = np.asarray(pos, np.int64).reshape(-1)
        assert len(pos) == N, f"{N} slots but {len(pos)} positions"
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
        return prev, ids, cur

    def _learn_predict(self, layer: int, prev: np.ndarray, ids: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """Learn a step's transitions (prev -> ids), then P(any slot selects e) from the slots' newest ids cur."""
        E = self.E
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

    def counts(self) -> np.ndarray:
        """float64 [L, E, E]: the decayed transition counts from -> to, without the prior (what a routing prior
        holds: `add_counts` puts them back)."""
        return (self.A * self.scale[:, None]).reshape(self.L, self.E, self.E)

    def add_counts(self, counts) -> None:
        """Warm start: add transition counts float [L, E, E] (from -> to; e.g. a routing prior) to the table."""
        c = np.asarray(counts, np.float64)
        assert c.shape == (self.L, self.E, self.E), f"counts {c.shape} do not match L, E = {self.L}, {self.E}"
        self.A += c.reshape(self.L, -1) / self.scale[:, None]


def transition_counts(experts, offsets, num_experts: int) -> np.ndarray:
    """float64 [L, E, E]: how often a sequence's token selected `to` at a layer right after its previous token
    selected `from` there, every (from, to) pair of the two tokens' experts (TransitionReuse's pairs, undecayed).
    experts int [T, L, K] (ids < 0: unknown), rows of sequence r in offsets[r]:offsets[r + 1]."""
    x = np.asarray(experts, np.int64)
    T, L, K = x.shape
    E = num_experts
    offs = np.asarray(offsets, np.int64)
    prev_ok = np.ones(T, bool)
    prev_ok[offs[:-1][offs[:-1] < T]] = False        # a sequence's first row has no previous token
    prev_ok[0] = False
    r = np.flatnonzero(prev_ok)                       # rows with a previous token
    a, b = x[r - 1], x[r]                             # [N, L, K] from, to
    ok = (a >= 0)[..., :, None] & (a < E)[..., :, None] & (b >= 0)[..., None, :] & (b < E)[..., None, :]  # [N,L,K,K]
    lay = np.arange(L)[None, :, None, None]
    flat = (lay * E + a[..., :, None]) * E + b[..., None, :]
    out = np.bincount(flat[ok], minlength=L * E * E).astype(np.float64)
    return out.reshape(L, E, E)


PRIOR_FILE = "routing_prior.npz"


def save_routing_prior(path: str, counts, *, top_k: int, source: str, rows: int, requests: int) -> None:
    """Write a routing prior (transition_counts: float [L, E, E], stored as `same_layer`) to `path` atomically: a
    temporary file in the same folder, renamed over it, so a failed write leaves any earlier prior whole."""
    import os
    c = np.asarray(counts, np.float32)
    if c.ndim != 3 or c.shape[1] != c.shape[2]:
        raise ValueError(f"routing prior {path}: same_layer must be counts [L, E, E], got shape {c.shape}")
    if not (np.isfinite(c).all() and (c >= 0).all()):
        raise ValueError(f"routing prior {path}: same_layer counts must be finite and >= 0")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, same_layer=c, top_k=np.int64(top_k), rows=np.int64(rows), requests=np.int64(requests),
                     source=np.array(source))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_routing_prior(path: str, num_layers: int, num_experts: int, top_k: int) -> tuple[np.ndarray, dict]:
    """(counts float64 [L, E, E], meta) from a `save_routing_prior` file; ValueError naming the file and what does
    not match the model (layers, experts, top-k) or is malformed. Wrong counts are never used."""
    def whole(z, key):   # an integer scalar, as save_routing_prior writes it (not 2.7, not [2, 2])
        a = z[key]
        if a.shape != () or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{key} must be an integer scalar, got {a.dtype} {a.shape}")
        return int(a)

    try:
        with np.load(path, allow_pickle=False) as z:
            raw = z["same_layer"]
            if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
                raise ValueError(f"same_layer must hold real counts, got {raw.dtype}")
            c = raw.astype(np.float64)
            meta = {"top_k": whole(z, "top_k"), "rows": whole(z, "rows"), "requests": whole(z, "requests"),
                    "source": str(z["source"]), "path": path}
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"routing prior {path}: not a routing prior file ({type(e).__name__}: {e})") from None
    want = (num_layers, num_experts, num_experts)
    if c.shape != want or meta["top_k"] != top_k:
        raise ValueError(f"routing prior {path}: same_layer {c.shape} with top_k {meta['top_k']} do not match the "
                         f"model (MoE layers, experts, experts) = {want} with top_k {top_k}")
    if not (np.isfinite(c).all() and (c >= 0).all()):
        raise ValueError(f"routing prior {path}: same_layer counts must be finite and >= 0")
    return c, meta


class MixedReuse:
    """The reuse values of two TransitionReuse tables mixed per layer by weights learned online: `fast` learns the
    live requests' transitions (half-life 70 transitions: a request's own routing, which gpt-oss-20b's follows),
    `slow` every request's (half-life `slow_half_life`, default ~no decay), warm-started from a routing prior
    (`jobs.train_predictor --routing-prior`) when one is given: the workload's shared routing, which
    DeepSeek-V2-Lite's prompts follow more. Neither is better everywhere (docs/benchmarks.md session 16: a primed
    table alone hits 0.490 against 0.462 on DeepSeek and 0.512 against 0.623 on gpt-oss), so both run and the truth
    picks: at each decode step of a layer whose rows are the slots of its previous step, both tables' previous
    predictions are scored by the Bernoulli log-likelihood of the experts the step selected, and the layer's
    weights move by Hedge (learning rate `eta`; a table's log-weight never falls more than `floor` below the other's,
    so a prior that goes stale can be left and one that becomes right again can be taken back).
    The same observe / reset interface as TransitionReuse, the slots' bookkeeping shared; ~2.4x its cost (92 against
    38 us per decode call at 8 x 64 experts, top-6: docs/benchmarks.md session 16)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, prior=None, slow_half_life: float = 1e9,
                 eta: float = 1.0, floor: float = 8.0):
        assert eta > 0 and floor > 0, "eta and floor must be > 0"
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.fast = TransitionReuse(num_layers, num_experts, top_k)
        self.slow = TransitionReuse(num_layers, num_experts, top_k, half_life=slow_half_life)
        if prior is not None:
            self.slow.add_counts(prior)
        self.eta, self.floor = eta, floor
        self.logw = np.zeros((num_layers, 2))                 # per layer: log weights of (fast, slow)
        self._logp: list = [None] * num_layers                # each layer's last predictions' logs (P, 1 - P)
        self._slots: list[np.ndarray | None] = [None] * num_layers   # and the slots they were for
        self.scored = np.zeros(num_layers, np.int64)          # steps scored per layer

    @property
    def weight_slow(self) -> np.ndarray:
        """float64 [L]: the slow (shared, primed) table's weight per layer."""
        w = np.exp(self.logw - self.logw.max(1, keepdims=True))
        return w[:, 1] / w.sum(1)

    def reset(self, slots) -> None:
        self.fast.reset(slots)
        self.slow.reset(slots)

    def observe(self, layer: int, slots, experts, pos) -> np.ndarray:
        """TransitionReuse.observe of both tables, mixed: float64 [E] P(at least one of these slots selects each
        expert at layer `layer` of its next token). The slots' bookkeeping is done once, for both."""
        slots = np.asarray(slots, np.int64).reshape(-1)
        step = self.fast._advance(layer, slots, experts, pos)
        if step is None:
            return np.zeros(self.E)
        prev, ids, cur = step
        decode = len(cur) == len(ids)                    # one row per slot (a prefill's rows repeat slots)
        last = self._slots[layer]
        if decode and last is not None and len(last) == len(slots) and np.array_equal(last, slots):
            # a decode step of the same slots: score what each table said about it
            y = np.zeros(self.E, bool)
            y[ids[ids >= 0]] = True
            lp, l1p = self._logp[layer]                                         # [2, E] each
            lw = self.logw[layer] + self.eta * (l1p.sum(1) + (lp[:, y] - l1p[:, y]).sum(1))
            self.logw[layer] = np.maximum(lw - lw.max(), -self.floor)
            self.scored[layer] += 1
        p = np.stack([self.fast._learn_predict(layer, prev, ids, cur),
                      self.slow._learn_predict(layer, prev, ids, cur)])        # [2, E]
        self._slots[layer] = slots if decode else None
        if decode:   # only a decode step's values are scored, at the same slots' next step
            q = np.clip(p, 1e-4, 1 - 1e-4)
            self._logp[layer] = (np.log(q), np.log1p(-q))
        w = np.exp(self.logw[layer])
        return (w[0] * p[0] + w[1] * p[1]) / w.sum()


def make_reuse_values(num_layers: int, num_experts: int, top_k: int, *, memory: bool | None = None, prior=None):
    """The runtime's reuse values (prefetch.reuse_values): TransitionReuse alone, or mixed with a long-memory table
    (prefetch.reuse_memory, MixedReuse) warm-started from `prior` counts [L, E, E] when given. memory None: mixed
    exactly when there is a prior (without one the mix gained no hits and doubled the cost: docs/benchmarks.md
    session 16)."""
    if memory is None:
        memory = prior is not None
    if not memory:
        assert prior is None, "a routing prior needs the long-memory table (reuse_memory)"
        return TransitionReuse(num_layers, num_experts, top_k)
    return MixedReuse(num_layers, num_experts, top_k, prior=prior)
