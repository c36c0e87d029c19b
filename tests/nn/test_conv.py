"""kiln.nn.Conv2d / ConvTranspose2d against torch's modules in float64 (same state_dict), and the
notes' max over shifts."""

import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.numerics import BOUND, rel_err

CONV_CASES = [
    # (in, out, kernel, kwargs, input H, W)
    (3, 5, 3, {}, 9, 11),
    (3, 5, 3, {"padding": 1}, 8, 8),
    (4, 6, (3, 2), {"stride": (2, 1), "padding": (1, 0)}, 10, 7),
    (2, 3, 3, {"dilation": 2, "padding": 2}, 9, 9),
    (4, 6, 3, {"groups": 2, "padding": 1}, 6, 5),
    (6, 6, 3, {"groups": 6}, 7, 7),
    (3, 4, 4, {"padding": "same"}, 7, 6),
    (3, 4, 3, {"padding": "valid", "bias": False}, 6, 6),
    (3, 4, 3, {"padding": 1, "padding_mode": "reflect"}, 6, 7),
    (3, 4, 3, {"padding": 2, "padding_mode": "circular"}, 6, 7),
    (3, 4, 3, {"padding": (1, 2), "padding_mode": "replicate"}, 5, 6),
    (1, 1, 1, {}, 1, 1),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("c_in,c_out,kernel,kwargs,H,W", CONV_CASES)
def test_conv2d_matches_torch_forward_and_backward(backend, c_in, c_out, kernel, kwargs, H, W):
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(c_in, c_out, kernel, dtype=torch.float64, **kwargs)
    ours = kiln.nn.Conv2d(c_in, c_out, kernel, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, c_in, H, W, dtype=torch.float64, requires_grad=True)
    with kiln.backend.use(backend):
        y = ours(x)
    y_ref = theirs(x)
    assert y.shape == y_ref.shape and y.is_contiguous()
    assert rel_err(y, y_ref) < BOUND[torch.float64]
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *theirs.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < BOUND[torch.float64]


def test_conv2d_under_a_backend_im2col_has_no_form_of_unfolds_with_torch():
    """kiln.backend.use("triton") on CPU tensors (the interpreter): im2col has no triton form, so
    the unfold is torch's F.unfold, as on a GPU, and the GEMM still runs on the chosen backend."""
    if not kiln.backend.triton_interpreted():
        pytest.skip("runs the triton form on CPU tensors under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    ours = kiln.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 5, 6)
    with kiln.backend.use("triton"):
        y = ours(x)
    assert rel_err(y, theirs(x)) < BOUND[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,kernel,kwargs,H,W", CONV_CASES)
def test_conv2d_matches_torch_on_cuda(c_in, c_out, kernel, kwargs, H, W):
    """Off the CPU Conv2d unfolds with F.unfold (channel-major columns) instead of kiln's
    im2col: float32 on CUDA against torch's Conv2d in float64 (on the CPU: cuDNN's own float32
    convolution may use TF32), forward and every gradient."""
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(c_in, c_out, kernel, dtype=torch.float64, **kwargs)
    ours = kiln.nn.Conv2d(c_in, c_out, kernel, device="cuda", **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x_ref = torch.randn(3, c_in, H, W, dtype=torch.float64, requires_grad=True)
    x = x_ref.detach().float().cuda().requires_grad_()
    y, y_ref = ours(x), theirs(x_ref)
    assert y.shape == y_ref.shape and rel_err(y.cpu().double(), y_ref) < BOUND[torch.float32]
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g.float().cuda())
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *theirs.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert rel_err(a.cpu().double(), b) < BOUND[torch.float32]


def test_conv2d_fused_activation_and_unbatched_input():
    torch.manual_seed(0)
    ours = kiln.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64, activation="gelu")
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    ref = F.gelu(F.conv2d(x[None], ours.weight, ours.bias, padding=1))[0]
    assert rel_err(ours(x), ref) < BOUND[torch.float64]
    assert "activation=gelu" in repr(ours)


def test_conv2d_float32_and_compile():
    torch.manual_seed(0)
    ours = kiln.nn.Conv2d(3, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    ref = F.conv2d(x.double(), ours.weight.double(), ours.bias.double(), stride=2, padding=1)
    assert rel_err(ours(x), ref) < BOUND[torch.float32]
    compiled = torch.compile(ours, fullgraph=True)
    assert rel_err(compiled(x), ref) < BOUND[torch.float32]


def test_conv2d_bad_input_names_the_shapes():
    conv = kiln.nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"2 channels.*expects 3.*\(1, 2, 5, 5\)"):
        conv(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"3-D.*4-D.*\(5, 5\)"):
        conv(torch.randn(5, 5))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv(torch.randn(1, 3, 2, 2))


CONV_T_CASES = [
    (3, 5, 3, {}, 4, 5, None),
    (4, 2, 4, {"stride": 2, "padding": 1}, 4, 4, None),
    (4, 6, 3, {"stride": 2, "padding": 1, "output_padding": 1}, 5, 3, None),
    (4, 6, (3, 2), {"stride": (2, 3), "dilation": (1, 2)}, 3, 4, None),
    (4, 6, 3, {"groups": 2, "bias": False}, 4, 4, None),
    (3, 2, 3, {"stride": 2, "padding": 1}, 4, 4, [8, 8]),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("c_in,c_out,kernel,kwargs,H,W,output_size", CONV_T_CASES)
def test_conv_transpose2d_matches_torch(backend, c_in, c_out, kernel, kwargs, H, W, output_size):
    torch.manual_seed(0)
    theirs = torch.nn.ConvTranspose2d(c_in, c_out, kernel, dtype=torch.float64, **kwargs)
    ours = kiln.nn.ConvTranspose2d(c_in, c_out, kernel, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, c_in, H, W, dtype=torch.float64, requires_grad=True)
    with kiln.backend.use(backend):
        y = ours(x, output_size)
    y_ref = theirs(x, output_size)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) < BOUND[torch.float64]
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *theirs.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < BOUND[torch.float64]


def test_max_over_all_cyclic_shifts_is_exactly_invariant():
    torch.manual_seed(0)
    g = torch.nn.Sequential(kiln.nn.Conv2d(1, 4, 3, dtype=torch.float64, activation="relu"),
                            torch.nn.Flatten(), kiln.nn.Linear(4 * 4 * 5, 3, dtype=torch.float64))
    x = torch.randn(2, 1, 6, 7, dtype=torch.float64)
    f = kiln.nn.MaxOverShifts(g, max_shift=None)
    out = f(x)
    assert out.shape == (2, 3)
    for shift in [(1, 0), (2, 3), (5, 6)]:
        assert torch.allclose(f(x.roll(shift, dims=(-2, -1))), out, rtol=0, atol=1e-12)
    assert not torch.allclose(g(x.roll((2, 3), dims=(-2, -1))), g(x))   # g alone is not invariant
    small = kiln.nn.MaxOverShifts(g, max_shift=1, reduce="mean")
    expected = torch.stack([g(x.roll((i, j), dims=(-2, -1))) for i in (-1, 0, 1) for j in (-1, 0, 1)]).mean(0)
    assert rel_err(small(x), expected) < BOUND[torch.float64]
    with pytest.raises(ValueError, match="reduce"):
        kiln.nn.MaxOverShifts(g, reduce="sum")
