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
    by_layer: dict[int, list[ExpertKey]] = {}
    for k in sizes:
        by_layer.setdefault(k[0], []).append(k)

    for layer, keys in sorted(by_layer.items()):
        layer_load = {w: 0.0 for w in ws}
        keep, orphans = [], []
        for k in keys:
            prev = previous.owners.get(k) if previous else None
            (keep if prev and prev[0] in layer_load else orphans).append(k)
        for k in keep:
            w = previous.owners[k][0]
            owners[k] = [w]
            layer_load[w] += cost[k]
            total_bytes[w] += sizes[k]
        # longest-processing-time first: the heaviest expert goes to the least loaded worker
        for k in sorted(orphans, key=lambda k: (-cost[k], k)):
            w = min(ws, key=lambda w: (layer_load[w], total_bytes[w], w))
            owners[k] = [w]
            layer_load[w] += cost[k]
            total_bytes[w] += sizes[k]
        # rebalance after a join: move experts from the busiest to the idlest worker while it helps enough
        mean = sum(layer_load.values()) / len(ws)
        for _ in range(len(keys)):
            hi = max(ws, key=lambda w: (layer_load[w], w))
            lo = min(ws, key=lambda w: (layer_load[w], w))
            if layer_load[hi] <= mean * (1 + rebalance_tolerance):
                break
            movable = [k for k in keys if owners[k][0] == hi and layer_load[lo] + cost[k] < layer_load[hi]]
            if not movable:
                break
            k = min(movable, key=lambda k: (abs((layer_load[hi] - cost[k]) - (layer_load[lo] + cost[k])), k))
            owners[k] = [lo]
            layer_load[hi] -= cost[k]
            layer_load[lo] += cost[k]
            total_bytes[hi] -= sizes[k]
            total_bytes[lo] += sizes[k]

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
    orphans = []
    for L, ks in sorted(keys_of.items()):
        prev = [previous.owners[k][0] for k in ks if previous and k in previous.owners]
        w = max(set(prev), key=lambda w: (prev.count(w), -w)) if prev else None  # where most of it already is
        if w is not None and w in total:
            owner[L] = w
            total[w] += weight[L]
        else:
            orphans.append(L)
    for L in sorted(orphans, key=lambda L: (-weight[L], L)):
        w = min(ws, key=lambda w: (total[w], w))
        owner[L] = w
        total[w] += weight[L]
    mean = sum(total.values()) / len(ws)
    for _ in range(len(keys_of)):
        hi = max(ws, key=lambda w: (total[w], w))
        lo = min(ws, key=lambda w: (total[w], w))
        if total[hi] <= mean * (1 + tolerance):
            break
        movable = [L for L in owner if owner[L] == hi and total[lo] + weight[L] < total[hi]]
        if not movable:
            break
        L = min(movable, key=lambda L: (abs((total[hi] - weight[L]) - (total[lo] + weight[L])), L))
        owner[L] = lo
        total[hi] -= weight[L]
        total[lo] += weight[L]
    return Placement(tuple(ws), {k: (owner[k[0]],) for k in sizes})
