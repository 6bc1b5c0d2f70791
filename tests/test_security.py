"""Access control and secrets of the Serve endpoint (docs/security.md), over real HTTP on 127.0.0.1.

One Serve app for the module, with auth enabled, over a store on two tiers: S3 (a moto server, blobs encrypted with
AES-256-GCM under a known key) listed before NVMe, so a request allowed every tier reads S3 and one restricted to
[dram, nvme] must not. Each refusal is checked against a request that is allowed: the storage actor's and the
workers' read counters and the engine's counters do not move across a refused request, and do move across an
allowed one. Outputs are compared with the runtime run in this process with every expert resident.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from storage_adapters.local_s3 import free_port
import ray
import requests
import torch
from ray import serve

from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint

pytestmark = pytest.mark.ray

NAMESPACE = "security-test"
KEYS = {"acme": "mec-acme-Zm9vYmFyLXNlY3JldC0x", "warm": "mec-warm-c2Vjb25kLXRlbmFudC0y",
        "nomodel": "mec-nomodel-dGhpcmQtdGVuYW50LTM"}
AES_KEY = bytes(range(101, 133))   # the S3 tier's encryption key: 32 known bytes to look for
PROMPTS = [[5, 17, 42, 9], [100, 3, 77], [8, 8, 250, 31, 64]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def app(tmp_path_factory, moto_server):
    """(url, reference model, storage actor, worker actors) of a Serve app with auth on."""
    from jobs.make_checkpoint import PRESETS, write_checkpoint
    from jobs.serve_app import build_app
    from storage_adapters.converter import convert, open_target, plan_conversion
    from storage_adapters.local_s3 import make_bucket
    d = tmp_path_factory.mktemp("security")
    ckpt = write_checkpoint(str(d / "ckpt"), PRESETS["tiny"], seed=3)
    make_bucket(moto_server.endpoint_url, "secure")
    targets = [open_target(f"file://{d}/nvme"),
               open_target("s3://secure/tiny", endpoint_url=moto_server.endpoint_url, key=AES_KEY)]
    m = asyncio.run(convert(plan_conversion(ckpt), targets, progress=False)).manifest
    one = max(b.size for b in m.blobs)   # 8 experts; each worker's cache and the DRAM tier hold one: misses read
    (d / "s3.key").write_text(AES_KEY.hex())
    digest = {t: hashlib.sha256(k.encode()).hexdigest() for t, k in KEYS.items()}
    cfg = d / "cluster.yaml"
    cfg.write_text(f"""
ray: {{namespace: {NAMESPACE}}}
workers: {{count: 2, hbm_budget_bytes: {one}}}
tiers:
  - {{kind: dram, budget_bytes: {one}}}
  - {{kind: s3, uri: s3://secure/tiny, endpoint_url: "{moto_server.endpoint_url}", encryption: {{key_file: s3.key}}}}
  - {{kind: nvme, path: {d}/nvme}}
tier_sets: {{default: [dram, s3, nvme], warm: [dram, nvme], dram_only: [dram]}}
auth:
  enabled: true
  models: [moe-expert-cluster, other-model]
  tenants:
    acme: {{api_key_sha256: [{digest['acme']}], tier_sets: [default, warm, dram_only]}}
    warm: {{api_key_sha256: [{digest['warm']}], tier_sets: [warm]}}
    nomodel: {{api_key_sha256: [{digest['nomodel']}], models: [other-model]}}
""")
    config, dense, experts = load_checkpoint(ckpt)
    ref = MoEModel.from_dense(config, dense, LocalExperts(experts))
    torch.set_num_threads(1)
    # address="local": a new cluster even when another `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="security-test-driver",
             object_store_memory=256 << 20, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(cfg), "max_batch": 4, "num_cpus": 0, "torch_threads": 1}), name="sec",
              route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    st = requests.get(f"{url}/v1/stats", headers=auth("acme"), timeout=30).json()
    from cluster.storage_tier import actor_name
    storage = ray.get_actor(actor_name(st["node_id"], 0), namespace=st["namespace"])
    workers = [ray.get_actor(f"expert-worker-{w}", namespace=st["namespace"]) for w in range(st["workers"])]
    yield url, ref, storage, workers, cfg
    serve.shutdown()
    ray.shutdown()


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def complete(url, headers=None, **body):
    body.setdefault("prompt", PROMPTS[0])
    body.setdefault("max_tokens", MAX_TOKENS)
    body.setdefault("temperature", 0)
    return requests.post(f"{url}/v1/completions", json=body, headers=headers or {}, timeout=120)


def reads(app) -> dict:
    """Every counter a storage read or an expert load on this cluster moves, and the engine's."""
    url, _, storage, workers, _ = app
    s = ray.get(storage.stats.remote())
    ws = ray.get([w.stats.remote() for w in workers])
    eng = requests.get(f"{url}/v1/stats", headers=auth("acme"), timeout=30).json()["engine"]
    return {"storage": {k: s.get(k) for k in ("hits", "misses", "coalesced", "bytes_read", "uncached", "errors",
                                              "tier_reads", "tier_bytes")},
            "workers": [{k: w[k] for k in ("hits", "misses", "loads", "bytes_loaded", "compute_calls", "tokens",
                                           "tier_bytes")} for w in ws],
            "engine": {k: eng[k] for k in ("steps", "requests_done", "requests_failed", "rejected_invalid",
                                           "rejected_overload", "prompt_tokens", "tokens_generated")}}


def check_refused_reads_nothing(app, send, status):
    """send() is refused with `status` and moves no counter; an allowed request right after moves them."""
    url, ref = app[0], app[1]
    before = reads(app)
    r = send()
    assert r.status_code == status, r.text
    assert reads(app) == before, "a refused request read or computed something"
    ok = complete(url, auth("acme"), prompt=PROMPTS[1])   # the control: an allowed request does move them
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["token_ids"] == generate(ref, [PROMPTS[1]], MAX_TOKENS)[0]
    after = reads(app)
    assert after["engine"]["requests_done"] == before["engine"]["requests_done"] + 1
    assert after["storage"]["bytes_read"] > before["storage"]["bytes_read"]
    assert sum(w["misses"] for w in after["workers"]) > sum(w["misses"] for w in before["workers"])
    return r


@pytest.mark.parametrize("headers, invalid", [
    ({}, False),
    ({"Authorization": KEYS["acme"]}, False),                     # no scheme
    ({"Authorization": f"Basic {KEYS['acme']}"}, False),          # wrong scheme
    ({"Authorization": "Bearer "}, False),
    ({"Authorization": f"Bearer {KEYS['acme']}x"}, True),         # one character off
    ({"Authorization": "Bearer mec-not-a-tenant"}, True),
])
def test_unauthenticated_is_401_and_reads_nothing(app, headers, invalid):
    r = check_refused_reads_nothing(app, lambda: complete(app[0], headers), 401)
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == 401
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="moe-expert-cluster"')
    assert ('error="invalid_token"' in r.headers["WWW-Authenticate"]) == invalid
    assert ("invalid API key" if invalid else "missing API key") in err["message"]


def test_401_comes_before_the_body_and_guards_every_path_but_health(app):
    url = app[0]
    r = requests.post(f"{url}/v1/completions", json={"prompt": [], "bogus": 1}, timeout=30)
    assert r.status_code == 401, r.text   # not a 400 about the body: nothing is parsed for a stranger
    for path in ("/v1/models", "/v1/stats", "/docs", "/openapi.json"):
        assert requests.get(f"{url}{path}", timeout=30).status_code == 401, path
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
    assert [m["id"] for m in requests.get(f"{url}/v1/models", headers=auth("acme"), timeout=30).json()["data"]] \
        == ["moe-expert-cluster"]
    # a tenant not allowed the served model does not see it listed
    assert requests.get(f"{url}/v1/models", headers=auth("nomodel"), timeout=30).json()["data"] == []


@pytest.mark.parametrize("tenant, body, what", [
    ("nomodel", {}, "tenant 'nomodel' is not allowed model 'moe-expert-cluster'"),
    ("warm", {"tier_set": "default"}, "tenant 'warm' may not use TierSet 'default' (allowed: ['warm'])"),
    ("acme", {"tier_set": "dram_only"}, "TierSet 'dram_only' ['dram'] cannot serve model 'moe-expert-cluster': "
                                        "8 of 8 expert blobs"),
])
def test_forbidden_model_or_tier_set_is_403_and_reads_nothing(app, tenant, body, what):
    r = check_refused_reads_nothing(app, lambda: complete(app[0], auth(tenant), **body), 403)
    err = r.json()["error"]
    assert err["type"] == "permission_error" and err["code"] == 403 and what in err["message"], err


def test_unknown_tier_set_is_400(app):
    r = complete(app[0], auth("acme"), tier_set="platinum")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tier_set"
    assert "unknown TierSet 'platinum'" in r.json()["error"]["message"]


def test_a_tenant_restricted_to_dram_and_nvme_never_reads_s3(app):
    """S3 comes before NVMe in the config: a request allowed every tier reads S3 (decrypting it), the 'warm'
    tenant's requests [dram, nvme] read NVMe only and give the same tokens."""
    url, ref = app[0], app[1]
    refs = [generate(ref, [p], MAX_TOKENS)[0] for p in PROMPTS]
    before = reads(app)
    for p, want in zip(PROMPTS, refs):
        r = complete(url, auth("warm"), prompt=p)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want, r.text
    after = reads(app)
    s0, s1 = before["storage"]["tier_bytes"], after["storage"]["tier_bytes"]
    assert s1.get("s3", 0) == s0.get("s3", 0), (s0, s1)
    assert s1.get("nvme", 0) > s0.get("nvme", 0), "the restricted requests read nothing: the test proves nothing"
    for w0, w1 in zip(before["workers"], after["workers"]):
        assert w1["tier_bytes"].get("s3", 0) == w0["tier_bytes"].get("s3", 0)
    # the control: the same prompts for a tenant allowed every tier are served from S3
    for p, want in zip(PROMPTS, refs):
        r = complete(url, auth("acme"), prompt=p)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want, r.text
    assert reads(app)["storage"]["tier_bytes"].get("s3", 0) > s1.get("s3", 0)


def test_tenants_with_different_tier_sets_share_steps_and_the_step_reads_neither_outside(app):
    """Concurrent requests of tenants with different TierSets go through one engine: every output equals the
    reference and none fails (a step runs with the intersection of its requests' TierSets; which set each step
    ran with is checked by the engine test below)."""
    url, ref = app[0], app[1]
    jobs = [("warm" if i % 2 else "acme", PROMPTS[i % len(PROMPTS)]) for i in range(6)]
    before = reads(app)
    with ThreadPoolExecutor(len(jobs)) as ex:
        rs = list(ex.map(lambda j: complete(url, auth(j[0]), prompt=j[1]), jobs))
    for (_, p), r in zip(jobs, rs):
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == generate(ref, [p], MAX_TOKENS)[0]
    after = reads(app)["engine"]
    assert after["requests_done"] == before["engine"]["requests_done"] + len(jobs)
    assert after["requests_failed"] == before["engine"]["requests_failed"]


class TierRecordingExperts(LocalExperts):
    """LocalExperts that remember the TierSet the engine set for each MoE call (the backend's `tiers`)."""
    tiers = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list = []

    def moe(self, layer, x, topk_ids, topk_w):
        self.seen.append(None if self.tiers is None else tuple(self.tiers))
        return super().moe(layer, x, topk_ids, topk_w)


@pytest.mark.parametrize("compatible", [False, True])
def test_engine_steps_read_only_the_intersection_of_their_requests_tier_sets(tmp_path, compatible):
    """A request allowed every tier (None) and one restricted to [dram, nvme]: when the narrower set can serve
    (tiers_ok), they share steps and every step they share runs with [dram, nvme]; when it cannot, the restricted
    one waits for the rows to drain rather than run with a set that cannot serve. Outputs stay exact."""
    from cluster.engine import Engine, GenerationRequest
    from jobs.make_checkpoint import PRESETS, write_checkpoint
    config, dense, experts = load_checkpoint(write_checkpoint(str(tmp_path / "ckpt"), PRESETS["tiny"], seed=3))
    ref = MoEModel.from_dense(config, dense, LocalExperts(experts))
    backend = TierRecordingExperts(experts)
    eng = Engine(MoEModel.from_dense(config, dense, backend), max_batch=2,
                 tiers_ok=(lambda tiers: "nvme" in tiers) if compatible else None)
    reqs = [GenerationRequest("all", PROMPTS[0], MAX_TOKENS), GenerationRequest("x", PROMPTS[0], 1),
            GenerationRequest("warm", PROMPTS[1], MAX_TOKENS, tiers=("dram", "nvme"))]
    out = {r.id: r.token_ids for r in eng.run(reqs)}
    assert out == {r.id: generate(ref, [r.prompt_ids], r.max_tokens)[0] for r in reqs}
    warm = ("dram", "nvme")
    assert warm in backend.seen and set(backend.seen) <= {None, warm}
    first = backend.seen.index(warm)
    L = len(ref.args.moe_layers)    # MoE calls per step
    assert backend.seen[:L] == [None] * L   # step 1: "all" and "x" (neither narrows)
    if compatible:   # it joined at step 2 while "all" ran: those shared steps ran with [dram, nvme]
        assert first == L and eng.stats.steps_with_several >= 2
    else:            # it waited until "all" was done, then ran alone with its own set
        assert eng.stats.steps_with_several == 1 and backend.seen[first:] == [warm] * (len(backend.seen) - first)
        assert first >= L * len(out["all"])


def _forms(secret: bytes) -> dict[str, bytes]:
    return {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode(),
            "base64": base64.b64encode(secret), "base64url": base64.urlsafe_b64encode(secret).rstrip(b"="),
            "base64-nopad": base64.b64encode(secret).rstrip(b"=")}


def test_secrets_never_appear_in_logs_errors_stats_or_metrics(app, caplog):
    """API keys (sent on every request, valid and invalid) and the S3 tier's AES key (used to decrypt every S3
    read) appear in no log of this Ray instance, no error body, /v1/stats, ExpertCluster.stats(), the Prometheus
    text, nor the config's repr — raw, hex or base64."""
    from cluster.config import load_config
    from cluster.expert_cluster import ExpertCluster
    url, ref, _, _, cfg_path = app
    caplog.set_level(logging.DEBUG)
    texts: dict[str, bytes] = {}
    ok = complete(url, auth("acme"), prompt=PROMPTS[2])
    assert ok.status_code == 200
    texts["ok body"] = ok.content
    for name, h in {"key as basic": {"Authorization": f"Basic {KEYS['acme']}"},
                    "key off by one": {"Authorization": f"Bearer {KEYS['acme']}x"},
                    "key without scheme": {"Authorization": KEYS["warm"]}}.items():
        r = complete(url, h)
        assert r.status_code == 401
        texts[name] = r.content + str(dict(r.headers)).encode()
    r = complete(url, auth("warm"), tier_set="default")
    assert r.status_code == 403
    texts["403 body"] = r.content
    texts["/v1/stats"] = requests.get(f"{url}/v1/stats", headers=auth("acme"), timeout=30).content
    # ExpertCluster.stats() of a cluster over the same config (encrypted S3 tier read, in this process)
    cfg = load_config(cfg_path)
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"namespace": "security-test-stats"})})
    texts["config repr"] = (repr(cfg) + str(cfg)).encode()
    with ExpertCluster(cfg) as c:
        assert c.generate([PROMPTS[0]], MAX_TOKENS) == [generate(ref, [PROMPTS[0]], MAX_TOKENS)[0]]
        st = c.stats()
        assert st["bytes_by_tier"].get("s3", 0) > 0, "the encrypted tier was not read: nothing to leak"
        texts["ExpertCluster.stats()"] = repr(st).encode()
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 60
    while True:   # exported every few seconds: wait until the refusals above are in (the text is then real)
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        refused = {ln.split('status="')[1].split('"')[0] for ln in metrics.splitlines()
                   if ln.startswith("ray_moe_requests_total") and 'status="' in ln}
        if {"unauthorized", "forbidden"} <= refused or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert {"unauthorized", "forbidden", "ok"} <= refused, refused
    texts["prometheus"] = metrics.encode()
    texts["caplog"] = caplog.text.encode()
    logs = os.path.join(ray._private.worker.global_worker.node.get_session_dir_path(), "logs")
    n_logs = 0
    for root, _, files in os.walk(logs):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                texts[f"ray log {f}"] = fh.read()
            n_logs += 1
    assert n_logs > 5 and any(b"CompletionServer" in t for k, t in texts.items() if k.startswith("ray log")), \
        "the Serve replica's logs were not found: the scan would prove nothing"
    secrets = {f"API key {t}": k.encode() for t, k in KEYS.items()}
    secrets["AES key"] = AES_KEY
    leaks = [(what, form, where) for what, s in secrets.items() for form, v in _forms(s).items()
             for where, text in texts.items() if v in text]
    assert not leaks, leaks
