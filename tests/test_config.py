"""ray_config.yaml -> one validated ClusterConfig; invalid files fail naming the file, the key path and the problem."""
import textwrap

import pytest

from cluster.config import ConfigError, load_config

GOOD = """
tiers:
  - {kind: dram, budget_bytes: 64MiB}
  - {kind: nvme, path: store/nvme, chunk_bytes: 1MiB}
  - {kind: s3, uri: s3://b/p, endpoint_url: http://127.0.0.1:9000, encryption: {key_env: MY_KEY}}
tier_sets: {default: [dram, nvme, s3], cold: [s3]}
"""


def write(tmp_path, text, name="ray_config.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_repo_config_is_valid():
    cfg = load_config("ray_config.yaml")
    assert cfg.active_tiers == ["dram", "nvme", "s3"]
    assert int(cfg.dram.budget_bytes) == 256 << 20
    assert cfg.storage_tiers[0].path.endswith(".store/nvme")


def test_sizes_paths_and_views(tmp_path):
    cfg = load_config(write(tmp_path, GOOD + "prefetch: {routing_prior: store/routing_prior.npz}\n"))
    assert int(cfg.tier("nvme").chunk_bytes) == 1 << 20
    assert cfg.tier("nvme").path == str(tmp_path / "store" / "nvme")  # relative to the config file
    assert cfg.prefetch.routing_prior == str(tmp_path / "store" / "routing_prior.npz")
    cfg = load_config(write(tmp_path, GOOD + "telemetry: {stats_path: out/stats.json}\n"))
    assert cfg.telemetry.stats_path == str(tmp_path / "out" / "stats.json")
    assert [t.name for t in cfg.storage_tiers] == ["nvme", "s3"]
    cold = cfg.model_copy(update={"active_tier_set": "cold"})
    assert [t.name for t in cold.storage_tiers] == ["s3"] and cold.dram is None


@pytest.mark.parametrize("text, where, what", [
    ("tiers: [{kind: nvme, path: x, bogus: 1}]", "tiers[0].bogus", "Extra inputs"),
    ("tiers: [{kind: nvme, path: x}]\nworkers: {count: zero}", "workers.count", "valid integer"),
    ("tiers: [{kind: nvme, path: x, chunk_bytes: 1000}]", "tiers[0].chunk_bytes", "multiple of 4096"),
    ("tiers: [{kind: s3, uri: http://x}]", "tiers[0].uri", "s3://bucket"),
    ("tiers: [{kind: tape, path: x}]", "tiers[0]", "tape"),
    ("tiers: [{kind: dram, budget_bytes: 1GiB}]", "(top level)", "at least one storage tier"),
    ("tiers: [{kind: nvme, path: x}]\ntier_sets: {default: [nvme, ssd]}", "(top level)", "unknown tiers ['ssd']"),
    ("tiers: [{kind: nvme, path: x}]\nactive_tier_set: fast", "(top level)", "'fast' is not one of"),
    ("tiers: [{kind: nvme, path: x, encryption: {}}]", "tiers[0].encryption", "exactly one of key_file or key_env"),
    ("tiers: [{kind: nvme, path: x}]\nray: {adress: auto}", "ray.adress", "Extra inputs"),
    # settings nothing read (a checkpoint to convert at start, an NVMe budget) are refused, not silently ignored
    ("tiers: [{kind: nvme, path: x}]\nmodel: {checkpoint: ckpt}", "model", "Extra inputs"),
    ("tiers: [{kind: nvme, path: x, budget_bytes: 1GiB}]", "tiers[0].budget_bytes", "Extra inputs"),
    ("tiers: [{kind: nvme, path: x}]\ntelemetry: {log_level: LOUD}", "telemetry.log_level", "'DEBUG'"),
    ("tiers: [{kind: nvme, path: x}]\nworkers: {h2d_copy_threads: 0}", "workers.h2d_copy_threads",
     "greater than or equal to 1"),
    ("tiers: [{kind: nvme, path: x}]\nworkers: {h2d_chunk_bytes: 1KiB}", "workers.h2d_chunk_bytes",
     "greater than or equal to 4096"),
    ("tiers: [{kind: nvme, path: x}]\nprefetch: {routing_prior: p.npz, reuse_memory: false}", "prefetch",
     "needs prefetch.reuse_values and prefetch.reuse_memory"),
    ("tiers: [{kind: nvme, path: x}]\nprefetch: {routing_prior: p.npz, reuse_values: false}", "prefetch",
     "needs prefetch.reuse_values and prefetch.reuse_memory"),
])
def test_invalid_config_names_file_key_and_problem(tmp_path, text, where, what):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f": {where}:" in msg and what in msg, msg


def test_yaml_syntax_error_has_line(tmp_path):
    p = write(tmp_path, "tiers:\n  - kind: nvme\n    path: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+:\d+: not valid YAML"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "nope.yaml")


def test_keys_resolved_once_from_env_and_never_in_errors(tmp_path):
    from cluster.config import resolve_keys
    from storage_adapters.crypto import KeyError_
    cfg = load_config(write(tmp_path, GOOD))
    key = bytes(range(32))
    assert resolve_keys(cfg, {"MY_KEY": key.hex()}) == {"s3": key}
    with pytest.raises(KeyError_, match="MY_KEY"):
        resolve_keys(cfg, {})
    with pytest.raises(KeyError_) as e:
        resolve_keys(cfg, {"MY_KEY": "ab" * 20})  # wrong length
    assert "ab" * 20 not in str(e.value)


# -- tenants and API keys (auth:, docs/security.md) --------------------------------------------------------------
KEY_A, KEY_B = "mec-tenant-a-0123456789", "mec-tenant-b-9876543210"


def auth_yaml(extra: str = "") -> str:
    import hashlib
    ha, hb = (hashlib.sha256(k.encode()).hexdigest() for k in (KEY_A, KEY_B))
    return GOOD + textwrap.dedent(f"""
    auth:
      enabled: true
      tenants:
        acme: {{api_key_sha256: ["{ha.upper()}"], models: [moe-expert-cluster], tier_sets: [cold]}}
        beta: {{api_key_sha256: ["{hb}"]}}
    """) + extra


def test_tenants_keys_and_derived_coordinator_rules(tmp_path):
    from cluster.config import hash_api_key
    cfg = load_config(write(tmp_path, auth_yaml()))
    a = cfg.auth
    assert a.enabled and a.tenants["acme"].api_key_sha256 == [hash_api_key(KEY_A)]   # digests normalised lower
    assert a.tenant_of(KEY_A) == "acme" and a.tenant_of(KEY_B) == "beta"
    assert a.tenant_of("mec-wrong") is None and a.tenant_of(KEY_A + " ") is None and a.tenant_of("") is None
    assert cfg.tier_set("cold") == ["s3"]
    # the coordinator's access rules follow the tenants' TierSets: acme's prefetches may read only s3
    assert cfg.prefetch.tenants == {"acme": {"models": None, "tiers": ["s3"]}, "beta": {"models": None, "tiers": None}}
    from actors.prefetch_coordinator import access_policy
    from policies.ranking import AccessDenied
    rules = access_policy(cfg.prefetch)   # what the coordinator's planner checks every request against
    rules.check("acme", "qwen2_moe", ["s3"])
    rules.check("beta", "qwen2_moe", ["dram", "nvme", "s3"])
    with pytest.raises(AccessDenied, match=r"tenant 'acme' is not allowed tiers \['nvme'\]"):
        rules.check("acme", "qwen2_moe", ["s3", "nvme"])
    # digests are kept out of the config's repr (and so out of any log line that prints it)
    for text in (repr(cfg), str(cfg), repr(a), repr(a.tenants["acme"])):
        assert hash_api_key(KEY_A) not in text and hash_api_key(KEY_A).upper() not in text


def test_auth_off_by_default_keeps_the_demo_keyless():
    cfg = load_config("ray_config.yaml")
    assert not cfg.auth.enabled and cfg.auth.tenants == {} and cfg.prefetch.tenants is None


@pytest.mark.parametrize("extra, where, what", [
    ("auth: {enabled: true}", "auth", "no tenants are configured"),
    ("auth: {tenants: {x: {api_key_sha256: [abc123]}}}", "auth.tenants.x.api_key_sha256",
     "64 hex characters"),
    ("auth: {tenants: {x: {api_key_sha256: []}}}", "auth.tenants.x.api_key_sha256", "at least 1"),
    (f"auth: {{tenants: {{x: {{api_key_sha256: ['{'0' * 64}'], models: [gpt-9]}}}}}}", "auth",
     "tenants.x.models: unknown models ['gpt-9']"),
    (f"auth: {{tenants: {{x: {{api_key_sha256: ['{'0' * 64}'], tier_sets: [cold, warm]}}}}}}", "(top level)",
     "auth.tenants.x.tier_sets: unknown TierSets ['warm']"),
    (f"auth: {{tenants: {{x: {{api_key_sha256: ['{'0' * 64}']}}, y: {{api_key_sha256: ['{'0' * 64}']}}}}}}",
     "auth", "tenants.y.api_key_sha256[0]: the same key is listed for tenant 'x'"),
    (f"auth: {{tenants: {{x: {{api_key_sha256: ['{'0' * 64}'], secret: 1}}}}}}", "auth.tenants.x.secret",
     "Extra inputs"),
])
def test_invalid_auth_names_key_path(tmp_path, extra, where, what):
    p = write(tmp_path, GOOD + extra)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f": {where}:" in msg and what in msg, msg


def test_a_raw_key_pasted_as_digest_is_never_echoed(tmp_path):
    """A key put where its digest belongs is refused without the key in the message or the exception chain."""
    p = write(tmp_path, GOOD + f"auth: {{tenants: {{x: {{api_key_sha256: ['{KEY_A}']}}}}}}")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "auth.tenants.x.api_key_sha256" in str(e.value)
    chain, exc = [], e.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    assert not any(KEY_A in c for c in chain), chain


def test_hash_api_key_reads_stdin_only(tmp_path):
    import subprocess
    import sys

    from cluster.config import hash_api_key
    r = subprocess.run([sys.executable, "-m", "jobs.hash_api_key"], input=KEY_A + "\n", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == hash_api_key(KEY_A) and KEY_A not in r.stdout, r
    assert hash_api_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
    r = subprocess.run([sys.executable, "-m", "jobs.hash_api_key", KEY_A], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, "a key on the command line is refused (it would land in the shell history)"


# -- weight_prefetch_config (docs/weight_prefetch.md) -------------------------------------------------------------
def test_weight_prefetch_defaults_off_and_parses(tmp_path):
    assert not load_config("ray_config.yaml").weight_prefetch_config.enabled   # default: whole-expert prefetch
    cfg = load_config(write(tmp_path, GOOD + """
weight_prefetch_config:
  enabled: true
  prefetch_ratio: {attn: {qkv: 0.5}, moe: {gate_up: 0.25}}
  max_prefetch_bytes_per_layer: 4MiB
"""))
    wp = cfg.weight_prefetch_config
    assert wp.enabled and wp.prefetch_ratio.moe.gate_up == 0.25 and int(wp.max_prefetch_bytes_per_layer) == 4 << 20
    assert (wp.prefetch_ratio.attn.qkv, wp.prefetch_ratio.attn.o, wp.prefetch_ratio.mlp.down) == (0.5, 1.0, 1.0)


@pytest.mark.parametrize("section, where, what", [
    ("{prefetch_ratio: {moe: {gate_up: 1.5}}}", "weight_prefetch_config.prefetch_ratio.moe.gate_up", "less than or equal to 1"),
    ("{prefetch_ratio: {attn: {qkv: -0.1}}}", "weight_prefetch_config.prefetch_ratio.attn.qkv", "greater than or equal to 0"),
    ("{prefetch_ratio: {mlp: {down: lots}}}", "weight_prefetch_config.prefetch_ratio.mlp.down", "valid number"),
    ("{prefetch_ratio: {moe: {gate: 0.5}}}", "weight_prefetch_config.prefetch_ratio.moe", "unknown key 'gate' (valid: gate_up)"),
    ("{prefetch_ratio: {dense: {qkv: 1}}}", "weight_prefetch_config.prefetch_ratio", "unknown key 'dense' (valid: attn, moe, mlp)"),
    ("{enable: true}", "weight_prefetch_config", "unknown key 'enable' (valid: enabled, prefetch_ratio"),
    ("{max_prefetch_bytes_per_layer: 0}", "weight_prefetch_config.max_prefetch_bytes_per_layer", "must be > 0"),
])
def test_weight_prefetch_invalid_names_the_key(tmp_path, section, where, what):
    p = write(tmp_path, "tiers: [{kind: nvme, path: x}]\nweight_prefetch_config: " + section)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f": {where}:" in msg and what in msg, msg


def test_log_level_reaches_the_projects_loggers():
    import logging
    from cluster.config import LOGGERS, TelemetryConfig, apply_log_level
    before = {n: logging.getLogger(n).level for n in LOGGERS}
    try:
        apply_log_level(TelemetryConfig(log_level="DEBUG"))
        assert logging.getLogger("storage_adapters.nvme").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("cluster.engine").isEnabledFor(logging.DEBUG)
        apply_log_level(TelemetryConfig(log_level="ERROR"))
        assert not logging.getLogger("cluster.expert_cluster").isEnabledFor(logging.WARNING)
        handlers = [len(logging.getLogger(n).handlers) for n in LOGGERS]
        apply_log_level(TelemetryConfig(log_level="INFO"))
        assert [len(logging.getLogger(n).handlers) for n in LOGGERS] == handlers, "a handler added again"
    finally:
        for n, lv in before.items():
            logging.getLogger(n).setLevel(lv)
