"""Every predictor by name: `make_predictor(name, ...)` for the coordinator, the simulator and the benchmarks.

Names (PREDICTOR_NAMES) and what each needs:
  on_demand             nothing (predicts nothing)
  oracle                trace= (a RoutingTrace; request ids must be its request indices): upper bounds only
  topk_frequency        nothing (decayed per-layer counts; seed strategy D)
  cross_layer           nothing (P(expert at the next layer | experts at this one))
  previous_token        nothing (the request's previous token's experts at that layer)
  multi_lookahead       nothing (seed strategy C, fixed: policies/seed_strategies.py)
  intelligent_adaptive  nothing (seed strategy E, fixed: policies/seed_strategies.py)
  next_gate             router_weights= (next-gate speculation, training-free; needs hidden states in events)
  learned               store_dir= holding a trained predictor (policies/learned.py; `python -m
                        jobs.train_predictor`), needs hidden states in events
  pre_gated             router_weights= a checkpoint's dense tensors with `pre_gate` weights (policies/learned.py)
  request_level         nothing (kNN over past requests; call begin(request, embedding) before the first event to
                        prefetch for the whole request; policies/request_level.py)
  ensemble              members= (names) or the default: every practical predictor that applies given what was
                        passed, but request_level and intelligent_adaptive (policies/ensemble.py)

router_weights: either {MoE layer 0..L-1: float [E, H]} router weights, or a (gates, norms) pair as
speculation.gates_from_dense returns, or a checkpoint's dense tensors {name: tensor} (cluster.model.load_checkpoint's
second value; also where `pre_gate` tensors are found). Extra keyword arguments go to the predictor's constructor
(for the ensemble: `members=`, and `member_kw={name: {...}}`).
"""
from __future__ import annotations

from typing import Mapping

from .predictors import CrossLayerTransition, OnDemand, Oracle, Predictor, PreviousToken, TopKFrequency

PREDICTOR_NAMES = ("on_demand", "oracle", "topk_frequency", "cross_layer", "previous_token", "multi_lookahead",
                   "intelligent_adaptive", "next_gate", "learned", "pre_gated", "request_level", "ensemble")

# history-only predictors: apply to any trace (the shared real traces carry routing only)
HISTORY_NAMES = ("topk_frequency", "cross_layer", "previous_token", "multi_lookahead", "intelligent_adaptive",
                 "request_level")


def split_router_weights(router_weights) -> tuple[dict, dict | None, dict | None]:
    """router_weights (any accepted form) -> (gates {l: [E, H]}, norms {l: [H]} or None, dense tensors or None)."""
    from .speculation import gates_from_dense
    if router_weights is None:
        return {}, None, None
    if isinstance(router_weights, tuple):
        gates, norms = router_weights
        return dict(gates), (dict(norms) if norms else None), None
    if isinstance(router_weights, Mapping) and router_weights and all(isinstance(k, str) for k in router_weights):
        gates, norms = gates_from_dense(router_weights)
        return gates, (norms or None), dict(router_weights)
    if isinstance(router_weights, Mapping):
        return dict(router_weights), None, None
    raise ValueError(f"router_weights must be {{layer: [E, H]}}, (gates, norms) or a checkpoint's dense tensors, "
                     f"got {type(router_weights).__name__}")


def available_names(*, trace=None, store_dir=None, router_weights=None, practical: bool = True) -> tuple[str, ...]:
    """The names make_predictor can build given what is available (practical: without oracle and on_demand)."""
    from .learned import has_pre_gates, has_trained_predictor
    out = [] if practical else ["on_demand"] + (["oracle"] if trace is not None else [])
    out += list(HISTORY_NAMES)
    gates, _, dense = split_router_weights(router_weights)
    if gates:
        out.append("next_gate")
    if store_dir is not None and has_trained_predictor(store_dir):
        out.append("learned")
    if dense is not None and has_pre_gates(dense):
        out.append("pre_gated")
    return tuple(out)


def make_predictor(name: str, *, num_layers: int, num_experts: int, top_k: int, trace=None, store_dir=None,
                   router_weights=None, **kw) -> Predictor:
    """A fresh predictor `name` (see the module docstring for what each one needs)."""
    if name not in PREDICTOR_NAMES:
        raise ValueError(f"unknown predictor {name!r}; valid names: {', '.join(PREDICTOR_NAMES)}")
    geo = (num_layers, num_experts, top_k)
    if name == "on_demand":
        return OnDemand(*geo, **kw)
    if name == "oracle":
        if trace is None:
            raise ValueError("predictor 'oracle' needs trace= (a RoutingTrace to read the future from)")
        got = (trace.num_layers, trace.num_experts, trace.top_k)
        if got != geo:
            raise ValueError(f"oracle: trace has L={got[0]} E={got[1]} K={got[2]}, asked for L={num_layers} "
                             f"E={num_experts} K={top_k}")
        return Oracle(trace, **kw)
    if name == "topk_frequency":  # the seed's decay (§5: 0.999 per token) unless told otherwise
        from .seed_strategies import SEED_TOPK_HALF_LIFE
        return TopKFrequency(*geo, **{"half_life": SEED_TOPK_HALF_LIFE, **kw})
    if name == "cross_layer":
        return CrossLayerTransition(*geo, **kw)
    if name == "previous_token":
        return PreviousToken(*geo, **kw)
    if name == "multi_lookahead":
        from .seed_strategies import MultiLookAhead
        return MultiLookAhead(*geo, **kw)
    if name == "intelligent_adaptive":
        from .seed_strategies import IntelligentAdaptive
        return IntelligentAdaptive(*geo, **kw)
    if name == "request_level":
        from .request_level import RequestLevel
        return RequestLevel(*geo, **kw)
    if name == "next_gate":
        from .speculation import NextGateSpeculation
        gates, norms, _ = split_router_weights(router_weights)
        if not gates:
            raise ValueError("predictor 'next_gate' needs router_weights= (the model's router weights)")
        p = NextGateSpeculation(gates, top_k, **kw)
        _check_geo(name, p, geo)
        return p
    if name == "learned":
        from .learned import LearnedPredictor
        if store_dir is None:
            raise ValueError("predictor 'learned' needs store_dir= holding a trained predictor "
                             "(python -m jobs.train_predictor --out STORE_DIR)")
        p = LearnedPredictor.load(store_dir, **kw)
        _check_geo(name, p, geo)
        return p
    if name == "pre_gated":
        from .learned import PreGated
        _, _, dense = split_router_weights(router_weights)
        if dense is None:
            raise ValueError("predictor 'pre_gated' needs router_weights= a checkpoint's dense tensors holding "
                             "model.layers.N.(block_sparse_moe|mlp).pre_gate.weight")
        p = PreGated.from_dense(dense, top_k, **kw)
        _check_geo(name, p, geo)
        return p
    assert name == "ensemble"
    from .ensemble import Ensemble
    members = kw.pop("members", None)
    member_kw = kw.pop("member_kw", {})
    if members is None:
        # not request_level (the whole-request warm-up: begin()), nor intelligent_adaptive: it is an ensemble of
        # the frequency, transition and pattern signals the other members give, and ran half of the ensemble's time
        # for no recall (docs/benchmarks.md, session 19)
        members = [n for n in available_names(trace=trace, store_dir=store_dir, router_weights=router_weights)
                   if n not in ("request_level", "intelligent_adaptive")]
        if "pre_gated" in members and "learned" in members:  # Pre-gated MoE: a trained pre-gate replaces the aux
            members.remove("learned")
    bad = [m for m in members if m == "ensemble" or m not in PREDICTOR_NAMES]
    if bad:
        raise ValueError(f"ensemble members {bad} are not valid; choose among {PREDICTOR_NAMES[:-1]}")
    built = {m: make_predictor(m, num_layers=num_layers, num_experts=num_experts, top_k=top_k, trace=trace,
                               store_dir=store_dir, router_weights=router_weights, **member_kw.get(m, {}))
             for m in members}
    return Ensemble(built, *geo, **kw)


def _check_geo(name: str, p: Predictor, geo: tuple[int, int, int]) -> None:
    if (p.L, p.E, p.K) != geo:
        raise ValueError(f"{name}: the weights are for L={p.L} E={p.E} K={p.K}, asked for L={geo[0]} E={geo[1]} "
                         f"K={geo[2]}")
