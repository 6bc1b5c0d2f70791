"""Tiny randomly initialised Hugging Face MoE models, one per family, for checking cluster/model.py against
transformers.

`build(family, tmp_dir)` returns a `Tiny` with the transformers model (float32, eval mode), its config.json as a
dict, the dense weights (every checkpoint tensor except routed experts, exactly what `dense.safetensors` of the
store holds) and the routed experts as {(layer, expert): (gate [I, H], up [I, H], down [H, I])}. Both are read
back from `save_pretrained`'s files with the safetensors library, so the runtime sees checkpoint names (transformers
5.x writes the per-expert layout on disk even though it fuses experts in memory), not transformers' in-memory ones.

Weights are drawn at a scale where logits and router scores are well separated (unit-ish activations), so greedy
tokens and top-k choices are not decided by float noise: the default 0.02-std initialisation makes every logit tie.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

HIDDEN = 64
TOL = 1e-4
DECODE_STEPS = 16
PROMPT_LENS = (5, 13, 9)

_COMMON = dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
               rms_norm_eps=1e-6, hidden_act="silu")
FAMILY_KWARGS = {
    # 8 experts, renormalised top-2 (Mixtral always renormalises), EOS 2 as in the real config
    "mixtral": dict(num_hidden_layers=2, vocab_size=128, intermediate_size=48, num_local_experts=8,
                    num_experts_per_tok=2, eos_token_id=2, bos_token_id=1, rope_theta=1e6),
    # shared expert with its sigmoid gate, qkv bias, layer 1 dense through mlp_only_layers, no renormalisation
    "qwen2_moe": dict(num_hidden_layers=3, vocab_size=160, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=3,
                      mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True, eos_token_id=5),
    # per-head q/k norm, head_dim decoupled from hidden/heads, renormalised top-k, tied embeddings
    "qwen3_moe": dict(num_hidden_layers=2, vocab_size=256, intermediate_size=96, moe_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, head_dim=32, norm_topk_prob=True,
                      tie_word_embeddings=True, eos_token_id=[7, 9]),
    # q/k norm over the whole projection, clip_qkv that actually clips, attention bias, 4 experts
    "olmoe": dict(num_hidden_layers=2, vocab_size=192, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                  clip_qkv=1.5, attention_bias=True, eos_token_id=1, pad_token_id=0, bos_token_id=None),
}
FAMILIES = tuple(FAMILY_KWARGS)



@dataclass
class Tiny:
    family: str
    model: object                # transformers *ForCausalLM, float32, eval
    config: dict                 # config.json as written by save_pretrained
    dense: dict                  # checkpoint name -> tensor, routed experts excluded
    experts: dict                # (layer, expert) -> (gate, up, down)
    path: str                    # the save_pretrained directory (a checkpoint jobs.convert accepts)


def make_model(family: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(_COMMON)
    kw.update(FAMILY_KWARGS[family])
    kw.update(overrides)
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:                                   # RMSNorm gains around 1
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "embed_tokens" in name:                        # RMSNorm follows; small enough for tied heads
                p.normal_(0, 0.3)
            else:                                                # [.., out, in]: unit-variance outputs
                p.normal_(0, 1.0 / math.sqrt(p.shape[-1]))
    return model.eval()


def build(family: str, tmp_dir: str, seed: int = 0, **overrides) -> Tiny:
    from cluster.model import load_checkpoint
    model = make_model(family, seed, **overrides)
    path = os.path.join(tmp_dir, f"{family}-ckpt")
    model.save_pretrained(path)
    config, dense, experts = load_checkpoint(path)
    assert experts, f"{family}: save_pretrained wrote no per-expert tensors; names: {sorted(dense)[:8]}"
    return Tiny(family, model, config, dense, experts, path)


def prompts(vocab: int, lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def check_against_hf(model, hf, prompts, family: str) -> float:
    """Prefill `prompts` as one right-padded batch, decode DECODE_STEPS fixed tokens; compare every real position's
    logits with transformers run on each sequence alone. Returns the max abs error."""
    B, V = len(prompts), model.args.vocab_size
    feed = torch.randint(3, V, (B, DECODE_STEPS), generator=torch.Generator().manual_seed(2))
    lens = [len(p) for p in prompts]
    cache = model.new_cache(B, max(lens) + DECODE_STEPS)
    tokens = torch.zeros(B, max(lens), dtype=torch.int64)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    prefill = model.forward(cache, tokens.to(model.device), lens, all_logits=True)   # [B, T, V]
    assert prefill.dtype == torch.float32 and prefill.shape == (B, max(lens), V)
    assert prefill.device == model.device, f"logits on {prefill.device}, the model on {model.device}"
    prefill = prefill.cpu()                                                  # transformers runs on the CPU
    steps = [model.decode(cache, feed[:, s]).cpu() for s in range(DECODE_STEPS)]   # each [B, V]
    assert cache.lens == [n + DECODE_STEPS for n in lens]
    err = 0.0
    with torch.no_grad():
        for b, p in enumerate(prompts):
            out = hf(torch.tensor([p]), use_cache=True)
            e = (out.logits[0] - prefill[b, :len(p)]).abs().max().item()
            assert e < TOL, f"{family} sequence {b}: prefill logits differ by {e:.2e}"
            err = max(err, e)
            pkv = out.past_key_values
            for s in range(DECODE_STEPS):
                out = hf(feed[b:b + 1, s:s + 1], past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                e = (out.logits[0, -1] - steps[s][b]).abs().max().item()
                assert e < TOL, f"{family} sequence {b}, decode step {s}: logits differ by {e:.2e}"
                err = max(err, e)
    return err




def check_greedy_against_hf(model, hf, family: str, max_new_tokens: int = 16, seed: int = 3) -> None:
    """`generate(do_sample=False)` of the runtime and of transformers (each prompt alone) give the same tokens."""
    from cluster.model import generate
    prompts_ = prompts(model.args.vocab_size, seed=seed)
    got = generate(model, prompts_, max_new_tokens=max_new_tokens)
    for b, p in enumerate(prompts_):
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_new_tokens,
                          pad_token_id=model.args.pad_token_id or 0)[0, len(p):].tolist()
        assert got[b] == ref, f"{family} request {b}: runtime on {model.device} {got[b]} != transformers {ref}"


def forwards(model, decode: int) -> list:
    """Prefill the right-padded `prompts` batch (every position's logits), then `decode` steps of fixed random
    tokens: each forward's logits, on the CPU (for bit-for-bit comparisons between runtimes)."""
    prompts_ = prompts(model.args.vocab_size)
    lens = [len(p) for p in prompts_]
    cache = model.new_cache(len(prompts_), max(lens) + decode)
    tokens = torch.zeros(len(prompts_), max(lens), dtype=torch.int64)
    for b, p in enumerate(prompts_):
        tokens[b, :len(p)] = torch.tensor(p)
    out = [model.forward(cache, tokens.to(model.device), lens, all_logits=True)]
    feed = torch.randint(3, model.args.vocab_size, (len(prompts_), decode), generator=torch.Generator().manual_seed(5))
    out += [model.decode(cache, feed[:, s]) for s in range(decode)]
    return [o.cpu() for o in out]
