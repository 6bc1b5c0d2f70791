"""A routing generator fitted to a trace, for models without public traces, and how close it comes to the trace.

Statistics (`stats_of`): per-layer popularity P(e at l) [L, E]; layer-to-layer transitions P(b at l+1 | a at l)
within a token [L-1, E, E]; token-to-token reuse, the fraction of a token's experts at layer l that the previous
token of the same request also selected there [L].

Generator (`SyntheticRouter.generate`), request by request (all requests advance together, vectorised), token by
token, layer by layer: each expert the previous token selected at this layer is kept with probability
copy[l]; the remaining slots are drawn without replacement (Gumbel top-k) from, at layer 0, the popularity, and
at layer l > 0 the mean of the transition rows of the experts just selected at l-1 (rows smoothed towards the
popularity with `smoothing` pseudo-counts). copy[l] is calibrated so the generated reuse matches the target; the evidence of the K rows is combined naive-Bayes
style (log pop + gamma * sum_k (log T[a_k] - log pop)), gamma calibrated to the trace's transition information
and a per-layer logit bias to its popularity.

Two ways to get one:
  SyntheticRouter.fit(trace)                 the trace's own tables (same geometry)
  SyntheticRouter.from_params(L, E, K, p)    a random model of another geometry with the trace's scalar shape
                                             (`params_of(trace)`: popularity entropy, transition information,
                                             reuse): Zipf popularity and Dirichlet transition rows, their
                                             exponents found by bisection so the same scalars come out.
`fidelity(a, b)` compares two RoutingStats: popularity TV (mean over layers), transition TV (rows weighted by how
often their source occurs), reuse error, and the scalar params.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .traces import RoutingTrace


@dataclass
class RoutingStats:
    popularity: np.ndarray   # float64 [L, E], rows sum to 1 (share of the layer's selections)
    transition: np.ndarray   # float64 [L-1, E, E], rows sum to 1 where seen (0 rows: never seen)
    source: np.ndarray       # float64 [L-1, E] how often each transition row's source occurred
    reuse: np.ndarray        # float64 [L]


def stats_of(trace: RoutingTrace) -> RoutingStats:
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    x = trace.experts.astype(np.int64)                                    # [T, L, K]
    known = x[..., 0] >= 0                                                 # [T, L]
    pop = np.zeros((L, E))
    lay = np.broadcast_to(np.arange(L)[None, :, None], x.shape)
    m = np.broadcast_to(known[..., None], x.shape)
    np.add.at(pop, (lay[m], x[m]), 1.0)
    pop /= np.maximum(pop.sum(1, keepdims=True), 1)
    trans = np.zeros((max(L - 1, 0), E, E))
    for l in range(L - 1):                                                 # L steps, vectorised over tokens
        ok = known[:, l] & known[:, l + 1]
        a, b = x[ok, l], x[ok, l + 1]                                     # [n, K]
        np.add.at(trans[l], (np.repeat(a, K, 1).reshape(-1), np.tile(b, (1, K)).reshape(-1)), 1.0)
    src = trans.sum(2)
    trans = trans / np.maximum(src[..., None], 1e-300)
    # reuse: same request, consecutive rows
    same = np.ones(len(x), bool)
    same[trace.offsets[:-1]] = False                                      # first row of a request has no previous
    same[0] = False
    reuse = np.zeros(L)
    for l in range(L):
        ok = same[1:] & known[1:, l] & known[:-1, l]
        cur, prev = x[1:][ok, l], x[:-1][ok, l]                           # [n, K]
        hit = (cur[:, :, None] == prev[:, None, :]).any(2)
        reuse[l] = hit.mean() if hit.size else np.nan
    return RoutingStats(pop, trans, src, reuse)


def _entropy(p: np.ndarray, axis=-1) -> np.ndarray:
    q = np.where(p > 0, p, 1.0)
    return -(p * np.log(q)).sum(axis)


@dataclass(frozen=True)
class ShapeParams:
    """Geometry-free shape of a routing trace (what from_params reproduces in another geometry)."""
    pop_entropy: float       # mean over layers of H(pop[l]) / log E
    transition_info: float   # 1 - E_a[H(row a)] / H(pop[l+1]), weighted by source frequency (0: independent)
    reuse_lift: float        # (reuse - K/E) / (1 - K/E): reuse above chance, 0..1

    def as_dict(self) -> dict:
        return asdict(self)


def params_of(st: RoutingStats, top_k: int) -> ShapeParams:
    L, E = st.popularity.shape
    pe = float(np.mean(_entropy(st.popularity) / np.log(E)))
    if L > 1:
        w = st.source / np.maximum(st.source.sum(1, keepdims=True), 1e-300)
        hrow = (w * _entropy(st.transition)).sum(1)                        # [L-1]
        hnext = _entropy(st.popularity[1:])
        ti = float(np.mean(1 - hrow / np.maximum(hnext, 1e-12)))
    else:
        ti = 0.0
    chance = top_k / E
    r = float(np.nanmean(st.reuse))
    return ShapeParams(pe, ti, float(np.clip((r - chance) / (1 - chance), 0, 1)))


def fidelity(ref: RoutingStats, got: RoutingStats, top_k: int) -> dict:
    """How close `got` is to `ref` (smaller is closer)."""
    pop_tv = 0.5 * np.abs(ref.popularity - got.popularity).sum(1)          # [L]
    out = {"popularity_tv": float(pop_tv.mean())}
    if len(ref.transition):
        w = ref.source / np.maximum(ref.source.sum(1, keepdims=True), 1e-300)
        row_tv = 0.5 * np.abs(ref.transition - got.transition).sum(2)       # [L-1, E]
        out["transition_tv"] = float((w * row_tv).sum(1).mean())
    out["reuse_abs_err"] = float(np.nanmean(np.abs(ref.reuse - got.reuse)))
    out["reuse_ref"], out["reuse_got"] = float(np.nanmean(ref.reuse)), float(np.nanmean(got.reuse))
    out["params_ref"] = params_of(ref, top_k).as_dict()
    out["params_got"] = params_of(got, top_k).as_dict()
    return out


@dataclass
class SyntheticRouter:
    popularity: np.ndarray   # [L, E]
    transition: np.ndarray   # [L-1, E, E] row-stochastic
    copy: np.ndarray         # [L] probability of keeping each of the previous token's experts
    top_k: int
    name: str = "synthetic"
    gamma: float = 1.0       # sharpness of the combined transition evidence (calibrated)
    bias: np.ndarray | None = None  # [L, E] logit correction (calibrated)

    def __post_init__(self):
        if self.bias is None:
            self.bias = np.zeros_like(self.popularity)

    @property
    def num_layers(self) -> int:
        return self.popularity.shape[0]

    @property
    def num_experts(self) -> int:
        return self.popularity.shape[1]

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, trace: RoutingTrace, smoothing: float = 1.0, calibrate: bool = True, seed: int = 0
            ) -> "SyntheticRouter":
        """The trace's own tables; transition rows get `smoothing` pseudo-counts of the next layer's popularity."""
        st = stats_of(trace)
        eps = 1e-3 / trace.num_experts
        pop = (st.popularity + eps) / (1 + eps * trace.num_experts)
        cnt = st.transition * st.source[..., None] * trace.top_k               # back to counts (approximately)
        trans = (cnt + smoothing * pop[1:, None, :]) / (st.source[..., None] * trace.top_k + smoothing)
        r = cls(pop, trans, np.nan_to_num(st.reuse), trace.top_k, f"fit:{trace.model}")
        if calibrate:
            r.calibrate(st.popularity, params_of(st, trace.top_k).transition_info, st.reuse, seed=seed)
        return r

    @classmethod
    def from_params(cls, L: int, E: int, K: int, p: ShapeParams, seed: int = 0, name: str = "synthetic"
                    ) -> "SyntheticRouter":
        rng = np.random.default_rng(seed)
        ranks = np.arange(1, E + 1, dtype=np.float64)

        def zipf(s):
            z = ranks ** -s
            return z / z.sum()
        lo, hi = 0.0, 8.0                                # H(zipf(s)) / log E falls from 1 as s grows
        for _ in range(40):
            mid = (lo + hi) / 2
            if _entropy(zipf(mid)) / np.log(E) > p.pop_entropy:
                lo = mid
            else:
                hi = mid
        pop = np.stack([zipf(lo)[rng.permutation(E)] for _ in range(L)])      # [L, E]
        # transition rows ~ Dirichlet(c * E * pop[l+1]): mean pop[l+1]; c sets how informative a row is
        # (each trial draws with the same seed, so the bisection sees a smooth function of c)
        def rows(c, s):
            r2 = np.random.default_rng(s)
            a = np.maximum(c * E * pop[1:, None, :], 1e-3)                  # [L-1, 1, E]
            a = np.broadcast_to(a, (L - 1, E, E))
            x = r2.standard_gamma(a) + 1e-300
            return x / x.sum(2, keepdims=True)

        def info(t):
            h = _entropy(t).mean(1)
            return float(np.mean(1 - h / np.maximum(_entropy(pop[1:]), 1e-12)))
        trans = np.zeros((max(L - 1, 0), E, E))
        if L > 1:
            lo, hi = -4.0, 4.0                            # log10 c: small c -> sparse rows -> high information
            for _ in range(25):
                mid = (lo + hi) / 2
                if info(rows(10 ** mid, seed + 1)) > p.transition_info:
                    lo = mid
                else:
                    hi = mid
            trans = rows(10 ** lo, seed + 1)
        chance = K / E
        target = chance + p.reuse_lift * (1 - chance)
        r = cls(pop, trans, np.full(L, target), K, name)
        r.calibrate(pop, p.transition_info, np.full(L, target), seed=seed)
        return r

    def calibrate(self, pop: np.ndarray, info: float, reuse: np.ndarray, seed: int = 0, rounds: int = 8,
                  tokens: int = 1200) -> None:
        """Match the generated statistics to targets: per-layer popularity pop [L, E] (a per-layer logit bias:
        combining K transition rows distorts the marginals), the transition information `info` (gamma, the
        sharpness of the combined evidence) and the reuse [L] (copy). A few rounds of fixed-point updates on a
        sample of `tokens` rows; deterministic for a seed."""
        reuse = np.nan_to_num(np.asarray(reuse, np.float64))
        self.copy = np.clip(reuse.copy(), 0, 1)
        for i in range(rounds):
            st = stats_of(self.generate(tokens, 8, seed=seed + 1000 + i))
            self.copy = np.clip(self.copy + (reuse - np.nan_to_num(st.reuse)), 0, 1)
            self.bias += 0.6 * (np.log(pop + 1e-6) - np.log(st.popularity + 1e-6))
            got = params_of(st, self.top_k).transition_info
            if info > 0 and got > 0:
                self.gamma = float(np.clip(self.gamma * (info / got) ** 0.7, 0.05, 8.0))

    # -- generating ---------------------------------------------------------------------------------------------
    def generate(self, num_tokens: int, num_requests: int = 1, seed: int = 0) -> RoutingTrace:
        """num_tokens rows in num_requests requests of near-equal length (deterministic for a seed)."""
        assert 1 <= num_requests <= num_tokens, f"need 1 <= num_requests={num_requests} <= num_tokens={num_tokens}"
        L, E, K = self.num_layers, self.num_experts, self.top_k
        rng = np.random.default_rng(seed)
        lens = np.full(num_requests, num_tokens // num_requests)
        lens[: num_tokens % num_requests] += 1
        Tm = int(lens.max())
        R = num_requests
        out = np.zeros((R, Tm, L, K), np.int64)
        logpop = np.log(self.popularity)                                   # [L, E]
        rr = np.arange(R)[:, None]
        for t in range(Tm):                                                # Tm * L steps, vectorised over requests
            for l in range(L):
                if l == 0:
                    logit = np.broadcast_to(logpop[0] + self.bias[0], (R, E)).copy()
                else:
                    prev = out[:, t, l - 1]                                 # [R, K]
                    # naive Bayes over the K experts just selected: log pop + sum_k gamma (log T[a_k] - log pop)
                    lt = np.log(self.transition[l - 1][prev] + 1e-300)     # [R, K, E]
                    logit = logpop[l] + self.bias[l] + self.gamma * (lt - logpop[l]).sum(1)
                logit = logit + rng.gumbel(size=(R, E))
                if t > 0:
                    keep = rng.random((R, K)) < self.copy[l]
                    kept = out[:, t - 1, l]
                    logit[np.broadcast_to(rr, (R, K))[keep], kept[keep]] = np.inf
                out[:, t, l] = np.argpartition(-logit, K - 1, axis=1)[:, :K]
        rows = np.concatenate([out[r, :lens[r]] for r in range(R)])           # [T, L, K]
        w = np.full(rows.shape, 1.0 / K, np.float32)
        offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
        return RoutingTrace(rows.astype(np.int16), w, offsets, L, E, K, self.name, "synthetic", None,
                            {"seed": seed, "generator": "policies.synthetic"}, f"<{self.name} seed={seed}>")


def uniform_router(L: int, E: int, K: int) -> SyntheticRouter:
    """The baseline: uniform popularity, uninformative transitions, no reuse beyond chance."""
    return SyntheticRouter(np.full((L, E), 1 / E), np.full((max(L - 1, 0), E, E), 1 / E), np.zeros(L), K, "uniform")
