"""ExpertWorker's prefetch queue in process, without Ray: the storage actor is a stand-in that reads a tiny converted
store through the real ExpertStore and can hold a read open. A prefetch cancelled while on the wire (its request
ended, or the coordinator or the fast path no longer wants it) lands stale, first to evict; an order for an expert
the store does not hold is dropped without stopping the prefetch threads."""
import asyncio
import threading
import time
import types
from concurrent.futures import Future

import pytest
import ray.exceptions

import actors.expert_worker as ew
from jobs.make_checkpoint import PRESETS, write_checkpoint
from storage_adapters.converter import convert, open_target, plan_conversion
from storage_adapters.nvme import NvmeAdapter
from storage_adapters.store import ExpertStore


class _Ref:
    def __init__(self, fn):
        self.fn = fn

    def future(self):
        f = Future()

        def run():
            try:
                f.set_result(self.fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                f.set_exception(e)
        threading.Thread(target=run, daemon=True).start()
        return f


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a, **k):
        return _Ref(lambda: self.fn(*a, **k))


class _Storage:
    """get_tiered as the StorageActor answers it; a read of a key in `gate` waits for its event."""
    def __init__(self, root: str, gate: dict):
        self.root, self.gate = root, gate
        self.store = asyncio.run(ExpertStore.open([NvmeAdapter(root, o_direct=False)]))
        self.get_tiered = _Method(self._get_tiered)
        self.weight_prefetch_config = _Method(lambda: {"enabled": False})

    def _get_tiered(self, layer, expert, tiers=None, prefetch=False, inline_max=0):
        ev = self.gate.get((layer, expert))
        if ev is not None:
            assert ev.wait(10), "the test never opened the gate"
        st = ExpertStore(self.store.manifest, [NvmeAdapter(self.root, o_direct=False)])
        return list(asyncio.run(st.read_blob(layer, expert, tiers=None)))


def _get(x, timeout=None):
    if isinstance(x, list):
        return [_get(i) for i in x]
    return x.fn() if isinstance(x, _Ref) else x


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("wq")
    ckpt = write_checkpoint(str(root / "ckpt"), PRESETS["tiny"], seed=0)
    asyncio.run(convert(plan_conversion(ckpt), [open_target(f"file://{root}/nvme")], progress=False))
    return str(root / "nvme")


@pytest.fixture
def make_worker(store, monkeypatch):
    monkeypatch.setattr(ew, "ray", types.SimpleNamespace(
        get=_get, exceptions=ray.exceptions,
        get_runtime_context=lambda: types.SimpleNamespace(get_node_id=lambda: "n0")))

    def make(budget_blobs: int, gate: dict | None = None, **kw):
        st = _Storage(store, gate or {})
        man = st.store.manifest
        return ew.ExpertWorker(0, man.to_json(), budget_blobs * man.expert_bytes, {"n0": [st]}, device="cpu",
                               weight_prefetch={"enabled": False}, **kw)
    return make


def _wait(cond, what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["request_ended", "coordinator_cancel", "fast_path_cancel"])
def test_a_prefetch_cancelled_on_the_wire_lands_stale(make_worker, how):
    gate = {(0, 1): threading.Event()}
    w = make_worker(3, gate)
    w.prefetch([(0, 1, 5.0, None if how == "fast_path_cancel" else "r1")])
    _wait(lambda: (0, 1) in w._loading, "the prefetch never started")
    if how == "request_ended":
        w.cancel(requests=["r1"])
    else:
        w.cancel(items=[(0, 1)], fast_path=how == "fast_path_cancel")
    gate[(0, 1)].set()
    _wait(lambda: (0, 1) in w._res and (0, 1) not in w._loading, "the prefetch never landed")
    assert w.cache.entries[(0, 1)].stale and w.stats()["stale_marked"] == 1


def test_a_fast_path_cancel_leaves_a_coordinators_load_on_the_wire_alone(make_worker):
    gate = {(0, 1): threading.Event()}
    w = make_worker(3, gate)
    w.prefetch([(0, 1, 5.0, "r1")])
    _wait(lambda: (0, 1) in w._loading, "the prefetch never started")
    w.cancel(items=[(0, 1)], fast_path=True)   # the fast path touches only its own orders
    gate[(0, 1)].set()
    _wait(lambda: (0, 1) in w._res and (0, 1) not in w._loading, "the prefetch never landed")
    assert not w.cache.entries[(0, 1)].stale


def test_an_order_for_an_expert_the_store_lacks_is_dropped_and_the_queue_goes_on(make_worker):
    w = make_worker(2, prefetch_concurrency=2)
    assert w.prefetch([(7, 0, 9.0, None), (7, 1, 9.0, "r")]) == 0
    assert w.stats()["prefetch_dropped"] == 2
    w.prefetch([(0, 1, 5.0, None)])
    _wait(lambda: (0, 1) in w._res, "a valid order never loaded")
    assert all(t.is_alive() for t in w._prefetchers)
