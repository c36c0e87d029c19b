"""kiln.kernels.cpu.parallel: the serial build runs below GRAIN elements, the parallel one
from GRAIN up, and both give the same bits (linear_act's dz pass and column sums)."""

import numpy as np
import pytest

from kiln.kernels.cpu import linear_act, parallel
from kiln.kernels.activations import GELU


def test_the_build_follows_the_work(monkeypatch):
    calls = []
    kernel = linear_act._column_sums
    assert kernel.serial.py_func.__qualname__ == kernel.parallel.py_func.__qualname__ + "_serial"
    for build in ("serial", "parallel"):
        real = getattr(kernel, build)
        monkeypatch.setattr(kernel, build, lambda *a, build=build, real=real: calls.append(build) or real(*a))
    dy, parts = np.ones((4, 4), np.float32), np.zeros((8, 4))
    kernel(parallel.GRAIN - 1, dy, parts)
    kernel(parallel.GRAIN, dy, parts)
    assert calls == ["serial", "parallel"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_and_parallel_builds_agree_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    dy, z = (rng.standard_normal((301, 77)).astype(dtype) for _ in range(2))
    drop = (False, np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0), dtype(1.0))
    results = []
    # one_thread: the single-thread form (one loop over the block, then the parts) gives the same bits too
    for build, one_thread in ((linear_act._grad_preact.serial, True), (linear_act._grad_preact.serial, False),
                              (linear_act._grad_preact.parallel, False)):
        dz, parts = np.empty_like(dy), np.zeros((8, 77))
        build(dy, z, True, dz, parts, GELU, *drop[:1], 0, *drop[1:], one_thread)
        results.append((dz, parts))
    for dz, parts in results[1:]:
        assert np.array_equal(results[0][0], dz) and np.array_equal(results[0][1], parts)
