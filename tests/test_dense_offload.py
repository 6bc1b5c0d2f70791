"""Dense offload (`weight_prefetch_config.dense_offload`, cluster/model.py DenseOffload), without Ray.

With it on, each decoder layer's q/k/v/o projections and dense MLP / shared-expert weights live in host memory and
are copied into one of two device slots per layer: the first `attn`/`mlp` ratio of their rows one layer ahead
(capped by `max_prefetch_bytes_per_layer`), the rest when the layer starts. For one tiny checkpoint per family
(tests/hf_models.py) this checks: logits bit-for-bit equal to offload off (prefill and decode) at ratios 0, 0.5 and
1; the byte counters against an independent count over the checkpoint's tensor names; the per-layer cap; at most
two layers' dense bytes on the device; and bad settings rejected naming the key.
"""
from __future__ import annotations

import math

import pytest
import torch

import hf_models
from cluster.config import ConfigError, load_config
from cluster.model import LocalExperts, MoEModel, OffloadSettings, generate

DECODE = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf"))
    return {f: hf_models.build(f, d) for f in hf_models.FAMILIES}


def _wp(qkv=1.0, o=1.0, gate_up=1.0, down=1.0, cap=None, on=True) -> dict:
    d = {"dense_offload": on,
         "prefetch_ratio": {"attn": {"qkv": qkv, "o": o}, "mlp": {"gate_up": gate_up, "down": down}}}
    if cap is not None:
        d["max_prefetch_bytes_per_layer"] = cap
    return d


def _model(t, wp=None) -> MoEModel:
    return MoEModel.from_dense(t.config, t.dense, LocalExperts(t.experts), weight_prefetch=wp)


def _run(model) -> list[torch.Tensor]:
    """Prefill a right-padded batch (every position's logits), then DECODE steps: the logits of each forward."""
    return hf_models.forwards(model, DECODE)


def _expected_bytes(t, st: OffloadSettings) -> tuple[list[int], list[int]]:
    """Independently of the runtime's plan: per layer, (bytes ahead per forward, offloaded bytes), from the
    checkpoint's tensor names. Ahead rows of a tensor: floor(ratio x rows); scaled by cap / bytes when over."""
    ahead, total = [], []
    for l in range(t.config["num_hidden_layers"]):
        p = f"model.layers.{l}."
        rows, row_bytes = [], []
        for name, w in t.dense.items():
            if not name.startswith(p) or ".experts." in name or not name.endswith("_proj.weight"):
                continue
            proj = name.rsplit(".", 2)[-2]                          # q_proj, ..., gate_proj, up_proj, down_proj
            ratio = {"q_proj": st.qkv, "k_proj": st.qkv, "v_proj": st.qkv, "o_proj": st.o, "gate_proj": st.gate_up,
                     "up_proj": st.gate_up, "down_proj": st.down}[proj]
            rows.append(math.floor(ratio * w.shape[0]))
            row_bytes.append(w.shape[1] * w.element_size())
        n = sum(r * b for r, b in zip(rows, row_bytes))
        if n > st.max_ahead_bytes:
            rows = [r * st.max_ahead_bytes // n for r in rows]
        ahead.append(sum(r * b for r, b in zip(rows, row_bytes)))
        total.append(sum(w.numel() * w.element_size() for name, w in t.dense.items() if name.startswith(p)
                         and ".experts." not in name and name.endswith("_proj.weight")))
    return ahead, total


def _check_counters(t, model, st: OffloadSettings, forwards: int) -> dict:
    s = model.dense_offload_stats()
    ahead, total = _expected_bytes(t, st)
    assert s["enabled"] and s["forwards"] == forwards
    assert s["layer_bytes"] == total and s["ahead_plan_per_layer"] == ahead
    assert s["ahead_bytes_per_layer"] == [a * forwards for a in ahead], (s["ahead_bytes_per_layer"], ahead)
    assert [a + u for a, u in zip(s["ahead_bytes_per_layer"], s["at_use_bytes_per_layer"])] == \
        [n * forwards for n in total], "ahead + at use must be every offloaded byte of every layer, each forward"
    assert all(a <= st.max_ahead_bytes for a in ahead), "a layer prefetched more than the cap"
    two = sum(sorted(total)[-2:])
    assert s["peak_resident_bytes"] <= two, f"{s['peak_resident_bytes']} dense bytes on the device > two layers' {two}"
    # the device memory dense offload holds: two slots of the largest layer (plus per-tensor page alignment)
    slack = 2 * 7 * 4096
    assert s["device_buffer_bytes"] <= 2 * max(total) + slack
    return s


# -- bit-for-bit, and the counters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_logits_bit_exact_and_counters(tiny, family):
    t = tiny[family]
    ref = _run(_model(t))
    for ratio in (0.0, 0.5, 1.0):
        wp = _wp(ratio, ratio, ratio, ratio)
        model = _model(t, wp)
        got = _run(model)
        for i, (a, b) in enumerate(zip(ref, got)):
            assert torch.equal(a, b), f"{family} ratio {ratio}: forward {i} logits differ from offload off " \
                                      f"by {(a - b).abs().max().item():.2e}"
        s = _check_counters(t, model, OffloadSettings.from_config(wp), forwards=1 + DECODE)
        if ratio == 0.0:
            assert s["ahead_bytes"] == 0 and s["at_use_bytes"] == sum(s["layer_bytes"]) * (1 + DECODE)
        if ratio == 1.0:
            assert s["at_use_bytes"] == 0 and s["ahead_bytes"] == sum(s["layer_bytes"]) * (1 + DECODE)
        # the layer weights the model keeps are host tensors; the device holds them only in the two slots
        slots = {b.untyped_storage().data_ptr() for b in model.offload.slots}
        for lw in model.weights.layers:
            for w in [lw.wq, lw.wk, lw.wv, lw.wo, *(lw.mlp or ()), *(lw.shared or ())]:
                assert w.untyped_storage().data_ptr() not in slots
        for l, lw in enumerate(model.offload.views):
            assert lw.wq.untyped_storage().data_ptr() == model.offload.slots[l % 2].untyped_storage().data_ptr()


def test_distinct_ratios_per_group(tiny):
    """Qwen2-MoE has q/k/v with biases, a shared expert on MoE layers and a dense MLP on layer 1: each group's
    ratio applies to its own tensors (the counters differ from any single-ratio plan)."""
    t = tiny["qwen2_moe"]
    wp = _wp(qkv=0.5, o=0.25, gate_up=1.0, down=0.0)
    ref, model = _run(_model(t)), _model(t, wp)
    got = _run(model)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    s = _check_counters(t, model, OffloadSettings.from_config(wp), forwards=1 + DECODE)
    assert 0 < s["ahead_bytes"] < sum(s["layer_bytes"]) * (1 + DECODE)
    assert s["ahead_plan_per_layer"][1] != s["ahead_plan_per_layer"][0], "dense MLP and shared expert differ"


def test_per_layer_cap_bounds_the_ahead_bytes(tiny):
    t = tiny["qwen2_moe"]
    cap = 5000                                      # below every layer's plan at ratio 1 (86 KiB and more)
    wp = _wp(cap=cap)
    ref, model = _run(_model(t)), _model(t, wp)
    got = _run(model)
    assert all(torch.equal(a, b) for a, b in zip(ref, got)), "the cap changes where bytes come from, not results"
    s = _check_counters(t, model, OffloadSettings.from_config(wp), forwards=1 + DECODE)
    assert all(0 < a <= cap for a in s["ahead_plan_per_layer"]), s["ahead_plan_per_layer"]
    assert s["at_use_bytes"] > 0


def test_generation_equal_and_off_by_default(tiny):
    t = tiny["olmoe"]
    prompts = hf_models.prompts(t.config["vocab_size"], seed=3)
    off = _model(t)
    assert off.offload is None and off.dense_offload_stats() == {"enabled": False}
    assert _model(t, _wp(on=False)).offload is None, "ratios without dense_offload change nothing"
    on = _model(t, _wp(0.5, 0.5, 0.5, 0.5))
    assert generate(on, prompts, max_new_tokens=8) == generate(off, prompts, max_new_tokens=8)


# -- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, key", [
    (dict(qkv=1.5), "weight_prefetch_config.prefetch_ratio.attn.qkv"),
    (dict(o=-0.1), "weight_prefetch_config.prefetch_ratio.attn.o"),
    (dict(gate_up="lots"), "weight_prefetch_config.prefetch_ratio.mlp.gate_up"),
    (dict(down=True), "weight_prefetch_config.prefetch_ratio.mlp.down"),
    (dict(max_ahead_bytes=0), "weight_prefetch_config.max_prefetch_bytes_per_layer"),
    (dict(enabled="yes"), "weight_prefetch_config.dense_offload"),
])
def test_runtime_settings_reject_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        OffloadSettings(**{"enabled": True, **kw})


def test_from_dense_rejects_a_bad_ratio(tiny):
    with pytest.raises(ValueError, match=r"prefetch_ratio\.mlp\.down"):
        _model(tiny["mixtral"], _wp(down=2.0))


@pytest.mark.parametrize("section, where, what", [
    ("{dense_offload: maybe}", "weight_prefetch_config.dense_offload", "valid boolean"),
    ("{dense_offload: true, prefetch_ratio: {attn: {o: 1.01}}}", "weight_prefetch_config.prefetch_ratio.attn.o",
     "less than or equal to 1"),
    ("{dense_ofload: true}", "weight_prefetch_config", "unknown key 'dense_ofload'"),
])
def test_config_rejects_naming_the_key(tmp_path, section, where, what):
    p = tmp_path / "ray_config.yaml"
    p.write_text("tiers: [{kind: nvme, path: x}]\nweight_prefetch_config: " + section + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert f": {where}:" in str(e.value) and what in str(e.value), str(e.value)


def test_config_parses_into_the_runtime_settings(tmp_path):
    assert not load_config("ray_config.yaml").weight_prefetch_config.dense_offload   # default off
    p = tmp_path / "ray_config.yaml"
    p.write_text("tiers: [{kind: nvme, path: x}]\nweight_prefetch_config: {dense_offload: true, "
                 "prefetch_ratio: {attn: {qkv: 0.5}, mlp: {down: 0.25}}, max_prefetch_bytes_per_layer: 1MiB}\n")
    st = OffloadSettings.from_config(load_config(str(p)).weight_prefetch_config)
    assert st == OffloadSettings(enabled=True, qkv=0.5, o=1.0, gate_up=1.0, down=0.25, max_ahead_bytes=1 << 20)
