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
    cfg = load_config(write(tmp_path, GOOD))
    assert int(cfg.tier("nvme").chunk_bytes) == 1 << 20
    assert cfg.tier("nvme").path == str(tmp_path / "store" / "nvme")  # relative to the config file
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
