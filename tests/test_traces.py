"""Routing traces (no Ray): both on-disk formats into one RoutingTrace, npz round trips, malformed input errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from policies.traces import RoutingTrace, TraceFormatError, load, synthetic_trace

TRACES = Path("/work/shared/traces")
MIXTRAL = TRACES / "mixtral-8x7b-instruct_humaneval.jsonl"
GPT_OSS = TRACES / "gpt-oss-20b_decode.npz"
DEEPSEEK = TRACES / "deepseek-v2-lite_prefill.npz"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"{TRACES} not present")


def assert_same(a: RoutingTrace, b: RoutingTrace):
    np.testing.assert_array_equal(a.experts, b.experts)
    # weights travel as float16: compare against the float16 rounding, NaN where unknown
    np.testing.assert_array_equal(a.weights.astype(np.float16).astype(np.float32), b.weights)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert (a.num_layers, a.num_experts, a.top_k, a.model, a.phase) == \
        (b.num_layers, b.num_experts, b.top_k, b.model, b.phase)


def test_npz_round_trip_with_hidden(tmp_path):
    tr = synthetic_trace(300, 4, 8, 2, correlation=0.5, num_requests=5, unknown_fraction=0.1, hidden_dim=6)
    assert tr.hidden.shape == (300, 4, 6) and tr.hidden.dtype == np.float16
    tr.save_npz(tmp_path / "t.npz")
    back = load(tmp_path / "t.npz")
    assert_same(tr, back)
    np.testing.assert_array_equal(tr.hidden, back.hidden)
    assert back.meta["seed"] == 0
    assert (~back.known).sum() == (~tr.known).sum() > 0  # unknowns survive
    assert not list(tmp_path.glob("*.tmp*"))              # the atomic write left nothing behind


def test_npz_round_trip_without_hidden(tmp_path):
    tr = synthetic_trace(50, 3, 6, 3, num_requests=2)
    tr.hidden = None
    tr.save_npz(tmp_path / "t.npz")
    assert "hidden" not in np.load(tmp_path / "t.npz").files
    back = load(tmp_path / "t.npz")
    assert back.hidden is None
    assert_same(tr, back)


def test_requests_and_head():
    tr = synthetic_trace(200, 3, 8, 2, num_requests=7, seed=3)
    reqs = list(tr.requests())
    assert [r.index for r in reqs] == list(range(7))
    np.testing.assert_array_equal(np.concatenate([r.experts for r in reqs]), tr.experts)
    assert sum(r.num_tokens for r in reqs) == 200 and reqs[0].start == 0
    np.testing.assert_array_equal(tr.request_of_rows(), np.repeat(np.arange(7), np.diff(tr.offsets)))
    cut = int(tr.offsets[3]) + 1  # one row into request 3
    h = tr.head(cut)
    assert h.num_tokens == cut and h.num_requests == 4 and h.offsets[-1] == cut
    np.testing.assert_array_equal(h.offsets[:4], tr.offsets[:4])
    assert tr.head(10**9).num_tokens == 200


def test_synthetic_correlation():
    tr = synthetic_trace(500, 5, 12, 3, correlation=1.0, num_requests=4)
    x = tr.experts.astype(int)
    for l in range(4):  # correlation 1: layer l+1's set is a fixed function of layer l's
        m = {}
        for row_a, row_b in zip(x[:, l], x[:, l + 1]):
            for a, b in zip(row_a, row_b):
                assert m.setdefault(a, b) == b
    tr = synthetic_trace(2000, 3, 8, 2, correlation=0.0, unknown_fraction=0.2)
    assert abs((~tr.known).mean() - 0.2) < 0.03
    assert np.isnan(tr.weights[~tr.known]).all() and (tr.experts[~tr.known] == -1).all()
    w = tr.weights[tr.known]
    assert np.allclose(w.sum(-1), 1, atol=1e-5) and (np.diff(w, axis=-1) <= 0).all()


# -- the real traces ------------------------------------------------------------------------------------------

@needs_traces
def test_jsonl_mixtral():
    tr = load(MIXTRAL)
    assert (tr.num_tokens, tr.num_requests, tr.num_layers, tr.num_experts, tr.top_k) == (338, 2, 32, 8, 2)
    np.testing.assert_array_equal(tr.offsets, [0, 83, 338])
    # 10,779 lines for 338 x 32 positions: 37 unknown, whole (token, layer)s, NaN weights
    assert (~tr.known).sum() == 338 * 32 - 10779 == 37
    assert tr.experts[81, 13].tolist() == [-1, -1] and np.isnan(tr.weights[81, 13]).all()
    assert tr.experts[83 + 254, 0].tolist() == [-1, -1]  # problem 1, token 254, layer 0
    assert tr.experts[0, 0].tolist() == [6, 5]           # the first line
    assert tr.weights[0, 0, 0] == pytest.approx(0.69596, abs=1e-5)
    assert tr.meta["datasets"] == ["humaneval"] and tr.meta["requests"] == ["0", "1"]


@needs_traces
def test_npz_real_traces():
    g = load(GPT_OSS)
    assert (g.num_tokens, g.num_requests, g.num_layers, g.num_experts, g.top_k) == (61020, 201, 24, 32, 4)
    assert g.model == "openai/gpt-oss-20b" and g.phase == "decode" and g.known.all()
    assert not np.isnan(g.weights).any()
    d = load(DEEPSEEK)
    assert (d.num_tokens, d.num_requests, d.num_layers, d.num_experts, d.top_k) == (49590, 499, 26, 64, 6)
    assert np.isnan(d.weights).all() and d.hidden is None and "source" in d.meta


def test_jsonl_unknowns_and_order(tmp_path):
    lines = [  # out of order, problem "b" first, (b, token 1, layer 0) missing, token 2 entirely missing in "a"
        {"problem_id": "b", "token_idx": 1, "layer": 1, "experts": [3, 0], "gating_probs": [0.75, 0.25]},
        {"problem_id": "b", "token_idx": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.5, 0.5]},
        {"problem_id": "b", "token_idx": 0, "layer": 1, "experts": [2, 1]},
        {"problem_id": "a", "token_idx": 3, "layer": 0, "experts": [0, 1], "gating_probs": [0.6, 0.4]},
    ]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(o) for o in lines) + "\n\n")
    tr = load(p, num_experts=5, model="tiny")
    assert (tr.num_tokens, tr.num_layers, tr.num_experts, tr.top_k, tr.model) == (6, 2, 5, 2, "tiny")
    np.testing.assert_array_equal(tr.offsets, [0, 2, 6])  # b: tokens 0..1, a: tokens 0..3
    assert tr.experts[1].tolist() == [[-1, -1], [3, 0]]
    assert np.isnan(tr.weights[0, 1]).all()  # a line without gating_probs: experts known, weights not
    assert tr.known.sum() == 4 and tr.experts[2:5].max() == -1 and tr.experts[5, 0].tolist() == [0, 1]
    tr.save_npz(tmp_path / "t.npz")
    assert_same(tr, load(tmp_path / "t.npz"))


# -- malformed input ------------------------------------------------------------------------------------------

def _npz(tmp_path, **override):
    tr = synthetic_trace(20, 2, 4, 2, num_requests=2)
    arrays = dict(experts=tr.experts, weights=tr.weights.astype(np.float16), offsets=tr.offsets,
                  meta=np.array(json.dumps({"model": "m", "num_layers": 2, "num_experts": 4, "top_k": 2})))
    for k, v in override.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v(arrays[k]) if callable(v) else v
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return p


def _set(idx, value):
    def f(a):
        a = a.copy()
        a[idx] = value
        return a
    return f


@pytest.mark.parametrize("override, message", [
    (dict(offsets=None), "missing array.*offsets"),
    (dict(meta=np.array("{not json")), "meta is not a JSON"),
    (dict(meta=np.array(json.dumps({"num_layers": 2, "num_experts": 4}))), "meta lacks integer top_k"),
    (dict(meta=np.array(json.dumps({"num_layers": 3, "num_experts": 4, "top_k": 2}))), "meta says num_layers=3"),
    (dict(experts=_set((0, 0, 0), 4)), r"expert ids must lie in \[-1, 3\]"),
    (dict(experts=_set((5, 1, 1), -1)), r"\(token row 5, layer 1\) has only some"),
    (dict(experts=_set((2, 0), [1, 1])), r"\(token row 2, layer 0\) selects an expert twice"),
    (dict(offsets=np.array([0, 5, 19])), "offsets must rise strictly from 0 to the 20"),
    (dict(offsets=np.array([0, 5, 5, 20])), "offsets must rise strictly"),
    (dict(weights=lambda w: w[:, :1]), "weights has shape"),
    (dict(hidden=np.zeros((20, 3, 4), np.float16)), r"hidden must be \[T, L, H\]"),
    (dict(experts=lambda x: x.astype(np.float32)), r"experts must be an integer array \[T, L, K\], got float32"),
    (dict(experts=np.array([None, 1], dtype=object)), "unreadable array"),
    (dict(weights=lambda w: w.astype(np.int16)), "weights must be floating point"),
    (dict(meta=np.array(json.dumps({"num_layers": 2, "num_experts": 4, "top_k": 0})),
          experts=lambda x: x[..., :0], weights=lambda w: w[..., :0]), "num_layers and top_k must be >= 1"),
])
def test_npz_malformed(tmp_path, override, message):
    p = _npz(tmp_path, **override)
    with pytest.raises(TraceFormatError, match=message) as e:
        load(p)
    assert str(p) in str(e.value)


def test_not_a_trace(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(TraceFormatError, match="junk.npz: not a readable npz"):
        load(p)
    with pytest.raises(TraceFormatError, match="unknown trace format '.csv'"):
        load(tmp_path / "t.csv")


@pytest.mark.parametrize("lines, message", [
    (['{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 2]}', "{oops"], r"t.jsonl:2: not JSON"),
    (['{"problem_id": 0, "token_idx": 0, "experts": [1, 2]}'], r"t.jsonl:1: missing key\(s\) layer"),
    (['{"problem_id": 0, "token_idx": -1, "layer": 0, "experts": [1, 2]}'], "non-negative integers"),
    (['{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 2]}',
      '{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 3]}'],
     r"\(problem 0, token 0, layer 0\) appears on lines \[1, 2\]"),
    (['{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 2]}',
      '{"problem_id": 0, "token_idx": 1, "layer": 0, "experts": [1]}'], r"t.jsonl:2: 1 experts where"),
    (['{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 2], "gating_probs": [1.0]}'],
     "gating_probs must be a list of numbers as long"),
    (['{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [2, 2]}'], "selects an expert twice"),
    (['[1, 2]'], "expected a JSON object"),
    ([""], "no records"),
    (['{"problem_id": [1], "token_idx": 0, "layer": 0, "experts": [1, 2]}'], "problem_id must be a string or"),
    (['{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 2], "gating_probs": ["a", "b"]}'],
     "gating_probs must be a list of numbers"),
    (['{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 40000]}'], r"integers in \[0, 32768\)"),
    (['{"problem_id": 0, "token_idx": 0, "layer": true, "experts": [1, 2]}'], "non-negative integers, got 0, True"),
    (['{"problem_id": 0, "token_idx": 1000000000, "layer": 0, "experts": [1, 2]}'],
     "token_idx values leave most rows empty: 1000000001 token rows for 1 records"),
])
def test_jsonl_malformed(tmp_path, lines, message):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError, match=message):
        load(p)


def test_jsonl_declared_geometry_too_small(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"problem_id": 0, "token_idx": 0, "layer": 2, "experts": [5, 1]}\n')
    with pytest.raises(TraceFormatError, match="num_experts=4 but expert 5 occurs"):
        load(p, num_experts=4)
    with pytest.raises(TraceFormatError, match="num_layers=2 but layer 2 occurs"):
        load(p, num_layers=2)
