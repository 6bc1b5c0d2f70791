"""HostToDevice (actors/h2d.py) without a GPU: the CPU path gives the exact bytes into a fresh tensor or a slice,
the threaded memcpy that fills pinned chunks on CUDA is exact for sizes around its 4 MiB pieces, staging is
sized to one expert, and bad input is refused naming what is wrong. The CUDA path: tests/test_cuda.py."""
import numpy as np
import pytest
import torch

from actors.h2d import HostToDevice


@pytest.mark.parametrize("n", [0, 1, 4097, 1 << 20])
def test_cpu_copy_is_exact_into_a_fresh_tensor_or_a_slice(n):
    h = HostToDevice(torch.device("cpu"))
    host = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dev, ready = h.copy(host)
    assert ready is None and h.pinned_bytes == 0
    np.testing.assert_array_equal(dev.numpy(), host)
    dst = torch.zeros(n + 6, dtype=torch.uint8)
    h.copy(host, dst=dst[3:3 + n])
    np.testing.assert_array_equal(dst[3:3 + n].numpy(), host)
    assert not dst[:3].any() and not dst[3 + n:].any(), "a copy into a slice wrote outside it"


@pytest.mark.parametrize("n", [(4 << 20) - 1, 4 << 20, (9 << 20) + 5, 33 << 20])
def test_threaded_fill_is_exact(n):
    h = HostToDevice(torch.device("cpu"), copy_threads=4)
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n + 1, np.uint8)
    h._fill(dst[:n], src)
    np.testing.assert_array_equal(dst[:n], src)
    assert dst[n] == 0


def test_chunks_are_never_larger_than_one_expert():
    assert HostToDevice(torch.device("cpu"), chunk_bytes=32 << 20, max_bytes=98_305).chunk == 102_400   # 25 pages
    assert HostToDevice(torch.device("cpu"), chunk_bytes=32 << 20, max_bytes=1 << 30).chunk == 32 << 20


def test_bad_input_is_refused_naming_it():
    h = HostToDevice(torch.device("cpu"))
    with pytest.raises(AssertionError, match="uint8"):
        h.copy(np.zeros(4, np.float32))
    with pytest.raises(AssertionError, match="need 8 uint8"):
        h.copy(np.zeros(8, np.uint8), dst=torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(AssertionError, match="copy_threads 0"):
        HostToDevice(torch.device("cpu"), copy_threads=0)
