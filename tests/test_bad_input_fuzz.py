"""Property-based bad input (hypothesis) on the three parsers users feed files to: the config loader, the store
manifest and the trace loaders. Every input either loads or fails with the parser's own error type, whose message
names the file (and the key, line or array that is wrong); nothing else escapes. The number of inputs tried per
parser is asserted (and reported in docs/reliability.md).

Inputs are mutations of real, valid files (one leaf replaced, a key deleted or added, bytes flipped, arrays with
wrong shapes/dtypes/values) plus arbitrary text, so most inputs get past the first syntax check and exercise the
semantic validation behind it."""
from __future__ import annotations

import copy
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from cluster.config import ClusterConfig, ConfigError, load_config
from policies.traces import RoutingTrace, TraceFormatError, load_jsonl, load_npz
from storage_adapters.errors import ManifestError
from storage_adapters.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
TRIED: Counter = Counter()
SETTINGS = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# values a hand-edited file plausibly holds in the wrong place
junk = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                 st.text(max_size=12), st.sampled_from(["", "-1", "1e9", "12XiB", "NaN", "s3://", "file:///nope",
                                                        "0MiB", "-5GiB"]),
                 st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                           max_size=2))


def _paths(obj, prefix=()):
    """Every path to a node of a JSON-like tree (dict keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """(tree, description): base with one node replaced, deleted, or given an unknown sibling."""
    tree = copy.deepcopy(base)
    paths = [p for p in _paths(tree) if p]
    path = draw(st.sampled_from(paths))
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    op = draw(st.sampled_from(["replace", "delete", "add"]))
    if op == "replace":
        parent[path[-1]] = draw(junk)
    elif op == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent["unknown_" + draw(st.text("abcxyz", min_size=1, max_size=5))] = draw(junk)
    else:
        parent.append(draw(junk))
    return tree, (op, path)


# -- the config loader ---------------------------------------------------------------------------------------------
BASE_CFG = yaml.safe_load((ROOT / "ray_config.yaml").read_text())


@SETTINGS
@given(mutated(BASE_CFG))
def test_config_mutations_load_or_name_the_key(tmp_path_factory, case):
    tree, (op, path) = case
    f = tmp_path_factory.mktemp("cfg") / "ray_config.yaml"
    f.write_text(yaml.safe_dump(tree))
    TRIED["config"] += 1
    try:
        cfg = load_config(f)
    except ConfigError as e:
        msg = str(e)
        assert str(f) in msg, f"error does not name the file: {msg}"
        named = [p for p in path if isinstance(p, str)]
        if op != "add" and named:  # the error names the key that was changed (or, if deleted, its parent's)
            assert any(k in msg for k in named), f"{op} {path}: error names none of {named}: {msg}"
        if op == "add" and isinstance(path[-1], str):
            assert "unknown_" in msg or "Extra inputs" in msg or named[-1] in msg, msg
        return
    assert isinstance(cfg, ClusterConfig)


@SETTINGS
@given(st.text(max_size=200))
def test_config_arbitrary_text(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("cfg") / "c.yaml"
    f.write_text(text)
    TRIED["config"] += 1
    try:
        load_config(f)
    except ConfigError as e:
        assert str(f) in str(e), str(e)


# -- the store manifest --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_json(tmp_path_factory):
    from conftest import tiny_store
    root = tmp_path_factory.mktemp("store")
    _, man = tiny_store(root, f"file://{root}/nvme")
    return json.loads(man.to_json())


@SETTINGS
@given(data=st.data())
def test_manifest_mutations(manifest_json, data):
    tree, (op, path) = data.draw(mutated(manifest_json))
    TRIED["manifest"] += 1
    try:
        m = Manifest.from_json(json.dumps(tree), "s3://bucket/store/manifest.json")
    except ManifestError as e:
        assert "s3://bucket/store/manifest.json" in str(e), str(e)
        return
    assert isinstance(m, Manifest)


@SETTINGS
@given(data=st.data())
def test_manifest_flipped_bytes(manifest_json, data):
    raw = bytearray(json.dumps(manifest_json).encode())
    for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
        raw[i] = data.draw(st.integers(0, 255))
    TRIED["manifest"] += 1
    try:
        Manifest.from_json(bytes(raw), "store/manifest.json")
    except ManifestError as e:
        assert "store/manifest.json" in str(e), str(e)


# -- the trace loaders ---------------------------------------------------------------------------------------------
def _npz(arrays: dict) -> bytes:
    b = io.BytesIO()
    np.savez(b, **arrays)
    return b.getvalue()


GOOD = dict(experts=np.array([[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[3, 2], [1, 0]]], np.int16),
            weights=np.full((3, 2, 2), 0.5, np.float16), offsets=np.array([0, 2, 3], np.int64),
            meta=np.array(json.dumps({"model": "t", "num_layers": 2, "num_experts": 4, "top_k": 2})))

arrays = st.one_of(
    st.builds(lambda v, s: np.full(s, v), st.integers(-5, 300),
              st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)),
    st.builds(lambda v, s: np.full(s, v), st.floats(allow_nan=True), st.sampled_from([(3, 2, 2), (3, 2), (2,)])),
    st.sampled_from([np.array("not json"), np.array(json.dumps([1, 2])), np.array(json.dumps({"num_layers": "2"})),
                     np.array([b"\x00\x01"]), np.array([3, 2, 0], np.int64), np.array([0, 5], np.int64)]))


@SETTINGS
@given(key=st.sampled_from(["experts", "weights", "offsets", "meta", "hidden", None]), value=arrays,
       drop=st.sampled_from([None, "experts", "weights", "offsets", "meta"]))
def test_trace_npz_mutations(tmp_path_factory, key, value, drop):
    a = dict(GOOD)
    if key is not None:
        a[key] = value
    if drop is not None:
        a.pop(drop, None)
    f = tmp_path_factory.mktemp("tr") / "t.npz"
    f.write_bytes(_npz(a))
    TRIED["trace"] += 1
    try:
        tr = load_npz(f)
    except TraceFormatError as e:
        assert str(f) in str(e), str(e)
        return
    assert isinstance(tr, RoutingTrace)  # what loads is consistent: ids in range, offsets cover the rows
    assert tr.experts.max() < tr.num_experts and tr.offsets[-1] == tr.num_tokens


@SETTINGS
@given(cut=st.integers(0, 2000), junk_bytes=st.binary(max_size=64))
def test_trace_npz_truncated_or_garbage(tmp_path_factory, cut, junk_bytes):
    f = tmp_path_factory.mktemp("tr") / "t.npz"
    good = _npz(GOOD)
    f.write_bytes(good[:cut] + junk_bytes if cut < len(good) else junk_bytes)
    TRIED["trace"] += 1
    try:
        load_npz(f)
    except (TraceFormatError, zipfile.BadZipFile) as e:  # noqa: PERF203
        assert isinstance(e, TraceFormatError), f"a raw {type(e).__name__} escaped: {e}"
        assert str(f) in str(e)


line = st.one_of(
    st.fixed_dictionaries({"problem_id": st.one_of(st.integers(), st.text(max_size=3)),
                           "token_idx": st.one_of(st.integers(-2, 5), st.text(max_size=2), st.none()),
                           "layer": st.one_of(st.integers(-2, 5), st.floats()),
                           "experts": st.one_of(st.lists(st.integers(-2, 9), max_size=3), st.text(max_size=3))},
                          optional={"gating_probs": st.lists(st.floats(allow_nan=True), max_size=3)})
    .map(json.dumps),
    st.text(max_size=30))


@SETTINGS
@given(st.lists(line, min_size=1, max_size=6))
def test_trace_jsonl_lines(tmp_path_factory, lines):
    f = tmp_path_factory.mktemp("tr") / "t.jsonl"
    f.write_text("\n".join(lines) + "\n")
    TRIED["trace"] += 1
    try:
        tr = load_jsonl(f)
    except TraceFormatError as e:
        assert str(f) in str(e), str(e)
        return
    assert isinstance(tr, RoutingTrace) and tr.num_tokens >= 1


def test_inputs_tried_are_counted():
    """Runs last in this module: every parser saw its share of inputs (the counts go to docs/reliability.md)."""
    if not TRIED:
        pytest.skip("run together with the property tests above")
    assert TRIED["config"] >= 1000 and TRIED["manifest"] >= 1000 and TRIED["trace"] >= 1500, dict(TRIED)
    print(f"\nbad inputs tried: {dict(TRIED)}")
