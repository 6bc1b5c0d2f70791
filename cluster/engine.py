"""Continuous batching over a MoEModel: the one decode loop that batch inference and Ray Serve share.

    engine = Engine(model, max_batch=8)              # model: MoEModel over LocalExperts or an ExpertCluster's
    for r in engine.run(requests):                   # batch use: results in completion order
        print(r.id, r.token_ids, r.finish_reason)
    engine.start(); h = engine.submit(req)           # serving: a background loop thread
    for ids in h.stream(): ...                       # new token ids as they are produced (await h.aresult() too)

The engine owns a fixed pool of `max_batch` KV-cache rows. Every step is ONE `model.forward` over all rows:
a request that just got a row feeds its whole prompt (n_new = prompt length: its prefill), a running one feeds
its last token (n_new = 1: a decode step), a free row feeds nothing (n_new = 0). So prefills ride in the same
forward as the others' decode steps, a finished request leaves its row at once and a waiting one takes it on
the next step. `cache.requests[row]` names the request in each row (the prefetch coordinator reads it through
the routing hook) and `on_request_end(request_id)` is called when a request leaves.

Exactness: the runtime computes each row as if alone (right padding never reaches the cache or the experts, see
cluster/model.py), so a greedy request gives the tokens `generate(model, [prompt], max_tokens)` gives, whatever
else shares its steps. Sampling draws from the request's own torch.Generator, one uniform per generated token,
exactly as `generate` does, so a seeded request is reproducible whatever batch it ran in.

Cache hits/misses per request are an approximation: the expert backend's cumulative counters (ClusterExperts
`counters`, when present) are read around each step and the step's delta is split over the requests in that
step in proportion to the tokens each fed (a prefill of 40 tokens takes 40 shares, a decode step 1). Backends
without counters (LocalExperts) report 0/0.

A failing step (e.g. a worker died and could not be replaced) fails the requests of that step with
finish_reason "error"; the rows are freed and the engine goes on with new requests. `cancel(request_id)` (a
client that went away) frees a request's row before the next step.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .model import MoEModel, sample

log = logging.getLogger(__name__)

_MODEL_EOS = object()
DEFAULT_MAX_LEN = 4096   # a 32k-context model would otherwise reserve 32k KV slots per row
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 64 - 1   # what torch.Generator.manual_seed takes (it raises ValueError beyond)


@dataclass
class GenerationRequest:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0                     # 0: greedy
    top_p: float = 1.0
    seed: int | None = None                      # None with temperature > 0: fresh entropy
    tenant: str | None = None
    stop_token_ids: tuple[int, ...] | None = None   # None: the engine's EOS ids; () never stops early
    tiers: tuple[str, ...] | None = None         # its TierSet: tier names its expert loads may read; None: all


@dataclass
class GenerationResult:
    id: str
    token_ids: list[int]                         # generated ids only; the stop token included (as transformers)
    finish_reason: str                           # "eos" | "length" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    latency_s: float = 0.0                       # submit -> last token
    ttft_s: float | None = None                  # submit -> first token (None: none produced)
    hits: int = 0                                # expert-cache hits attributed to this request (approximate)
    misses: int = 0
    tenant: str | None = None


class RequestError(ValueError):
    """A request the engine refuses before it enters the batch; `field` names the offending field."""

    def __init__(self, field_name: str, msg: str):
        super().__init__(f"{field_name}: {msg}")
        self.field = field_name
        self.reason = msg


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later (Serve answers 503 with Retry-After)."""


class RequestHandle:
    """The caller's side of a submitted request: its result (blocking or awaitable) and its token stream.

    Written by the engine thread, read from any thread or event loop; asyncio waiters are woken through
    `loop.call_soon_threadsafe`, so an event loop never blocks on the engine."""

    def __init__(self, req: GenerationRequest):
        self.request = req
        self._cv = threading.Condition()
        self._tokens: list[int] = []
        self._result: GenerationResult | None = None
        self._events: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._callbacks: list[Callable[[GenerationResult], None]] = []

    @property
    def id(self) -> str:
        return self.request.id

    def done(self) -> bool:
        return self._result is not None

    # -- engine side ------------------------------------------------------------------------------------------
    def _push(self, tok: int) -> None:
        with self._cv:
            self._tokens.append(tok)
            self._cv.notify_all()
            events = list(self._events)
        self._wake(events)

    def _finish(self, result: GenerationResult) -> None:
        with self._cv:
            if self._result is not None:
                return
            self._result = result
            self._cv.notify_all()
            events, cbs = list(self._events), list(self._callbacks)
        self._wake(events)
        for cb in cbs:
            cb(result)

    @staticmethod
    def _wake(events) -> None:
        for loop, ev in events:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed: its waiter is gone
                pass

    def add_done_callback(self, cb: Callable[[GenerationResult], None]) -> None:
        """cb(result) runs in the engine thread when the request finishes (at once if it already has)."""
        with self._cv:
            if self._result is None:
                self._callbacks.append(cb)
                return
        cb(self._result)

    # -- caller side ------------------------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> GenerationResult:
        with self._cv:
            if not self._cv.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.id!r}: no result within {timeout} s")
            return self._result

    def stream(self, timeout: float | None = None) -> Iterator[list[int]]:
        """New token ids as they are produced (lists, possibly several ids at once), until the request ends;
        then `result()` says why. timeout bounds each wait."""
        i = 0
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: len(self._tokens) > i or self._result is not None, timeout):
                    raise TimeoutError(f"request {self.id!r}: no token within {timeout} s")
                new, done = self._tokens[i:], self._result is not None
            i += len(new)
            if new:
                yield new
            if done:
                return

    async def astream(self):
        """Async iterator version of stream(), for event loops (Serve's FastAPI handlers)."""
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        with self._cv:
            self._events.append((loop, ev))
        try:
            i = 0
            while True:
                with self._cv:
                    ev.clear()  # any later push schedules ev.set on this loop, after this clear: no lost wakeup
                    new, done = self._tokens[i:], self._result is not None
                i += len(new)
                if new:
                    yield new
                if done:
                    return
                await ev.wait()
        finally:
            with self._cv:
                self._events.remove((loop, ev))

    async def aresult(self) -> GenerationResult:
        async for _ in self.astream():
            pass
        return self._result


@dataclass
class _Row:
    """A request holding a KV-cache row."""
    req: GenerationRequest
    handle: RequestHandle
    stop: frozenset
    budget: int                                   # tokens it may generate (max_tokens, capped by the context)
    gen: torch.Generator | None                   # its own sampler state (None: greedy)
    t_submit: float
    feed: list[int]                               # tokens the next step appends: the prompt, then the last token
    out: list[int] = field(default_factory=list)
    t_first: float | None = None
    hits: float = 0.0
    misses: float = 0.0


@dataclass
class EngineStats:
    steps: int = 0
    requests_done: int = 0
    requests_failed: int = 0                      # finished with "error" (failed steps, stopped engine, cancel)
    requests_cancelled: int = 0                   # of which cancelled (the client went away)
    rejected_invalid: int = 0
    rejected_overload: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    max_requests_in_step: int = 0
    steps_with_several: int = 0                   # steps whose forward carried more than one request
    mixed_steps: int = 0                          # steps where a prefill rode along with another's decode
    request_steps: int = 0                        # sum over steps of requests in the step
    failed_steps: int = 0
    step_seconds: float = 0.0


class Engine:
    def __init__(self, model: MoEModel, *, max_batch: int = 8, max_len: int | None = None,
                 eos_token_id=_MODEL_EOS, max_queue: int | None = None,
                 on_request_end: Callable[[str], None] | None = None,
                 tiers_ok: Callable[[tuple[str, ...]], bool] | None = None):
        """max_len: the context of one request (prompt + generated tokens), default the config's
        max_position_embeddings up to DEFAULT_MAX_LEN (the KV cache holds max_batch x max_len slots per layer).
        eos_token_id: int, list, or None for no stop token (default: the config's).
        max_queue: requests that may wait beyond the free rows before submit() raises EngineOverloaded (None:
        unbounded).
        on_request_end(request_id): called in the engine thread when a request finishes (default: the expert
        backend's `end_request`, if it has one). A routing hook with a `cache` attribute (ExpertCluster's
        RoutePublisher) is bound to this engine's cache, so routing events carry `cache.requests`.
        tiers_ok(tiers): whether a TierSet can serve every expert of the store. A step's loads read only the tiers
        every request in it allows (the intersection of their TierSets, set as the backend's `tiers`); a request
        that would narrow it joins only if tiers_ok says the narrower set still serves (None: only requests that
        do not narrow it join; the others wait for the rows to drain)."""
        assert max_batch >= 1, f"max_batch must be >= 1, got {max_batch}"
        self.model = model
        self.max_batch = max_batch
        self.max_len = int(max_len or min(model.args.max_position_embeddings, DEFAULT_MAX_LEN))
        assert self.max_len >= 1, f"max_len must be >= 1, got {max_len}"
        eos = model.args.eos_token_ids if eos_token_id is _MODEL_EOS else \
            () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        self.eos = tuple(int(e) for e in eos)
        self.max_queue = max_queue
        self.on_request_end = on_request_end or getattr(model.experts, "end_request", None)
        self.tiers_ok = tiers_ok
        self.cache = model.new_cache(max_batch, self.max_len)
        self.cache.lens = [1] * max_batch         # a free row keeps one (stale) slot: forward needs >= 1 per row
        self.cache.requests = [None] * max_batch
        hook = model.on_route
        if hook is not None and hasattr(hook, "cache"):  # the cluster's routing publisher names rows from it
            hook.cache = self.cache
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: deque[_Row] = deque()
        self.stats = EngineStats()
        self._cv = threading.Condition()          # guards waiting, rows' membership, stats counters of submit
        self._step_lock = threading.Lock()        # one step at a time (loop thread or run())
        self._in_flight: set[str] = set()
        self._cancelled: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- requests -----------------------------------------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> None:
        """Raise RequestError naming the field when the request cannot run on this engine."""
        V = self.model.args.vocab_size
        if not isinstance(req.id, str) or not req.id:
            raise RequestError("id", f"must be a non-empty string, got {req.id!r}")
        p = req.prompt_ids
        if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise RequestError("prompt_ids", "must be a list of integer token ids")
        if len(p) == 0:
            raise RequestError("prompt_ids", "the prompt is empty")
        if len(p) > self.max_len:
            raise RequestError("prompt_ids", f"the prompt has {len(p)} tokens, longer than the maximum context "
                                             f"of {self.max_len} tokens")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise RequestError("prompt_ids", f"token ids {bad[:4]} are outside the vocabulary [0, {V})")
        if not isinstance(req.max_tokens, int) or isinstance(req.max_tokens, bool) or req.max_tokens < 1:
            raise RequestError("max_tokens", f"must be an integer >= 1, got {req.max_tokens!r}")
        t = req.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise RequestError("temperature", f"must be a finite number >= 0, got {t!r}")
        tp = req.top_p
        if not isinstance(tp, (int, float)) or isinstance(tp, bool) or not 0 < tp <= 1:
            raise RequestError("top_p", f"must be in (0, 1], got {tp!r}")
        if req.seed is not None and (not isinstance(req.seed, int) or isinstance(req.seed, bool)):
            raise RequestError("seed", f"must be an integer or null, got {req.seed!r}")
        if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
            raise RequestError("seed", f"must be in [{SEED_MIN}, {SEED_MAX}], got {req.seed}")
        if req.stop_token_ids is not None and not all(isinstance(s, int) for s in req.stop_token_ids):
            raise RequestError("stop_token_ids", "must be a list of integer token ids")
        if req.tiers is not None and (isinstance(req.tiers, str) or not req.tiers
                                      or not all(isinstance(t, str) for t in req.tiers)):
            raise RequestError("tiers", f"must be a non-empty list of tier names or null, got {req.tiers!r}")

    def submit(self, req: GenerationRequest) -> RequestHandle:
        """Queue a request (thread-safe). Raises RequestError for an invalid one (it never enters the batch) and
        EngineOverloaded when max_queue requests already wait beyond the free rows."""
        try:
            self.validate(req)
        except RequestError:
            with self._cv:
                self.stats.rejected_invalid += 1
            raise
        n = len(req.prompt_ids)
        gen = None
        if req.temperature > 0:
            gen = torch.Generator()
            if req.seed is None:
                gen.seed()
            else:
                gen.manual_seed(int(req.seed))
        stop = self.eos if req.stop_token_ids is None else tuple(req.stop_token_ids)
        h = RequestHandle(req)
        # a sequence holds its prompt plus every generated token but the last: context - n + 1 tokens at most
        row = _Row(req=req, handle=h, stop=frozenset(stop), budget=min(req.max_tokens, self.max_len - n + 1),
                   gen=gen, t_submit=time.perf_counter(), feed=list(req.prompt_ids))
        with self._cv:
            if req.id in self._in_flight:
                self.stats.rejected_invalid += 1
                raise RequestError("id", f"a request with id {req.id!r} is already in flight")
            free = sum(r is None for r in self.rows)
            if self.max_queue is not None and len(self.waiting) - free >= self.max_queue:
                self.stats.rejected_overload += 1
                raise EngineOverloaded(f"all {self.max_batch} rows are busy and {len(self.waiting) - free} "
                                       f"requests wait (max_queue {self.max_queue})")
            self._in_flight.add(req.id)   # last: a submit that raised left nothing in flight (run() relies on it)
            self.waiting.append(row)
            self._cv.notify_all()
        return h

    def cancel(self, request_id: str) -> bool:
        """Give up on a request (its client went away): a waiting one finishes at once, a running one leaves its
        row before the next step. Finishes with "error" / "cancelled". Returns whether it was in flight."""
        with self._cv:
            if request_id not in self._in_flight:
                return False
            self._cancelled.add(request_id)
            self._cv.notify_all()
        return True

    # -- the step -----------------------------------------------------------------------------------------------
    def step(self) -> int:
        """Admit waiting requests into free rows, run one forward over every row, sample, retire finished
        requests. Returns how many requests the step carried (0: nothing to do)."""
        with self._step_lock:
            return self._step()

    def _step(self) -> int:
        cache = self.cache
        if self._cancelled:
            self._drop_cancelled()
        with self._cv:
            busy = [row for row in self.rows if row is not None]
            tiers = _meet_all(row.req.tiers for row in busy)
            for r in range(self.max_batch):
                if self.rows[r] is None and self.waiting:
                    want = _meet(tiers, self.waiting[0].req.tiers)
                    if busy and want != tiers and not (self.tiers_ok is not None and self.tiers_ok(want)):
                        break  # its TierSet and the running ones' cannot serve together: it waits (FIFO kept)
                    row = self.waiting.popleft()
                    busy.append(row)
                    tiers = want
                    self.rows[r] = row
                    cache.lens[r] = 0
                    cache.requests[r] = row.req.id
        active = [r for r in range(self.max_batch) if self.rows[r] is not None]
        if not active:
            return 0
        if hasattr(self.model.experts, "tiers"):  # this step's loads read only tiers every request allows
            self.model.experts.tiers = None if tiers is None else list(tiers)
        n_new = [0] * self.max_batch
        for r in active:
            n_new[r] = len(self.rows[r].feed)
        T = max(n_new)
        tokens = torch.zeros(self.max_batch, T, dtype=torch.int64)          # [B, T] right-padded
        for r in active:  # per row, not per token: a prompt is copied once, a decode row is one id
            tokens[r, :n_new[r]] = torch.as_tensor(self.rows[r].feed, dtype=torch.int64)
        counters = getattr(self.model.experts, "counters", None)
        before = _hm(counters)
        t0 = time.perf_counter()
        try:
            logits = self.model.forward(cache, tokens.to(self.model.device), n_new)        # [B, V] f32
            nxt, bad = self._sample(logits, active)                                        # [B] int64 (CPU)
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine lives on
            log.warning("engine step failed for requests %s: %s: %s", [self.rows[r].req.id for r in active],
                        type(e).__name__, e)
            self.stats.failed_steps += 1
            msg = f"{type(e).__name__}: {e}"
            for r in active:
                self._retire(r, "error", msg)
            return len(active)
        now = time.perf_counter()
        after = _hm(counters)
        st = self.stats
        st.steps += 1
        st.step_seconds += now - t0
        st.request_steps += len(active)
        st.max_requests_in_step = max(st.max_requests_in_step, len(active))
        st.steps_with_several += len(active) > 1
        prefills = sum(self.rows[r].t_first is None for r in active)
        st.mixed_steps += 0 < prefills < len(active)
        if before is not None and after is not None:  # split the step's hits/misses by tokens fed
            tot = sum(n_new)
            for r in active:
                share = n_new[r] / tot
                self.rows[r].hits += (after[0] - before[0]) * share
                self.rows[r].misses += (after[1] - before[1]) * share
        ids = nxt.tolist()                                                   # the one host sync of the step
        for r, msg in bad.items():   # their sampling failed: they end with the error, the others go on
            self._retire(r, "error", msg)
        for r in active:
            if r in bad:
                continue
            row = self.rows[r]
            if row.t_first is None:
                row.t_first = now
                st.prompt_tokens += len(row.req.prompt_ids)
            t = ids[r]
            row.out.append(t)
            st.tokens_generated += 1
            row.handle._push(t)
            if t in row.stop:
                self._retire(r, "eos")
            elif len(row.out) >= row.budget:
                self._retire(r, "length")
            else:
                row.feed = [t]
        return len(active)

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone, self._cancelled = self._cancelled, set()
            self.stats.requests_cancelled += len(gone & self._in_flight)
            keep, dropped = deque(), []
            for row in self.waiting:
                (dropped if row.req.id in gone else keep).append(row)
            self.waiting = keep
        for row in dropped:
            self._finish_unstarted(row, "cancelled")
        for r in range(self.max_batch):
            if self.rows[r] is not None and self.rows[r].req.id in gone:
                self._retire(r, "error", "cancelled")

    def _finish_unstarted(self, row: _Row, why: str) -> None:
        with self._cv:
            self._in_flight.discard(row.req.id)
            self.stats.requests_failed += 1
        self._end(row.req.id)   # as _retire: the coordinator may hold a registration for it (Serve registers first)
        row.handle._finish(GenerationResult(id=row.req.id, token_ids=[], finish_reason="error", error=why,
                                            prompt_tokens=len(row.req.prompt_ids), latency_s=time.perf_counter()
                                            - row.t_submit, tenant=row.req.tenant))

    def _sample(self, logits: torch.Tensor, active: list[int]) -> tuple[torch.Tensor, dict]:
        """(next token of every active row with that request's own settings, [B] int64 on the CPU; {row: error} of
        the rows whose sampling failed: one request's settings must not fail the others of its step)."""
        out = torch.zeros(self.max_batch, dtype=torch.int64)
        bad: dict[int, str] = {}
        greedy = [r for r in active if self.rows[r].gen is None]
        if greedy:
            idx = torch.tensor(greedy)
            out[idx] = logits[idx.to(logits.device)].argmax(dim=-1).cpu()
        groups: dict[tuple[float, float], list[int]] = {}
        for r in active:
            if self.rows[r].gen is not None:
                q = self.rows[r].req
                groups.setdefault((float(q.temperature), float(q.top_p)), []).append(r)
        for (temp, top_p), rs in groups.items():  # one `sample` per distinct setting: the rows' own generators
            idx = torch.tensor(rs)
            try:
                out[idx] = sample(logits[idx.to(logits.device)], temperature=temp, top_p=top_p,
                                  generators=[self.rows[r].gen for r in rs]).cpu()
            except Exception as e:  # noqa: BLE001 - only these rows' requests fail
                log.warning("sampling failed for requests %s: %s: %s", [self.rows[r].req.id for r in rs],
                            type(e).__name__, e)
                bad.update(dict.fromkeys(rs, f"sampling failed: {type(e).__name__}: {e}"))
        return out, bad

    def _retire(self, r: int, reason: str, error: str | None = None) -> None:
        row = self.rows[r]
        now = time.perf_counter()
        res = GenerationResult(
            id=row.req.id, token_ids=list(row.out), finish_reason=reason, error=error,
            prompt_tokens=len(row.req.prompt_ids), latency_s=now - row.t_submit,
            ttft_s=None if row.t_first is None else row.t_first - row.t_submit,
            hits=int(round(row.hits)), misses=int(round(row.misses)), tenant=row.req.tenant)
        with self._cv:
            self.rows[r] = None
            self.cache.lens[r] = 1
            self.cache.requests[r] = None
            self._in_flight.discard(row.req.id)
            if reason == "error":
                self.stats.requests_failed += 1
            else:
                self.stats.requests_done += 1
            self._cv.notify_all()
        self._end(row.req.id)
        row.handle._finish(res)

    def _end(self, request_id: str) -> None:
        if self.on_request_end is not None:
            try:
                self.on_request_end(request_id)
            except Exception as e:  # noqa: BLE001 - a notification must not fail the request
                log.warning("on_request_end(%r) failed: %s", request_id, e)

    # -- batch use ----------------------------------------------------------------------------------------------
    def run(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        """Run requests (read lazily) to completion; yields results in completion order. An invalid request
        yields an "error" result naming the field; the others go on. Drives the steps in this thread unless the
        background loop runs."""
        it = iter(requests)
        done: queue.SimpleQueue = queue.SimpleQueue()
        window = 2 * self.max_batch              # keep rows busy without reading the whole input
        in_flight = 0
        exhausted = False
        while True:
            while not exhausted and in_flight < window:
                req = next(it, None)
                if req is None:
                    exhausted = True
                    break
                try:
                    h = self.submit(req)
                except (RequestError, EngineOverloaded) as e:
                    yield _refused(req, str(e))
                    continue
                except Exception as e:  # noqa: BLE001 - a bug in submit fails this request only, not the run
                    log.warning("submit(%r) failed: %s: %s", getattr(req, "id", None), type(e).__name__, e)
                    yield _refused(req, f"submit failed: {type(e).__name__}: {e}")
                    continue
                in_flight += 1
                h.add_done_callback(done.put)
            if in_flight == 0:
                return
            if self.running:
                res = done.get()
            else:
                while done.empty():
                    self.step()
                res = done.get()
            in_flight -= 1
            yield res

    # -- serving loop -------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        if not self.running:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="moe-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still waiting or running finish with an "engine stopped" error."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._step_lock:
            with self._cv:
                waiting, self.waiting = list(self.waiting), deque()
            for r in range(self.max_batch):
                if self.rows[r] is not None:
                    self._retire(r, "error", "engine stopped")
            for row in waiting:
                self._finish_unstarted(row, "engine stopped")

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self.waiting or self._cancelled
                                  or any(r is not None for r in self.rows))
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug outside the forward: fail what runs, keep serving
                log.exception("engine loop step failed")
                with self._step_lock:
                    for r in range(self.max_batch):
                        if self.rows[r] is not None:
                            self._retire(r, "error", "internal engine error (see the replica log)")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- introspection ------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Counters and the current occupancy, JSON-ready."""
        with self._cv:
            d = dict(vars(self.stats))
            d.update(waiting=len(self.waiting), active=sum(r is not None for r in self.rows),
                     max_batch=self.max_batch, max_len=self.max_len, max_queue=self.max_queue,
                     running=self.running)
        d["mean_requests_per_step"] = round(d["request_steps"] / d["steps"], 3) if d["steps"] else 0.0
        return d


def _refused(req, error: str) -> GenerationResult:
    """The "error" result of a request that never entered the engine (submit raised; nothing is in flight)."""
    return GenerationResult(id=str(getattr(req, "id", "")), token_ids=[], finish_reason="error", error=error,
                            prompt_tokens=len(getattr(req, "prompt_ids", []) or []),
                            tenant=getattr(req, "tenant", None))


def _meet(a: tuple[str, ...] | None, b: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The tiers both TierSets allow (None: every tier), in a's order."""
    if a is None or b is None:
        return b if a is None else a
    return tuple(t for t in a if t in b)


def _meet_all(sets) -> tuple[str, ...] | None:
    out = None
    for s in sets:
        out = _meet(out, s)
    return out


def _hm(counters) -> tuple[int, int] | None:
    """(hits, misses) of a backend's cumulative counters dict, or None when it keeps none."""
    if not counters:
        return None
    try:
        return int(counters.get("hits", 0)), int(counters.get("misses", 0))
    except (AttributeError, TypeError, ValueError):
        return None
