import importlib

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


def test_wide_and_offset_rows_float32_backward():
    """The cpu backward sums a row's w dy xhat and w dy in float32 for float32 rows: wide rows
    and rows far from 0 (xhat from the float64 mean) stay inside the bound."""
    _check("cpu", (3,), (16384,), torch.float32)
    _check("cpu", (5,), (4099,), torch.float32, offset=1e4, scale=1e-2)


def test_wide_float32_rows_whose_first_values_sit_far_from_the_mean():
    """Wide float32 rows sum their deviations from the mean of their first 16 values in
    float32 blocks. Rows that start with outliers put that center up to sqrt(n/16) std off
    the mean (the variance cancelling by ~1000x at n = 16384: 9.9e-6 normwise before such
    rows summed again about their mean); held here to a tenth of the bound (torch: 6e-8)."""
    n = 16384
    x = _randn(3, n, dtype=torch.float64)
    x[:, :16] += torch.tensor([100.0, -1000.0, 8.0], dtype=torch.float64)[:, None]
    w, b, dy = _randn(n, seed=1), _randn(n, seed=2), _randn(3, n, seed=3)
    ours = [t.float().requires_grad_() for t in (x, w, b)]
    theirs = [t.float().double().requires_grad_() for t in (x, w, b)]
    with kiln.backend.use("cpu"):
        y = kiln.ops.layer_norm(ours[0], n, ours[1], ours[2])
        y.backward(dy.float())
    ref = F.layer_norm(theirs[0], (n,), theirs[1], theirs[2])
    ref.backward(dy.float().double())
    assert rel_err(y, ref) < BOUND[torch.float32] / 10
    for a, r in zip(ours, theirs):
        assert rel_err(a.grad, r.grad) < BOUND[torch.float32]


def test_eager_cpu_node_gradcheck_and_gradgradcheck():
    """The eager call's own autograd node (one normalized dim, contiguous, cpu kernels)."""
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True) for s in [(2, 3, 7), (7,), (7,)])
    with kiln.backend.use("cpu"):
        node = kiln.ops.layer_norm(x, 7, w, b).grad_fn.next_functions[0][0]  # under the view back to 3-D
        assert "CpuKernelsFunction" in type(node).__name__
        assert torch.autograd.gradcheck(lambda *a: kiln.ops.layer_norm(a[0], 7, a[1], a[2]), (x, w, b))
        assert torch.autograd.gradgradcheck(lambda *a: kiln.ops.layer_norm(a[0], 7, a[1], a[2]), (x, w, b))
        assert torch.autograd.gradcheck(lambda a: kiln.ops.layer_norm(a, [7], w.detach()), (x,))


def test_eager_backward_sees_an_in_place_change_of_its_input_as_torch():
    x = _randn(4, 8, dtype=torch.float32).requires_grad_()
    with kiln.backend.use("cpu"):
        h = x * 2
        y = kiln.ops.layer_norm(h, 8)
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_eager_forward_then_profiled_backward_runs_the_custom_op_with_the_same_grads():
    x, w, b = (_randn(*s, seed=k, dtype=torch.float32) for k, s in enumerate([(5, 40), (40,), (40,)]))
    dy = _randn(5, 40, seed=3, dtype=torch.float32)
    grads = []
    for profiled in (False, True):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        with kiln.backend.use("cpu"):
            y = kiln.ops.layer_norm(xi, 40, wi, bi)  # no profiler yet: the direct eager path
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                if profiled:
                    y.backward(dy)
            if not profiled:
                y.backward(dy)
        grads.append((xi.grad, wi.grad, bi.grad))
        if profiled:
            assert "kiln::layer_norm_backward" in {e.name for e in prof.events()}
    for got, want in zip(*grads):
        assert torch.equal(got, want)


# --- double backward -------------------------------------------------------------------


@pytest.mark.parametrize("affine", [(True, True), (False, False), (True, False)], ids=str)
def test_gradgradcheck_cpu_backend(affine):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    params = [torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True) if on else None
              for on in affine]
    inputs = (x, *[p for p in params if p is not None])

    def fn(x, *given):
        it = iter(given)
        return kiln.ops.layer_norm(x, (3, 5), *[next(it) if on else None for on in affine])

    with kiln.backend.use("cpu"):
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradient_penalty_matches_torch():
    """d/dtheta of L + ||dL/dx||^2 + ||dL/dw||^2 against F.layer_norm."""
    x, w, b = _randn(6, 9), _randn(9, seed=1), _randn(9, seed=2)
    results = []
    for forward in (lambda *a: kiln.ops.layer_norm(a[0], 9, a[1], a[2]),
                    lambda *a: F.layer_norm(a[0], (9,), a[1], a[2])):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        with kiln.backend.use("cpu"):
            loss = (forward(xi, wi, bi) * torch.arange(9.0, dtype=torch.float64)).square().sum()
            dx, dw = torch.autograd.grad(loss, (xi, wi), create_graph=True)
            (loss + dx.square().sum() + dw.square().sum()).backward()
        results.append((xi.grad, wi.grad, bi.grad))
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-12


# --- autocast and mixed precision --------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_autocast_output_dtype_and_values_as_torch(x_dtype):
    """torch's CPU autocast leaves layer_norm alone: float32 in, float32 out; a bfloat16
    activation with float32 parameters is torch's mixed precision, bfloat16 out."""
    x, w, b = _randn(4, 5, 33, dtype=x_dtype), _randn(33, seed=1, dtype=torch.float32), \
        _randn(33, seed=2, dtype=torch.float32)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kiln.ops.layer_norm(ours[0], 33, ours[1], ours[2])
        ref = F.layer_norm(theirs[0], (33,), theirs[1], theirs[2])
    assert y.dtype == ref.dtype == x_dtype
    dy = _randn(4, 5, 33, seed=3, dtype=x_dtype)
    y.backward(dy)
    ref.backward(dy)
    bound = BOUND[x_dtype]
    assert rel_err(y, ref) < bound
    for name, a, r in zip(("dx", "dweight", "dbias"), ours, theirs):
        assert a.grad.dtype == r.grad.dtype, name
        assert rel_err(a.grad, r.grad) < bound, name


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])  # the cpu backend has no half dtypes
def test_half_input_with_float32_parameters(backend, x_dtype):
    x = _randn(3, 40, dtype=x_dtype).requires_grad_()
    w, b = _randn(40, seed=1, dtype=torch.float32).requires_grad_(), _randn(40, seed=2, dtype=torch.float32).requires_grad_()
    with kiln.backend.use(backend):
        y = kiln.ops.layer_norm(x, 40, w, b)
        y.sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.layer_norm(x64, (40,), w64, b64)
    ref.sum().backward()
    assert y.dtype == x_dtype and x.grad.dtype == x_dtype
    assert w.grad.dtype == b.grad.dtype == torch.float32
    for got, want in ((y, ref), (x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) < BOUND[x_dtype]


def test_autocast_rules_are_on_the_devices_torch_has_them():
    # torch's policy: float32 under CUDA autocast (checked on a GPU below), none on CPU.
    name = torch.ops.kiln.layer_norm.default.name()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU") is False
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA") is True


# --- zero-size -------------------------------------------------------------------------


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("lead,shape", [((0,), (5,)), ((2, 0), (3, 4)), ((3,), (0,)), ((2,), (3, 0))],
                         ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_zero_size_matches_torch_without_a_kernel(monkeypatch, backend, lead, shape):
    """torch's empty output and its zero (not None) parameter gradients, no kernel run."""
    def no_kernel(*args):
        raise AssertionError("a kernel was asked to run on an empty input")

    monkeypatch.setattr(importlib.import_module("kiln.ops.layer_norm"), "_implementation", no_kernel)
    x, w, b = _randn(*lead, *shape), _randn(*shape, seed=1), _randn(*shape, seed=2)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    with kiln.backend.use(backend):
        y = kiln.ops.layer_norm(ours[0], shape, ours[1], ours[2])
        y.sum().backward()
    ref = F.layer_norm(theirs[0], shape, theirs[1], theirs[2])
    ref.sum().backward()
    assert y.shape == ref.shape
    for a, r in zip(ours, theirs):
        assert a.grad is not None and a.grad.shape == r.grad.shape and torch.equal(a.grad, r.grad)


# --- bad input ------------------------------------------------------------------------


def test_weight_of_the_wrong_shape_names_both():
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \(8,\), got \(7,\) \(x \(2, 8\)\)"):
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


def test_parameters_on_another_device_name_both():
    with pytest.raises(ValueError, match=r"bias is on meta but x is on cpu \(bias \(8,\), x \(2, 8\)\)"):
        kiln.ops.layer_norm(torch.randn(2, 8), 8, torch.ones(8), torch.empty(8, device="meta"))


def test_float32_input_with_half_parameters_is_refused_as_torch():
    with pytest.raises(TypeError, match=r"weight has dtype bfloat16 but x has dtype float32 .*x's dtype"):
        kiln.ops.layer_norm(torch.randn(2, 8), 8, torch.ones(8, dtype=torch.bfloat16))


def test_mixed_parameter_dtypes_name_both():
    with pytest.raises(TypeError, match=r"bias has dtype bfloat16 but weight has dtype float32"):
        kiln.ops.layer_norm(torch.randn(2, 8, dtype=torch.bfloat16), 8, torch.ones(8),
                            torch.zeros(8, dtype=torch.bfloat16))


def test_negative_normalized_shape():
    with pytest.raises(ValueError, match=r"normalized_shape must be one or more sizes >= 0, got \(-1,\)"):
        kiln.ops.layer_norm(torch.randn(2, 8), (-1,))


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


@pytest.mark.gpu
@pytest.mark.parametrize("region", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_autocast_runs_float32_as_torch(backend, region):
    """torch's CUDA autocast runs layer_norm in float32: a half activation comes out float32."""
    x = _randn(16, 96, dtype=region, device="cuda")
    w, b = _randn(96, seed=1, dtype=torch.float32, device="cuda"), _randn(96, seed=2, dtype=torch.float32, device="cuda")
    with kiln.backend.use(backend), torch.autocast("cuda", dtype=region):
        y, ref = kiln.ops.layer_norm(x, 96, w, b), F.layer_norm(x, (96,), w, b)
    assert y.dtype == ref.dtype == torch.float32
    assert rel_err(y, ref) < BOUND[torch.float32]
