"""python -m jobs.make_checkpoint --out DIR [--preset NAME] [--seed N]

Write a random Hugging Face-format MoE checkpoint (config.json + model.safetensors, Mixtral per-expert naming)
without transformers, tensor by tensor. The demo and the storage benchmark use it; tests build theirs with
transformers itself.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from storage_adapters.safetensors_io import SafetensorsWriter


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int = 2


PRESETS = {
    "tiny": Preset(256, 64, 128, 2, 4, 2, 4),                 # ~100 KiB experts: tests, instant demo
    "demo": Preset(512, 256, 512, 4, 8, 4, 8),                # 1.5 MiB experts, 32 of them
    # storage benchmark: fp16 experts of 31.5 MiB (3 x 2048 x 2688 x 2 B); layers set by the blob count
    "bench-32m": Preset(512, 2048, 2688, 2, 16, 4, 8),
}


def write_checkpoint(out: str, preset: Preset, seed: int = 0, dtype=np.float32) -> str:
    """Random weights ~N(0, 0.02), norms 1; written tensor by tensor (memory: one tensor)."""
    os.makedirs(out, exist_ok=True)
    p = preset
    H, I, E, L = p.hidden_size, p.intermediate_size, p.num_local_experts, p.num_hidden_layers
    kv = H // p.num_attention_heads * p.num_key_value_heads
    specs = [("model.embed_tokens.weight", (p.vocab_size, H)), ("model.norm.weight", (H,)),
             ("lm_head.weight", (p.vocab_size, H))]
    for l in range(L):
        pre = f"model.layers.{l}"
        specs += [(f"{pre}.input_layernorm.weight", (H,)), (f"{pre}.post_attention_layernorm.weight", (H,)),
                  (f"{pre}.self_attn.q_proj.weight", (H, H)), (f"{pre}.self_attn.k_proj.weight", (kv, H)),
                  (f"{pre}.self_attn.v_proj.weight", (kv, H)), (f"{pre}.self_attn.o_proj.weight", (H, H)),
                  (f"{pre}.block_sparse_moe.gate.weight", (E, H))]
        for e in range(E):
            x = f"{pre}.block_sparse_moe.experts.{e}"
            specs += [(f"{x}.w1.weight", (I, H)), (f"{x}.w2.weight", (H, I)), (f"{x}.w3.weight", (I, H))]
    st = {np.float32: "F32", np.float16: "F16"}[dtype]
    w = SafetensorsWriter(os.path.join(out, "model.safetensors"), [(n, st, s) for n, s in specs])
    rng = np.random.default_rng(seed)
    for name, shape in specs:
        if name.endswith("norm.weight"):
            arr = np.ones(shape, dtype)
        else:
            arr = rng.standard_normal(shape, dtype=np.float32)
            arr *= 0.02
            arr = arr.astype(dtype, copy=False)
        w.write(name, arr)
    w.close()
    cfg = dict(asdict(p), model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_act="silu",
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
               dtype={np.float32: "float32", np.float16: "float16"}[dtype], router_aux_loss_coef=0.02)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.make_checkpoint", description=__doc__.split("\n\n")[1])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(write_checkpoint(a.out, PRESETS[a.preset], a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
