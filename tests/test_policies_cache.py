"""HBM cache bookkeeping and placement (no Ray): budgets, pins, eviction orders, balance, minimal movement."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.hbm_cache import CacheIndex, DoesNotFit, make_policy
from policies.placement import place


def cache(policy, budget=100):
    return CacheIndex(budget, make_policy(policy, budget))


def test_lru_and_pins():
    c = cache("lru")
    for k in "abc":
        c.insert(k, 30)
    c.access("a")
    assert c.insert("d", 30) == ["b"]
    c.pin("c")
    assert c.insert("e", 30) == ["a"]  # c is pinned, so the next LRU victim is a
    c.pin("d")
    c.pin("e")
    with pytest.raises(DoesNotFit, match="unpinned"):
        c.insert("f", 30)
    with pytest.raises(DoesNotFit, match="whole budget"):
        c.insert("g", 101)


def test_lfu_keeps_frequent():
    c = cache("lfu")
    c.insert("hot", 40)
    c.insert("cold", 40)
    for _ in range(5):
        c.access("hot")
    c.access("cold")
    assert c.insert("new", 40) == ["cold"]


def test_slru_probation_first():
    c = cache("slru", 120)
    c.insert("a", 40)
    c.insert("b", 40)
    c.access("a")
    c.access("a")  # second use: protected
    c.access("b")  # one use: still probation
    c.insert("c", 40)
    c.access("c")
    assert list(c.keys())[0] == "a"  # a is the least recent of all...
    assert c.insert("d", 40) == ["b"]  # ...but protected: probation's LRU goes first


def test_prefetch_aware_order():
    c = cache("prefetch_aware", 160)
    c.insert("used", 40)
    c.access("used")
    c.insert("pf-fresh", 40, prefetched=True, request="r1")
    c.insert("pf-cancel", 40, prefetched=True, request="r2")
    c.insert("used2", 40)
    c.access("used2")
    assert c.mark_stale(request="r2") == 1
    assert c.plan_room(120) == ["pf-cancel", "used", "used2"]  # stale, then used LRU; fresh prefetch last
    c.insert("x", 40)
    assert c.wasted_prefetches == 1 and "pf-fresh" in c
    c.access("pf-fresh")  # first use clears the flag
    assert not c.entries["pf-fresh"].prefetched


@pytest.mark.parametrize("policy", ["lru", "lfu", "slru"])
def test_cancelled_prefetches_go_first_under_every_policy(policy):
    """A prefetch cancelled before its first use (its request ended, or the router refuted the fast path's
    prediction) is evicted before anything else, whatever the policy would say (a coordinator's values, when it
    sends them, still decide); a use gives it back its place. The fast path's cancellations (unowned_only) never
    mark what a request's prefetch loaded."""
    c = cache(policy, 200)
    c.insert("used", 40)
    c.access("used")
    c.insert("pf-right", 40, prefetched=True)
    c.insert("pf-wrong", 40, prefetched=True)
    c.insert("pf-coord", 40, prefetched=True, request=0)
    c.insert("used2", 40)
    c.access("used2")
    assert "pf-wrong" not in c.plan_room(40)          # the policy alone: the most recent prefetch stays
    assert c.mark_stale(keys=["pf-wrong", "used", "pf-coord"], unowned_only=True) == 1   # never-used, no request
    assert c.mark_stale(keys=["pf-wrong"]) == 0       # already marked: not counted again
    assert c.plan_room(40) == ["pf-wrong"]
    assert c.plan_room(80)[0] == "pf-wrong"
    c.hints = {"pf-wrong": 9.0, "used": 0.0, "pf-right": 1.0, "used2": 2.0, "pf-coord": 3.0}
    assert c.plan_room(40) == ["used"]                # a coordinator's values decide
    c.hints = None
    c.access("pf-wrong")                              # used after all: no longer stale
    assert "pf-wrong" not in c.plan_room(40)
    assert c.mark_stale(keys=["pf-coord"]) == 1 and c.plan_room(40) == ["pf-coord"]   # a coordinator's own


def test_a_valued_prefetch_is_admitted_only_over_lower_valued_residents():
    """CacheIndex.admits: a prefetch that names no victims (the runtime's fast path) loads when it fits, when it has
    no value, or when everything it would evict is valued below it; never over a resident predicted likelier."""
    c = cache("lru", 100)
    c.insert("a", 40)
    assert c.admits("b", 40), "fits without evicting"
    c.insert("b", 40)
    assert c.admits("c", 40), "no values at all: the cache's policy decides, as before"
    c.update_hints({"a": 0.6, "b": 0.9, "c": 0.5})
    assert not c.admits("c", 40), "would evict a (0.6) for c (0.5)"
    assert c.admits("a", 40), "resident already: nothing to evict"
    c.update_hints({"c": 0.7})
    assert c.admits("c", 40) and c.plan_room(40) == ["a"]
    assert not c.admits("c", 80), "room for 80 bytes needs b (0.9) too"
    assert c.admits("d", 40), "an expert nobody valued is not gated"
    c.update_hints({"a": 0.7})
    assert not c.admits("c", 40), "equal value: no gain in swapping"
    c.pin("a")
    c.pin("b")
    assert not c.admits("c", 40), "nothing evictable"


def test_unknown_policy():
    with pytest.raises(ValueError, match="lru, lfu, slru, prefetch_aware"):
        make_policy("fifo")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["lru", "lfu", "slru", "prefetch_aware"]),
       st.lists(st.tuples(st.sampled_from(["ins", "acc", "pin", "unpin", "stale"]), st.integers(0, 12),
                          st.integers(1, 50), st.booleans()), max_size=120))
def test_budget_and_pins_hold_under_any_sequence(policy, ops):
    c = cache(policy, 128)
    pins = {}
    for op, k, size, pf in ops:
        if op == "ins" and k not in c:
            before = {x for x in c.keys() if pins.get(x)}
            try:
                c.insert(k, size, prefetched=pf, request=str(k % 3))
            except DoesNotFit:
                pass
            assert before <= set(c.keys()), "a pinned entry was evicted"
        elif op == "acc":
            c.access(k)
        elif op == "pin" and k in c:
            c.pin(k)
            pins[k] = pins.get(k, 0) + 1
        elif op == "unpin" and pins.get(k):
            c.unpin(k)
            pins[k] -= 1
        elif op == "stale":
            c.mark_stale(request=str(k % 3))
        assert c.used <= c.budget
        assert c.used == sum(e.size for e in c.entries.values())


def test_placement_balances_layers_and_bytes():
    sizes = {(l, e): 100 for l in range(4) for e in range(8)}
    p = place(sizes, [0, 1])
    for l in range(4):
        mine = [p.owner((l, e)) for e in range(8)]
        assert mine.count(0) == mine.count(1) == 4
    assert p.bytes_of(sizes) == {0: 1600, 1: 1600}


def test_placement_uses_measured_load():
    sizes = {(0, e): 100 for e in range(4)}
    load = {(0, 0): 10, (0, 1): 1, (0, 2): 1, (0, 3): 1}
    p = place(sizes, [0, 1], load)
    hot = p.owner((0, 0))
    assert all(p.owner((0, e)) != hot for e in (1, 2, 3))  # the hot expert's worker takes nothing else


def test_replication_of_hot_experts():
    sizes = {(0, e): 100 for e in range(6)}
    load = {(0, e): float(6 - e) for e in range(6)}
    p = place(sizes, [0, 1, 2], load, replicate_top=2, replicas=2)
    assert len(p.replicas((0, 0))) == 2 and len(p.replicas((0, 1))) == 2
    assert len(p.replicas((0, 5))) == 1


def test_by_layer_placement_gives_whole_layers_balanced_by_bytes_and_load():
    sizes = {(l, e): 100 * (1 + (l == 3)) for l in range(6) for e in range(8)}   # layer 3's experts twice the size
    p = place(sizes, [0, 1], by_layer=True)
    owner = {l: {p.owner((l, e)) for e in range(8)} for l in range(6)}
    assert all(len(ws) == 1 for ws in owner.values()), owner
    b = p.bytes_of(sizes)
    assert abs(b[0] - b[1]) <= 800, b   # within one layer's bytes of even
    # a hot layer counts for more than its bytes: the two hottest layers land on different workers
    load = {(l, e): (50.0 if l in (0, 1) else 1.0) for l in range(6) for e in range(8)}
    p = place({(l, e): 100 for l in range(6) for e in range(8)}, [0, 1], load, by_layer=True)
    assert p.owner((0, 0)) != p.owner((1, 0))
    with pytest.raises(AssertionError, match="at least one worker"):
        place(sizes, [], by_layer=True)


def test_by_layer_join_and_leave_move_whole_layers_and_few():
    sizes = {(l, e): 100 for l in range(6) for e in range(4)}
    p2 = place(sizes, [0, 1], by_layer=True)
    p3 = place(sizes, [0, 1, 2], previous=p2, by_layer=True)
    assert all(len({p3.owner((l, e)) for e in range(4)}) == 1 for l in range(6))
    assert p3.bytes_of(sizes) == {0: 800, 1: 800, 2: 800}
    assert p3.moved_from(p2) == 8   # exactly the two layers the newcomer takes
    p_leave = place(sizes, [0, 2], previous=p3, by_layer=True)
    assert set(p_leave.bytes_of(sizes).values()) == {1200}
    assert all(p_leave.owner(k) == p3.owner(k) for k in sizes if p3.owner(k) != 1)   # survivors keep theirs


def test_join_and_leave_move_little():
    sizes = {(l, e): 100 for l in range(2) for e in range(8)}
    p2 = place(sizes, [0, 1])
    p3 = place(sizes, [0, 1, 2], previous=p2)
    assert p3.moved_from(p2) <= 6  # ~1/3 of 16 must move to the newcomer; no more than that plus slack
    assert min(p3.bytes_of(sizes).values()) >= 400
    p_leave = place(sizes, [0, 2], previous=p3)
    assert all(p_leave.owner(k) in (0, 2) for k in sizes)
    kept = [k for k in sizes if p3.owner(k) in (0, 2)]
    assert all(p_leave.owner(k) == p3.owner(k) for k in kept)  # survivors keep their experts


def test_insert_evicting_only_named_victims():
    c = cache("lru", budget=90)
    for k in "abc":
        c.insert(k, 30)
    with pytest.raises(DoesNotFit, match="named victims"):
        c.insert_evicting_only("d", 30, victims=[])          # full: a coordinator prefetch never picks victims
    assert list(c.keys()) == ["a", "b", "c"]
    c.pin("b")
    assert c.insert_evicting_only("d", 30, victims=["b", "c", "a"], request="r") == ["c"]  # b pinned: skipped
    assert c.entries["d"].prefetched and c.entries["d"].request == "r" and c.used == 90
    with pytest.raises(DoesNotFit):
        c.insert_evicting_only("e", 60, victims=["a"])       # not enough: nothing changes
    assert sorted(c.keys()) == ["a", "b", "d"]
