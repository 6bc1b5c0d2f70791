"""Learned (PreScope-style) and pre-gated predictors (policies/learned.py, jobs/train_predictor.py), no Ray: on a
synthetic trace whose hidden states encode the next layer's experts (history carries nothing: correlation 0), the
trained MLPs beat the frequency baseline on held-out requests and come close to the exact linear decoder computed
here; online fine-tuning recovers on a shifted distribution; save/load is bit-exact; memory is bounded; pre_gate
tensors of a checkpoint are used as they are."""
import json

import numpy as np
import pytest

from jobs.train_predictor import main as train_main
from jobs.train_predictor import split_requests, train
from policies.learned import PREDICTOR_FILE, PREDICTOR_META, LearnedPredictor, PreGated
from policies.predictors import CrossLayerTransition, RoutingEvent, TopKFrequency
from policies.registry import make_predictor
from policies.replay import recall_at_k
from policies.reuse import PRIOR_FILE, load_routing_prior, transition_counts
from policies.traces import RoutingTrace, synthetic_trace

L, E, K, H = 4, 8, 2, 16


@pytest.fixture(scope="module")
def data():
    import torch
    torch.set_num_threads(1)
    tr = synthetic_trace(3000, L, E, K, correlation=0.0, num_requests=30, hidden_dim=H, seed=1)
    fit, held = split_requests(tr, 0.2, seed=0)
    w = train(fit, horizon=2, rank=H, hidden_units=32, epochs=4, batch=256, lr=1e-2, seed=0)
    return tr, fit, held, w


def decoder_recall(trace: RoutingTrace) -> float:
    """The exact linear decoder of the synthetic hidden states (least squares from hidden to the next layer's
    multi-hot, fitted on the very trace it is scored on): what an ideal learner reaches at distance 1."""
    x = trace.hidden[:, :L - 1].reshape(-1, H).astype(np.float64)
    y = np.zeros((len(x), E))
    np.put_along_axis(y, trace.experts[:, 1:].reshape(-1, K).astype(np.int64), 1.0, axis=-1)
    coef, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)
    top = np.argsort(-(np.c_[x, np.ones(len(x))] @ coef), -1)[:, :K]
    return float(np.take_along_axis(y, top, -1).sum() / (len(y) * K))


def test_beats_frequency_and_nears_the_decoder_on_held_out_requests(data):
    tr, fit, held, w = data
    assert not set(map(bytes, held.hidden[:, 0])) & set(map(bytes, fit.hidden[:, 0]))  # disjoint requests
    learned = recall_at_k(LearnedPredictor(w, K, finetune=False), held, 1).overall
    freq = recall_at_k(TopKFrequency(L, E, K), held, 1).overall
    ref = decoder_recall(held)
    assert ref > 0.9, ref
    assert learned > freq + 0.5, (learned, freq)
    assert learned >= 0.9 * ref, (learned, ref)
    # distance 2 has no signal in this trace's hidden states beyond chance: no claim, but valid Candidates
    p = LearnedPredictor(w, K)
    req = next(held.requests())
    p.observe(RoutingEvent(0, 0, 3, req.experts[0, 3], None, req.hidden[0, 3]))
    c = p.predict(0, 5)
    assert set(c.distance.tolist()) == {1, 2}  # horizon D = 2
    np.testing.assert_array_equal(c.layer, (3 + c.distance) % L)
    assert ((c.prob > 0) & (c.prob <= 1)).all()


def test_online_finetuning_recovers_on_a_shifted_distribution(data):
    tr, fit, held, w = data
    perm = np.random.default_rng(3).permutation(E)  # the same hidden states now mean other experts
    shifted = RoutingTrace(perm[held.experts.astype(np.int64)], held.weights, held.offsets, L, E, K,
                           hidden=held.hidden)
    frozen = recall_at_k(LearnedPredictor(w, K, finetune=False), shifted, 1).overall
    p = LearnedPredictor(w, K, finetune=True, lr=0.3)
    tuned = recall_at_k(p, shifted, 1).overall
    assert p.updates > 0
    assert tuned > frozen + 0.1, (frozen, tuned)
    # the weights handed in are not modified (the predictor owns copies only where it trains)
    again = recall_at_k(LearnedPredictor(w, K, finetune=False), shifted, 1).overall
    assert again == frozen


def test_save_load_round_trip_is_bit_exact(data, tmp_path):
    _, _, held, w = data
    p = LearnedPredictor(w, K, meta={"note": "x"})
    recall_at_k(p, held.head(300), 1)  # fine-tunes, so the saved weights differ from `w`
    p.save(tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted([PREDICTOR_FILE, PREDICTOR_META])
    q = LearnedPredictor.load(tmp_path)
    for k in p.w:
        assert q.w[k].dtype == np.float32 and np.array_equal(q.w[k], p.w[k]), k
    meta = json.loads((tmp_path / PREDICTOR_META).read_text())
    assert meta["note"] == "x" and meta["online_updates"] == p.updates and meta["horizon"] == 2
    r = make_predictor("learned", num_layers=L, num_experts=E, top_k=K, store_dir=tmp_path, finetune=False)
    a = recall_at_k(r, held, 1)
    b = recall_at_k(LearnedPredictor({k: v.copy() for k, v in p.w.items()}, K, finetune=False), held, 1)
    np.testing.assert_array_equal(a.hits, b.hits)
    with pytest.raises(ValueError, match="K=2"):
        make_predictor("learned", num_layers=L, num_experts=E, top_k=3, store_dir=tmp_path)


def test_train_cli_writes_the_store_files(tmp_path):
    tr = synthetic_trace(600, L, E, K, correlation=0.0, num_requests=6, hidden_dim=H, seed=4)
    tr.save_npz(tmp_path / "t.npz")
    out = tmp_path / "store"
    assert train_main(["--traces", str(tmp_path / "t.npz"), "--out", str(out), "--epochs", "1",
                       "--hidden-units", "8", "--horizon", "1", "--quiet"]) == 0
    meta = json.loads((out / PREDICTOR_META).read_text())
    assert meta["training"]["requests"] == 5 and meta["training"]["val_requests"] == 1
    assert 0 <= meta["training"]["val_next_layer_recall"] <= 1
    assert LearnedPredictor.load(out).D == 1
    no_hidden = synthetic_trace(100, L, E, K, num_requests=2, seed=0)
    no_hidden.save_npz(tmp_path / "n.npz")
    assert train_main(["--traces", str(tmp_path / "n.npz"), "--out", str(out)]) == 2


def test_routing_only_predictor_learns_routing_from_other_requests(tmp_path):
    """Routing only (no hidden state anywhere): trained on some requests of a trace whose layer l+1 follows a fixed
    map of layer l 90% of the time, it predicts held-out requests as well as the cross-layer table fed the same
    training requests first (the ideal first-order model here), and far above frequency; its events carry no hidden
    state; the CLI leaves out the first --skip-requests requests and keeps the first --layers layers."""
    tr = synthetic_trace(3000, L, E, K, correlation=0.9, num_requests=30, seed=2)
    assert tr.hidden is None
    fit, held = split_requests(tr, 0.2, seed=0)
    w = train(fit, horizon=2, hidden_units=32, epochs=8, batch=256, lr=1e-2, seed=0, routing_only=True)
    p = LearnedPredictor(w, K, finetune=False)
    assert p.H == p.R == 0 and not p.needs_hidden
    learned = recall_at_k(p, held, 1).overall
    primed = CrossLayerTransition(L, E, K)
    recall_at_k(primed, fit, 1)                                    # the table learns the training requests
    table = recall_at_k(primed, held, 1).overall
    freq = recall_at_k(TopKFrequency(L, E, K), held, 1).overall
    assert learned >= table - 0.02 and learned > freq + 0.3, (learned, table, freq)
    p.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / PREDICTOR_META).read_text())
    assert meta["hidden_size"] == 0 and meta["features"] == ["experts", "recent_experts_at_target"]
    q = LearnedPredictor.load(tmp_path / "p")
    q.observe(RoutingEvent(0, 0, 0, held.experts[0, 0]))          # no hidden state needed
    assert len(q.predict(0, 2)) > 0
    with pytest.raises(ValueError, match="routing-only"):
        LearnedPredictor(dict(w, mean=np.zeros(H, np.float32), proj=np.zeros((H, 0), np.float32)), K)
    # jobs.eval_predictors runs it on a trace without hidden states (only hidden-state predictors are refused)
    from jobs.eval_predictors import main as eval_main
    tr.save_npz(tmp_path / "t.npz")
    assert eval_main(["--trace", str(tmp_path / "t.npz"), "--store-dir", str(tmp_path / "p"), "--max-tokens", "400",
                      "--predictors", "learned,cross_layer", "--distances", "1",
                      "--json", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())["predictors"]["learned"]["recall_at_k_d1"]
    assert got == round(recall_at_k(LearnedPredictor.load(tmp_path / "p"), tr.head(400), 1).overall, 4)
    # the CLI: requests 0..4 left out, 2 layers kept, from a trace without hidden states
    out = tmp_path / "store"
    assert train_main(["--traces", str(tmp_path / "t.npz"), "--out", str(out), "--routing-only",
                       "--skip-requests", "5", "--layers", "2", "--epochs", "1", "--hidden-units", "8",
                       "--val-fraction", "0", "--quiet"]) == 0
    meta = json.loads((out / PREDICTOR_META).read_text())
    assert meta["num_layers"] == 2 and meta["hidden_size"] == 0
    assert meta["training"]["requests"] == 25 and meta["training"]["rows"] == tr.num_tokens - tr.offsets[5]
    assert train_main(["--traces", str(tmp_path / "t.npz"), "--out", str(tmp_path / "x"), "--routing-only",
                       "--skip-requests", "30"]) == 2
    assert not (tmp_path / "x").exists()


def test_routing_prior_cli_counts_any_routing_trace(tmp_path):
    """--routing-prior: routing only (no hidden states needed), the transitions of every trace given, over the
    first --layers layers, into STORE_DIR/routing_prior.npz; traces of two geometries or too many layers: exit 2
    and no file."""
    a = synthetic_trace(300, L, E, K, num_requests=3, seed=1)
    b = synthetic_trace(200, L, E, K, num_requests=2, seed=2)
    a.save_npz(tmp_path / "a.npz")
    b.save_npz(tmp_path / "b.npz")
    out = tmp_path / "store"
    assert train_main(["--routing-prior", "--traces", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                       "--out", str(out), "--layers", "2"]) == 0
    counts, meta = load_routing_prior(str(out / PRIOR_FILE), 2, E, K)
    ref = transition_counts(a.experts[:, :2], a.offsets, E) + transition_counts(b.experts[:, :2], b.offsets, E)
    assert np.array_equal(counts, ref) and meta["rows"] == 500 and meta["requests"] == 5
    assert ref.sum() == 2 * (297 + 198) * K * K
    other = synthetic_trace(100, L, E + 1, K, num_requests=2, seed=0)
    other.save_npz(tmp_path / "o.npz")
    bad = tmp_path / "bad"
    assert train_main(["--routing-prior", "--traces", str(tmp_path / "a.npz"), str(tmp_path / "o.npz"),
                       "--out", str(bad)]) == 2
    assert train_main(["--routing-prior", "--traces", str(tmp_path / "a.npz"), "--out", str(bad),
                       "--layers", str(L + 1)]) == 2
    assert not bad.exists()


def test_bounded_memory_and_missing_hidden(data):
    _, _, held, w = data
    p = LearnedPredictor(w, K, max_requests=8)
    weights = sum(a.nbytes for a in p.w.values())
    req = next(held.requests())
    for r in range(200):  # requests never ended
        p.observe(RoutingEvent(r, 0, 0, req.experts[0, 0], None, req.hidden[0, 0]))
    one = p.state_nbytes() - weights
    assert len(p._reqs) == 8 and one <= 8 * (64 + 8 * K + 4 * (L * (H + E) + 2 * 2 * 32 + 2 * 2 * E) + 32)
    with pytest.raises(ValueError, match="hidden state"):
        p.observe(RoutingEvent(0, 1, 0, req.experts[1, 0]))


# -- pre-gated ----------------------------------------------------------------------------------------------

def test_pre_gate_tensors_of_a_checkpoint_are_used(data, tmp_path):
    """A tiny checkpoint whose pre_gate of layer m decodes layer m-1's router input into layer m's experts (the
    exact decoder of the synthetic hidden states): the pre-gated predictor's distance-1 recall equals that
    decoder's, computed here directly; the registry prefers it to the auxiliary predictor in the ensemble."""
    from safetensors.numpy import load_file, save_file
    tr, _, held, w = data
    x = tr.hidden[:, :L - 1].reshape(-1, H).astype(np.float64)
    y = np.zeros((len(x), E))
    np.put_along_axis(y, tr.experts[:, 1:].reshape(-1, K).astype(np.int64), 1.0, axis=-1)
    dec, *_ = np.linalg.lstsq(x, y, rcond=None)                             # [H, E]
    rng = np.random.default_rng(0)
    dense = {}
    for l in range(L):
        dense[f"model.layers.{l}.block_sparse_moe.gate.weight"] = rng.standard_normal((E, H)).astype(np.float32)
        if l > 0:
            dense[f"model.layers.{l}.block_sparse_moe.pre_gate.weight"] = np.ascontiguousarray(8.0 * dec.T, np.float32)
    save_file(dense, str(tmp_path / "model.safetensors"))
    loaded = load_file(str(tmp_path / "model.safetensors"))
    p = make_predictor("pre_gated", num_layers=L, num_experts=E, top_k=K, router_weights=loaded)
    assert isinstance(p, PreGated)
    got = recall_at_k(p, held, 1)
    # the reference: the same pre-gates applied directly to every (token, layer < L-1) of the held-out trace
    xs = held.hidden[:, :L - 1].astype(np.float32)                           # [T, L-1, H]
    logits = np.einsum("tlh,leh->tle", xs, np.stack([loaded[f"model.layers.{m}.block_sparse_moe.pre_gate.weight"]
                                                     for m in range(1, L)]))
    top = np.argsort(-logits, -1, kind="stable")[..., :K]
    ref = (held.experts[:, 1:, :, None] == top[:, :, None, :]).any(-1).sum() / (held.num_tokens * (L - 1) * K)
    assert got.overall == pytest.approx(ref, abs=0.01) and ref > 0.9
    c = p.predict(0, 4)
    assert set(c.distance.tolist()) <= {1}
    LearnedPredictor(w, K).save(tmp_path)
    ens = make_predictor("ensemble", num_layers=L, num_experts=E, top_k=K, router_weights=loaded,
                         store_dir=tmp_path)
    assert "pre_gated" in ens.names and "next_gate" in ens.names and "learned" not in ens.names
    with pytest.raises(ValueError, match="pre_gate"):
        make_predictor("pre_gated", num_layers=L, num_experts=E, top_k=K,
                       router_weights={k: v for k, v in loaded.items() if "pre_gate" not in k})
