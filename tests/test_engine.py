"""The continuous-batching engine (cluster/engine.py) without Ray, on the embedded model in one process.

Reference: `cluster.model.generate` on each request alone. Requests arrive at different times into a pool smaller
than their number, so prefills ride along with other rows' decode steps and rows are refilled mid-run; every
greedy request must still give exactly the reference tokens, and a seeded sampled request the tokens of the same
request run alone with that seed.
"""
from __future__ import annotations

import asyncio
import os
import threading

import pytest

from cluster.engine import Engine, EngineOverloaded, GenerationRequest, RequestError
from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint

EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "embedded_model")
PROMPTS = ["def ", "import os\n", "class Foo(object):\n    def __init__(self", "    for i in range(",
           "x = ", "return ", "# Copyright", "if __name__ == '__main__':\n    "]


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # shared cores: one torch thread (conftest)


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(EMBEDDED)


@pytest.fixture(scope="module")
def model(ckpt):
    config, dense, experts = ckpt
    return MoEModel.from_dense(config, dense, LocalExperts(experts))


@pytest.fixture(scope="module")
def prompts():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(EMBEDDED, "tokenizer.json"))
    return [tok.encode(p).ids for p in PROMPTS]


def drain(engine: Engine, handles) -> None:
    while not all(h.done() for h in handles):
        assert engine.step() > 0, "requests left but the step had nothing to do"


def test_greedy_staggered_arrivals_equal_generate_alone(model, prompts):
    lens = [24, 5, 31, 12, 40, 3, 18, 27]
    refs = [generate(model, [p], n)[0] for p, n in zip(prompts, lens)]
    ends = []
    eng = Engine(model, max_batch=3, on_request_end=ends.append)
    handles = []
    for i in range(len(prompts)):  # a new request every 2 steps: joins mid-decode or waits for a free row
        handles.append(eng.submit(GenerationRequest(f"r{i}", prompts[i], lens[i])))
        eng.step()
        eng.step()
    drain(eng, handles)
    for i, h in enumerate(handles):
        r = h.result(timeout=0)
        assert r.token_ids == refs[i], f"request {i}: engine {r.token_ids} != generate alone {refs[i]}"
        assert r.finish_reason == ("eos" if refs[i][-1] in model.args.eos_token_ids else "length")
        assert r.prompt_tokens == len(prompts[i]) and r.ttft_s <= r.latency_s and (r.hits, r.misses) == (0, 0)
    st = eng.snapshot()
    assert st["max_requests_in_step"] == 3 and st["mixed_steps"] > 0 and st["requests_done"] == len(prompts)
    assert st["tokens_generated"] == sum(map(len, refs)) and st["active"] == 0 and st["waiting"] == 0
    assert sorted(ends) == sorted(f"r{i}" for i in range(len(prompts)))   # on_request_end once per request


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_every_family_batched_equals_generate_alone(tmp_path, family):
    """Shared experts, dense layers, q/k norms, EOS lists: rows refilled mid-run still match generate alone."""
    import hf_models
    t = hf_models.build(family, str(tmp_path))
    model = MoEModel.from_dense(t.config, t.dense, LocalExperts(t.experts))
    ps = hf_models.prompts(model.args.vocab_size, lens=(5, 13, 9, 3, 11), seed=4)
    lens = [12, 4, 16, 9, 7]
    eng = Engine(model, max_batch=2)
    hs = []
    for i, p in enumerate(ps):
        hs.append(eng.submit(GenerationRequest(f"{family}{i}", p, lens[i])))
        eng.step()
    drain(eng, hs)
    for i, (p, h) in enumerate(zip(ps, hs)):
        assert h.result().token_ids == generate(model, [p], lens[i])[0], f"{family} request {i}"
    assert eng.snapshot()["mixed_steps"] > 0


def test_stop_tokens_and_context_limit(model, prompts):
    ref = generate(model, [prompts[0]], 12, eos_token_id=None)[0]
    stop = ref[4]
    eng = Engine(model, max_batch=2, eos_token_id=None)
    a = eng.submit(GenerationRequest("stop", prompts[0], 12, stop_token_ids=(stop,)))
    b = eng.submit(GenerationRequest("len", prompts[0], 12))
    # a context of len(prompt) + 3 slots: generation stops after 4 tokens, as generate's max_seq_len does
    short = Engine(model, max_batch=1, max_len=len(prompts[1]) + 3, eos_token_id=None)
    c = short.submit(GenerationRequest("ctx", prompts[1], 50))
    drain(eng, [a, b])
    drain(short, [c])
    ra = a.result()
    assert ra.token_ids == ref[:ref.index(stop) + 1] and ra.finish_reason == "eos"  # stop token included
    assert b.result().token_ids == ref and b.result().finish_reason == "length"
    ref_c = generate(model, [prompts[1]], 50, eos_token_id=None, max_seq_len=len(prompts[1]) + 3)[0]
    assert c.result().token_ids == ref_c and len(ref_c) == 4 and c.result().finish_reason == "length"


def test_seeded_sampling_is_independent_of_batch_composition(model, prompts):
    ref = generate(model, [prompts[2]], 20, temperature=0.9, top_p=0.9, seeds=1234)[0]
    alone = Engine(model, max_batch=1)
    h = alone.submit(GenerationRequest("s", prompts[2], 20, temperature=0.9, top_p=0.9, seed=1234))
    drain(alone, [h])
    assert h.result().token_ids == ref
    busy = Engine(model, max_batch=4)  # the same request among others with other settings, joining late
    others = [busy.submit(GenerationRequest(f"o{i}", prompts[i], 15, temperature=t, top_p=p, seed=i))
              for i, (t, p) in enumerate([(1.2, 1.0), (0.0, 1.0), (0.9, 0.9)])]
    busy.step()
    busy.step()
    h2 = busy.submit(GenerationRequest("s", prompts[2], 20, temperature=0.9, top_p=0.9, seed=1234))
    drain(busy, others + [h2])
    assert h2.result().token_ids == ref
    # the other seeded ones match their own solo runs too; a different seed gives a different continuation
    assert others[0].result().token_ids == generate(model, [prompts[0]], 15, temperature=1.2, seeds=0)[0]
    assert generate(model, [prompts[2]], 20, temperature=0.9, top_p=0.9, seeds=99)[0] != ref


@pytest.mark.parametrize("field,kw,why", [
    ("prompt_ids", dict(prompt_ids=[]), "empty"),
    ("prompt_ids", dict(prompt_ids=[5] * 257), "longer than the maximum context of 256"),
    ("prompt_ids", dict(prompt_ids=[5, 9999]), "outside the vocabulary"),
    ("max_tokens", dict(max_tokens=0), ">= 1"),
    ("temperature", dict(temperature=-0.5), ">= 0"),
    ("temperature", dict(temperature=float("nan")), "finite"),
    ("top_p", dict(top_p=0.0), "(0, 1]"),
    ("top_p", dict(top_p=1.5), "(0, 1]"),
    ("id", dict(id=""), "non-empty"),
    ("seed", dict(seed=2 ** 64, temperature=0.5), "must be in [-9223372036854775808, 18446744073709551615]"),
    ("seed", dict(seed=-2 ** 63 - 1), "must be in ["),   # torch.Generator.manual_seed would raise ValueError
])
def test_invalid_requests_never_enter_the_batch(model, field, kw, why):
    eng = Engine(model, max_batch=2)
    req = GenerationRequest(**{**dict(id="bad", prompt_ids=[5, 6], max_tokens=4), **kw})
    with pytest.raises(RequestError, match=rf"^{field}: .*{__import__('re').escape(why)}") as e:
        eng.submit(req)
    assert e.value.field == field
    assert eng.step() == 0 and eng.snapshot()["rejected_invalid"] == 1


def test_duplicate_id_and_queue_bound(model, prompts):
    eng = Engine(model, max_batch=1, max_queue=1)
    a = eng.submit(GenerationRequest("a", prompts[0], 3))   # will take the free row
    with pytest.raises(RequestError, match="id: .*already in flight"):
        eng.submit(GenerationRequest("a", prompts[1], 3))
    b = eng.submit(GenerationRequest("b", prompts[1], 3))   # the one queued beyond the free rows
    with pytest.raises(EngineOverloaded, match="max_queue 1"):
        eng.submit(GenerationRequest("c", prompts[2], 3))
    drain(eng, [a])  # "a" leaves its row: the queue has room again
    c = eng.submit(GenerationRequest("c", prompts[2], 3))
    drain(eng, [b, c])
    assert [h.result().token_ids for h in (a, b, c)] == [generate(model, [p], 3)[0] for p in prompts[:3]]
    assert eng.snapshot()["rejected_overload"] == 1


def test_cancel_frees_rows_and_queue_slots(model, prompts):
    eng = Engine(model, max_batch=1)
    a, b, c = (eng.submit(GenerationRequest(x, prompts[i], 30)) for i, x in enumerate("abc"))
    eng.step()
    eng.step()                                    # "a" holds the row with 2 tokens, "b" and "c" wait
    assert eng.cancel("b") and eng.cancel("a") and not eng.cancel("nope")
    eng.step()                                    # both leave before this step's forward; "c" takes the row
    ra, rb = a.result(timeout=0), b.result(timeout=0)
    assert (ra.finish_reason, ra.error, len(ra.token_ids)) == ("error", "cancelled", 2)
    assert (rb.finish_reason, rb.error, rb.token_ids) == ("error", "cancelled", [])
    drain(eng, [c])
    assert c.result().token_ids == generate(model, [prompts[2]], 30)[0]
    st = eng.snapshot()
    assert st["requests_cancelled"] == 2 and st["requests_done"] == 1 and st["active"] == 0


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(ckpt, prompts):
    config, dense, experts = ckpt
    backend = LocalExperts(experts)
    model = MoEModel.from_dense(config, dense, backend)
    refs = [generate(model, [p], 10)[0] for p in prompts[:3]]
    eng = Engine(model, max_batch=2)
    hs = [eng.submit(GenerationRequest(f"r{i}", p, 10)) for i, p in enumerate(prompts[:3])]
    eng.step()
    held = dict(backend.weights)
    backend.weights.clear()  # every expert gone: the next forward raises inside the expert backend
    eng.step()
    backend.weights.update(held)
    assert [h.done() for h in hs] == [True, True, False]
    for h in hs[:2]:
        r = h.result()
        assert r.finish_reason == "error" and "holds no weights" in r.error and len(r.token_ids) == 1
    drain(eng, hs)  # the waiting request, and a new one, run normally on the freed rows
    h = eng.submit(GenerationRequest("late", prompts[0], 10))
    drain(eng, [h])
    assert hs[2].result().token_ids == refs[2] and h.result().token_ids == refs[0]
    st = eng.snapshot()
    assert st["failed_steps"] == 1 and st["requests_failed"] == 2 and st["requests_done"] == 2


def test_one_requests_sampling_never_fails_the_others_of_its_step(model, prompts, monkeypatch):
    """A temperature so small that logits / T overflows samples the top token (it gave NaN probabilities and
    failed the whole step); and a sampling failure ends only the requests of that setting."""
    ref = generate(model, [prompts[0]], 6)[0]
    eng = Engine(model, max_batch=3)
    hs = [eng.submit(GenerationRequest("greedy", prompts[0], 6)),
          eng.submit(GenerationRequest("tiny-t", prompts[0], 6, temperature=1e-40, seed=1))]
    drain(eng, hs)
    assert [h.result().token_ids for h in hs] == [ref, ref] and all(h.result().error is None for h in hs)
    import cluster.engine as engine_mod
    real = engine_mod.sample

    def fussy(logits, temperature, **kw):   # fails for one setting only
        if temperature == 0.7:
            raise RuntimeError("no sampler for 0.7")
        return real(logits, temperature=temperature, **kw)
    monkeypatch.setattr(engine_mod, "sample", fussy)
    hs = [eng.submit(GenerationRequest("greedy2", prompts[0], 6)),
          eng.submit(GenerationRequest("t07", prompts[1], 6, temperature=0.7, seed=2)),
          eng.submit(GenerationRequest("t09", prompts[2], 6, temperature=0.9, seed=3))]
    drain(eng, hs)
    r = [h.result() for h in hs]
    assert r[0].token_ids == ref and r[0].finish_reason == "length"
    assert r[1].finish_reason == "error" and "no sampler for 0.7" in r[1].error and r[1].token_ids == []
    assert r[2].finish_reason == "length" and len(r[2].token_ids) == 6


def test_background_loop_threads_asyncio_and_streams(model, prompts):
    refs = [generate(model, [p], 16)[0] for p in prompts]
    with Engine(model, max_batch=4) as eng:
        results = {}

        def client(i):
            h = eng.submit(GenerationRequest(f"t{i}", prompts[i], 16))
            streamed = [t for chunk in h.stream(timeout=60) for t in chunk]
            results[i] = (streamed, h.result(timeout=60).token_ids)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()

        async def aclients():
            async def one(i):
                h = eng.submit(GenerationRequest(f"a{i}", prompts[i], 16))
                streamed = [t async for chunk in h.astream() for t in chunk]
                return streamed, (await h.aresult()).token_ids
            return await asyncio.gather(*(one(i) for i in range(4, 8)))

        for i, got in zip(range(4, 8), asyncio.run(aclients())):
            results[i] = got
        for t in threads:
            t.join(60)
        for i, (streamed, final) in results.items():
            assert streamed == final == refs[i], f"request {i}"
        assert eng.snapshot()["max_requests_in_step"] > 1
    assert not eng.running


def test_run_batches_lazily_and_reports_bad_rows(model, prompts):
    reqs = [GenerationRequest(f"b{i}", p, 8) for i, p in enumerate(prompts)]
    reqs.insert(3, GenerationRequest("bad", [], 8))
    out = {r.id: r for r in Engine(model, max_batch=3).run(iter(reqs))}
    assert out["bad"].finish_reason == "error" and out["bad"].error.startswith("prompt_ids: ")
    for i, p in enumerate(prompts):
        assert out[f"b{i}"].token_ids == generate(model, [p], 8)[0]


def test_run_fails_only_the_request_whose_submit_raised(model, prompts):
    """A seed torch cannot take is a RequestError naming it; any other exception out of submit (a bug) fails that
    request alone: the run goes on and nothing is left in flight."""
    eng = Engine(model, max_batch=2)
    real = eng.submit

    def submit(req):
        if req.id == "boom":
            raise RuntimeError("kaboom")
        return real(req)
    eng.submit = submit
    reqs = [GenerationRequest("a", prompts[0], 5),
            GenerationRequest("big-seed", prompts[1], 5, temperature=0.8, seed=2 ** 64),
            GenerationRequest("boom", prompts[2], 5),
            GenerationRequest("b", prompts[3], 5)]
    out = {r.id: r for r in eng.run(iter(reqs))}
    assert out["big-seed"].finish_reason == "error" and out["big-seed"].error.startswith("seed: must be in [")
    assert out["boom"].finish_reason == "error" and out["boom"].error == "submit failed: RuntimeError: kaboom"
    assert out["boom"].prompt_tokens == len(prompts[2])
    for k, i in (("a", 0), ("b", 3)):
        assert out[k].token_ids == generate(model, [prompts[i]], 5)[0], k
    assert not eng._in_flight and eng.snapshot()["waiting"] == 0 and eng.snapshot()["active"] == 0


def test_requests_that_never_got_a_row_end_too(model, prompts):
    """on_request_end (the coordinator's registration) for requests cancelled while waiting and still waiting at
    stop(), not only for those that held a row."""
    ends = []
    eng = Engine(model, max_batch=1, on_request_end=ends.append)
    hs = [eng.submit(GenerationRequest(x, prompts[i], 30)) for i, x in enumerate("abc")]
    eng.step()                                    # "a" holds the row, "b" and "c" wait
    assert eng.cancel("b")
    eng.step()
    assert hs[1].result(timeout=0).error == "cancelled" and ends == ["b"]
    eng.stop()                                    # "a" running, "c" waiting: both end
    assert [h.result(timeout=0).error for h in hs] == ["engine stopped", "cancelled", "engine stopped"]
    assert sorted(ends) == ["a", "b", "c"]


class CountingExperts(LocalExperts):
    """LocalExperts that keep ClusterExperts-style cumulative counters: every (token, expert) pair a miss."""

    def __init__(self, weights):
        super().__init__(weights)
        self.counters = {"hits": 0, "misses": 0}
        self.routed: list[list] = []

    def moe(self, layer, x, topk_ids, topk_w):
        self.counters["misses"] += topk_ids.numel()
        return super().moe(layer, x, topk_ids, topk_w)


def test_hits_misses_split_by_tokens_and_rows_name_their_request(ckpt, prompts):
    config, dense, experts = ckpt
    backend = CountingExperts(experts)
    model = MoEModel.from_dense(config, dense, backend)

    class Publisher:  # a routing hook shaped like ExpertCluster's RoutePublisher: names rows via `cache`
        cache = None
        seen: list = []

        def __call__(self, layer, ids, w, x):
            self.seen.append({self.cache.requests[r] for r in model.route_rows.tolist()})

    model.on_route = hook = Publisher()
    eng = Engine(model, max_batch=2)
    assert hook.cache is eng.cache   # the engine bound its cache to the hook
    seen = hook.seen
    a = eng.submit(GenerationRequest("long", prompts[2], 6))
    b = eng.submit(GenerationRequest("short", prompts[0], 6))
    drain(eng, [a, b])
    ra, rb = a.result(), b.result()
    k, L = model.args.top_k, len(model.args.moe_layers)
    # each request fed its prompt plus 5 decode tokens; every token makes k pairs per MoE layer, all "misses"
    assert ra.misses == (len(prompts[2]) + 5) * k * L and rb.misses == (len(prompts[0]) + 5) * k * L
    assert ra.hits == rb.hits == 0 and ra.misses + rb.misses == backend.counters["misses"]
    assert {"long", "short"} in seen and None not in set().union(*seen)
