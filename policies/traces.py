"""Recorded MoE routing: one in-memory form (`RoutingTrace`) for both on-disk formats of /work/shared/traces.

Formats (`load(path)` picks by suffix):
  .npz    `experts` int16 [T, L, K] (-1 unknown), `weights` float16 [T, L, K] (NaN unknown), `offsets` int64
          [R + 1] (request r is rows offsets[r]:offsets[r+1], in token order), `meta` a JSON string (model,
          num_layers, num_experts, top_k, phase, ...). This project adds an optional `hidden` float16 [T, L, H]:
          the hidden state entering each layer's router, for predictors that read it (`save_npz` writes it).
  .jsonl  one object per (problem, token, layer): {"problem_id", "token_idx", "layer", "experts", "gating_probs"}
          (Mixtral HumanEval). A (token, layer) without a line is unknown, never "no expert"; a problem's tokens run
          0..max(token_idx); problems become requests in order of first appearance.

Unknown routing is a whole (token, layer): all K slots -1 (and NaN weights). A row with only some slots unknown
is rejected, since every consumer (recall@k with k = top_k, cache replay) reads a (token, layer) as one unit.
Malformed files raise `TraceFormatError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np


class TraceFormatError(ValueError):
    """A trace file (or arrays handed to RoutingTrace) that does not follow the format; the message names both."""


@dataclass(frozen=True)
class TraceRequest:
    """One request's rows (views into the trace, no copies)."""
    index: int
    start: int                 # first row in the trace
    experts: np.ndarray        # int16 [n, L, K], -1 unknown
    weights: np.ndarray        # float32 [n, L, K], NaN unknown
    hidden: np.ndarray | None  # float16 [n, L, H] or None

    @property
    def num_tokens(self) -> int:
        return len(self.experts)


@dataclass
class RoutingTrace:
    experts: np.ndarray          # int16 [T, L, K]: selected expert ids, -1 where unknown
    weights: np.ndarray          # float32 [T, L, K]: their router weights, NaN where not recorded
    offsets: np.ndarray          # int64 [R + 1]: request r is rows offsets[r]:offsets[r+1]
    num_layers: int
    num_experts: int
    top_k: int
    model: str = ""
    phase: str = ""
    hidden: np.ndarray | None = None  # float16 [T, L, H] or None
    meta: dict = field(default_factory=dict)  # everything else the file's meta held (source, prompts, ...)
    origin: str = "<memory>"     # where it came from, for error messages

    def __post_init__(self):
        self.experts = np.asarray(self.experts)
        self.weights = np.asarray(self.weights, dtype=np.float32)
        self.offsets = np.asarray(self.offsets)
        _validate(self, self.origin)
        self.experts = self.experts.astype(np.int16, copy=False)
        self.offsets = self.offsets.astype(np.int64, copy=False)
        if self.hidden is not None:
            self.hidden = np.asarray(self.hidden).astype(np.float16, copy=False)

    # -- shape -----------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_requests(self) -> int:
        return len(self.offsets) - 1

    @property
    def known(self) -> np.ndarray:
        """bool [T, L]: the (token, layer) routing is recorded (all K slots; partial rows are rejected at load)."""
        return self.experts[:, :, 0] >= 0

    def request_of_rows(self) -> np.ndarray:
        """int64 [T]: the request index of every row."""
        return np.repeat(np.arange(self.num_requests), np.diff(self.offsets))

    def requests(self) -> Iterator[TraceRequest]:
        """The requests in trace order, as views."""
        for r in range(self.num_requests):
            a, b = int(self.offsets[r]), int(self.offsets[r + 1])
            yield TraceRequest(r, a, self.experts[a:b], self.weights[a:b],
                               None if self.hidden is None else self.hidden[a:b])

    def head(self, num_tokens: int) -> "RoutingTrace":
        """The first `num_tokens` rows (a deterministic prefix; the last request may be cut short)."""
        n = min(int(num_tokens), self.num_tokens)
        offs = np.minimum(self.offsets, n)
        offs = offs[np.r_[True, offs[1:] > offs[:-1]]]  # drop requests that start at or after the cut
        return RoutingTrace(self.experts[:n], self.weights[:n], offs, self.num_layers, self.num_experts,
                            self.top_k, self.model, self.phase, None if self.hidden is None else self.hidden[:n],
                            dict(self.meta), f"{self.origin}[:{n}]")

    # -- files -----------------------------------------------------------------------------------------------
    def save_npz(self, path: str | os.PathLike) -> None:
        """Write the npz format (plus `hidden` when present), compressed, atomically (temp file + rename)."""
        path = Path(path)
        meta = dict(self.meta, model=self.model, num_layers=self.num_layers, num_experts=self.num_experts,
                    top_k=self.top_k, phase=self.phase)
        arrays = dict(experts=self.experts.astype(np.int16), weights=self.weights.astype(np.float16),
                      offsets=self.offsets.astype(np.int64), meta=np.array(json.dumps(meta)))
        if self.hidden is not None:
            arrays["hidden"] = self.hidden.astype(np.float16)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _fail(origin: str, what: str):
    raise TraceFormatError(f"{origin}: {what}")


_MAX_EXPERTS = 1 << 15   # expert ids are stored as int16


def _is_int(v) -> bool:   # JSON true / false are not integers here
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(tr: RoutingTrace, origin: str) -> None:
    x, w, o = tr.experts, tr.weights, tr.offsets
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.integer):
        _fail(origin, f"experts must be an integer array [T, L, K], got {x.dtype} {x.shape}")
    T, L, K = x.shape
    if (L, K) != (tr.num_layers, tr.top_k):
        _fail(origin, f"experts has shape {x.shape} but meta says num_layers={tr.num_layers}, top_k={tr.top_k}")
    if L < 1 or K < 1:
        _fail(origin, f"num_layers and top_k must be >= 1, got {L} and {K}")
    if tr.num_experts < K:
        _fail(origin, f"num_experts={tr.num_experts} is smaller than top_k={K}")
    if w.shape != x.shape:
        _fail(origin, f"weights has shape {w.shape}, experts {x.shape}: they must match")
    if x.size and (x.min() < -1 or x.max() >= tr.num_experts):
        _fail(origin, f"expert ids must lie in [-1, {tr.num_experts - 1}], found [{x.min()}, {x.max()}]")
    unk = x < 0
    partial = unk.any(-1) & ~unk.all(-1)
    if partial.any():
        t, l = np.argwhere(partial)[0]
        _fail(origin, f"(token row {t}, layer {l}) has only some of its {K} experts unknown: {x[t, l].tolist()}"
                      f" ({int(partial.sum())} such rows); unknown must be the whole (token, layer)")
    if K > 1:
        s = np.sort(x, axis=-1)
        dup = (s[..., 1:] == s[..., :-1]).any(-1) & ~unk[..., 0]
        if dup.any():
            t, l = np.argwhere(dup)[0]
            _fail(origin, f"(token row {t}, layer {l}) selects an expert twice: {x[t, l].tolist()}")
    if o.ndim != 1 or len(o) < 1 or not np.issubdtype(o.dtype, np.integer):
        _fail(origin, f"offsets must be a 1-D integer array [R + 1], got {o.dtype} {o.shape}")
    if o[0] != 0 or o[-1] != T or (np.diff(o) <= 0).any():
        _fail(origin, f"offsets must rise strictly from 0 to the {T} token rows, got "
                      f"{o[:4].tolist()}...{o[-2:].tolist()} (len {len(o)})")
    if tr.hidden is not None:
        h = np.asarray(tr.hidden)
        if h.ndim != 3 or h.shape[:2] != (T, L):
            _fail(origin, f"hidden must be [T, L, H] = [{T}, {L}, H], got {h.shape}")


# -- loading -------------------------------------------------------------------------------------------------

def load(path: str | os.PathLike, **kw) -> RoutingTrace:
    """Read a trace: `.npz` (`load_npz`) or `.jsonl` (`load_jsonl`, which takes keyword arguments)."""
    p = Path(path)
    if p.suffix == ".npz":
        return load_npz(p)
    if p.suffix == ".jsonl":
        return load_jsonl(p, **kw)
    _fail(str(p), f"unknown trace format {p.suffix!r}: expected .npz or .jsonl")


def load_npz(path: str | os.PathLike) -> RoutingTrace:
    origin = str(path)
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # a zip that is not one, a truncated file
        _fail(origin, f"not a readable npz file ({type(e).__name__}: {e})")
    with z:
        missing = [k for k in ("experts", "weights", "offsets", "meta") if k not in z.files]
        if missing:
            _fail(origin, f"missing array(s) {', '.join(missing)} (has {', '.join(z.files) or 'none'})")
        try:
            meta = json.loads(str(z["meta"]))
        except (json.JSONDecodeError, ValueError) as e:
            _fail(origin, f"meta is not a JSON string: {e}")
        if not isinstance(meta, dict):
            _fail(origin, f"meta must be a JSON object, got {type(meta).__name__}")
        need = [k for k in ("num_layers", "num_experts", "top_k") if not isinstance(meta.get(k), int)]
        if need:
            _fail(origin, f"meta lacks integer {', '.join(need)}: {sorted(meta)}")
        try:
            arrays = {k: z[k] for k in ("experts", "weights", "offsets", "hidden") if k in z.files}
        except Exception as e:  # object (pickled) arrays that allow_pickle=False refuses, a corrupt member
            _fail(origin, f"unreadable array ({type(e).__name__}: {e})")
    w = arrays["weights"]
    if not np.issubdtype(w.dtype, np.floating):
        _fail(origin, f"weights must be floating point, got {w.dtype}")
    rest = {k: v for k, v in meta.items() if k not in ("model", "num_layers", "num_experts", "top_k", "phase")}
    return RoutingTrace(arrays["experts"], w, arrays["offsets"], meta["num_layers"], meta["num_experts"],
                        meta["top_k"], str(meta.get("model", "")), str(meta.get("phase", "")), arrays.get("hidden"),
                        rest, origin)


_JSONL_KEYS = ("problem_id", "token_idx", "layer", "experts")


def load_jsonl(path: str | os.PathLike, *, num_experts: int | None = None, num_layers: int | None = None,
               model: str | None = None, phase: str = "") -> RoutingTrace:
    """The per-(problem, token, layer) JSONL. num_experts/num_layers default to the largest id seen + 1 (the
    format does not record them: pass them when the tail experts or layers might never appear); model defaults
    to the file's stem. `gating_probs` (optional per line) become the weights."""
    origin = str(path)
    recs = []  # (problem, token, layer, experts, probs, line number)
    datasets = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{origin}:{n}"
            try:
                o = json.loads(line)
            except json.JSONDecodeError as e:
                _fail(where, f"not JSON: {e}")
            if not isinstance(o, dict):
                _fail(where, f"expected a JSON object, got {type(o).__name__}")
            missing = [k for k in _JSONL_KEYS if k not in o]
            if missing:
                _fail(where, f"missing key(s) {', '.join(missing)}")
            t, l, ex, pid = o["token_idx"], o["layer"], o["experts"], o["problem_id"]
            if not (_is_int(t) and _is_int(l) and t >= 0 and l >= 0):
                _fail(where, f"token_idx and layer must be non-negative integers, got {t!r}, {l!r}")
            if not (isinstance(ex, list) and ex and all(_is_int(e) and 0 <= e < _MAX_EXPERTS for e in ex)):
                _fail(where, f"experts must be a non-empty list of integers in [0, {_MAX_EXPERTS}), got {ex!r}")
            if not (isinstance(pid, str) or _is_int(pid)):
                _fail(where, f"problem_id must be a string or an integer, got {pid!r}")
            pr = o.get("gating_probs")
            if pr is not None and (not isinstance(pr, list) or len(pr) != len(ex) or
                                   not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pr)):
                _fail(where, f"gating_probs must be a list of numbers as long as experts ({len(ex)}), got {pr!r}")
            recs.append((o["problem_id"], t, l, ex, pr, n))
            if "dataset" in o:
                datasets.add(str(o["dataset"]))
    if not recs:
        _fail(origin, "no records")
    K = len(recs[0][3])
    for p, t, l, ex, pr, n in recs:
        if len(ex) != K:
            _fail(f"{origin}:{n}", f"{len(ex)} experts where earlier lines have {K} (top_k must be constant)")
    problems: dict = {}
    for r in recs:
        problems.setdefault(r[0], 0)
        problems[r[0]] = max(problems[r[0]], r[1] + 1)
    base = dict(zip(problems, np.cumsum([0] + list(problems.values()))[:-1].tolist()))
    offsets = np.cumsum([0] + list(problems.values())).astype(np.int64)
    L = max(r[2] for r in recs) + 1
    E = max(max(r[3]) for r in recs) + 1
    if num_layers is not None:
        if num_layers < L:
            _fail(origin, f"num_layers={num_layers} but layer {L - 1} occurs")
        L = num_layers
    if num_experts is not None:
        if num_experts < E:
            _fail(origin, f"num_experts={num_experts} but expert {E - 1} occurs")
        E = num_experts
    T = int(offsets[-1])
    if T > 16 * len(recs):   # the arrays are dense in rows: a stray token_idx must not allocate gigabytes
        worst = max(problems, key=problems.get)
        _fail(origin, f"token_idx values leave most rows empty: {T} token rows for {len(recs)} records (problem "
                      f"{worst!r} reaches token {problems[worst] - 1})")
    rows = np.array([base[r[0]] + r[1] for r in recs])
    layers = np.array([r[2] for r in recs])
    flat = rows * L + layers
    uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
    if (counts > 1).any():
        i = np.nonzero(counts > 1)[0][0]
        dup = [r[5] for r in recs if (base[r[0]] + r[1]) * L + r[2] == uniq[i]]
        p, t, l = recs[first[i]][:3]
        _fail(origin, f"(problem {p!r}, token {t}, layer {l}) appears on lines {dup}")
    experts = np.full((T, L, K), -1, np.int16)
    weights = np.full((T, L, K), np.nan, np.float32)
    experts[rows, layers] = np.array([r[3] for r in recs], np.int16)
    weights[rows, layers] = np.array([r[4] if r[4] is not None else [np.nan] * K for r in recs], np.float32)
    meta = {"source": origin, "requests": [str(p) for p in problems]}
    if datasets:
        meta["datasets"] = sorted(datasets)
    return RoutingTrace(experts, weights, offsets, L, E, K, model if model is not None else Path(path).stem,
                        phase, None, meta, origin)


# -- synthetic -----------------------------------------------------------------------------------------------

class TraceSlots:
    """Continuous batching over a trace's requests, as a replay sees it: B slots; an empty slot admits the next
    request, a request leaves its slot after its last row. Shared by jobs.benchmark and the simulator, so both
    replay the same token order."""

    def __init__(self, trace: RoutingTrace, batch: int):
        self.offsets = trace.offsets
        self.num_requests = trace.num_requests
        self.req = np.full(batch, -1, np.int64)   # [B] request in each slot, -1 empty
        self.tok = np.zeros(batch, np.int64)      # [B] its next token position
        self.next = 0                             # next request of the trace to admit

    def admit(self, room: int | None = None) -> np.ndarray:
        """Fill empty slots (at most `room` more live requests); returns the live slots, int64 [b]."""
        for s in np.flatnonzero(self.req < 0):
            if self.next >= self.num_requests or (room is not None and room <= 0):
                break
            self.req[s], self.tok[s] = self.next, 0
            self.next += 1
            room = None if room is None else room - 1
        return np.flatnonzero(self.req >= 0)

    def rows(self, live: np.ndarray) -> np.ndarray:
        """int64 [b]: the trace row each live slot decodes now."""
        return self.offsets[self.req[live]] + self.tok[live]

    def advance(self, live: np.ndarray) -> list[int]:
        """One token done for every live slot; frees the slots whose request ended and returns those requests."""
        self.tok[live] += 1
        r = self.req[live]
        done = live[self.tok[live] >= self.offsets[r + 1] - self.offsets[r]]
        ended = self.req[done].tolist()
        self.req[done] = -1
        return ended


def synthetic_trace(num_tokens: int = 2000, num_layers: int = 8, num_experts: int = 16, top_k: int = 2, *,
                    correlation: float = 1.0, num_requests: int = 10, unknown_fraction: float = 0.0,
                    hidden_dim: int | None = None, seed: int = 0) -> RoutingTrace:
    """A trace whose layer-to-layer dependence is set by `correlation`.

    Each token's layer 0 is a uniform random top-k set. With probability `correlation` (independently per
    (token, layer)) layer l+1's set is a fixed bijection `perm[l]` applied to layer l's set, else a fresh uniform
    set; so correlation=1 is perfectly predictable from the previous layer (transition recall -> 1) and 0 is
    independent (recall of any history predictor -> k/E). `unknown_fraction` of (token, layer) become unknown.
    `hidden_dim` adds hidden states: a fixed random projection of the multi-hot of the *next* layer's experts plus
    noise, so a hidden-state predictor has something to learn. Weights are random, descending, summing to 1.
    """
    assert 0 <= correlation <= 1, f"correlation must be in [0, 1], got {correlation}"
    assert top_k <= num_experts, f"top_k={top_k} > num_experts={num_experts}"
    assert 1 <= num_requests <= num_tokens, f"need 1 <= num_requests={num_requests} <= num_tokens={num_tokens}"
    rng = np.random.default_rng(seed)
    T, L, E, K = num_tokens, num_layers, num_experts, top_k
    fresh = np.argsort(rng.random((T, L, E)), axis=-1)[..., :K]  # uniform random K-subsets [T, L, K]
    perm = np.stack([rng.permutation(E) for _ in range(L)])    # [L, E]: the bijection layer l -> l+1
    follow = rng.random((T, L)) < correlation
    x = fresh.copy()
    for l in range(1, L):  # L steps, vectorised over tokens
        x[:, l] = np.where(follow[:, l, None], perm[l - 1][x[:, l - 1]], fresh[:, l])
    w = np.sort(rng.dirichlet(np.ones(K), size=(T, L)), axis=-1)[..., ::-1].astype(np.float32)
    hidden = None
    if hidden_dim:
        proj = rng.standard_normal((E, hidden_dim)).astype(np.float32)
        nxt = np.concatenate([x[:, 1:], x[:, :1]], axis=1)  # [T, L, K] the following layer's experts
        multi = np.zeros((T, L, E), np.float32)
        np.put_along_axis(multi, nxt, 1.0, axis=-1)
        hidden = (multi @ proj + 0.1 * rng.standard_normal((T, L, hidden_dim))).astype(np.float16)
    if unknown_fraction > 0:
        unk = rng.random((T, L)) < unknown_fraction
        x[unk] = -1
        w[unk] = np.nan
    cuts = np.sort(rng.choice(np.arange(1, T), size=num_requests - 1, replace=False)) if num_requests > 1 else []
    offsets = np.r_[0, cuts, T].astype(np.int64)
    return RoutingTrace(x.astype(np.int16), w, offsets, L, E, K, "synthetic", f"correlation={correlation}",
                        hidden, {"seed": seed})
