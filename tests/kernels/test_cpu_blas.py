"""kiln.kernels.cpu.blas.PackedLinear: both providers (oneDNN packed, torch.mm) against float64."""

import pytest
import torch

from kiln.kernels.cpu import blas
from tests.numerics import BOUND, rel_err


def _operands(rows, n_in, n_out, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_in, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
    b = torch.randn(n_out, generator=g, dtype=torch.float64)
    return x, w, b, (x.to(dtype), w.to(dtype), b.to(dtype))


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mm"])
@pytest.mark.parametrize("rows, n_in, n_out", [(1, 7, 5), (8, 256, 1024), (33, 129, 516)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_linear_matches_float64(monkeypatch, onednn, rows, n_in, n_out, dtype):
    if onednn and not blas._onednn_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(blas, "_onednn_available", lambda: onednn)
    monkeypatch.setattr(blas, "_ONEDNN_MIN_MACS", 0)   # the provider itself, at every size
    x, w, b, (x_, w_, b_) = _operands(rows, n_in, n_out, dtype)
    linear = blas.PackedLinear(w_, rows)
    assert linear.onednn == (onednn and dtype == torch.float32)  # oneDNN has no float64
    for bias, bias_ in ((None, None), (b, b_)):
        ref = x @ w.t() + (0 if bias is None else bias)
        out = linear(x_, bias_)
        assert out.dtype == dtype and out.shape == (rows, n_out)
        assert rel_err(out, ref) < BOUND[dtype]


def test_packed_linear_takes_a_transposed_weight_and_other_row_counts():
    """The rnn backward packs w_hh^T (a view) and may see a batch other than the hint."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g, dtype=torch.float64)
    d = torch.randn(12, 96, generator=g, dtype=torch.float64)
    linear = blas.PackedLinear(w.float().t(), 5)
    assert rel_err(linear(d.float()), d @ w) < BOUND[torch.float32]


def test_small_products_skip_onednn_packing():
    """Packing costs more than a small product saves: below _ONEDNN_MIN_MACS torch.mm runs."""
    small = blas.PackedLinear(torch.randn(16, 8), 4)
    assert not small.onednn
    big_rows = blas._ONEDNN_MIN_MACS // (64 * 64) + 1
    big = blas.PackedLinear(torch.randn(64, 64), big_rows)
    assert big.onednn == blas._onednn_available()
