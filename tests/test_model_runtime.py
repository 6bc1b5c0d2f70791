"""The model runtime (cluster/model.py) against transformers, without Ray.

For one tiny random checkpoint per family (tests/hf_models.py: Mixtral; Qwen2-MoE with a shared expert and a dense
mlp_only_layers layer; Qwen3-MoE with per-head q/k norms and tied embeddings; OLMoE with full-width q/k norms and
clip_qkv), a right-padded batch of prompts of different lengths is prefilled and then decoded 16 steps; every
sequence's float32 logits must equal transformers' on that sequence alone (use_cache=True, the same tokens fed)
within 1e-4, and greedy generation must give transformers' `generate(do_sample=False)` tokens. Expert weights come
from the checkpoint files in the per-expert layout, and once through a real store (convert -> NvmeAdapter ->
ExpertStore -> LocalExperts.from_blobs). Plus: seeded sampling, top-p, EOS, context and family errors, the routing
hook, expert grouping, bf16 blobs.
"""
from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

import hf_models
from cluster.model import (SUPPORTED_FAMILIES, KVCache, LocalExperts, ModelArgs, MoEModel, UnsupportedModelError,
                           generate, group_by_expert, load_dense_from_bytes, rope_frequencies, sample, swiglu,
                           tensor_from_blob)

TOL, DECODE_STEPS, PROMPT_LENS = hf_models.TOL, hf_models.DECODE_STEPS, hf_models.PROMPT_LENS
MAX_ERR: dict[str, float] = {}   # family -> max abs logit error, printed at the end of the module (-s)


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_report(one_torch_thread):
    """One torch thread (shared cores; conftest), and the max logit errors printed at the end."""
    yield
    if MAX_ERR:
        print("\nmax abs logit error vs transformers:", {k: f"{v:.2e}" for k, v in MAX_ERR.items()})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> hf_models.Tiny, each built once per module."""
    d = str(tmp_path_factory.mktemp("hf"))
    return {f: hf_models.build(f, d) for f in hf_models.FAMILIES}


def _runtime(t: hf_models.Tiny, **kw) -> MoEModel:
    return MoEModel.from_dense(t.config, t.dense, LocalExperts(t.experts), **kw)


# -- logits and greedy tokens against transformers --------------------------------------------------------------
@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_logits_match_transformers(tiny, family):
    t = tiny[family]
    model = _runtime(t)
    MAX_ERR[family] = hf_models.check_against_hf(model, t.model, hf_models.prompts(model.args.vocab_size), family)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_greedy_generation_matches_transformers(tiny, family):
    t = tiny[family]
    hf_models.check_greedy_against_hf(_runtime(t), t.model, family)


def test_model_args_follow_each_family(tiny):
    a = {f: ModelArgs.from_config(tiny[f].config) for f in hf_models.FAMILIES}
    assert a["mixtral"].norm_topk_prob and a["mixtral"].rope_theta == 1e6 and a["mixtral"].qk_norm == "none"
    q2 = a["qwen2_moe"]
    assert q2.moe_layers == (0, 2) and q2.shared_expert_intermediate_size == 48 and q2.qkv_bias and not q2.o_bias
    assert not q2.norm_topk_prob and q2.sliding_window is None  # use_sliding_window false: config's 0 ignored
    q3 = a["qwen3_moe"]
    assert q3.num_experts == 8 and q3.head_dim == 32 and q3.qk_norm == "per_head" and q3.tie_word_embeddings
    assert q3.eos_token_ids == (7, 9) and "lm_head.weight" not in tiny["qwen3_moe"].dense
    ol = a["olmoe"]
    assert ol.qk_norm == "full" and ol.clip_qkv == 1.5 and ol.qkv_bias and ol.o_bias and ol.eos_token_ids == (1,)


# -- through the real store ---------------------------------------------------------------------------------------
def test_logits_through_the_store(tiny, tmp_path):
    """Convert the Qwen2-MoE checkpoint (shared expert, dense layer) into a file:// store and run from its bytes."""
    from storage_adapters.converter import convert, open_target, plan_conversion
    from storage_adapters.nvme import NvmeAdapter
    from storage_adapters.store import ExpertStore

    t = tiny["qwen2_moe"]
    root = str(tmp_path / "store")
    asyncio.run(convert(plan_conversion(t.path), [open_target(f"file://{root}")], progress=False))

    async def read():
        store = await ExpertStore.open([NvmeAdapter(root)])
        try:
            blobs = {(b.layer, b.expert): (await store.read_blob(b.layer, b.expert))[0] for b in store.manifest.blobs}
            dense, _ = await store.read_dense()
            return store.manifest, blobs, dense
        finally:
            await store.close()

    manifest, blobs, dense_raw = asyncio.run(read())
    assert set(blobs) == set(t.experts)
    dense = load_dense_from_bytes(dense_raw)
    assert set(dense) == set(t.dense)
    experts = LocalExperts.from_blobs(manifest, blobs)
    for key, (g, u, d) in t.experts.items():  # zero-copy views of the very bytes of the checkpoint
        for got, want in zip(experts.weights[key], (g, u, d)):
            assert torch.equal(got, want)
    model = MoEModel.from_dense(manifest.model.config, dense, experts)
    err = hf_models.check_against_hf(model, t.model, hf_models.prompts(model.args.vocab_size, seed=4), "qwen2_moe via store")
    MAX_ERR["qwen2_moe via store"] = err


def test_bf16_blob_views():
    """BF16 (and F16) expert tensors are viewed out of a page-aligned blob through manifest TensorEntry ranges."""
    from storage_adapters.manifest import BlobEntry, TensorEntry
    I, H = 8, 16
    g = torch.Generator().manual_seed(0)
    parts = {"gate": torch.randn(I, H, generator=g), "up": torch.randn(I, H, generator=g),
             "down": torch.randn(H, I, generator=g)}
    for dt, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16")):
        blob = np.zeros(3 * 4096, np.uint8)
        entries = {}
        for i, (role, x) in enumerate(parts.items()):
            raw = x.to(dt).contiguous().view(torch.uint8).numpy().reshape(-1)
            blob[i * 4096:i * 4096 + raw.size] = raw
            entries[role] = TensorEntry(name=role, dtype=name, shape=tuple(x.shape), offset=i * 4096,
                                        length=raw.size, checksum="")
        entry = BlobEntry(key="experts/L000/E000.bin", layer=0, expert=0, size=blob.size, checksum="",
                          tensors=entries, tiers={})

        class OneBlob:
            def blob(self, layer, expert):
                assert (layer, expert) == (0, 0)
                return entry

        blob.setflags(write=False)  # as a Ray object-store buffer
        experts = LocalExperts.from_blobs(OneBlob(), {(0, 0): blob})
        for got, (role, x) in zip(experts.weights[(0, 0)], parts.items()):
            assert got.dtype == dt and torch.equal(got, x.to(dt)), (name, role)
        x = torch.randn(5, H, generator=g).to(dt)
        y = experts.moe(0, x, torch.zeros(5, 1, dtype=torch.int64), torch.ones(5, 1, dtype=dt))
        ref = swiglu(x.float(), *(p.to(dt).float() for p in parts.values()))
        assert y.dtype == dt and (y.float() - ref).abs().max() < 0.02 * ref.abs().max()
    with pytest.raises(UnsupportedModelError, match="F32, F16, BF16"):
        tensor_from_blob(blob, TensorEntry(name="gate", dtype="I8", shape=(4,), offset=0, length=4, checksum=""))


# -- the expert backend contract ------------------------------------------------------------------------------------
def test_group_by_expert_and_local_experts_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    N, k, E, H, I = 37, 3, 6, 16, 8
    # [N, k], distinct experts per token, expert E-1 never selected
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(N)])
    order, experts, counts = group_by_expert(ids)
    flat = ids.reshape(-1)
    assert experts.tolist() == sorted(set(flat.tolist())) and counts.sum().item() == N * k
    assert torch.equal(flat[order], torch.repeat_interleave(experts, counts))
    for u, e in enumerate(experts.tolist()):  # stable: token order within an expert
        s = int(counts[:u].sum())
        assert torch.equal(order[s:s + int(counts[u])], (flat == e).nonzero().squeeze(1))
    w = {(2, e): (torch.randn(I, H, generator=g), torch.randn(I, H, generator=g), torch.randn(H, I, generator=g))
         for e in range(E) if e != 5}   # expert 5 is never selected, so it need not be held
    x, tw = torch.randn(N, H, generator=g), torch.rand(N, k, generator=g)
    got = LocalExperts(w).moe(2, x, ids, tw)
    ref = torch.stack([sum(tw[n, j] * swiglu(x[n:n + 1], *w[(2, int(ids[n, j]))])[0] for j in range(k))
                       for n in range(N)])
    assert torch.allclose(got, ref, atol=1e-5)
    assert LocalExperts(w).moe(2, x[:0], ids[:0], tw[:0]).shape == (0, H)
    with pytest.raises(KeyError, match="layer 3 expert"):
        LocalExperts(w).moe(3, x, ids, tw)


def test_routing_hook_sees_real_tokens_before_each_backend_call(tiny):
    t = tiny["qwen2_moe"]
    events = []

    class Recording(LocalExperts):
        def moe(self, layer, x, topk_ids, topk_w):
            events.append(("backend", layer, x.shape[0]))
            return super().moe(layer, x, topk_ids, topk_w)

    def hook(layer, topk_ids, topk_w, x):
        assert topk_ids.dtype == torch.int64 and topk_w.dtype == x.dtype
        assert topk_ids.shape == topk_w.shape == (x.shape[0], 3)
        assert not t.config["norm_topk_prob"] and (topk_w.sum(-1) < 1).all()  # qwen2_moe default: no renorm
        events.append(("route", layer, x.shape[0]))

    model = MoEModel.from_dense(t.config, t.dense, Recording(t.experts), on_route=hook)
    prompts = hf_models.prompts(model.args.vocab_size, lens=(4, 7))
    cache = model.new_cache(2, 12)
    model.prefill(cache, prompts)
    assert events == [(kind, l, 11) for l in (0, 2) for kind in ("route", "backend")]  # 11 real tokens, no padding
    events.clear()
    model.decode(cache, torch.tensor([5, 6]), active=[False, True])
    assert events == [(kind, l, 1) for l in (0, 2) for kind in ("route", "backend")]
    assert cache.lens == [4, 8]


# -- sampling -----------------------------------------------------------------------------------------------------
def test_seeded_sampling(tiny):
    model = _runtime(tiny["mixtral"])
    prompts = hf_models.prompts(model.args.vocab_size, seed=5)
    kw = dict(max_new_tokens=12, temperature=1.0, eos_token_id=None)
    a = generate(model, prompts, seeds=[11, 12, 13], **kw)
    assert a == generate(model, prompts, seeds=[11, 12, 13], **kw)
    b = generate(model, prompts, seeds=[21, 22, 23], **kw)
    assert all(x != y for x, y in zip(a, b)), "different seeds gave identical samples"
    # a request's tokens depend on its own seed and logits only, not on its batch
    assert generate(model, prompts[1:2], seeds=[12], **kw) == a[1:2]
    # a vanishing nucleus is the argmax: top_p sampling then equals greedy decoding
    greedy = generate(model, prompts, max_new_tokens=12, eos_token_id=None)
    assert generate(model, prompts, seeds=5, top_p=1e-6, **kw) == greedy


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])            # sorted: 0.5 (1), 0.3 (3) reach 0.8 >= 0.7
    logits = probs.log().expand(2000, 4).contiguous()
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    got = sample(logits, temperature=1.0, top_p=0.7, generators=gens)
    counts = torch.bincount(got, minlength=4).tolist()
    assert counts[0] == counts[2] == 0 and counts[1] > 0 and counts[3] > 0, counts
    assert abs(counts[1] / 2000 - 0.5 / 0.8) < 0.05, counts  # renormalised within the nucleus
    full = torch.bincount(sample(logits, temperature=1.0, top_p=1.0, generators=gens), minlength=4)
    assert (full > 0).all(), full.tolist()


# -- stopping and errors -----------------------------------------------------------------------------------------
def test_eos_stops_a_request(tiny):
    model = _runtime(tiny["olmoe"])
    prompts = hf_models.prompts(model.args.vocab_size, seed=3)
    free = generate(model, prompts, max_new_tokens=10, eos_token_id=None)
    assert [len(x) for x in free] == [10, 10, 10]
    eos = free[1][3]
    cut = free[1].index(eos)
    got = generate(model, prompts, max_new_tokens=10, eos_token_id=[eos])
    assert got[1] == free[1][:cut + 1], "stops right after (and including) its EOS"
    for b in (0, 2):
        assert got[b] == (free[b][:free[b].index(eos) + 1] if eos in free[b] else free[b])
    # the config's EOS (olmoe: 1) is the default: a prompt whose greedy continuation hits it stops there
    assert ModelArgs.from_config(tiny["olmoe"].config).eos_token_ids == (1,)
    model_eos = generate(model, prompts, max_new_tokens=10)
    for b in range(3):
        want = free[b][:free[b].index(1) + 1] if 1 in free[b] else free[b]
        assert model_eos[b] == want


def test_prompt_longer_than_the_context_raises(tiny):
    model = _runtime(tiny["mixtral"])
    ctx = model.args.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt 1 has {ctx + 4} tokens, longer than the maximum context of {ctx}"):
        generate(model, [[3, 4], [5] * (ctx + 4)], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 has 9 tokens, longer than the maximum context of 8"):
        generate(model, [[5] * 9], max_new_tokens=2, max_seq_len=8)
    # a prompt that fits generates until the context is full
    assert len(generate(model, [[5] * 6], max_new_tokens=10, max_seq_len=8, eos_token_id=None)[0]) == 3
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="more than the KV cache's 4 slots"):
        model.prefill(cache, [[1, 2, 3, 4, 5]])


def test_unknown_family_and_sliding_window_are_refused(tiny):
    with pytest.raises(UnsupportedModelError) as e:
        ModelArgs.from_config({"model_type": "llama", "hidden_size": 64})
    assert "'llama'" in str(e.value) and all(f in str(e.value) for f in SUPPORTED_FAMILIES)
    args = ModelArgs.from_config({**tiny["mixtral"].config, "sliding_window": 16})
    assert args.sliding_window == 16
    KVCache.allocate(args, 1, 16)
    with pytest.raises(UnsupportedModelError, match="window 16"):
        KVCache.allocate(args, 1, 17)
    with pytest.raises(UnsupportedModelError, match="RoPE type 'dynamic'"):
        ModelArgs.from_config({**tiny["olmoe"].config, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})


def test_dense_weights_that_do_not_fit_are_refused(tiny):
    t = tiny["qwen3_moe"]
    dense = dict(t.dense)
    del dense["model.layers.1.self_attn.q_norm.weight"]
    dense["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    with pytest.raises(ValueError) as e:
        MoEModel.from_dense(t.config, dense, LocalExperts({}))
    assert "model.layers.1.self_attn.q_norm.weight" in str(e.value) and "q_proj.bias" in str(e.value)


@pytest.mark.parametrize("rope,top", [({"rope_type": "linear", "factor": 2.0}, {}),
                                      ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 24}, {}),
                                      # a top-level original_max_position_embeddings wins over the block's
                                      ({"rope_type": "yarn", "factor": 4.0}, {"original_max_position_embeddings": 24}),
                                      ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 48},
                                       {"original_max_position_embeddings": 24})])
def test_scaled_rope_matches_transformers(tiny, rope, top):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = {**tiny["qwen3_moe"].config, **top, "rope_parameters": {"rope_theta": 10000.0, **rope}}
    # a deep copy: transformers writes into the RoPE block it is given
    hf_cfg = AutoConfig.for_model("qwen3_moe", **copy.deepcopy({k: v for k, v in cfg.items() if k != "model_type"}))
    want, want_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    got, scale = rope_frequencies(ModelArgs.from_config(cfg))
    assert torch.allclose(got, want, rtol=1e-6) and abs(scale - want_scale) < 1e-9


@pytest.mark.parametrize("family,kv", [("mixtral", "absent"), ("mixtral", 2), ("olmoe", "absent"), ("olmoe", None),
                                       ("qwen3_moe", "absent"), ("qwen2_moe", "absent")])
def test_key_value_heads_default_as_each_config_class_does(tiny, family, kv):
    from transformers import AutoConfig
    cfg = {**tiny[family].config}
    cfg.pop("num_key_value_heads", None)
    cfg["num_attention_heads"] = 16
    if kv != "absent":
        cfg["num_key_value_heads"] = kv
    hf_cfg = AutoConfig.for_model(family, **{k: v for k, v in cfg.items() if k != "model_type"})
    assert ModelArgs.from_config(cfg).num_kv_heads == hf_cfg.num_key_value_heads, (family, kv)


def test_bf16_runtime_tracks_float32(tiny):
    """The same code path in bfloat16 (weights, cache, experts): no dtype mismatches, logits close to float32."""
    t = tiny["qwen2_moe"]
    prompts = hf_models.prompts(160, seed=6)
    f32 = _runtime(t)
    bf16 = MoEModel.from_dense(t.config, t.dense, LocalExperts(t.experts, dtype=torch.bfloat16),
                               dtype=torch.bfloat16)
    a = f32.prefill(f32.new_cache(3, 16), prompts)
    b = bf16.prefill(bf16.new_cache(3, 16), prompts)
    assert b.dtype == torch.float32 and (a - b).abs().max().item() < 0.3
    assert len(generate(bf16, prompts, max_new_tokens=4, temperature=0.8, seeds=1, top_p=0.9)[0]) <= 4
