"""Request-level expert prediction (SPEC-045 §4.3; the idea of MoE-Infinity's and FineMoE's request maps): similar
requests use similar experts, so the experts a new request will need, at every layer for its whole life, can be
read from the maps of the past requests that look most like it, before its first decode step.

Interface, in addition to observe / predict / end:
  begin(request, signature=None)   a new request. `signature` is a float vector describing its prompt: the mean of
                                   its input embeddings [H] (what the runtime has before any layer ran), or any fixed
                                   length vector (e.g. its first layers' routing histogram, flattened). Without one,
                                   the signature is the request's own routing histogram [L * E] over its first
                                   `signature_tokens` tokens (the prompt's prefill), formed when they were observed.
                                   One predictor uses one kind: the first signature fixes its length.
  request_map(request)             float [L, E]: P(expert selected at that layer, per token) for the whole request,
                                   what a prefetcher warms before the first decode step (None before a signature).
  neighbours(request)              [(past request id, cosine similarity)], most similar first.
predict(request, horizon) gives the request map's rows of the target layers, blended with the request's own counts
as they accumulate (own weight n / (n + prior_tokens) after n tokens).

Memory: a ring of at most `capacity` past requests: unit signatures [N, S] float32 and maps [N, L, E] float32 (the
oldest replaced first); per live request its counts [L, E] and signature. kNN is one matrix-vector product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import numpy as np

from .predictors import Candidates, Predictor, _from_dense, _Req


@dataclass
class _RLReq(_Req):
    counts: np.ndarray | None = None   # float32 [L, E]: this request's selections so far
    ntok: np.ndarray | None = None     # float32 [L]: tokens observed per layer
    sig: np.ndarray | None = None      # float32 [S] unit signature, None until known
    given: bool = False                # the signature came from begin()
    map: np.ndarray | None = None      # float32 [L, E]: the neighbours' map (cached when the signature is set)
    nbrs: list | None = None


class RequestLevel(Predictor):
    """kNN over past requests' expert maps (module docstring). neighbours: k of the kNN; capacity: past requests
    kept; signature_tokens: tokens of routing that form a routing signature; prior_tokens: how many tokens of the
    request's own evidence weigh as much as its neighbours' map; temperature: softmax over cosine similarities."""
    name = "request_level"

    def __init__(self, num_layers, num_experts, top_k, *, neighbours: int = 8, capacity: int = 1024,
                 signature_tokens: int = 16, prior_tokens: float = 32.0, temperature: float = 0.05,
                 max_requests: int = 4096):
        super().__init__(num_layers, num_experts, top_k, max_requests=max_requests)
        assert neighbours >= 1 and capacity >= 1 and signature_tokens >= 1 and temperature > 0, \
            f"bad neighbours={neighbours} capacity={capacity} signature_tokens={signature_tokens} tau={temperature}"
        self.k_nn, self.cap, self.sig_tokens = int(neighbours), int(capacity), int(signature_tokens)
        self.prior, self.tau = float(prior_tokens), float(temperature)
        self.S: int | None = None
        self.keys = np.zeros((0, 0), np.float32)                      # [N, S] unit signatures
        self.maps = np.zeros((self.cap, num_layers, num_experts), np.float32)   # [N, L, E]
        self.ids: list = [None] * self.cap
        self.filled = 0
        self.next = 0                                                  # ring write position

    # -- the extra interface -----------------------------------------------------------------------------------
    def begin(self, request: Hashable, signature=None) -> None:
        st = self._state(request)
        if signature is not None:
            st.sig = self._unit(np.asarray(signature, np.float32).reshape(-1), request)
            st.given = True
            self._lookup(st)

    def request_map(self, request: Hashable) -> np.ndarray | None:
        st = self._reqs.get(request)
        return None if st is None or st.sig is None else st.map

    def neighbours(self, request: Hashable) -> list:
        st = self._reqs.get(request)
        return [] if st is None or st.nbrs is None else list(st.nbrs)

    def end(self, request: Hashable) -> None:
        st = self._reqs.get(request)
        if st is not None and st.sig is not None and st.ntok.max() > 0:  # remember it
            i = self.next
            self.keys[i] = st.sig
            self.maps[i] = st.counts / np.maximum(st.ntok, 1.0)[:, None]
            self.ids[i] = request
            self.next = (i + 1) % self.cap
            self.filled = min(self.filled + 1, self.cap)
        super().end(request)

    # -- internals ----------------------------------------------------------------------------------------------
    def _state(self, request) -> _RLReq:
        st = self._reqs.get(request)
        if st is None:
            st = self._reqs[request] = self._new_request()
            while len(self._reqs) > self.max_requests:
                self._reqs.popitem(last=False)
        return st

    def _unit(self, v: np.ndarray, request) -> np.ndarray:
        if self.S is None:
            self.S = len(v)
            self.keys = np.zeros((self.cap, self.S), np.float32)
        if len(v) != self.S:
            raise ValueError(f"request {request!r}: signature has {len(v)} values, this predictor's past requests "
                             f"have {self.S} (one kind of signature per predictor)")
        n = float(np.linalg.norm(v))
        return v / n if n > 0 else v

    def _lookup(self, st: _RLReq) -> None:
        n = self.filled
        if n == 0:
            st.map, st.nbrs = None, []
            return
        sims = self.keys[:n] @ st.sig                                  # [n] cosine similarities
        k = min(self.k_nn, n)
        idx = np.argpartition(-sims, k - 1)[:k]
        idx = idx[np.lexsort((idx, -sims[idx]))]                       # most similar first, ties: older slot
        w = np.exp((sims[idx] - sims[idx].max()) / self.tau)
        w /= w.sum()
        st.map = np.einsum("n,nle->le", w.astype(np.float32), self.maps[idx])
        st.nbrs = [(self.ids[i], float(sims[i])) for i in idx]

    def _new_request(self):
        return _RLReq(counts=np.zeros((self.L, self.E), np.float32), ntok=np.zeros(self.L, np.float32))

    def _observe(self, st: _RLReq, ev, experts, adjacent):
        st.counts[ev.layer, experts] += 1.0
        st.ntok[ev.layer] += 1.0
        if st.sig is None and ev.layer == self.L - 1 and st.ntok[-1] >= self.sig_tokens:
            st.sig = self._unit((st.counts / np.maximum(st.ntok, 1.0)[:, None]).reshape(-1), ev.request)
            self._lookup(st)

    def _predict(self, request, st, tokens, layers) -> Candidates:
        if getattr(st, "counts", None) is None:
            return Candidates.empty()
        own = st.counts[layers] / np.maximum(st.ntok[layers], 1.0)[:, None]         # [D, E]
        if st.map is None:
            P = own
        else:
            a = (st.ntok[layers] / (st.ntok[layers] + self.prior))[:, None]
            P = a * own + (1.0 - a) * st.map[layers]
        return _from_dense(np.minimum(P, 1.0), layers)

    def _arrays(self):
        return [self.keys, self.maps]

    def _req_nbytes(self, st: _RLReq) -> int:
        return sum(a.nbytes for a in (st.counts, st.ntok, st.sig, st.map) if a is not None)
