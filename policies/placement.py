"""Which worker owns which experts.

Every MoE layer makes one call per worker, so a layer is as fast as its busiest worker: placement balances each
layer's experts across workers by measured load (tokens routed to them), and the whole by bytes (HBM). Hot experts
may be replicated on several workers; the runtime then splits their tokens among the replicas. When workers join
or leave, experts keep their owner where it still exists, orphans are placed greedily, and a joining worker takes
experts from the most loaded ones — as few moves as the balance allows, since each move is a reload.

`by_layer=True` assigns whole layers instead: every MoE layer then costs the decode loop ONE worker call (a Ray
round trip is most of a layer's dispatch cost on small batches: docs/benchmarks.md, "The cost of distribution"),
at the price of no parallelism across workers inside a layer (prefill of long prompts). Layers are balanced by
bytes (HBM) and by measured load, with the same keep-what-you-can rule on joins and leaves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Placement:
    workers: tuple[int, ...]
    owners: dict[ExpertKey, tuple[int, ...]] = field(default_factory=dict)  # first entry: primary

    def owner(self, key: ExpertKey) -> int:
        return self.owners[key][0]

    def replicas(self, key: ExpertKey) -> tuple[int, ...]:
        return self.owners[key]

    def experts_of(self, worker: int) -> list[ExpertKey]:
        return sorted(k for k, ws in self.owners.items() if worker in ws)

    def bytes_of(self, sizes: dict[ExpertKey, int]) -> dict[int, int]:
        out = {w: 0 for w in self.workers}
        for k, ws in self.owners.items():
            for w in ws:
                out[w] += sizes[k]
        return out

    def moved_from(self, old: "Placement") -> int:
        """How many (expert, worker) holdings are new compared with `old` (each is a load)."""
        return sum(len(set(ws) - set(old.owners.get(k, ()))) for k, ws in self.owners.items())


def place(sizes: dict[ExpertKey, int], workers: list[int], load: dict[ExpertKey, float] | None = None, *,
          replicate_top: int = 0, replicas: int = 2, previous: Placement | None = None,
          rebalance_tolerance: float = 0.15, by_layer: bool = False) -> Placement:
    """Assign every expert in `sizes` (bytes) to workers.

    load: measured tokens per expert (default: uniform). replicate_top: the hottest N experts get `replicas`
    owners. previous: keep its assignments where the owner is still in `workers` (join/leave), moving only what
    the balance needs (a worker may exceed the mean per-layer load by `rebalance_tolerance` before experts move).
    by_layer: whole layers per worker (one worker call per MoE layer); replication is then not applied, since a
    replica on another worker would bring the second call back.
    """
    assert workers, "placement needs at least one worker"
    assert len(set(workers)) == len(workers), f"duplicate worker ids {workers}"
    if by_layer:
        return _place_layers(sizes, sorted(workers), load or {}, previous, rebalance_tolerance)
    load = load or {}
    cost = {k: float(load.get(k, 1.0)) + 1e-9 for k in sizes}
    ws = sorted(workers)
    total_bytes = {w: 0 for w in ws}
    owners: dict[ExpertKey, list[int]] = {}
    keys_of: dict[int, list[ExpertKey]] = {}
    for k in sizes:
        keys_of.setdefault(k[0], []).append(k)

    def moved(k: ExpertKey, src: int | None, dst: int) -> None:
        total_bytes[dst] += sizes[k]
        if src is not None:
            total_bytes[src] -= sizes[k]

    for layer, keys in sorted(keys_of.items()):
        layer_load = {w: 0.0 for w in ws}
        owner: dict[ExpertKey, int] = {}
        for k in keys:   # kept where the owner still exists
            prev = previous.owners.get(k) if previous else None
            if prev and prev[0] in layer_load:
                owner[k] = prev[0]
                layer_load[prev[0]] += cost[k]
                moved(k, None, prev[0])
        _balance(keys, cost, owner, layer_load, ws, rebalance_tolerance, tie=total_bytes.__getitem__, moved=moved)
        for k in keys:
            owners[k] = [owner[k]]

    if replicate_top and len(ws) > 1:
        for k in sorted(sizes, key=lambda k: (-cost[k], k))[:replicate_top]:
            for w in sorted((w for w in ws if w not in owners[k]), key=lambda w: (total_bytes[w], w)):
                if len(owners[k]) >= replicas:
                    break
                owners[k].append(w)
                total_bytes[w] += sizes[k]
    return Placement(tuple(ws), {k: tuple(v) for k, v in owners.items()})


def _place_layers(sizes: dict[ExpertKey, int], ws: list[int], load: dict[ExpertKey, float],
                  previous: Placement | None, tolerance: float) -> Placement:
    """Whole layers to workers: a layer's weight is its bytes scaled by its share of the measured load (uniform
    when none), so both memory and work are balanced; kept layers stay where they were (each move reloads a
    layer's experts), orphans go heaviest first to the lightest worker, then whole layers move from the heaviest
    worker to the lightest while that brings it back within `tolerance` of the mean."""
    keys_of: dict[int, list[ExpertKey]] = {}
    for k in sizes:
        keys_of.setdefault(k[0], []).append(k)
    nbytes = {L: sum(sizes[k] for k in ks) for L, ks in keys_of.items()}
    lsum = {L: sum(float(load.get(k, 0.0)) for k in ks) for L, ks in keys_of.items()}
    mean_load = sum(lsum.values()) / len(lsum) if lsum else 0.0
    weight = {L: nbytes[L] * (0.5 + 0.5 * lsum[L] / mean_load if mean_load > 0 else 1.0) for L in keys_of}
    owner: dict[int, int] = {}
    total = {w: 0.0 for w in ws}
    for L, ks in sorted(keys_of.items()):
        prev = [previous.owners[k][0] for k in ks if previous and k in previous.owners]
        w = max(set(prev), key=lambda w: (prev.count(w), -w)) if prev else None  # where most of it already is
        if w is not None and w in total:
            owner[L] = w
            total[w] += weight[L]
    _balance(sorted(keys_of), weight, owner, total, ws, tolerance)
    return Placement(tuple(ws), {k: (owner[k[0]],) for k in sizes})


def _balance(items: list, cost: dict, owner: dict, load: dict, ws: list[int], tolerance: float, *,
             tie=None, moved=None) -> None:
    """Longest-processing-time first for the items without an owner yet (the heaviest to the least loaded worker;
    ties: tie(worker), then the worker id), then move items from the busiest to the idlest worker while the busiest
    exceeds the mean by `tolerance` and a move narrows the gap: each move is a reload, so no more than the balance
    needs. owner: item -> worker, completed in place; load: worker -> summed cost of its items, updated in place;
    moved(item, source worker or None, destination): told of every assignment and move (other totals)."""
    for it in sorted((i for i in items if i not in owner), key=lambda i: (-cost[i], i)):
        w = min(ws, key=lambda w: (load[w], tie(w) if tie else 0, w))
        owner[it] = w
        load[w] += cost[it]
        if moved:
            moved(it, None, w)
    mean = sum(load.values()) / len(ws)
    for _ in range(len(items)):
        hi = max(ws, key=lambda w: (load[w], w))
        lo = min(ws, key=lambda w: (load[w], w))
        if load[hi] <= mean * (1 + tolerance):
            break
        movable = [i for i in items if owner[i] == hi and load[lo] + cost[i] < load[hi]]
        if not movable:
            break
        it = min(movable, key=lambda i: (abs((load[hi] - cost[i]) - (load[lo] + cost[i])), i))
        owner[it] = lo
        load[hi] -= cost[it]
        load[lo] += cost[it]
        if moved:
            moved(it, hi, lo)
