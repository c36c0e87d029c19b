import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]
# (leading dims, normalized_shape): widths no block multiple, one row, two trailing dims.
SHAPES = [((3,), (1,)), ((2, 3), (7,)), ((1,), (769,)), ((4,), (5120,)), ((5,), (3, 11)),
          ((2, 2), (4, 65))]


def _randn(*shape, scale=1.0, offset=0.0, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (offset + torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _err(out, ref, floor):
    """rel_err, except that a reference near 0 (width 1: xhat = 0) is measured against floor."""
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    if not torch.isfinite(out).all():
        return float("inf")
    return diff / max(ref.norm().item(), floor)


def _check(backend, lead, shape, dtype, affine=(True, True), device="cpu", offset=0.0, scale=1.0,
           bound=None):
    bound = BOUND[dtype] if bound is None else bound
    x = _randn(*lead, *shape, offset=offset, scale=scale, dtype=dtype, device=device)
    w = _randn(*shape, seed=1, dtype=dtype, device=device) if affine[0] else None
    b = _randn(*shape, seed=2, dtype=dtype, device=device) if affine[1] else None
    dy = _randn(*lead, *shape, seed=3, dtype=dtype, device=device)
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    theirs = [t.detach().cpu().double().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with kiln.backend.use(backend):
        y = kiln.ops.layer_norm(ours[0], shape, ours[1], ours[2])
        y.backward(dy)
    ref = F.layer_norm(theirs[0], shape, theirs[1], theirs[2])
    ref.backward(dy.cpu().double())
    floor = dy.double().norm().item()
    assert _err(y, ref, 1.0) < bound, "forward"
    for name, a, r in zip(("dx", "dweight", "dbias"), ours, theirs):
        if a is not None:
            assert _err(a.grad, r.grad, floor) < bound, name


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("lead,shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_matches_torch(backend, dtype, lead, shape):
    _check(backend, lead, shape, dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("lead,shape", SHAPES, ids=str)
def test_matches_torch_triton_interpreted(lead, shape):
    _check("triton", lead, shape, torch.float32)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_affine_off(backend, affine):
    _check(backend, (3,), (37,), torch.float32, affine=affine)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_large_offset_small_spread_float32(backend):
    """Rows with mean 1e4 and std 1e-2: torch's own float32 layer_norm is off by ~5e-2
    here (its float32 mean is rounded by ulp(1e4)/2, 5% of the std); ours holds 1e-5."""
    _check(backend, (4,), (769,), torch.float32, offset=1e4, scale=1e-2)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_constant_rows(backend):
    x = torch.full((3, 50), 7.25).requires_grad_()
    w, b = _randn(50, seed=1, dtype=torch.float32), _randn(50, seed=2, dtype=torch.float32)
    with kiln.backend.use(backend):
        y = kiln.ops.layer_norm(x, (50,), w, b)
        y.sum().backward()
    assert torch.equal(y, b.expand(3, 50)), "variance 0: y = bias"
    # dx = rstd (w dy - mean(w dy)) with rstd = 1/sqrt(eps): large, finite, as torch's.
    x64 = x.detach().double().requires_grad_()
    F.layer_norm(x64, (50,), w.double(), b.double()).sum().backward()
    assert rel_err(x.grad, x64.grad) < BOUND[torch.float32]


def test_gradcheck_cpu_backend():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(lambda *a: kiln.ops.layer_norm(a[0], (3, 5), a[1], a[2]), (x, w, b))


def test_non_contiguous_input():
    x = _randn(6, 9, 4).transpose(1, 2)
    with kiln.backend.use("cpu"):
        y = kiln.ops.layer_norm(x, (9,))
    assert rel_err(y, F.layer_norm(x, (9,))) < 1e-12


def test_only_weight_grads_when_input_is_data():
    x, w = _randn(4, 8), _randn(8, seed=1).requires_grad_()
    with kiln.backend.use("cpu"):
        kiln.ops.layer_norm(x, 8, w).sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    F.layer_norm(x, (8,), ref_w).sum().backward()
    assert rel_err(w.grad, ref_w.grad) < 1e-12


def test_deterministic_parameter_grads():
    x, dy = _randn(1000, 33, dtype=torch.float32), _randn(1000, 33, seed=4, dtype=torch.float32)
    grads = []
    for _ in range(2):
        w, b = torch.ones(33, requires_grad=True), torch.zeros(33, requires_grad=True)
        with kiln.backend.use("cpu"):
            kiln.ops.layer_norm(x, 33, w, b).backward(dy)
        grads.append((w.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# --- bad input ------------------------------------------------------------------------


def test_weight_of_the_wrong_shape_names_both():
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \(8,\), got \(7,\)"):
        kiln.ops.layer_norm(torch.randn(2, 8), (8,), torch.ones(7))


def test_normalized_shape_must_match_trailing_dims():
    with pytest.raises(ValueError, match=r"x \(2, 8\) vs normalized_shape \(4,\)"):
        kiln.ops.layer_norm(torch.randn(2, 8), 4)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        kiln.ops.layer_norm(torch.ones(2, 8, dtype=torch.int64), 8)


def test_mixed_dtypes_name_both():
    with pytest.raises(TypeError, match="weight has dtype float64 but x has dtype float32"):
        kiln.ops.layer_norm(torch.randn(2, 8), 8, torch.ones(8, dtype=torch.float64))


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()
    x, w, b = (_randn(5, 12).requires_grad_(), _randn(12, seed=1).requires_grad_(),
               _randn(12, seed=2).requires_grad_())
    fn = lambda x, w, b: kiln.ops.layer_norm(x, 12, w, b).square().sum()
    with kiln.backend.use("cpu"):
        torch.compile(fn, fullgraph=True)(x, w, b).backward()
        grads = [t.grad.clone() for t in (x, w, b)]
        for t in (x, w, b):
            t.grad = None
        fn(x, w, b).backward()
    for got, t in zip(grads, (x, w, b)):
        assert rel_err(got, t.grad) < 1e-12


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("lead,shape", SHAPES + [((16384,), (4096,))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_torch_gpu(backend, dtype, lead, shape):
    _check(backend, lead, shape, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_large_offset_small_spread_gpu(backend):
    _check(backend, (64,), (5120,), torch.float32, device="cuda", offset=1e4, scale=1e-2)
