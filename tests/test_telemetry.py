"""Telemetry math (policies/telemetry.py) against hand-computed values."""
import numpy as np
import pytest

from policies.telemetry import Telemetry

L, E, K = 4, 8, 2


def a(*x):
    return np.array(x, dtype=np.int64)


def test_recall_precision_and_timely_recall_by_distance():
    t = Telemetry(L, E, K)
    # request r at position 5 (token 1, layer 1) predicts distance 1 (pos 6) and distance 2 (pos 7)
    t.record_prediction("r", 5, a(1, 1, 1, 2, 2), a(2, 2, 2, 3, 3), a(0, 1, 2, 4, 5),
                        np.array([0.9, 0.6, 0.1, 0.5, 0.4]), threshold=0.3)
    t.record_truth("r", 6, a(1, 2), resident=np.array([True, True]))
    # d=1: top-2 = {0, 1}; truth {1, 2}: recall 1/2; above threshold {0, 1}: 1 of 2 right
    # timely: 1 predicted (top-k) and resident; 2 predicted? no (0.1 is below threshold and not in the top 2)
    t.record_truth("r", 7, a(4, 6), resident=np.array([False, True]))
    # d=2: top-2 = {4, 5}; truth {4, 6}: recall 1/2; above threshold {4, 5}: 1 of 2; timely: 4 not resident
    s = t.snapshot()
    assert s["recall_at_k"] == {1: 0.5, 2: 0.5}
    assert s["precision_by_distance"] == {1: 0.5, 2: 0.5}
    assert s["timely_recall"] == pytest.approx(1 / 4)
    # a second prediction round at distance 1 only, perfect
    t.record_prediction("r", 7, a(1, 1), a(0, 0), a(3, 7), np.array([0.8, 0.7]), threshold=0.3)
    t.record_truth("r", 8, a(3, 7), resident=np.array([True, True]))
    s = t.snapshot()
    assert s["recall_at_k"][1] == pytest.approx((0.5 + 1.0) / 2)
    assert s["precision_by_distance"][1] == pytest.approx(3 / 4)
    assert s["timely_recall"] == pytest.approx(3 / 6)
    assert s["scored_predictions"] == {1: 2, 2: 1}


def test_unscored_positions_are_dropped_and_end_request_frees():
    t = Telemetry(L, E, K)
    t.record_prediction("r", 0, a(1, 2, 3), a(1, 2, 3), a(0, 0, 0), np.ones(3), 0.5)
    t.record_truth("r", 3, a(0, 1), np.zeros(2, bool))   # positions 1, 2 never arrived: dropped, not scored
    assert t.snapshot()["scored_predictions"] == {3: 1}
    assert not t._pending["r"].by_pos
    t.end_request("r")
    assert "r" not in t._pending


def test_prefetch_accounting_issued_used_wasted_cancelled():
    t = Telemetry(L, E, K, expiry=3)
    t.record_issue(a(0, 0, 1, 1, 2), a(1, 2, 3, 4, 5), step=0)
    assert t.record_use(0, a(1, 7)) == 1              # (0, 1) used; (0, 7) was never prefetched
    assert t.record_cancel(a(1, 0), a(3, 1)) == 1      # (1, 3) cancelled; (0, 1) already used
    t.record_issue(a(0), a(2), step=1)                 # (0, 2) issued again while pending: the first was wasted
    assert t.expire(4) == 2                            # (1, 4), (2, 5) expired at step 3 < 4; (0, 2) lives to 4
    s = t.snapshot()["prefetches"]
    assert (s["issued"], s["used"], s["wasted"], s["cancelled"], s["pending"]) == (6, 1, 3, 1, 1)
    assert s["issued"] == s["used"] + s["wasted"] + s["cancelled"] + s["pending"]
    assert s["precision"] == pytest.approx(1 / 4)


def test_runtime_counters_summed_over_runtimes_and_window_history():
    t = Telemetry(L, E, K, history=2)
    t.record_runtime("a", {"hits": 3, "misses": 1, "stall_s": 0.5, "bytes_by_tier": {"dram": 10}})
    t.record_runtime("b", {"hits": 1, "misses": 3, "stall_s": 0.25, "bytes_by_tier": {"dram": 5, "nvme": 7}})
    t.record_runtime("a", {"hits": 4, "misses": 1, "stall_s": 0.5, "bytes_by_tier": {"dram": 10},  # cumulative
                           "hook_s": 0.25, "hook_deferred_s": 0.5, "hook_layers": 8})
    for step, w in [(1, 2.0), (2, 2.5), (3, 3.0)]:
        t.record_window(step, w)
    s = t.snapshot()
    assert (s["hits"], s["misses"], s["stall_s"]) == (5, 4, 0.75)
    assert s["bytes_by_tier"] == {"dram": 15, "nvme": 7} and s["hit_rate"] == pytest.approx(5 / 9)
    assert s["window"] == 3.0 and s["window_history"] == [(2, 2.5), (3, 3.0)]
    assert s["hook"] == {"loop_s": 0.25, "deferred_s": 0.5, "layers": 8}   # "b" reported no hook counters


def test_record_truth_many_scores_as_row_by_row():
    """The coordinator scores a layer event's rows at once (record_truth_many): the same recall, precision and
    timely recall as record_truth row by row, a request twice in the event (a prefill) included, whose later row
    drops its earlier pending positions."""
    rng = np.random.default_rng(0)
    one, many = Telemetry(L, E, K), Telemetry(L, E, K)
    for step in range(60):
        reqs = [f"r{i}" for i in range(5) if rng.random() < 0.8]
        if not reqs:
            continue
        pos = np.array([step + i for i in range(len(reqs))])
        if step % 7 == 0:
            reqs, pos = reqs + [reqs[0]], np.append(pos, pos[0] + 1)
        items = []   # predictions made 3 positions back for the next 1..3 positions, some above threshold
        for r, q in zip(reqs, pos):
            n = int(rng.integers(1, 9))
            items.append((r, int(q) - 3, rng.integers(1, 4, n), rng.integers(0, E, n), rng.random(n)))
        for t in (one, many):
            t.record_predictions(items, threshold=0.5)
        ids = np.stack([rng.choice(E, K, replace=False) for _ in reqs])
        res = rng.random((len(reqs), K)) < 0.5
        for r, q, x, z in zip(reqs, pos, ids, res):
            one.record_truth(r, int(q), x, z)
        many.record_truth_many(reqs, pos, ids, res)
    a, b = one.snapshot(), many.snapshot()
    assert one.recall_n.sum() > 100, "too few predictions were scored to compare"
    for key in ("recall_at_k", "precision_by_distance"):
        assert a[key].keys() == b[key].keys()
        for d in a[key]:
            assert b[key][d] == pytest.approx(a[key][d], rel=1e-12), (key, d)
    assert (many.timely, many.selected, many.events) == (one.timely, one.selected, one.events)
    assert np.array_equal(many.tp, one.tp) and np.array_equal(many.predicted, one.predicted)
