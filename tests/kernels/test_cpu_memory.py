"""kiln.kernels.cpu.memory: large outputs on 2 MiB pages that behave as torch tensors."""

import os

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.kernels.cpu import layer_norm as cpu_layer_norm
from kiln.kernels.cpu import memory
from tests.numerics import BOUND, rel_err

LARGE = (1100, 1000)  # 4.2 MiB of float32: above HUGE_MIN_BYTES


def test_small_buffers_are_torch_empty(monkeypatch):
    made = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: made.append(a) or real_empty(*a, **k))
    t = memory.empty((3, 5), torch.float64)
    assert made and t.shape == (3, 5) and t.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_large_buffers_are_aligned_writable_tensors(dtype):
    shape = (LARGE[0] * 8 // torch.empty((), dtype=dtype).element_size(), LARGE[1])  # >= 4.2 MiB
    t = memory.empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    if memory._HAS_HUGE_PAGES:
        assert t.data_ptr() % memory.HUGE_PAGE == 0
    t.fill_(2)
    view = t[5:, 3:]
    del t  # the view keeps the mapping alive
    assert view.double().sum().item() == 2 * (shape[0] - 5) * (shape[1] - 3)
    assert memory.empty_like(view).shape == view.shape


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc")
def test_freed_buffers_are_unmapped():
    def resident_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = resident_bytes()
    for _ in range(20):
        memory.empty((16, 1 << 20), torch.float32).fill_(1)  # 64 MiB each
    assert resident_bytes() - before < 200 << 20  # one or two alive at a time, not 1.3 GiB


def test_layer_norm_on_large_outputs(monkeypatch):
    """The huge-page path of the cpu layer_norm, its outputs poisoned with NaN first, at mean
    1e4 and std 1e-2 (the float64 mean at work)."""
    real_empty_like = memory.empty_like
    monkeypatch.setattr(cpu_layer_norm, "empty_like", lambda t: real_empty_like(t).fill_(float("nan")))
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(LARGE, generator=g, dtype=torch.float64)).float()
    w, b = torch.randn(LARGE[1], generator=g), torch.randn(LARGE[1], generator=g)
    dy = torch.randn(LARGE, generator=g)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.double().requires_grad_() for t in (x, w, b)]
    with kiln.backend.use("cpu"):
        y = kiln.ops.layer_norm(ours[0], LARGE[1:], ours[1], ours[2])
        y.backward(dy)
    ref = F.layer_norm(theirs[0], LARGE[1:], theirs[1], theirs[2])
    ref.backward(dy.double())
    assert rel_err(y, ref) < BOUND[torch.float32]
    for a, r in zip(ours, theirs):
        assert rel_err(a.grad, r.grad) < BOUND[torch.float32]


@pytest.mark.skipif(not memory._HAS_HUGE_PAGES, reason="the pool holds huge-page mappings")
def test_pool_reuses_only_mappings_no_tensor_uses():
    memory.release()
    t = memory.empty(LARGE, torch.float32)
    address = t.data_ptr()
    view, array = t[7:], t.numpy()[3:]
    del t
    assert memory.empty(LARGE, torch.float32).data_ptr() != address  # the view still uses it
    del view
    assert memory.empty(LARGE, torch.float32).data_ptr() != address  # the numpy array does
    del array
    again = memory.empty(LARGE, torch.float32)
    assert again.data_ptr() == address  # free: handed out again
    other = memory.empty(LARGE, torch.float32)
    assert other.data_ptr() != address
    other.fill_(1)
    again.fill_(2)
    assert other.sum().item() == LARGE[0] * LARGE[1]
    del again, other
    memory.release()
    assert not memory._pool
