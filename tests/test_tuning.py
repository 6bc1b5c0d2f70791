"""PartTuner (no I/O): on a simulated store it converges to the part count that maximises throughput."""
import pytest

from storage_adapters.tuning import PartTuner


class FakeClock:
    t = 0.0

    def __call__(self):
        return self.t


def drive(tuner, clock, rate_of, blobs=400, size=32 << 20):
    """Sequential blob reads; each takes size / rate_of(parts) seconds of virtual time."""
    for _ in range(blobs):
        parts = tuner.begin()
        clock.t += size / rate_of(parts)
        tuner.end(size)


@pytest.mark.parametrize("best, curve", [
    (1, {1: 1000e6, 2: 700e6, 4: 400e6, 8: 250e6}),    # server-bound: every range costs a whole-object copy
    (8, {1: 90e6, 2: 180e6, 4: 350e6, 8: 600e6}),      # per-connection-capped object store
    (4, {1: 200e6, 2: 380e6, 4: 500e6, 8: 450e6}),     # in between
])
def test_converges_and_mostly_stays(best, curve):
    clock = FakeClock()
    t = PartTuner(8, clock=clock)
    drive(t, clock, lambda p: curve[p])
    late = [p for p, _ in t.history[-40:]]
    assert t.parts == best or late.count(best) >= 0.8 * len(late), t.history[-10:]
    assert late.count(best) >= 0.8 * len(late), late  # probing fades at the optimum


def test_idle_time_between_reads_does_not_count():
    clock = FakeClock()
    t = PartTuner(4, clock=clock, window_blobs=2)
    for _ in range(2):
        t.begin()
        clock.t += 0.1
        t.end(10_000_000)
        clock.t += 5.0  # idle
    (_, rate), = t.history
    assert rate == pytest.approx(100e6)


def test_history_stays_bounded():
    from storage_adapters.tuning import HISTORY
    now = [0.0]
    t = PartTuner(max_parts=8, window_blobs=1, clock=lambda: now[0])
    for _ in range(5 * HISTORY):
        t.begin()
        now[0] += 0.01
        t.end(1 << 20)
    assert HISTORY <= len(t.history) <= 2 * HISTORY
