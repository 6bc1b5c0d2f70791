"""ByteBudgetLRU (no Ray): the budget is never exceeded, LRU order holds, pinned entries are never evicted."""
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.eviction import ByteBudgetLRU


def test_lru_order_and_refusal():
    c = ByteBudgetLRU(100)
    assert c.admit("a", 40) == (True, [])
    assert c.admit("b", 40) == (True, [])
    c.touch("a")
    ok, ev = c.admit("c", 40)
    assert ok and ev == ["b"] and c.keys() == ["a", "c"] and c.used == 80
    assert c.admit("huge", 101) == (False, [])
    assert "huge" not in c


def test_pinned_never_evicted():
    c = ByteBudgetLRU(100)
    c.admit("a", 60)
    c.pin("a")
    ok, ev = c.admit("b", 60)
    assert not ok and ev == [] and "a" in c
    c.unpin("a")
    assert c.admit("b", 60) == (True, ["a"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 60), st.booleans()), max_size=80))
def test_budget_never_exceeded(ops):
    c = ByteBudgetLRU(128)
    sizes = {}
    for key, size, touch in ops:
        if touch:
            c.touch(key)
        else:
            ok, ev = c.admit(key, size)
            if ok:
                sizes[key] = size
            for v in ev:
                sizes.pop(v, None)
        assert c.used <= c.budget
        assert c.used == sum(sizes[k] for k in c.keys())
