"""python -m jobs.collect_traces [--checkpoint DIR] [--requests N] [--prompt-bytes P] [--max-tokens M] [--hidden]
                                 [--split heldout|train] [--seed S] --out TRACE.npz

Record routing traces from the project's own runtime: for each request, prefill a prompt and decode greedily,
and at every MoE layer keep the selected experts, their router weights and (with --hidden) the hidden state the
router saw — what next-gate speculation and learned predictors are trained and evaluated on. The shared traces
(../shared/traces) carry routing only. Output: the npz format of policies/traces.py, with `hidden` [T, L, H].

Prompts are windows of the Python standard library's files that the embedded model held out from training
(every 20th file), so traces of the embedded model measure it on text it has not seen (`--split heldout`, the
default). `--split train` draws the windows from the other files instead: training data for learned predictors
(`python -m jobs.train_predictor`) that never overlaps a held-out evaluation trace. When more windows are asked for
than the split has files long enough, files are revisited at other random offsets. Routing does not depend
on where experts live, so this runs the model in one process with every expert resident.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

from jobs._cli import at_least, check_out_file

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_model")


def held_out_prompts(n: int, nbytes: int, seed: int) -> list[list[int]]:
    """n byte windows of `nbytes` from the stdlib files the embedded model never trained on."""
    return prompts_from("heldout", n, nbytes, seed)


@functools.lru_cache(maxsize=1)
def _stdlib_split():
    """(train files, held-out files) of the embedded model's split (walking the stdlib takes seconds: once)."""
    from jobs.train_tiny_moe import split_files, stdlib_files
    return split_files(stdlib_files())


def prompts_from(split: str, n: int, nbytes: int, seed: int) -> list[list[int]]:
    """n byte windows of `nbytes` from the stdlib files of `split` ("heldout": every 20th file, which the embedded
    model never trained on; "train": the rest). One window per file in a random file order; past the last file,
    another round at fresh random offsets."""
    if split not in ("heldout", "train"):
        raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
    train, val = _stdlib_split()
    files = val if split == "heldout" else train
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    out = []
    for _ in range(max(1, -(-n // max(len(files), 1))) + 1):  # rounds over the files
        long_enough = 0
        for i in order:
            data = files[i].read_bytes()
            if len(data) <= nbytes:
                continue
            long_enough += 1
            start = int(rng.integers(0, len(data) - nbytes))
            out.append(list(data[start:start + nbytes]))
            if len(out) == n:
                return out
        if not long_enough:
            break
    raise AssertionError(f"only {len(out)} windows: no {split} file is longer than {nbytes} bytes")


def collect(model, prompts: list[list[int]], max_tokens: int, hidden: bool):
    """Run each request alone (rows of the trace = its token positions) and record every MoE layer's routing."""
    import torch

    from cluster.model import generate
    from policies.traces import RoutingTrace
    a = model.args
    moe_index = {l: i for i, l in enumerate(a.moe_layers)}
    L, K = len(a.moe_layers), a.top_k
    ex, wt, hs, offsets = [], [], [], [0]
    for p in prompts:
        rows: dict[int, list] = {l: [] for l in a.moe_layers}

        def hook(layer, ids, w, x):  # called before each MoE layer's expert compute, every forward
            rows[layer].append((ids.cpu().numpy().astype(np.int16), w.float().cpu().numpy(),
                                x.to(torch.float16).cpu().numpy() if hidden else None))

        model.on_route = hook
        try:
            generate(model, [p], max_tokens, eos_token_id=None)
        finally:
            model.on_route = None
        n = sum(r[0].shape[0] for r in rows[a.moe_layers[0]])  # prompt + every generated token but the last
        e = np.full((n, L, K), -1, np.int16)
        w = np.full((n, L, K), np.nan, np.float32)
        h = np.zeros((n, L, a.hidden_size), np.float16) if hidden else None
        for layer, chunks in rows.items():
            i = moe_index[layer]
            e[:, i] = np.concatenate([c[0] for c in chunks])
            w[:, i] = np.concatenate([c[1] for c in chunks])
            if hidden:
                h[:, i] = np.concatenate([c[2] for c in chunks])
        ex.append(e)
        wt.append(w)
        hs.append(h)
        offsets.append(offsets[-1] + n)
    return RoutingTrace(np.concatenate(ex), np.concatenate(wt), np.array(offsets), L, a.num_experts, K,
                        model=a.family, phase="prefill+decode", hidden=np.concatenate(hs) if hidden else None,
                        meta={"moe_layers": list(a.moe_layers), "max_tokens": max_tokens,
                              "prompt_tokens": [len(p) for p in prompts]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.collect_traces", description=__doc__.split("\n\n")[1])
    ap.add_argument("--checkpoint", default=EMBEDDED)
    ap.add_argument("--requests", type=at_least(1), default=64)
    ap.add_argument("--prompt-bytes", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden", action="store_true", help="also record the hidden state at every MoE layer")
    ap.add_argument("--split", choices=("heldout", "train"), default="heldout",
                    help="which stdlib files the prompts come from (train: for training predictors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="an .npz file in an existing folder")
    a = ap.parse_args(argv)
    # before the model loads and the requests run: traces are read back by suffix (policies.traces.load), and
    # save_npz writes into an existing folder only
    if not a.out.endswith(".npz"):
        ap.error(f"--out {a.out}: must end in .npz (the trace is written in the npz format)")
    check_out_file(ap, a.out, "--out", parent_must_exist=True)
    import torch

    from cluster.model import LocalExperts, MoEModel, load_checkpoint
    torch.set_num_threads(1)
    config, dense, experts = load_checkpoint(a.checkpoint)
    model = MoEModel.from_dense(config, dense, LocalExperts(experts), dtype=torch.float32)
    ctx = model.args.max_position_embeddings
    if a.prompt_bytes + a.max_tokens > ctx:
        print(f"collect_traces: error: --prompt-bytes {a.prompt_bytes} + --max-tokens {a.max_tokens} exceeds the "
              f"model's context of {ctx}", file=sys.stderr)
        return 2
    prompts = prompts_from(a.split, a.requests, a.prompt_bytes, a.seed)
    trace = collect(model, prompts, a.max_tokens, a.hidden)
    trace.meta["checkpoint"] = os.path.abspath(a.checkpoint)
    trace.meta.update(split=a.split, seed=a.seed)
    trace.save_npz(a.out)
    print(json.dumps({"out": a.out, "tokens": trace.num_tokens, "requests": trace.num_requests,
                      "moe_layers": trace.num_layers, "experts": trace.num_experts, "top_k": trace.top_k,
                      "hidden": a.hidden}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
