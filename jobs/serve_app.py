"""Ray Serve: an OpenAI-compatible completions server over the expert cluster.

    serve run jobs.serve_app:app                                   # defaults: ray_config.yaml, its NVMe store
    serve run jobs.serve_app:build_app store=file:///data/store max_batch=16
    serve deploy cluster/deploy/serve.yaml                         # on a running Ray cluster

One ingress deployment (`CompletionServer`, FastAPI through @serve.ingress). Each replica starts an ExpertCluster
from the config (storage actors, ExpertWorkers, placement, model runtime) and one continuous-batching Engine
(cluster/engine.py) whose loop thread runs the decode steps: concurrent HTTP requests share steps instead of
queueing one by one.

Endpoints: POST /v1/completions (prompt as text or token ids, max_tokens, temperature, top_p, seed, stream as
server-sent events), GET /v1/models, GET /health (503 when no expert worker answers), GET /v1/stats (engine and
cache counters). Errors are JSON in OpenAI's shape: 400 naming the field and why, 404 for an unknown model,
503 with Retry-After when the engine's queue is full (and from Serve itself past max_queued_requests).
Request metrics (latency, time to first token, tokens, expert-cache hits/misses) go to Ray's Prometheus export
through ray.serve.metrics.

Access control (the config's `auth:` section, docs/security.md): with auth enabled every path but /health needs
`Authorization: Bearer <key>` of a configured tenant (keys are kept as SHA-256 digests, compared in constant
time): 401 with WWW-Authenticate otherwise. A tenant asking for a model or TierSet it may not use, or whose TierSet
cannot serve the store, gets 403 naming what is refused. Every refusal happens before the request reaches the
engine: nothing is read on its behalf. An admitted request carries its tenant and TierSet to the engine (whose
steps' expert loads read only tiers every request in the step allows) and to the prefetch coordinator.
"""
# no `from __future__ import annotations`: FastAPI must see the body model class, not a string
import asyncio
import importlib
import json
import logging
import os
import time
import uuid
from types import SimpleNamespace
from typing import Literal

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: 127.0.0.1 only

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402
from ray import serve  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("ray.serve")
REALM = "moe-expert-cluster"
OPEN_PATHS = frozenset({"/health"})   # load balancers probe it without a key; it shows no tenant's data
# this replica process's auth settings: set by CompletionServer.__init__ through the imported module (the class is
# shipped to the replica by value, so a plain global there would be a copy the middleware never sees)
_AUTH: dict = {"auth": None, "refused": None}


class ServeArgs(BaseModel):
    """Application arguments (`serve run jobs.serve_app:build_app key=value ...` or `args:` in a Serve config)."""
    model_config = ConfigDict(extra="forbid")
    config: str = "ray_config.yaml"          # relative: against the working directory, else the repository root
    store: str | None = None                 # file:///path or s3://bucket/prefix; None: the config's storage tiers
    endpoint_url: str | None = None          # S3 endpoint of `store`
    workers: int | None = Field(None, ge=1)
    hbm_budget: str | None = None            # per worker, e.g. "64MiB" (default: the config's)
    model_name: str = "moe-expert-cluster"   # the `model` clients name; any other is a 404
    max_batch: int = Field(8, ge=1, le=1024)     # KV rows: requests decoded together
    max_queue: int = Field(32, ge=0)             # requests waiting for a row before 503
    max_len: int | None = Field(None, ge=1)      # context per request (default: the model's, at most 4096)
    max_tokens_limit: int = Field(1024, ge=1)    # the most a request may ask for
    retry_after_s: int = Field(1, ge=0)
    num_replicas: int = Field(1, ge=1)           # Serve: replicas, each with its own ExpertCluster
    max_ongoing_requests: int = Field(64, ge=1)  # Serve: requests in a replica at once
    max_queued_requests: int = Field(64, ge=-1)  # Serve: requests queued at a proxy before its own 503
    num_cpus: float = Field(1.0, ge=0)           # reserved by the replica (the runtime's attention and routing)
    torch_threads: int | None = Field(None, ge=1)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    worker_ping_timeout_s: float = Field(5.0, gt=0)

    @field_validator("config")
    @classmethod
    def _resolve(cls, v: str) -> str:
        if os.path.isabs(v) or os.path.exists(v):
            return os.path.abspath(v)
        return os.path.join(ROOT, v)  # `serve deploy`: the app is built where the package is installed


class CompletionRequest(BaseModel):
    """The OpenAI completions request body (the fields this server implements; unknown fields are an error)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stream: bool = False
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 64 - 1)   # torch.Generator's range (cluster/engine.py)
    n: Literal[1] = 1
    stop_token_ids: list[int] | None = None      # vLLM's extension: stop on these ids instead of the EOS
    user: str | None = None                      # OpenAI's end-user id; the tenant when auth is off
    tier_set: str | None = None                  # extension: a TierSet of the config (default: the tenant's)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if len(v) == 0:
            raise ValueError("the prompt is empty")
        return v


def _build_config(a: ServeArgs):
    """The ExpertCluster's config: the file, with `store` replacing its storage tiers as jobs.generate does;
    without a store, a local-S3 tier marked `embedded` (which only the demo starts) is left out."""
    from cluster.config import EMBEDDED, load_config
    from jobs.generate import build_config
    if a.store:
        return build_config(SimpleNamespace(config=a.config, store=a.store, endpoint_url=a.endpoint_url,
                                            workers=a.workers, hbm_budget=a.hbm_budget))
    return _config_tiers(a, load_config(a.config), embedded=EMBEDDED)


def cluster_config(a: ServeArgs):
    """_build_config, in the replica: its NVMe store must be there (a missing manifest is named here)."""
    cfg = _build_config(a)
    tiers = cfg.storage_tiers
    if tiers and all(t.kind == "nvme" and not os.path.exists(os.path.join(t.path, "manifest.json")) for t in tiers):
        raise FileNotFoundError(
            f"no expert store at {[t.path for t in tiers]} (no manifest.json): run `python -m jobs.demo` or "
            f"`python -m jobs.convert --checkpoint DIR --store file://{tiers[0].path}` first, or pass store=URI")
    return cfg


def _config_tiers(a: ServeArgs, base, embedded: str):
    """The config file's tiers without the demo's embedded S3 server, and the worker overrides."""
    tiers = [t.model_dump() for t in base.tiers if not (t.kind == "s3" and t.endpoint_url == embedded)]
    workers = base.workers.model_dump()
    if a.workers:
        workers["count"] = a.workers
    if a.hbm_budget:
        workers["hbm_budget_bytes"] = a.hbm_budget
    kept = {t["name"] for t in tiers}
    sets = {k: [n for n in v if n in kept] for k, v in base.tier_sets.items()}
    named = {s for t in base.auth.tenants.values() for s in t.tier_sets or []}  # kept: refused with a 403 by name
    return base.model_validate({**base.model_dump(), "tiers": tiers, "workers": workers,
                                "tier_sets": {k: v for k, v in sets.items() if v or k in named}})


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


api = FastAPI(title="moe-expert-cluster", description="OpenAI-compatible completions over the expert cluster")


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError):
    """pydantic's errors as 400: the first field and why, every error listed."""
    errs = exc.errors()
    if errs and errs[0]["type"] == "json_invalid":   # its loc is ("body", character offset): not a field
        e = errs[0]
        pos = e["loc"][1] if len(e["loc"]) > 1 else "?"
        return _error(400, f"body: invalid JSON at position {pos}: {(e.get('ctx') or {}).get('error') or e['msg']}")

    def where(e):
        loc = [str(p) for p in e["loc"] if p != "body"]
        # a union (prompt: str | list[int]) reports the branch tried: keep the field, then the item index
        return ".".join(p for p in loc if p not in ("str", "list[int]")) or "body"

    msgs = [f"{where(e)}: {e['msg']}" for e in errs]
    first = where(errs[0]) if errs else None
    return _error(400, "; ".join(msgs), param=first.split(".")[0] if first else None)


@api.middleware("http")
async def _authenticate(request: Request, call_next):
    """With auth on, every path but OPEN_PATHS needs a tenant's key: 401 otherwise, before the body is parsed.
    The tenant goes on request.state. The key is never logged nor echoed."""
    auth = _AUTH["auth"]
    request.state.tenant = None
    if auth is None or request.url.path in OPEN_PATHS:
        return await call_next(request)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    tenant = auth.tenant_of(key) if scheme.lower() == "bearer" and key else None
    if tenant is None:
        if _AUTH["refused"] is not None:
            _AUTH["refused"]("unauthorized")
        missing = scheme.lower() != "bearer" or not key
        return _error(401, "missing API key: send the header `Authorization: Bearer <key>`" if missing else
                      "invalid API key", kind="authentication_error",
                      headers={"WWW-Authenticate": f'Bearer realm="{REALM}"' +
                               ("" if missing else ', error="invalid_token"')})
    request.state.tenant = tenant
    return await call_next(request)


@serve.deployment(name="CompletionServer")
@serve.ingress(api)
class CompletionServer:
    def __init__(self, args: dict):
        import torch

        from cluster.engine import Engine
        from cluster.expert_cluster import ExpertCluster
        self.args = a = ServeArgs(**args)
        if a.torch_threads:
            torch.set_num_threads(a.torch_threads)
        cfg = cluster_config(a)
        self.auth = cfg.auth
        if self.auth.enabled and a.model_name not in self.auth.models:
            raise ValueError(f"model_name {a.model_name!r} is not one of auth.models {self.auth.models} in {a.config}")
        self.tier_sets = dict(cfg.tier_sets) or {"default": [t.name for t in cfg.tiers]}
        self.active_tier_set = cfg.active_tier_set
        self.storage_names = [t.name for t in cfg.storage_tiers]
        # each replica runs its own cluster: its own namespace keeps the named actors (workers, storage actors,
        # coordinator) of two replicas apart
        self.namespace = f"{cfg.ray.namespace}-{serve.get_replica_context().replica_id.unique_id}"
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"namespace": self.namespace})})
        self.cluster = ExpertCluster(cfg).start()
        self.tokenizer = self._tokenizer()
        end = getattr(self.cluster, "end_requests", None)  # tells the prefetch coordinator a request is over
        self.blob_tiers = [frozenset(b.tiers) for b in self.cluster.manifest.blobs]
        self._unserved_of: dict[frozenset, int] = {}
        self.engine = Engine(self.cluster.model, max_batch=a.max_batch, max_len=a.max_len, max_queue=a.max_queue,
                             on_request_end=(lambda rid: end([rid])) if end else None,
                             tiers_ok=lambda tiers: self.unserved(tiers) == 0).start()
        self.created = int(time.time())
        self._metrics()
        state = importlib.import_module(__name__)._AUTH   # the module the middleware reads (see _AUTH)
        state.update(auth=self.auth if self.auth.enabled else None,
                     refused=lambda status: self.m_requests.inc(1, {"status": status}))
        log.info("CompletionServer ready: %d workers, max_batch %d, context %d", len(self.cluster.workers),
                 a.max_batch, self.engine.max_len)

    def _tokenizer(self):
        import ray
        from tokenizers import Tokenizer
        storage = next(iter(self.cluster.storage.values()))[0]
        raw = ray.get(storage.aux.remote("tokenizer.json"))
        return Tokenizer.from_str(raw.decode()) if raw else None

    def _metrics(self):
        from ray.serve.metrics import Counter, Gauge, Histogram
        lat = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
        self.m_latency = Histogram("moe_request_latency_s", "completion latency, request in to last token",
                                   boundaries=lat, tag_keys=("status",))
        self.m_ttft = Histogram("moe_time_to_first_token_s", "request in to first token", boundaries=lat)
        self.m_requests = Counter("moe_requests", "completion requests by outcome", tag_keys=("status",))
        self.m_tokens = Counter("moe_tokens", "tokens processed", tag_keys=("kind",))
        self.m_cache = Counter("moe_expert_cache", "expert-cache lookups attributed to requests",
                               tag_keys=("result",))
        self.m_waiting = Gauge("moe_engine_waiting", "requests waiting for a KV row")
        self.m_active = Gauge("moe_engine_active", "requests holding a KV row")

    def _record(self, res, status: str) -> None:
        self.m_requests.inc(1, {"status": status})
        self.m_latency.observe(res.latency_s, {"status": status})
        if res.ttft_s is not None:
            self.m_ttft.observe(res.ttft_s)
        for counter, n, tags in ((self.m_tokens, res.prompt_tokens, {"kind": "prompt"}),
                                 (self.m_tokens, len(res.token_ids), {"kind": "completion"}),
                                 (self.m_cache, res.hits, {"result": "hit"}),
                                 (self.m_cache, res.misses, {"result": "miss"})):
            if n > 0:  # Ray's Counter refuses 0
                counter.inc(n, tags)
        snap = self.engine.snapshot()
        self.m_waiting.set(snap["waiting"])
        self.m_active.set(snap["active"])

    # -- access -------------------------------------------------------------------------------------------------
    def unserved(self, tiers) -> int:
        """How many expert blobs no storage tier of the TierSet `tiers` (deployed here) holds; 0: it serves."""
        key = frozenset(tiers)
        n = self._unserved_of.get(key)
        if n is None:
            allowed = key & set(self.storage_names)
            n = self._unserved_of[key] = sum(1 for held in self.blob_tiers if not held & allowed)
        return n

    def _admit(self, body: CompletionRequest, tenant: str | None):
        """(the request's TierSet as tier names or None for every tier, None) or (None, the refusal). Every refusal
        is decided here, before the engine: nothing is read on behalf of a refused request."""
        a = self.args
        rule = self.auth.tenants[tenant] if self.auth.enabled else None

        def refuse(status, msg, param):
            self.m_requests.inc(1, {"status": "forbidden" if status == 403 else "invalid"})
            return None, _error(status, msg, param=param,
                                kind="permission_error" if status == 403 else "invalid_request_error")
        if rule is not None and rule.models is not None and a.model_name not in rule.models:
            return refuse(403, f"model: tenant {tenant!r} is not allowed model {a.model_name!r} (allowed: "
                               f"{rule.models})", "model")
        name = body.tier_set
        if name is None and rule is not None:
            name = rule.tier_sets[0] if rule.tier_sets else self.active_tier_set
        if name is None:
            return None, None
        if name not in self.tier_sets:
            return refuse(400, f"tier_set: unknown TierSet {name!r} (defined: {sorted(self.tier_sets)})", "tier_set")
        if rule is not None and rule.tier_sets is not None and name not in rule.tier_sets:
            return refuse(403, f"tier_set: tenant {tenant!r} may not use TierSet {name!r} (allowed: "
                               f"{rule.tier_sets})", "tier_set")
        tiers = tuple(self.tier_sets[name])
        n = self.unserved(tiers)
        if n:
            return refuse(403 if rule is not None else 400,
                          f"tier_set: TierSet {name!r} {list(tiers)} cannot serve model {a.model_name!r}: {n} of "
                          f"{len(self.blob_tiers)} expert blobs are held by none of its storage tiers (storage "
                          f"tiers here: {self.storage_names})", "tier_set")
        return tiers, None

    # -- health -------------------------------------------------------------------------------------------------
    async def _probe(self) -> tuple[list[int], dict[int, str]]:
        """(live worker ids, {dead worker id: why}) by pinging every worker of the placement."""
        ids = list(self.cluster.workers)
        refs = [self.cluster.workers[w].ping.remote() for w in ids]
        live, dead = [], {}
        done = await asyncio.wait_for(asyncio.gather(*refs, return_exceptions=True),
                                      self.args.worker_ping_timeout_s) if refs else []
        for w, r in zip(ids, done):
            if isinstance(r, BaseException):
                dead[w] = f"{type(r).__name__}: {str(r).splitlines()[0] if str(r) else ''}"
            else:
                live.append(w)
        return live, dead

    async def check_health(self):
        """Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it (a fresh
        cluster). A single dead worker is not fatal: the next step re-places its experts on the survivors."""
        if not self.engine.running:
            raise RuntimeError("the engine loop is not running")
        try:
            live, dead = await self._probe()
        except asyncio.TimeoutError:
            raise RuntimeError(f"expert workers did not answer a ping within {self.args.worker_ping_timeout_s} s")
        if not live:
            raise RuntimeError(f"no expert worker is reachable: {dead}")

    @api.get("/health")
    async def health(self):
        try:
            live, dead = await self._probe()
        except asyncio.TimeoutError:
            return _error(503, "expert workers did not answer in time", kind="unavailable")
        body = {"status": "ok" if live and self.engine.running else "unavailable", "live_workers": live,
                "dead_workers": dead, "engine_running": self.engine.running}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    # -- OpenAI API ---------------------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self, request: Request):
        rule = self.auth.tenants[request.state.tenant] if self.auth.enabled else None
        if rule is not None and rule.models is not None and self.args.model_name not in rule.models:
            return {"object": "list", "data": []}   # only the models this tenant may use
        return {"object": "list", "data": [{"id": self.args.model_name, "object": "model", "created": self.created,
                                            "owned_by": "moe-expert-cluster", "max_model_len": self.engine.max_len}]}

    @api.get("/v1/stats")
    async def stats(self):
        import ray
        ws = await asyncio.gather(*[w.stats.remote() for w in self.cluster.workers.values()],
                                  return_exceptions=True)
        ws = [w for w in ws if isinstance(w, dict)]
        coord = getattr(self.cluster, "coordinator", None)
        if coord is not None:  # the prefetch coordinator's view: routing batches received, requests still live
            try:
                cs = await asyncio.wait_for(coord.stats.remote(), 10)
                coord = {k: cs.get(k) for k in ("policy", "batches", "steps", "live_requests", "registered_requests",
                                                "dropped_batches")}
            except Exception as e:  # noqa: BLE001 - stats must answer even when the coordinator does not
                coord = {"error": f"{type(e).__name__}: {e}"}
        return {"coordinator": coord, "engine": self.engine.snapshot(), "replica_pid": os.getpid(),
                "namespace": self.namespace,
                "node_id": ray.get_runtime_context().get_node_id(),
                "workers": len(self.cluster.workers), "lost_workers": list(self.cluster.lost_workers),
                "hits": sum(w.get("hits", 0) for w in ws), "misses": sum(w.get("misses", 0) for w in ws)}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        from cluster.engine import EngineOverloaded, GenerationRequest, RequestError
        a = self.args
        if body.model is not None and body.model != a.model_name:
            return _error(404, f"model: the model {body.model!r} does not exist; this server serves "
                               f"{a.model_name!r}", param="model", kind="model_not_found")
        tenant = request.state.tenant if self.auth.enabled else body.user
        tiers, refused = self._admit(body, tenant)
        if refused is not None:
            return refused
        if body.max_tokens > a.max_tokens_limit:
            return _error(400, f"max_tokens: {body.max_tokens} is more than this server's limit of "
                               f"{a.max_tokens_limit}", param="max_tokens")
        if isinstance(body.prompt, str):
            if self.tokenizer is None:
                return _error(400, "prompt: the store has no tokenizer.json; send the prompt as a list of token "
                                   "ids", param="prompt")
            ids = self.tokenizer.encode(body.prompt).ids
        else:
            ids = list(body.prompt)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        req = GenerationRequest(id=rid, prompt_ids=ids, max_tokens=body.max_tokens, temperature=body.temperature,
                                top_p=body.top_p, seed=body.seed, tenant=tenant, tiers=tiers,
                                stop_token_ids=tuple(body.stop_token_ids) if body.stop_token_ids is not None
                                else None)
        registered = getattr(self.cluster, "coordinator", None) is not None and (tenant is not None or
                                                                                tiers is not None)
        if registered:
            try:   # before its first routing event: its prefetches honour these (numbered with its end: an async
                   # actor runs calls out of order, and a stale registration is dropped by the coordinator)
                self.cluster.register_request(rid, tenant, None if tiers is None else list(tiers))
            except Exception:  # noqa: BLE001 - admitted above; a stricter prefetch rule only means no prefetch
                pass
        try:
            handle = self.engine.submit(req)
        except Exception as e:  # noqa: BLE001 - every refusal, a bug included, is a JSON answer
            if registered:   # it will never run: the coordinator forgets what it was told
                self.cluster.end_requests([rid])
            if isinstance(e, RequestError):
                field = {"prompt_ids": "prompt"}.get(e.field, e.field)
                self.m_requests.inc(1, {"status": "invalid"})
                return _error(400, f"{field}: {e.reason}", param=field)
            if isinstance(e, EngineOverloaded):
                self.m_requests.inc(1, {"status": "overloaded"})
                return _error(503, f"server overloaded: {e}; retry later", kind="overloaded",
                              headers={"Retry-After": str(a.retry_after_s)})
            log.exception("engine.submit failed for %s", rid)
            self.m_requests.inc(1, {"status": "error"})
            return _error(500, f"could not submit the request: {type(e).__name__}: {e}", kind="server_error")
        if body.stream:
            return StreamingResponse(self._sse(handle, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            res = await handle.aresult()
        except asyncio.CancelledError:  # the client went away (Serve cancels the handler): free the row
            self.engine.cancel(rid)
            raise
        if res.finish_reason == "error":
            self._record(res, "error")
            return _error(500, f"generation failed: {res.error}", kind="server_error")
        self._record(res, "ok")
        return self._body(rid, res.token_ids, res, self._text(res.token_ids))

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _body(self, rid: str, ids: list[int], res, text: str, *, chunk: bool = False) -> dict:
        d = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.args.model_name,
             "choices": [{"index": 0, "text": text, "token_ids": ids, "logprobs": None,
                          "finish_reason": None if res is None else
                          {"eos": "stop", "length": "length"}.get(res.finish_reason, res.finish_reason)}]}
        if res is not None:
            d["usage"] = {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                          "total_tokens": res.prompt_tokens + len(res.token_ids)}
            d["expert_cache"] = {"hits": res.hits, "misses": res.misses}
            d["latency_s"] = round(res.latency_s, 6)
            d["ttft_s"] = None if res.ttft_s is None else round(res.ttft_s, 6)
        return d

    async def _sse(self, handle, rid: str):
        """Server-sent events: one `data: {...}` per batch of new tokens (text is the decoded delta; a partial
        UTF-8 character waits for its next byte), a final event with finish_reason and usage, then [DONE]."""
        ids: list[int] = []
        sent = ""
        try:
            async for new in handle.astream():
                ids += new
                text = self._text(ids)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: hold it back
                    delta = ""
                else:
                    delta, sent = text[len(sent):], text
                yield f"data: {json.dumps(self._body(rid, new, None, delta))}\n\n"
        finally:  # the client disconnected mid-stream (the generator is closed or cancelled): free the row
            if not handle.done():
                self.engine.cancel(rid)
        res = handle.result(timeout=0)
        if res.finish_reason == "error":
            self._record(res, "error")
            err = {"error": {"message": f"generation failed: {res.error}", "type": "server_error", "code": 500}}
            yield f"data: {json.dumps(err)}\n\n"
        else:
            self._record(res, "ok")
            tail = self._text(ids)[len(sent):]
            yield f"data: {json.dumps(self._body(rid, [], res, tail))}\n\n"
        yield "data: [DONE]\n\n"

    def __del__(self):
        eng, c = getattr(self, "engine", None), getattr(self, "cluster", None)
        if eng is not None:
            eng.stop(timeout=5)
        if c is not None:
            c.shutdown()


def build_app(args: dict):
    """The Serve application for `args` (see ServeArgs). What can be checked without Ray fails here, before anything
    is deployed (`serve run` calls this before it starts Ray), naming what is wrong: the args, the config file
    (ConfigError names the file and key), a `model_name` that auth does not serve, a `store` whose manifest cannot
    be read. The config's own tiers (no `store`) are the cluster's nodes' business: the replica checks them."""
    from storage_adapters.errors import StoreError

    def invalid(e: ValidationError):
        return ValueError("invalid jobs.serve_app arguments: " + "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    try:
        a = ServeArgs(**(args or {}))
    except ValidationError as e:
        raise invalid(e) from None
    try:
        cfg = _build_config(a)
    except ValidationError as e:   # workers / hbm_budget / store applied to the config's models
        raise invalid(e) from None
    if cfg.auth.enabled and a.model_name not in cfg.auth.models:
        raise ValueError(f"invalid jobs.serve_app arguments: model_name {a.model_name!r} is not one of auth.models "
                         f"{cfg.auth.models} in {a.config}")
    if a.store:
        from jobs.generate import check_store
        try:
            check_store(cfg)
        except StoreError as e:
            raise ValueError(f"invalid jobs.serve_app arguments: store {a.store}: {e}") from None
    return CompletionServer.options(
        num_replicas=a.num_replicas, max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": a.retry_after_s},
        health_check_period_s=a.health_check_period_s, health_check_timeout_s=a.health_check_timeout_s,
        ray_actor_options={"num_cpus": a.num_cpus}).bind(a.model_dump())


def __getattr__(name: str):
    """`jobs.serve_app:app` (serve run / deploy / build): the app with its defaults, built (and checked) on first
    use, so that importing this module for build_app(args) reads no default config."""
    if name == "app":
        globals()["app"] = built = build_app({})
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
