"""Wait-vs-CPU decision per miss (policies/cost_model.py) with configured rates, against hand-computed times."""
import pytest

from policies.cost_model import RateMeter, Rates, break_even_tokens, decide_miss, expert_flops

H, I = 4096, 14336                 # Mixtral-8x7B expert
NB = 3 * H * I * 2                 # bf16 bytes
GPU = Rates(link_Bps=25e9, link_latency_s=10e-6, device_flops=300e12, cpu_flops=1e12)


def test_small_batch_computes_on_cpu_large_batch_waits():
    one = decide_miss(GPU, nbytes=NB, tokens=1, hidden=H, intermediate=I)
    # wait: 10 us + 352 MB / 25 GB/s = 14.09 ms (+ 1.2 ns compute); cpu: 352 MFLOP / 1 TFLOP/s = 0.35 ms
    assert one.wait_s == pytest.approx(10e-6 + NB / 25e9 + expert_flops(1, H, I) / 300e12)
    assert one.cpu_s == pytest.approx(6 * H * I / 1e12)
    assert one.choice == "cpu"
    big = decide_miss(GPU, nbytes=NB, tokens=4096, hidden=H, intermediate=I)
    assert big.choice == "wait"       # prefill-sized batch: 1.44 s on the CPU vs 19 ms waiting
    n = break_even_tokens(GPU, nbytes=NB, hidden=H, intermediate=I)
    assert decide_miss(GPU, nbytes=NB, tokens=int(n) - 1, hidden=H, intermediate=I).choice == "cpu"
    assert decide_miss(GPU, nbytes=NB, tokens=int(n) + 1, hidden=H, intermediate=I).choice == "wait"


def test_almost_arrived_transfer_is_waited_for_and_no_host_copy_means_wait():
    d = decide_miss(GPU, nbytes=NB, bytes_done=NB - 1000, tokens=1, hidden=H, intermediate=I)
    assert d.choice == "wait" and d.wait_s < d.cpu_s
    assert decide_miss(GPU, nbytes=NB, tokens=1, hidden=H, intermediate=I, host_copy=False).choice == "wait"


def test_cpu_only_machine_rates_and_margin():
    cpu_box = Rates(link_Bps=5e9, link_latency_s=0, device_flops=50e9, cpu_flops=50e9)  # both CPU paths
    d = decide_miss(cpu_box, nbytes=NB, tokens=1, hidden=H, intermediate=I)
    assert d.choice == "cpu" and d.wait_s - d.cpu_s == pytest.approx(NB / 5e9)   # the copy is pure overhead
    assert break_even_tokens(cpu_box, nbytes=NB, hidden=H, intermediate=I) == float("inf")
    # a margin that favours waiting flips a close call
    close = Rates(link_Bps=1e12, link_latency_s=0, device_flops=1e12, cpu_flops=1e12)   # cpu 24.6 ns, wait 25.6
    assert decide_miss(close, nbytes=1000, tokens=1, hidden=64, intermediate=64).choice == "cpu"
    assert decide_miss(close, nbytes=1000, tokens=1, hidden=64, intermediate=64, margin=1.1).choice == "wait"
    with pytest.raises(AssertionError, match="bytes_done"):
        decide_miss(GPU, nbytes=10, bytes_done=11, tokens=1, hidden=H, intermediate=I)


def test_rate_meter_averages_measurements():
    m = RateMeter(1e9, alpha=0.5)
    assert m.observe(0, 1.0) == 1e9                 # nothing measured: the prior stays
    assert m.observe(2e9, 1.0) == 2e9               # first measurement replaces the prior
    assert m.observe(4e9, 1.0) == pytest.approx(3e9)
