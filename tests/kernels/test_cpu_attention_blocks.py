"""The cpu attention's block sizing: head chunks and grown query blocks, against SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.kernels.cpu import attention as cpu_attention
from tests.numerics import rel_err


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_chunks_and_query_blocks(monkeypatch, causal):
    """Scores for 3 heads x 16 rows x 24 keys per block: 6 heads in 2 chunks, 70 queries in
    5 blocks, 101 keys in 5; one head alone grows its query blocks to 48 rows."""
    monkeypatch.setattr(cpu_attention, "BLOCK_Q", 16)
    monkeypatch.setattr(cpu_attention, "BLOCK_K", 24)
    monkeypatch.setattr(cpu_attention, "SCORE_BYTES", 3 * 16 * 24 * 8)
    assert cpu_attention._blocks(6, 70, 101, 8) == (16, 24, 3)
    assert cpu_attention._blocks(1, 70, 101, 8) == (48, 24, 1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 70, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 101, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    do = torch.randn(2, 3, 70, 16, generator=g, dtype=torch.float64)
    with kiln.backend.use("cpu"):
        out = kiln.ops.attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    # bottom-right causal, as the op defines it
    mask = torch.ones(70, 101, dtype=torch.bool).tril(101 - 70) if causal else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(16))
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    assert rel_err(out, ref) < 1e-12
    for a, r in zip(grads, ref_grads):
        assert rel_err(a, r) < 1e-12


def test_exp2_polynomial_of_the_float32_forward():
    """The base-2 exponential of the float32 forward against float64: within 3 ulps where
    2^x is a normal float32, 0 below -126.5 and for -inf (a hidden key), NaN for NaN."""
    import numpy as np

    from tests.kernels.test_cpu_fastmath import _vectorized

    apply = _vectorized(cpu_attention._exp2_f32)
    x = np.concatenate([np.linspace(-126, 0, 400_001), np.random.default_rng(0).uniform(-30, 0, 100_000)])
    x = x.astype(np.float32)
    got = apply(x).astype(np.float64)
    want = np.exp2(x.astype(np.float64))
    assert np.abs(got / want - 1).max() < 3 * 2.0 ** -23
    edge = apply(np.array([-126.6, -127.0, -200.0, -np.inf, np.nan], np.float32))
    assert (edge[:4] == 0).all() and np.isnan(edge[4])
