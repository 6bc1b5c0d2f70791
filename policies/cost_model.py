"""Per-miss decision: wait for the expert's transfer into the worker's device memory, or compute the expert where
its weights already are (on the CPU, reading the DRAM tier in place) — the choice KTransformers, Fiddler and
PreScope make. Pure: rates are configured or measured by the caller (`RateMeter`), times are passed in.

    wait = remaining transfer (latency + bytes_left / link bandwidth) + device compute (flops / device rate)
    cpu  = host compute (flops / cpu rate)     (possible only where a host copy exists: DRAM tier / pinned host)

Expert FLOPs for n tokens of a SwiGLU expert with hidden H and intermediate I: 2 * n * 3 * H * I (three
matmuls, a multiply-add each). On a machine without a GPU both paths run on the CPU: the decision is still made,
and tested, with configured rates.
"""
from __future__ import annotations

from dataclasses import dataclass


def expert_flops(tokens: int, hidden: int, intermediate: int) -> float:
    return 6.0 * tokens * hidden * intermediate


@dataclass(frozen=True)
class Rates:
    link_Bps: float          # host -> device copy bandwidth (PCIe / NVLink / memcpy on CPU)
    link_latency_s: float    # per transfer
    device_flops: float      # the worker's device (GPU, or the CPU when there is none)
    cpu_flops: float         # the host, computing from the DRAM tier in place

    def __post_init__(self):
        assert self.link_Bps > 0 and self.device_flops > 0 and self.cpu_flops > 0, f"rates must be > 0: {self}"
        assert self.link_latency_s >= 0, "link latency must be >= 0"


@dataclass(frozen=True)
class MissDecision:
    choice: str         # "wait" or "cpu"
    wait_s: float       # estimated time to finish by waiting for the transfer
    cpu_s: float        # estimated time to finish by computing on the host (inf: no host copy)


def decide_miss(rates: Rates, *, nbytes: int, bytes_done: int = 0, tokens: int, hidden: int, intermediate: int,
                host_copy: bool = True, margin: float = 1.0) -> MissDecision:
    """Compute on the CPU only when that is faster than waiting by `margin` (>= 1 favours waiting, which also
    warms the cache for the next use) and a host copy exists."""
    assert 0 <= bytes_done <= nbytes, f"bytes_done {bytes_done} outside [0, {nbytes}]"
    assert tokens >= 0, "tokens must be >= 0"
    f = expert_flops(tokens, hidden, intermediate)
    left = nbytes - bytes_done
    wait = (rates.link_latency_s if left else 0.0) + left / rates.link_Bps + f / rates.device_flops
    cpu = f / rates.cpu_flops if host_copy else float("inf")
    return MissDecision("cpu" if cpu * margin < wait else "wait", wait, cpu)


def break_even_tokens(rates: Rates, *, nbytes: int, hidden: int, intermediate: int) -> float:
    """The batch size above which waiting beats the CPU for a miss that has not started moving (inf: never)."""
    per_tok_cpu = expert_flops(1, hidden, intermediate) / rates.cpu_flops
    per_tok_dev = expert_flops(1, hidden, intermediate) / rates.device_flops
    gain = per_tok_cpu - per_tok_dev
    if gain <= 0:
        return float("inf")
    return (rates.link_latency_s + nbytes / rates.link_Bps) / gain


@dataclass
class RateMeter:
    """Exponentially averaged rate (units per second) from observations (units, seconds); `value` is the prior
    until the first observation."""
    value: float
    alpha: float = 0.2
    n: int = 0

    def observe(self, units: float, seconds: float) -> float:
        if seconds <= 0 or units <= 0:
            return self.value
        r = units / seconds
        self.value = r if self.n == 0 else (1 - self.alpha) * self.value + self.alpha * r
        self.n += 1
        return self.value
