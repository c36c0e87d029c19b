"""kiln.ops.im2col against torch's F.unfold (forward: the same values, exactly) and F.fold (backward)
in float64, for every geometry F.unfold takes."""

import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]

# (N, C, H, W, kernel_size, dilation, padding, stride)
GEOMETRIES = [
    (2, 3, 7, 5, 3, 1, 1, 1),
    (4, 5, 9, 8, (3, 2), (2, 1), (1, 0), (2, 3)),
    (3, 1, 6, 6, 5, 1, 2, 1),
    (1, 7, 5, 11, (1, 4), 1, (0, 3), (1, 2)),
    (2, 2, 4, 4, 4, 1, 0, 1),            # one output pixel
    (64, 32, 8, 8, 3, 1, 1, 1),          # the digits CNN's second convolution: the parallel build
]


def _tap_major(input, kernel_size, dilation, padding, stride):
    """F.unfold's columns, transposed to rows and reordered tap-major: what im2col promises."""
    N, C = input.shape[:2]
    columns = F.unfold(input, kernel_size, dilation, padding, stride)
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    L = columns.shape[-1]
    return columns.reshape(N, C, kh * kw, L).permute(0, 3, 2, 1).reshape(N, L, kh * kw * C)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_rows_are_unfold_columns_and_gradient_is_fold(backend, geometry, poison_empty):
    N, C, H, W, k, d, p, s = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    with kiln.backend.use(backend, ops=["im2col"]):
        rows = kiln.ops.im2col(ours, k, d, p, s)
    expected = _tap_major(theirs, k, d, p, s)
    assert torch.equal(rows, expected)
    dy = torch.randn(rows.shape, generator=g, dtype=torch.float64)
    with kiln.backend.use(backend, ops=["im2col"]):
        (dx,) = torch.autograd.grad(rows, ours, dy)
    (dx_ref,) = torch.autograd.grad(expected, theirs, dy)
    assert rel_err(dx, dx_ref) <= BOUND[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_and_non_contiguous_inputs(dtype):
    x = torch.randn(3, 6, 7, 9, dtype=torch.float64)
    expected = _tap_major(x, 3, 1, 1, 1).to(dtype)
    for view in (x.to(dtype).contiguous(memory_format=torch.channels_last), x.to(dtype)[:, :, :, :],
                 x.to(dtype).transpose(2, 3).contiguous().transpose(2, 3)):
        assert torch.equal(kiln.ops.im2col(view, 3, 1, 1, 1), expected)


def test_gradcheck_and_double_backward():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda t: kiln.ops.im2col(t, (3, 2), (1, 2), (1, 1), (2, 1))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_empty_batch_as_torch_and_no_channels_refused_as_torch():
    x = torch.randn(0, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    rows = kiln.ops.im2col(x, 3, 1, 1, 1)
    assert rows.shape == _tap_major(x, 3, 1, 1, 1).shape == (0, 25, 27)
    rows.sum().backward()
    assert x.grad.shape == x.shape
    no_channels = torch.randn(2, 0, 5, 5)
    with pytest.raises(RuntimeError, match="non-zero dimensions"):
        F.unfold(no_channels, 3)
    with pytest.raises(RuntimeError, match="non-zero dimensions"):
        kiln.ops.im2col(no_channels, 3)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="input must be 4-D"):
        kiln.ops.im2col(x[0], 3)
    with pytest.raises(TypeError, match="floating-point"):
        kiln.ops.im2col(x.long(), 3)
    with pytest.raises(ValueError, match="kernel_size"):
        kiln.ops.im2col(x, (3, 3, 3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        kiln.ops.im2col(x, 3, stride=0)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        kiln.ops.im2col(x, 7)


def test_compiles_without_graph_breaks():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    fn = torch.compile(lambda t: kiln.ops.im2col(t, 3, 1, 1, 2), fullgraph=True, backend="aot_eager")
    rows = fn(x)
    assert torch.equal(rows, kiln.ops.im2col(x, 3, 1, 1, 2))
    rows.sum().backward()
    assert torch.allclose(x.grad, torch.autograd.grad(_tap_major(x, 3, 1, 1, 2).sum(), x)[0])
