"""The Ray Serve app (jobs/serve_app.py) over real HTTP on 127.0.0.1, one app for the whole module.

The embedded model is converted into a store; the app's replica runs an ExpertCluster over it with two workers
whose caches hold a fraction of the experts. References are the runtime run in this process with every expert
resident (`generate` on each prompt alone). Health is checked last: killing the workers must make /health and
Serve's check_health fail, and Serve must replace the replica with a working one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
import torch
from ray import serve

from conftest import convert_checkpoint, tiny_store
from storage_adapters.local_s3 import free_port
from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint

pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(ROOT, "jobs", "embedded_model")
TEXTS = ["def ", "import os\n", "class ", "    for i in range(", "x = ", "return ", "# ", "if "]
NAMESPACE = "serve-test"


@pytest.fixture(scope="module")
def reference():
    """(in-process model with every expert resident, tokenizer)."""
    from tokenizers import Tokenizer
    config, dense, experts = load_checkpoint(EMBEDDED)
    return (MoEModel.from_dense(config, dense, LocalExperts(experts)),
            Tokenizer.from_file(os.path.join(EMBEDDED, "tokenizer.json")))


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from jobs.serve_app import build_app
    d = tmp_path_factory.mktemp("serve")
    convert_checkpoint(EMBEDDED, f"file://{d}/store")
    cfg = d / "cluster.yaml"
    cfg.write_text(f"ray: {{namespace: {NAMESPACE}}}\n"
                   f"workers: {{count: 2, hbm_budget_bytes: 1MiB}}\n"   # ~10 of 64 experts each: misses
                   f"prefetch: {{policy: topk_frequency}}\n"            # a coordinator, fed by the engine
                   f"tiers:\n  - {{kind: dram, budget_bytes: 64MiB}}\n  - {{kind: nvme, path: {d}/store}}\n")
    torch.set_num_threads(1)
    # address="local": a new cluster even when another `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve-test-driver",
             object_store_memory=256 << 20, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(cfg), "max_batch": 4, "max_queue": 4, "max_ongoing_requests": 48,
                         "num_cpus": 0, "torch_threads": 1, "health_check_period_s": 1,
                         "health_check_timeout_s": 10}), name="moe", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def complete(url, **body):
    return requests.post(f"{url}/v1/completions", json=body, timeout=120)


def ids_of(reference, text):
    return reference[1].encode(text).ids


def test_concurrent_completions_equal_generate_and_share_steps(url, reference):
    model, tok = reference
    before = requests.get(f"{url}/v1/stats", timeout=30).json()["engine"]
    prompts = [ids_of(reference, t) for t in TEXTS]
    with ThreadPoolExecutor(len(prompts)) as ex:   # half as token ids, half as text
        rs = list(ex.map(lambda i: complete(url, prompt=prompts[i] if i % 2 else TEXTS[i], max_tokens=24,
                                            temperature=0), range(len(prompts))))
    for p, r in zip(prompts, rs):
        assert r.status_code == 200, r.text
        body = r.json()
        ref = generate(model, [p], 24)[0]
        ch = body["choices"][0]
        assert ch["token_ids"] == ref and ch["text"] == tok.decode(ref)
        assert ch["finish_reason"] == ("stop" if ref[-1] in model.args.eos_token_ids else "length")
        assert body["object"] == "text_completion" and body["model"] == "moe-expert-cluster"
        assert body["usage"] == {"prompt_tokens": len(p), "completion_tokens": len(ref),
                                 "total_tokens": len(p) + len(ref)}
    st = requests.get(f"{url}/v1/stats", timeout=30).json()
    e = st["engine"]
    # 8 requests on 4 rows: steps carried several requests and prefills rode along with decodes
    assert e["max_requests_in_step"] > 1 and e["steps_with_several"] > before["steps_with_several"]
    assert e["requests_done"] - before["requests_done"] == len(prompts)
    assert st["misses"] > 0  # the workers' caches hold a fraction of the experts: they were read from the store


def test_the_prefetch_coordinator_hears_of_every_request_and_its_end(url):
    """Routing events name each row's request (the engine's cache.requests) and on_request_end tells the
    coordinator when a request is over: after the requests above, it has received batches and holds none live."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        c = requests.get(f"{url}/v1/stats", timeout=30).json()["coordinator"]
        if c["batches"] and c["live_requests"] == 0:
            break
        time.sleep(0.5)
    assert c["policy"] == "topk_frequency" and c["batches"] > 0 and c["live_requests"] == 0, c


def test_a_request_the_engine_refuses_is_forgotten_by_the_coordinator(url):
    """A request with a tenant is registered with the coordinator before the engine sees it; when the engine refuses
    it (400), the coordinator is told it ended, so refused requests do not pile up there."""
    def registered():
        return requests.get(f"{url}/v1/stats", timeout=30).json()["coordinator"]["registered_requests"]
    before = registered()
    for i in range(5):
        r = complete(url, prompt=[5, 9999], max_tokens=2, user=f"tenant-{i}")
        assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"], r.text
    # the ends travel as fire-and-forget calls: polled, not assumed to have landed within a fixed time (an end of an
    # earlier test's request may land meanwhile too, hence <=)
    deadline = time.monotonic() + 20
    while registered() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert registered() <= before


def test_streaming_yields_the_same_tokens(url, reference):
    model, tok = reference
    p = ids_of(reference, "class Foo(")
    ref = generate(model, [p], 20)[0]
    with requests.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 20, "temperature": 0,
                                                      "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ref
    assert "".join(c["choices"][0]["text"] for c in chunks) == tok.decode(ref)
    assert len(chunks) >= 2 and all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] == len(ref)


def test_a_client_that_goes_away_frees_its_row(url, reference):
    before = requests.get(f"{url}/v1/stats", timeout=30).json()["engine"]["requests_cancelled"]
    with requests.post(f"{url}/v1/completions", json={"prompt": ids_of(reference, "def "), "max_tokens": 240,
                                                      "temperature": 0, "stream": True}, stream=True, timeout=60) as r:
        first = next(line for line in r.iter_lines() if line)
        assert first.startswith(b"data: {")
    # the connection is closed after one event; the engine must drop the request long before 240 tokens
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        e = requests.get(f"{url}/v1/stats", timeout=30).json()["engine"]
        if e["requests_cancelled"] > before and e["active"] == 0:
            break
        time.sleep(0.2)
    assert e["requests_cancelled"] == before + 1 and e["active"] == 0, e


def test_seeded_sampling_is_reproducible(url, reference):
    model, _ = reference
    p = ids_of(reference, "def main(")
    ref = generate(model, [p], 16, temperature=0.8, top_p=0.9, seeds=7)[0]
    body = dict(prompt=p, max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    with ThreadPoolExecutor(4) as ex:  # once alone-ish, once among other requests
        rs = list(ex.map(lambda b: complete(url, **b), [body, dict(body, seed=8), body, dict(prompt=p)]))
    assert rs[0].json()["choices"][0]["token_ids"] == ref == rs[2].json()["choices"][0]["token_ids"]
    assert rs[1].json()["choices"][0]["token_ids"] != ref


@pytest.mark.parametrize("body,status,param,why", [
    (dict(prompt=[5, 6], max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (dict(prompt=[5, 6], temperature=-1), 400, "temperature", "greater than or equal to 0"),
    (dict(prompt=[5, 6], top_p=1.5), 400, "top_p", "less than or equal to 1"),
    (dict(prompt=[]), 400, "prompt", "empty"),
    (dict(prompt=""), 400, "prompt", "empty"),
    (dict(prompt=[5] * 300), 400, "prompt", "longer than the maximum context of 256 tokens"),
    (dict(prompt=[5, 9999]), 400, "prompt", "outside the vocabulary"),
    (dict(prompt=["a", "b"]), 400, "prompt", "valid"),
    (dict(prompt=[5, 6], max_token=3), 400, "max_token", "Extra inputs are not permitted"),
    (dict(prompt=[5, 6], max_tokens=100000), 400, "max_tokens", "limit of 1024"),
    (dict(prompt=[5, 6], n=2), 400, "n", "1"),
    (dict(max_tokens=3), 400, "prompt", "Field required"),
    (dict(prompt=[5, 6], model="gpt-4"), 404, "model", "does not exist"),
    (dict(prompt=[5, 6], temperature=0.5, seed=2 ** 64), 400, "seed", "less than or equal to 18446744073709551615"),
])
def test_bad_requests_are_json_errors_naming_the_field(url, body, status, param, why):
    r = complete(url, **body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: ") and why in err["message"], err


def test_invalid_json_is_a_400(url):
    r = requests.post(f"{url}/v1/completions", data=b"{not json", headers={"content-type": "application/json"},
                      timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] is None, err
    assert err["message"] == "body: invalid JSON at position 1: Expecting property name enclosed in double quotes"


# -- no Ray below: the body model, the error handler and build_app in this process ---------------------------------
def _post_in_process(body: bytes):
    """POST /v1/completions straight into the FastAPI app (ASGI): what happens before a handler needs its replica
    (the middleware, body parsing, the exception handlers). Returns (status, JSON body)."""
    import asyncio

    from jobs.serve_app import api
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    inbox, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)
    asyncio.run(api(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_invalid_json_names_no_field():
    """The offset pydantic puts in an invalid body's loc is not a parameter (it was answered as param "33")."""
    status, body = _post_in_process(b'{"prompt": [1, 2], "max_tokens": 3,}')
    assert status == 400 and body["error"]["param"] is None, body
    assert body["error"]["message"] == ("body: invalid JSON at position 35: Expecting property name enclosed in "
                                        "double quotes"), body


@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1])
def test_a_seed_torch_cannot_take_is_refused_by_the_body_model(seed):
    """torch.Generator.manual_seed raises ValueError beyond [-2**63, 2**64): a non-JSON 500 and a leaked
    coordinator registration; now a 400 naming seed, before anything is registered."""
    from pydantic import ValidationError

    from jobs.serve_app import CompletionRequest
    with pytest.raises(ValidationError) as e:
        CompletionRequest(prompt=[1, 2], temperature=0.5, seed=seed)
    assert [err["loc"] for err in e.value.errors()] == [("seed",)]
    assert CompletionRequest(prompt=[1], seed=2 ** 64 - 1).seed == 2 ** 64 - 1


def test_a_submit_that_raises_is_a_json_500_and_the_coordinator_is_told():
    """Any exception out of engine.submit (a ValueError from torch's manual_seed was one): a JSON 500, and the
    request registered with the coordinator just before is ended there, not leaked. The handler in this process,
    on a server object with stand-ins for its cluster and engine."""
    import asyncio
    from types import SimpleNamespace

    from cluster.config import AuthConfig
    from jobs.serve_app import CompletionRequest, CompletionServer, ServeArgs
    server = object.__new__(CompletionServer.func_or_class)
    registered, ended = [], []
    server.args, server.auth = ServeArgs(), AuthConfig()
    server.cluster = SimpleNamespace(coordinator=object(), register_request=lambda rid, *a: registered.append(rid),
                                     end_requests=ended.extend)
    server.m_requests = SimpleNamespace(inc=lambda *a: None)

    def submit(req):
        raise RuntimeError("kaboom")
    server.engine = SimpleNamespace(submit=submit)
    r = asyncio.run(server.completions(CompletionRequest(prompt=[1, 2], user="tenant-a"), SimpleNamespace()))
    assert r.status_code == 500 and json.loads(r.body)["error"] == {
        "message": "could not submit the request: RuntimeError: kaboom", "type": "server_error", "param": None,
        "code": 500}
    assert len(registered) == 1 and ended == registered


def test_build_app_checks_the_config_store_and_model_name(tmp_path):
    """`serve run` calls the builder before it starts Ray: a config that does not load, a store without a
    manifest, a model_name auth does not serve fail there with one clear error, not in a replica later."""
    from cluster.config import ConfigError
    from jobs.serve_app import build_app
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read configuration"):
        build_app({"config": str(tmp_path / "nope.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: {count: 0}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: workers\.count"):
        build_app({"config": str(bad)})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tiers:\n  - {{kind: dram, budget_bytes: 1MiB}}\n  - {{kind: nvme, path: {tmp_path}/none}}\n"
                   f"auth: {{enabled: true, models: [m1], tenants: {{t: {{api_key_sha256: ['{'0' * 64}']}}}}}}\n")
    with pytest.raises(ValueError, match=r"model_name 'moe-expert-cluster' is not one of auth\.models \['m1'\]"):
        build_app({"config": str(cfg)})
    with pytest.raises(ValueError, match=rf"store file://{tmp_path}/none: no usable manifest"):
        build_app({"config": str(cfg), "model_name": "m1", "store": f"file://{tmp_path}/none"})
    with pytest.raises(ValueError, match=r"workers\.hbm_budget_bytes: could not parse"):
        build_app({"config": str(cfg), "model_name": "m1", "hbm_budget": "lots"})
    tiny_store(tmp_path, f"file://{tmp_path}/store")
    assert type(build_app({"config": str(cfg), "model_name": "m1", "store": f"file://{tmp_path}/store"})).__name__ \
        == "Application"


HTTP_BODIES_TRIED = []


def test_request_bodies_property_based(url, reference):
    """Hypothesis on POST /v1/completions bodies: known fields with values of every JSON type and range, unknown
    fields, non-object JSON. Every body gets 200 (a valid request: its tokens equal the reference) or a JSON 4xx
    whose error names a parameter — never a 5xx — and the app keeps serving (a valid request afterwards)."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    model, _ = reference
    junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=False, width=32),
                     st.text(max_size=8), st.lists(st.integers(-3, 300), max_size=4))
    fields = dict(prompt=st.one_of(junk, st.lists(st.integers(0, 257), min_size=1, max_size=6)),
                  max_tokens=st.one_of(junk, st.integers(1, 3)), temperature=junk, top_p=junk, seed=junk,
                  stream=st.one_of(st.just(False), junk), model=st.one_of(st.just("moe-expert-cluster"), junk),
                  n=junk, unknown_field=junk)
    body = st.one_of(st.fixed_dictionaries({}, optional=fields),
                     st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5)))

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body)
    def check(b):
        HTTP_BODIES_TRIED.append(1)
        if isinstance(b, dict) and b.get("stream") is True:
            b = dict(b, stream=False)  # streamed bodies are covered above; here every answer is one JSON
        r = requests.post(f"{url}/v1/completions", json=b, timeout=120)
        assert r.status_code in (200, 400, 404, 422, 503), (b, r.status_code, r.text)
        if r.status_code == 200:
            ch = r.json()["choices"][0]
            p, mt = b["prompt"], b.get("max_tokens", None)
            if isinstance(p, list) and (b.get("temperature") in (None, 0, 0.0)) and isinstance(mt, int):
                assert ch["token_ids"] == generate(model, [p], mt)[0], b
        elif r.status_code != 503:
            err = r.json()["error"]
            assert err["message"] and "type" in err, (b, err)

    check()
    assert len(HTTP_BODIES_TRIED) >= 120
    r = complete(url, prompt=[5, 6, 7], max_tokens=4, temperature=0)   # still serving
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == generate(model, [[5, 6, 7]], 4)[0]


def test_overload_is_503_with_retry_after(url, reference):
    p = ids_of(reference, "def ")
    # 4 rows + 4 queued fit; 14 long requests at once must overflow the engine's queue
    with ThreadPoolExecutor(14) as ex:
        rs = list(ex.map(lambda _: complete(url, prompt=p, max_tokens=60, temperature=0), range(14)))
    codes = sorted(r.status_code for r in rs)
    over = [r for r in rs if r.status_code == 503]
    assert set(codes) == {200, 503} and codes.count(200) >= 8, codes
    for r in over:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded"
    ok = [r.json()["choices"][0]["token_ids"] for r in rs if r.status_code == 200]
    assert all(t == ok[0] for t in ok)  # the same greedy request: the same tokens in every batch position


def test_models_endpoint(url):
    r = requests.get(f"{url}/v1/models", timeout=30)
    assert r.status_code == 200
    [m] = r.json()["data"]
    assert m["id"] == "moe-expert-cluster" and m["object"] == "model" and m["max_model_len"] == 256


def test_load_test_against_the_app_has_no_errors(url, tmp_path):
    out = tmp_path / "load.json"
    p = subprocess.run([sys.executable, "-m", "jobs.load_test", "--url", url, "--clients", "1,3", "--seconds", "3",
                        "--max-tokens", "8", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(out.read_text())
    assert rep["errors"] == 0 and [r["clients"] for r in rep["runs"]] == [1, 3]
    for r in rep["runs"]:
        assert r["errors"] == 0 and r["requests"] >= 1 and r["tokens"] == 8 * r["requests"]
        assert r["p50_s"] <= r["p95_s"] <= r["p99_s"] and r["tokens_per_s"] > 0
    assert rep["runs"][1]["tokens_per_s_vs_first"] > 0
    assert "p50" in p.stdout and "tokens/s" in p.stdout


def test_request_metrics_reach_rays_prometheus_export(url):
    """ray.serve.metrics go through the node's metrics agent to its Prometheus endpoint (what /metrics scrapes)."""
    port = ray._private.worker.global_worker.node.metrics_export_port
    done = requests.get(f"{url}/v1/stats", timeout=30).json()["engine"]["requests_done"]
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        seen = {}
        for line in text.splitlines():
            if line.startswith("ray_moe_") and not line.startswith("#"):
                name = line.split("{")[0]
                if 'status="ok"' in line or "status=" not in line:
                    seen[name] = seen.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if seen.get("ray_moe_request_latency_s_count", 0) >= done - 2:  # exported every few seconds
            break
        time.sleep(2)
    assert seen.get("ray_moe_request_latency_s_count", 0) >= done - 2, sorted(seen)
    assert seen["ray_moe_tokens_total"] > 0 and "ray_moe_time_to_first_token_s_count" in seen
    assert seen.get("ray_moe_expert_cache_total", 0) > 0


def test_app_arguments_and_store_are_checked_before_anything_starts(tmp_path):
    from jobs.serve_app import ServeArgs, build_app, cluster_config
    with pytest.raises(ValueError, match=r"max_batch: Input should be greater than or equal to 1"):
        build_app({"max_batch": 0})
    with pytest.raises(ValueError, match=r"bogus: Extra inputs are not permitted"):
        build_app({"bogus": 1})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tiers:\n  - {{kind: dram, budget_bytes: 1MiB}}\n  - {{kind: nvme, path: {tmp_path}/none}}\n"
                   f"  - {{kind: s3, uri: s3://b/p, endpoint_url: embedded}}\n"
                   f"tier_sets: {{default: [dram, nvme, s3], cold: [s3]}}\n")
    with pytest.raises(FileNotFoundError, match=r"no expert store at .*none.*python -m jobs.demo"):
        cluster_config(ServeArgs(config=str(cfg)))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "manifest.json").write_text("{}")
    c = cluster_config(ServeArgs(config=str(cfg), workers=3, hbm_budget="2MiB"))
    # the demo-only embedded S3 tier is left out, with the TierSet that held only it
    assert [t.name for t in c.tiers] == ["dram", "nvme"] and c.tier_sets == {"default": ["dram", "nvme"]}
    assert c.workers.count == 3 and c.workers.hbm_budget_bytes == 2 << 20


def test_serve_config_yaml_is_valid_and_names_this_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema
    from ray.serve._private.utils import import_attr

    from jobs.serve_app import CompletionServer
    cfg = ServeDeploySchema.model_validate(yaml.safe_load(open(os.path.join(ROOT, "cluster/deploy/serve.yaml"))))
    [app] = cfg.applications
    assert app.import_path == "jobs.serve_app:app" and type(import_attr(app.import_path)).__name__ == "Application"
    [dep] = app.deployments
    assert dep.name == CompletionServer.name and dep.max_ongoing_requests >= 1
    assert dep.backpressure_config.retry_after_s >= 1 and cfg.http_options.host == "127.0.0.1"


def test_health_fails_when_workers_die_and_serve_replaces_the_replica(url, reference):
    r = requests.get(f"{url}/health", timeout=30)
    assert r.status_code == 200 and sorted(r.json()["live_workers"]) == [0, 1]
    st = requests.get(f"{url}/v1/stats", timeout=30).json()
    pid, ns = st["replica_pid"], st["namespace"]
    assert ns.startswith(NAMESPACE + "-")   # the replica's own namespace
    for w in (0, 1):
        ray.kill(ray.get_actor(f"expert-worker-{w}", namespace=ns))
    r = requests.get(f"{url}/health", timeout=30)
    if r.status_code == 503:   # the replica may already be on its way out; then Serve answers for it
        body = r.json()
        assert body.get("live_workers") == [] and sorted(body.get("dead_workers", {})) == ["0", "1"], body
    # Serve's check_health fails within a period or two; the replacement replica starts a fresh cluster
    deadline = time.monotonic() + 120
    new_pid = pid
    while time.monotonic() < deadline:
        try:
            s = requests.get(f"{url}/v1/stats", timeout=10)
            if s.status_code == 200:
                new_pid = s.json()["replica_pid"]
                if new_pid != pid:
                    break
        except requests.RequestException:
            pass
        time.sleep(1)
    assert new_pid != pid, "Serve did not replace the replica whose workers died"
    p = ids_of(reference, "def ")
    r = complete(url, prompt=p, max_tokens=8, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == generate(reference[0], [p], 8)[0]
