"""python -m jobs.train_tiny_moe [--out jobs/embedded_model] [--minutes M] [--seed S] [--tiny]

Train the project's embedded default model: a small Mixtral-style MoE (transformers' MixtralForCausalLM) on the
Python standard library's own source, on CPU, in about a quarter of an hour. It gives the demo and the tests a
checkpoint whose routing is learned rather than random, so expert usage and layer-to-layer expert
correlations -- what caching and prefetching exploit -- come from a trained router, without a download.

- Tokenizer: byte level. Ids 0-255 are the bytes themselves, then BOS=256, EOS=257, PAD=258 (vocab 259).
  It is saved as a Hugging Face `tokenizer.json`, so `AutoTokenizer.from_pretrained(out)` works too.
- Data: every *.py under `sysconfig.get_paths()["stdlib"]` (site-packages excluded), sorted by path; every
  20th file is held out for validation. Each file is BOS + bytes + EOS; training samples random windows.
- Training: AdamW, linear warm-up then cosine decay, seeded; the router's load-balancing loss stays on
  (`output_router_logits`, `router_aux_loss_coef`), applied per layer. `--minutes` is a wall-clock budget for
  the training loop: the cosine schedule follows whichever of steps or time runs out first, so a short budget
  still anneals, and the job still evaluates and saves.
- Output (`--out`): `save_pretrained` (safetensors, per-expert `block_sparse_moe.experts.{e}.w1/w2/w3` names),
  the tokenizer, and `training_report.json`: losses, bits per byte, greedy samples, and routing statistics on
  held-out text for the trained model and for the same architecture at its (same-seed) random init:
  per-layer expert-load entropy and the mutual information between consecutive layers' top-1 experts.

Run it single-threaded (it sets torch to one thread): `python -m jobs.train_tiny_moe --minutes 14`.
`--tiny` swaps in a 2-layer, 4-expert, hidden-32 model and small evaluations: the tests' smoke run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259
VAL_EVERY = 20  # every 20th stdlib file (sorted order) is held out
PROMPTS = ["def ", "import ", "class ", "    for "]


# ---------------------------------------------------------------------------------------------------- data
def stdlib_files() -> list[Path]:
    """The stdlib's *.py files, sorted by path so the split is the same on every run of a given Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    val = files[VAL_EVERY - 1::VAL_EVERY]
    keep = set(val)
    return [f for f in files if f not in keep], val


def encode_files(files: list[Path]) -> np.ndarray:
    """One token stream: BOS + raw bytes + EOS per file. uint16 because ids go up to 258."""
    parts = []
    for f in files:
        parts += [np.array([BOS], np.uint16), np.frombuffer(f.read_bytes(), np.uint8).astype(np.uint16),
                  np.array([EOS], np.uint16)]
    return np.concatenate(parts)


def val_windows(stream: np.ndarray, n: int, seq: int) -> torch.Tensor:
    """n non-overlapping windows spread evenly over the held-out stream: fixed, so evaluations compare."""
    starts = np.linspace(0, len(stream) - seq - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s:s + seq] for s in starts]).astype(np.int64))


def train_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, seq: int) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - seq, size=batch)
    return torch.from_numpy(np.stack([stream[s:s + seq] for s in starts]).astype(np.int64))


# ---------------------------------------------------------------------------------------------------- model
def build_config(layers=4, experts=16, top_k=2, hidden=128, intermediate=64, heads=4, kv_heads=2, seq=256):
    return MixtralConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
        num_experts_per_tok=top_k, max_position_embeddings=seq, rms_norm_eps=1e-5,
        # Tied embeddings: at vocab 259 an untied head would cost checkpoint bytes for nothing.
        tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        # Router logits on and a load-balancing coefficient: training adds coef x (balancing loss of each
        # layer), so all experts get used while which expert a token visits is still learned.
        output_router_logits=True, router_aux_loss_coef=0.02, dtype="float32")


def init_model(cfg, seed: int):
    """Seed right before construction: the trained model and the random-init baseline start identical."""
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg)


def make_tokenizer():
    """Byte-level tokenizer as a Hugging Face fast tokenizer whose ids equal the byte values (GPT-2's
    byte-to-unicode alphabet, BPE with no merges), so `encode` == BOS + list(text.encode())."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in visible]
    b2u = {b: chr(b) for b in visible} | {b: chr(256 + i) for i, b in enumerate(rest)}
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])  # ids 256, 257, 258
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


# ---------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int = 16) -> tuple[float, list[torch.Tensor]]:
    """Mean next-token cross-entropy (nats) over windows, and each layer's router logits (tokens x experts)."""
    model.eval()
    nll, count, logits = 0.0, 0, []
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        out = model(input_ids=x, output_router_logits=True)
        # Score with our own CE: out.loss would include the aux loss.
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        nll, count = nll + ce.item(), count + x[:, 1:].numel()
        logits.append([r.float() for r in out.router_logits])
    model.train()
    return nll / count, [torch.cat(layer) for layer in zip(*logits)]


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def routing_stats(router_logits: list[torch.Tensor], top_k: int) -> dict:
    """Per-layer load entropy of the top-k selections (bits; log2(E) = perfectly even load) and the mutual
    information (bits) between layer l's and layer l+1's top-1 expert for the same token. Near-uniform load
    plus high MI is the signature of learned routing: experts are all used, but which one a token visits is
    predictable from its earlier choices -- the structure a prefetcher exploits."""
    n_exp = router_logits[0].shape[-1]
    top = [r.topk(top_k, dim=-1).indices.numpy() for r in router_logits]
    load, ent = [], []
    for t in top:
        freq = np.bincount(t.ravel(), minlength=n_exp) / t.size
        load.append(freq.round(4).tolist())
        ent.append(round(entropy_bits(freq), 4))
    mi = []
    for a, b in zip(top, top[1:]):
        joint = np.zeros((n_exp, n_exp))
        np.add.at(joint, (a[:, 0], b[:, 0]), 1)
        joint /= joint.sum()
        mi.append(round(entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint.ravel()), 4))
    return {"load_entropy_bits": ent, "max_entropy_bits": math.log2(n_exp), "consecutive_top1_mi_bits": mi,
            "load_fraction": load, "tokens": int(top[0].shape[0])}


@torch.no_grad()
def greedy_samples(model, new_tokens: int) -> dict[str, str]:
    model.eval()
    out = {}
    for p in PROMPTS:
        x = torch.tensor([[BOS, *p.encode()]])
        y = model.generate(x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        out[p] = bytes(t for t in y[0, 1:].tolist() if t < 256).decode("utf-8", errors="replace")
    model.train()
    return out


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.train_tiny_moe", description=__doc__.split("\n\n")[1])
    ap.add_argument("--out", default="jobs/embedded_model")
    ap.add_argument("--minutes", type=float, default=14.0, help="wall-clock budget of the training loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000, help="step cap (the schedule ends at steps or minutes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="2 layers, 4 experts, hidden 32, small evals (smoke test)")
    ap.add_argument("--log-every", type=int, default=100)
    a = ap.parse_args(argv)
    if a.tiny:
        a.layers, a.experts, a.hidden, a.intermediate, a.seq = 2, 4, 32, 32, 64
    n_val, eval_every, sample_len = (8, 10**9, 16) if a.tiny else (128, 1000, 160)

    torch.set_num_threads(1)  # shared 2-core machine: one core, and reproducible float reductions
    t_start = time.time()
    train_files, val_files = split_files(stdlib_files())
    train, val = encode_files(train_files), encode_files(val_files)
    vwin = val_windows(val, n_val, a.seq)
    print(f"data: {len(train_files)} train files ({len(train) / 1e6:.1f} M bytes), {len(val_files)} held out "
          f"({len(val) / 1e6:.2f} M bytes)", flush=True)

    cfg = build_config(a.layers, a.experts, 2, a.hidden, a.intermediate, 4, 2, a.seq)
    model = init_model(cfg, a.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M params, {a.layers} layers x {a.experts} experts (top-2), hidden "
          f"{a.hidden}, expert intermediate {a.intermediate}, context {a.seq}", flush=True)

    # No weight decay on norms/1-D params: decaying RMSNorm gains toward 0 only hurts.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(a.seed)
    budget_s, warmup = a.minutes * 60, min(100, max(1, a.steps // 10))

    losses, history, step, tokens = [], [], 0, 0
    t_train = t_log = time.time()
    while True:
        # Progress is whichever runs out first, steps or time, so the cosine always reaches its floor.
        progress = max(step / a.steps, (time.time() - t_train) / budget_s)
        if progress >= 1:
            break
        lr = a.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = train_batch(train, rng, a.batch, a.seq)
        out = model(input_ids=x)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        # transformers' load_balancing_loss_func pools all layers' router logits, so one layer can starve
        # experts while another compensates (a 2-minute trial left experts dead at 0% load). Apply the same
        # function to each layer alone and sum, as Switch/GShard do: every layer's experts stay in use.
        aux = sum(load_balancing_loss_func((r,), cfg.num_local_experts, cfg.num_experts_per_tok)
                  for r in out.router_logits)
        opt.zero_grad(set_to_none=True)
        (ce + cfg.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, tokens = step + 1, tokens + x.numel()
        losses.append(ce.item())
        if step % a.log_every == 0:
            now = time.time()
            print(f"step {step:5d}  loss {np.mean(losses[-a.log_every:]):.4f}  "
                  f"aux/layer {aux.item() / cfg.num_hidden_layers:.3f}  lr {lr:.2e}  {a.log_every * x.numel() / (now - t_log):,.0f} tok/s  "
                  f"{now - t_train:.0f}s", flush=True)
            t_log = now
        if step % eval_every == 0:
            vl, _ = evaluate(model, vwin[:32])
            history.append({"step": step, "val_loss": round(vl, 4), "val_bpb": round(vl / math.log(2), 4)})
            print(f"  val loss {vl:.4f}  ({vl / math.log(2):.3f} bits/byte)", flush=True)
    train_s = time.time() - t_train

    # Final evaluation: trained vs the same architecture at its same-seed random init, on held-out files.
    val_loss, r_trained = evaluate(model, vwin)
    rand_loss, r_random = evaluate(init_model(cfg, a.seed), vwin)
    k = cfg.num_experts_per_tok
    routing = {"trained": routing_stats(r_trained, k), "random_init": routing_stats(r_random, k)}
    samples = greedy_samples(model, sample_len)

    os.makedirs(a.out, exist_ok=True)
    model.generation_config.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    # transformers 5 always writes safetensors; save_original_format un-fuses the experts into Mixtral's
    # per-expert w1/w2/w3 tensors, the layout jobs.convert and the expert store read.
    model.save_pretrained(a.out, save_original_format=True)
    os.chmod(os.path.join(a.out, "model.safetensors"), 0o644)  # it is written via a 0600 temp file
    make_tokenizer().save_pretrained(a.out)

    tail = max(1, min(50, len(losses) // 4))
    report = {
        "command": "python -m jobs.train_tiny_moe " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": a.seed,
        "architecture": {"model_type": "mixtral", "layers": a.layers, "experts": a.experts, "top_k": k,
                         "hidden": a.hidden, "expert_intermediate": a.intermediate, "heads": 4, "kv_heads": 2,
                         "context": a.seq, "vocab": VOCAB, "tied_embeddings": True, "params": n_params,
                         "dtype": "float32", "router_aux_loss_coef": cfg.router_aux_loss_coef},
        "tokenizer": {"type": "byte", "byte_ids": "0-255", "bos_token_id": BOS, "eos_token_id": EOS,
                      "pad_token_id": PAD},
        "data": {"source": "sysconfig stdlib *.py, sorted; every %dth file held out" % VAL_EVERY,
                 "python": sys.version.split()[0], "train_files": len(train_files), "val_files": len(val_files),
                 "train_bytes": int(len(train)), "val_bytes": int(len(val)),
                 "eval_tokens": int(vwin[:, 1:].numel())},
        "training": {"optimizer": "AdamW(b=0.9,0.95, wd=0.1)", "peak_lr": a.lr, "schedule": "warmup+cosine",
                     "batch": a.batch, "budget_minutes": a.minutes, "step_cap": a.steps, "steps": step,
                     "tokens_seen": tokens, "train_seconds": round(train_s, 1),
                     "wall_seconds": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
                     "loss_first": round(float(np.mean(losses[:tail])), 4),
                     "loss_last": round(float(np.mean(losses[-tail:])), 4), "val_history": history},
        "eval": {"val_loss": round(val_loss, 4), "val_bits_per_byte": round(val_loss / math.log(2), 4),
                 "random_init_val_loss": round(rand_loss, 4),
                 "random_init_val_bits_per_byte": round(rand_loss / math.log(2), 4)},
        "routing": routing,
        "samples": samples,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    with open(os.path.join(a.out, "training_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"done in {report['training']['wall_seconds']:.0f}s: {step} steps, {tokens / 1e6:.2f} M tokens, "
          f"val {val_loss:.4f} nats = {val_loss / math.log(2):.3f} bits/byte (random init "
          f"{rand_loss / math.log(2):.3f})", flush=True)
    for name in ("trained", "random_init"):
        r = routing[name]
        print(f"  {name:11s} load entropy {r['load_entropy_bits']}  top-1 MI {r['consecutive_top1_mi_bits']}")
    for p, s in samples.items():
        print(f"  sample {p!r}: {s[:120]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
