"""Tiny Mixture-of-Experts checkpoints for the storage tests, and a reference reader for what a store holds.

Builders write a checkpoint directory (config.json + *.safetensors) and return its path:
  save_hf(family, dir)        transformers `save_pretrained` of a randomly initialised tiny model of the family
                              (transformers 5.x writes the per-expert layout on disk); max_shard_size shards it
  save_fused(dir)             the fused layout transformers 5.x holds in memory (`mlp.experts.gate_up_proj`
                              [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) via safetensors.torch.save_file
  save_legacy(dir)            a hand-built Mixtral w1/w2/w3 per-expert checkpoint, bf16, no transformers involved
  save_big(dir)               a hand-built checkpoint much larger than one expert, streamed tensor by tensor

The reference side (original_tensors, reconstruct_from_store, check_layout) reads stores and checkpoints with
safetensors, xxhash and plain file/boto3 access, not with the code under test, so round trips are judged
independently of the converter.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Callable

import numpy as np

HIDDEN, INTER, EXPERTS, LAYERS = 64, 32, 4, 2
PAGE = 4096

_COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
FAMILY_KWARGS = {
    "mixtral": dict(intermediate_size=INTER, num_local_experts=EXPERTS, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=INTER, shared_expert_intermediate_size=48,
                      num_experts=EXPERTS, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=2,
                      head_dim=16),
    "olmoe": dict(intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=2, eos_token_id=1,
                  pad_token_id=0, bos_token_id=None),
    "deepseek_v2": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=INTER,
                        n_routed_experts=EXPERTS, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        n_group=1, topk_group=1),
}
FAMILIES = tuple(FAMILY_KWARGS)

# safetensors dtype name -> (numpy dtype used to hold raw bytes, itemsize); torch names for configs
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# -- builders ---------------------------------------------------------------------------------------------------
def _hf_model(family: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(_COMMON)
    kw.update(FAMILY_KWARGS[family])
    kw.update(overrides)
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # some initialisers leave zeros/ones; random everywhere makes byte mix-ups visible
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def save_hf(family: str, path: str, *, max_shard_size: str | None = None, seed: int = 0) -> str:
    model = _hf_model(family, seed)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return path


def save_fused(path: str, family: str = "qwen3_moe", seed: int = 1) -> str:
    """model.state_dict() as transformers 5.x holds it (fused experts), written by safetensors.torch.save_file."""
    from safetensors.torch import save_file
    model = _hf_model(family, seed)
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd), "this transformers keeps experts unfused"
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(os.path.join(path, "config.json"))
    return path


def mixtral_config(*, layers=LAYERS, experts=EXPERTS, hidden=HIDDEN, inter=INTER, dtype="bfloat16", **extra) -> dict:
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_local_experts": experts,
           "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
           "dtype": dtype}
    cfg.update(extra)
    return cfg


def legacy_tensors(*, layers=LAYERS, experts=EXPERTS, hidden=HIDDEN, inter=INTER, dtype="bfloat16", seed=2):
    """name -> torch tensor of a Mixtral checkpoint in the original w1/w2/w3 per-expert naming."""
    import torch
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dt)

    t = {"model.embed_tokens.weight": r(128, hidden), "model.norm.weight": r(hidden), "lm_head.weight": r(128, hidden)}
    for l in range(layers):
        p = f"model.layers.{l}"
        t[f"{p}.input_layernorm.weight"] = r(hidden)
        t[f"{p}.post_attention_layernorm.weight"] = r(hidden)
        for proj in ("q", "k", "v", "o"):
            t[f"{p}.self_attn.{proj}_proj.weight"] = r(hidden, hidden)
        t[f"{p}.block_sparse_moe.gate.weight"] = r(experts, hidden)
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t[f"{q}.w1.weight"] = r(inter, hidden)
            t[f"{q}.w3.weight"] = r(inter, hidden)
            t[f"{q}.w2.weight"] = r(hidden, inter)
    return t


def save_legacy(path: str, *, tensors: dict | None = None, config: dict | None = None, **kw) -> str:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tensors = legacy_tensors(**kw) if tensors is None else tensors
    save_file(tensors, os.path.join(path, "model.safetensors"))
    write_config(path, mixtral_config(**kw) if config is None else config)
    return path


def write_config(path: str, cfg: dict) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def write_safetensors_streaming(path: str, specs: list[tuple[str, str, tuple[int, ...]]],
                                fill: Callable[[str, int], bytes]) -> int:
    """A .safetensors file written tensor by tensor (fill(name, nbytes) gives each tensor's bytes), so building a
    large checkpoint never holds more than one tensor. Returns the file size."""
    header, off = {}, 0
    for name, dtype, shape in specs:
        n = int(np.prod(shape)) * ST_ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in specs:
            n = int(np.prod(shape)) * ST_ITEMSIZE[dtype]
            data = fill(name, n)
            assert len(data) == n
            f.write(data)
    return 8 + len(raw) + off


def save_big(path: str, *, layers=2, experts=16, hidden=1024, inter=512, seed=3) -> tuple[str, int, int]:
    """A Mixtral-named F32 checkpoint of layers*experts experts of 3*hidden*inter*4 bytes each (6 MiB with the
    defaults, 192 MiB in all). Returns (path, checkpoint bytes, bytes of one expert)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = [("model.embed_tokens.weight", "F32", (64, hidden)), ("model.norm.weight", "F32", (hidden,))]
    for l in range(layers):
        specs.append((f"model.layers.{l}.block_sparse_moe.gate.weight", "F32", (experts, hidden)))
        for e in range(experts):
            q = f"model.layers.{l}.block_sparse_moe.experts.{e}"
            specs += [(f"{q}.w1.weight", "F32", (inter, hidden)), (f"{q}.w2.weight", "F32", (hidden, inter)),
                      (f"{q}.w3.weight", "F32", (inter, hidden))]
    size = write_safetensors_streaming(os.path.join(path, "model.safetensors"), specs,
                                       lambda name, n: rng.bytes(n))
    write_config(path, mixtral_config(layers=layers, experts=experts, hidden=hidden, inter=inter, dtype="float32"))
    return path, size, 3 * hidden * inter * 4


# -- reference readers --------------------------------------------------------------------------------------------
def original_tensors(ckpt: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a checkpoint as (safetensors dtype, shape, raw bytes), read with the safetensors library."""
    from safetensors import safe_open
    import torch
    st_name = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
    out = {}
    for fname in sorted(os.listdir(ckpt)):
        if not fname.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(ckpt, fname), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                assert name not in out, f"{name} in two shards"
                out[name] = (st_name[t.dtype], tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def _parse_source(src: str) -> tuple[str, int | None, tuple[int, int] | None]:
    """'name' | 'name[e]' | 'name[e,a:b]' -> (name, index, rows)."""
    if not src.endswith("]"):
        return src, None, None
    name, _, idx = src[:-1].rpartition("[")
    if "," in idx:
        e, rows = idx.split(",")
        a, b = rows.split(":")
        return name, int(e), (int(a), int(b))
    return name, int(idx), None


def reconstruct_from_store(manifest: dict, blobs: dict[str, bytes], dense: bytes,
                           originals: dict[str, tuple[str, tuple[int, ...], bytes]]) -> dict[str, bytes]:
    """Rebuild every checkpoint tensor's bytes from a store: expert tensors from their blobs through the manifest's
    offset/length/shape/dtype and `source`, dense ones from dense.safetensors (parsed with the safetensors library).

    `manifest` is the parsed manifest.json, `blobs` maps blob key -> plaintext blob bytes. The originals give only
    each source tensor's full shape and dtype (to place slices); every byte comes from the store, and every byte of
    every rebuilt tensor must have been covered exactly once."""
    from safetensors.torch import load as st_load
    import torch
    out: dict[str, bytearray] = {}
    covered: dict[str, np.ndarray] = {}
    for b in manifest["blobs"]:
        data = blobs[b["key"]]
        assert len(data) == b["size"], (b["key"], len(data), b["size"])
        for role, t in b["tensors"].items():
            name, index, rows = _parse_source(t["source"])
            dtype, full_shape, full = originals[name]
            assert t["dtype"] == dtype, (name, t["dtype"], dtype)
            item = ST_ITEMSIZE[dtype]
            start, length = 0, len(full)
            shape = full_shape
            if index is not None:
                per = length // full_shape[0]
                start, length, shape = index * per, per, full_shape[1:]
                if rows is not None:
                    row = per // full_shape[1]
                    start, length = start + rows[0] * row, (rows[1] - rows[0]) * row
                    shape = (rows[1] - rows[0], *full_shape[2:])
            assert tuple(t["shape"]) == tuple(shape), (t["source"], t["shape"], shape)
            assert t["length"] == length == int(np.prod(shape)) * item
            buf = out.setdefault(name, bytearray(len(full)))
            cov = covered.setdefault(name, np.zeros(len(full), np.int32))
            buf[start:start + length] = data[t["offset"]:t["offset"] + t["length"]]
            cov[start:start + length] += 1
    for name, cov in covered.items():
        assert (cov == 1).all(), f"{name}: store covers its bytes {sorted(set(cov.tolist()))} times, not exactly once"
    dense_t = st_load(bytes(dense))
    for name, t in manifest["dense"]["tensors"].items():
        assert name in dense_t, f"dense tensor {name} listed in the manifest but absent from dense.safetensors"
        raw = dense_t[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw == bytes(dense[t["offset"]:t["offset"] + t["length"]]), f"{name}: manifest range != parsed bytes"
        assert name not in out, f"{name} is both an expert tensor and a dense one"
        out[name] = bytearray(raw)
    assert set(dense_t) == set(manifest["dense"]["tensors"]), "dense.safetensors and manifest disagree"
    return {k: bytes(v) for k, v in out.items()}


def xxh64(data) -> str:
    import xxhash
    return "xxh64:" + xxhash.xxh64(bytes(data)).hexdigest()


def sha256(data) -> str:
    return "sha256:" + hashlib.sha256(bytes(data)).hexdigest()


def checksum_of(data, like: str) -> str:
    """Checksum of data in the algorithm the string `like` names, computed independently of storage_adapters."""
    return xxh64(data) if like.startswith("xxh64:") else sha256(data)


def check_layout(manifest: dict, blobs: dict[str, bytes], stored_sizes: dict[str, dict[str, int]],
                 dense: bytes | None = None) -> None:
    """Every tensor 4 KiB-aligned, every blob a multiple of 4 KiB, every checksum right, stored sizes as claimed.
    stored_sizes: tier -> key -> size of the object as the tier holds it; dense: dense.safetensors' bytes."""
    assert manifest["alignment"] == PAGE
    for b in manifest["blobs"]:
        data = blobs[b["key"]]
        assert b["size"] % PAGE == 0 and len(data) == b["size"], (b["key"], b["size"])
        assert b["checksum"] == checksum_of(data, b["checksum"]), f"{b['key']}: blob checksum does not verify"
        ends = []
        for role, t in b["tensors"].items():
            assert t["offset"] % PAGE == 0, f"{b['key']}#{role} at offset {t['offset']}"
            assert t["checksum"] == checksum_of(data[t["offset"]:t["offset"] + t["length"]], t["checksum"]), \
                f"{b['key']}#{role}: tensor checksum does not verify"
            ends.append((t["offset"], t["offset"] + t["length"]))
        ends.sort()
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:])), f"{b['key']}: tensors overlap {ends}"
        assert ends[-1][1] <= b["size"]
        # padding is zero, so a blob's checksum is reproducible
        mask = np.ones(len(data), bool)
        for s, e in ends:
            mask[s:e] = False
        assert not np.frombuffer(data, np.uint8)[mask].any(), f"{b['key']}: padding is not zero"
        for tier, copy in b["tiers"].items():
            assert stored_sizes[tier][b["key"]] == copy["stored_size"], (tier, b["key"])
    for tier, copy in manifest["dense"]["tiers"].items():
        assert stored_sizes[tier][manifest["dense"]["key"]] == copy["stored_size"]
    if dense is not None:
        d = manifest["dense"]
        assert len(dense) == d["size"] and d["checksum"] == checksum_of(dense, d["checksum"])
        for name, t in d["tensors"].items():
            assert t["checksum"] == checksum_of(dense[t["offset"]:t["offset"] + t["length"]], t["checksum"]), name
