"""RouteOutbox (cluster/expert_cluster.py), without Ray: at most `inflight` publish calls outstanding, what is
flushed meanwhile goes together in the next call with every row still naming its own request, nothing is lost
below the backlog, and what is dropped past it (or refused) is counted in layer events."""
from concurrent.futures import Future

import numpy as np
import pytest

from cluster.expert_cluster import RouteOutbox, merge_batches


class _Ref:
    """What `.remote()` returns, as far as the outbox uses it: a future the test completes."""
    def __init__(self):
        self.f = Future()

    def future(self):
        return self.f


class _Coordinator:
    def __init__(self):
        self.calls, self.refs, self.refuse = [], [], False

    def send(self, table, layers):
        if self.refuse:
            raise RuntimeError("pending-calls cap")
        self.calls.append((list(table), layers))
        self.refs.append(_Ref())
        return self.refs[-1]

    def ack(self, i=0):
        self.refs[i].f.set_result(None)


def _layer(layer, rows, pos=0):
    rows = np.asarray(rows, np.int64)
    return {"layer": layer, "rows": rows, "pos": np.full(len(rows), pos), "ids": np.stack([rows, rows + 1], 1)}


def _named(table, layers):
    """(layer, [request of each row]) per event: what the coordinator reads out of a call."""
    return [(ev["layer"], [table[r] for r in ev["rows"].tolist()]) for ev in layers]


def test_merge_renumbers_rows_into_one_table():
    a = (["r0", "r1", "r2"], [_layer(0, [0, 2]), _layer(1, [1])])
    b = (["r5", "r1"], [_layer(2, [0, 1])])              # row 0 reassigned to a new request
    c = (["r5", "r1", None], [_layer(3, [1, 0])])
    table, layers = merge_batches([a, b, c])
    assert table[:3] == ["r5", "r1", None] and sorted(map(str, table)) == sorted(map(str, ["r5", "r1", None,
                                                                                          "r0", "r2"]))
    assert _named(table, layers) == _named(*a) + _named(*b) + _named(*c)
    # the other fields ride unchanged, the caller's events are not modified
    assert layers[0]["ids"] is a[1][0]["ids"] and a[1][0]["rows"].tolist() == [0, 2]
    assert merge_batches([a]) == a


def test_held_layers_go_together_when_a_call_finishes():
    co = _Coordinator()
    box = RouteOutbox(co.send, inflight=2, backlog=64)
    box.put(["r0"], [_layer(0, [0])])
    box.put(["r0"], [_layer(1, [0])])
    assert len(co.calls) == 2 and box.outstanding == 2
    for l in range(2, 6):                         # both outstanding: held
        box.put(["r0", "r1"], [_layer(l, [0, 1])])
    assert len(co.calls) == 2 and box.coalesced == 0
    co.ack(0)
    box.put(["r1", "r0"], [_layer(6, [0])])       # a call may go: everything held, in order, in one call
    assert len(co.calls) == 3 and box.coalesced == 4
    table, layers = co.calls[2]
    assert [ev["layer"] for ev in layers] == [2, 3, 4, 5, 6]
    assert _named(table, layers) == [(l, ["r0", "r1"]) for l in range(2, 6)] + [(6, ["r1"])]
    assert box.sent == 3 and box.dropped == 0


def test_backlog_drops_the_oldest_and_counts_them():
    co = _Coordinator()
    box = RouteOutbox(co.send, inflight=1, backlog=5)
    box.put(["r0"], [_layer(0, [0])])             # outstanding from here on
    for l in range(1, 9):
        box.put(["r0"], [_layer(l, [0]), _layer(l, [0])])   # two events per flush
    assert box.dropped == 12                      # 16 held, at most 5: whole flushes go, oldest first
    co.ack(0)
    box.put(["r0"], [])                           # nothing new: what is held goes
    assert [ev["layer"] for ev in co.calls[1][1]] == [7, 7, 8, 8]
    assert box.dropped + 4 + 1 == 17


def test_force_sends_despite_outstanding_and_refusals_are_counted():
    co = _Coordinator()
    box = RouteOutbox(co.send, inflight=1, backlog=64)
    box.put(["r0"], [_layer(0, [0])])
    box.put(["r0"], [_layer(1, [0]), _layer(2, [0])])
    assert len(co.calls) == 1
    box.put([], [], force=True)                   # before a request's end: its last routing goes now
    assert len(co.calls) == 2 and [ev["layer"] for ev in co.calls[1][1]] == [1, 2]
    box.put([], [], force=True)                   # nothing held: no call
    assert len(co.calls) == 2
    co.refuse = True
    box.put(["r0"], [_layer(3, [0]), _layer(4, [0])], force=True)
    assert box.dropped == 2 and box.sent == 2
    with pytest.raises(AssertionError, match="inflight"):
        RouteOutbox(co.send, inflight=0)
