import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kiln
from kiln.kernels.activations import ACTIVATIONS
from kiln.ops.linear_act import TORCH_ACTIVATIONS as TORCH_ACT
from tests.numerics import BOUND, rel_err

# (leading dims of x, in, out): none a multiple of a block size; 1s; a 3-D input.
SMALL_SHAPES = [((1,), 1, 1), ((7,), 19, 33), ((65,), 70, 130), ((2, 5), 19, 33)]
# With the cpu kernel's row blocks shrunk (below): several row blocks, a ragged last
# one, and blocks with fewer rows than the dz pass has parts.
CPU_BLOCKED_SHAPES = [((3000,), 17, 300), ((3, 700), 9, 45)]


def _inputs(lead, k, n, dtype, bias=True, device="cpu"):
    """Inputs in ``dtype`` on ``device``, and the same values in float64 for the oracle."""
    g = torch.Generator().manual_seed(hash((lead, k, n)) % 2**31)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    low = [None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b, dy)]
    exact = [None if t is None else t.detach().cpu().double().clone() for t in low]
    return low, exact


def _check(backend, lead, k, n, activation, dtype, bias=True, device="cpu"):
    (x, w, b, dy), (x64, w64, b64, dy64) = _inputs(lead, k, n, dtype, bias, device)
    params = [t for t in (x, w, b, x64, w64, b64) if t is not None]
    for t in params:
        t.requires_grad_()
    ref = TORCH_ACT[activation](F.linear(x64, w64, b64))
    ref.backward(dy64)
    with kiln.backend.use(backend):
        out = kiln.ops.linear_act(x, w, b, activation)
        out.backward(dy)
    bound = BOUND[dtype]
    assert rel_err(out, ref) < bound, "forward"
    assert rel_err(x.grad, x64.grad) < bound, "dx"
    assert rel_err(w.grad, w64.grad) < bound, "dweight"
    if bias:
        assert rel_err(b.grad, b64.grad) < bound, "dbias"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_matches_torch_cpu_and_reference(backend, dtype, shape, activation):
    _check(backend, *shape, activation, dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", CPU_BLOCKED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_backend_across_row_blocks(monkeypatch, dtype, shape, activation):
    cpu_kernel = importlib.import_module("kiln.kernels.cpu.linear_act")
    monkeypatch.setattr(cpu_kernel, "_BLOCK_BYTES", 1 << 14)
    monkeypatch.setattr(cpu_kernel, "_MIN_BLOCK_ROWS", 8)
    lead, k, n = shape
    assert cpu_kernel._rows_per_block(n, 8) < lead[-1]
    _check("cpu", *shape, activation, dtype)


# At least GRAIN outputs, for the cpu kernel's one-region forms (one numba task per thread,
# each with MKL's sequential GEMM): tasks with 1 or 2 rows, an empty task (2 rows, 3 tasks),
# an empty block of dW's rows (2 outputs, 3 tasks), a 3-D input.
CPU_FUSED_SHAPES = [((300,), 17, 130), ((2,), 5, 16500), ((17000,), 3, 2), ((3, 150), 9, 80)]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", CPU_FUSED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_one_region_forms(monkeypatch, dtype, shape, activation):
    cpu_kernel = importlib.import_module("kiln.kernels.cpu.linear_act")
    if not cpu_kernel.MKL_THREADS:
        pytest.skip("torch without MKL's exported GEMM: the one-region forms do not run")
    monkeypatch.setattr(cpu_kernel, "_team_size", lambda: 3)  # 3 tasks, whatever numba's thread count
    monkeypatch.setattr(cpu_kernel, "_MIN_BLOCK_ROWS", 1)
    lead, k, n = shape
    assert cpu_kernel._fused_tasks(lead[-1] * (lead[0] if len(lead) > 1 else 1), n, k, 8) == 3
    _check("cpu", *shape, activation, dtype)
    _check("cpu", *shape, activation, dtype, bias=False)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_cpu_one_region_backward_of_one_input(monkeypatch, activation):
    """dx alone and dW alone, in float64 against torch."""
    cpu_kernel = importlib.import_module("kiln.kernels.cpu.linear_act")
    if not cpu_kernel.MKL_THREADS:
        pytest.skip("torch without MKL's exported GEMM: the one-region forms do not run")
    monkeypatch.setattr(cpu_kernel, "_team_size", lambda: 2)
    monkeypatch.setattr(cpu_kernel, "_MIN_BLOCK_ROWS", 1)
    (x, w, b, dy), _ = _inputs((300,), 17, 130, torch.float64)
    for wanted in (x, w):
        x_, w_ = x.clone().requires_grad_(wanted is x), w.clone().requires_grad_(wanted is w)
        x64, w64 = x.clone().requires_grad_(wanted is x), w.clone().requires_grad_(wanted is w)
        with kiln.backend.use("cpu"):
            kiln.ops.linear_act(x_, w_, b, activation).backward(dy)
        TORCH_ACT[activation](F.linear(x64, w64, b)).backward(dy)
        got, ref = (x_.grad, x64.grad) if wanted is x else (w_.grad, w64.grad)
        assert rel_err(got, ref) < BOUND[torch.float64]
        assert (x_.grad is None) == (wanted is w) and (w_.grad is None) == (wanted is x)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_matches_torch_triton_interpreted(shape, activation):
    _check("triton", *shape, activation, torch.float32)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 300), k=st.integers(1, 70), n=st.integers(1, 600),
       activation=st.sampled_from(ACTIVATIONS), bias=st.booleans())
def test_cpu_backend_over_shapes(m, k, n, activation, bias):
    _check("cpu", (m,), k, n, activation, torch.float64, bias=bias)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_no_bias(backend, activation):
    dtype = torch.float32 if backend == "triton" else torch.float64
    _check(backend, (9,), 13, 21, activation, dtype, bias=False)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_non_contiguous_inputs(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(23, 40, dtype=dtype, generator=g)
    x = x_full[:, ::2].t()  # (20, 23), strided both ways
    w = torch.randn(23, 17, dtype=dtype, generator=g).t()  # (17, 23), transposed
    b = torch.randn(34, dtype=dtype, generator=g)[::2]
    for t in (x, w, b):
        t.requires_grad_()
    with kiln.backend.use(backend):
        out = kiln.ops.linear_act(x, w, b, "silu")
        out.sum().backward()  # an expanded (stride-0) upstream gradient
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.silu(F.linear(x64, w64, b64))
    ref.sum().backward()
    bound = BOUND[dtype]
    assert rel_err(out, ref) < bound
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) < bound


def test_only_weight_grad_when_input_is_data():
    x = torch.randn(6, 5, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    kiln.ops.linear_act(x, w, None, "tanh").sum().backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_cpu_backend(activation):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(
            lambda *a: kiln.ops.linear_act(*a, activation=activation), (x, w, b))


def test_large_activations_stay_finite():
    # sigmoid and silu evaluate exp only of non-positive arguments: no overflow to inf/inf.
    x = torch.tensor([[-1e4, -50.0, 0.0, 50.0, 1e4]], dtype=torch.float64).t()
    w = torch.ones(1, 1, dtype=torch.float64)
    for activation in ("sigmoid", "silu", "tanh", "gelu", "gelu_tanh"):
        with kiln.backend.use("cpu"):
            out = kiln.ops.linear_act(x, w, None, activation)
        assert rel_err(out, TORCH_ACT[activation](x)) < 1e-14, activation


# --- double backward -------------------------------------------------------------------


def _double_inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True),
            torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True),
            torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck_cpu_backend(activation):
    # relu's and identity's second derivative in z is 0 (a.e.), but d(dx)/dW etc. are not.
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradgradcheck(
            lambda *a: kiln.ops.linear_act(*a, activation=activation), _double_inputs())


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "sigmoid", "gelu_tanh"])
def test_second_derivative_matches_torch(activation):
    """d/dtheta of ||dL/dx||^2 against torch's own ops, for the activations whose act'' != 0."""
    x, w, b = _double_inputs(3)
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    results = []
    for (xi, wi, bi), forward in (((x, w, b), lambda *a: kiln.ops.linear_act(*a, activation=activation)),
                                  (ref, lambda *a: TORCH_ACT[activation](F.linear(*a)))):
        with kiln.backend.use("cpu"):
            y = forward(xi, wi, bi)
            (dx,) = torch.autograd.grad(y.square().sum(), xi, create_graph=True)
            dx.square().sum().backward()
        results.append((dx, xi.grad, wi.grad, bi.grad))
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_create_graph_gradients_equal_the_kernel_gradients(activation):
    x, w, b = _double_inputs(4)
    with kiln.backend.use("cpu"):
        y = kiln.ops.linear_act(x, w, b, activation)
        dy = torch.randn_like(y)
        plain = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        graphed = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    # dx and dW depend on W and x; db = sum(dy act'(z)) is a constant for relu (act'' = 0).
    assert graphed[0].grad_fn is not None and graphed[1].grad_fn is not None
    for got, want in zip(graphed, plain):
        assert rel_err(got, want) < 1e-12


# --- autocast --------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_cpu_autocast_runs_in_the_region_dtype_as_torch(activation):
    (x, w, b, dy), _ = _inputs((2, 7), 19, 33, torch.float32)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kiln.ops.linear_act(*ours, activation)
        ref = TORCH_ACT[activation](F.linear(*theirs))
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out, ref) < BOUND[torch.bfloat16]
    out.backward(dy.to(out.dtype))
    ref.backward(dy.to(ref.dtype))
    for a, r in zip(ours, theirs):
        assert a.grad.dtype == r.grad.dtype == torch.float32
        assert rel_err(a.grad, r.grad) < BOUND[torch.bfloat16]


def test_cpu_autocast_leaves_float64_alone_as_torch():
    (x, w, b, _), _ = _inputs((5,), 6, 7, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = kiln.ops.linear_act(x, w, b, "silu"), F.silu(F.linear(x, w, b))
    assert out.dtype == ref.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12


def test_autocast_rules_are_on_the_devices_torch_has_them():
    # torch's policy: the region's dtype on both devices, as F.linear.
    name = torch.ops.kiln.linear_act.default.name()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU") is True
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA") is True


# --- zero-size -------------------------------------------------------------------------


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
@pytest.mark.parametrize("lead,k,n", [((0,), 5, 4), ((3,), 8, 0), ((3,), 0, 4), ((2, 0), 3, 2),
                                      ((0,), 0, 0)], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_zero_size_matches_torch_without_a_kernel(monkeypatch, backend, lead, k, n, activation):
    """torch's output (act(bias) broadcast for in size 0) and gradients (zeros, or
    act'(bias) summed for db) without the custom op, so no kernel, on any backend."""
    def no_kernel(*args):
        raise AssertionError("a kernel was asked to run on an empty product")

    monkeypatch.setattr(importlib.import_module("kiln.ops.linear_act"), "_implementation", no_kernel)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, k, dtype=torch.float64, generator=g)
    w = torch.randn(n, k, dtype=torch.float64, generator=g)
    b = torch.randn(n, dtype=torch.float64, generator=g)
    dy = torch.randn(*lead, n, dtype=torch.float64, generator=g)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    with kiln.backend.use(backend):
        out = kiln.ops.linear_act(*ours, activation)
        out.backward(dy)
    ref = TORCH_ACT[activation](F.linear(*theirs))
    ref.backward(dy)
    assert out.shape == ref.shape and torch.equal(out, ref)
    for a, r in zip(ours, theirs):
        assert a.grad.shape == r.grad.shape and torch.equal(a.grad, r.grad)


# --- bad input -------------------------------------------------------------------------


def test_mismatched_inner_dims_names_both_shapes():
    with pytest.raises(ValueError, match=r"x \(3, 4\) vs weight \(5, 6\)"):
        kiln.ops.linear_act(torch.randn(3, 4), torch.randn(5, 6))


def test_bias_shape_is_checked():
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\).*got \(4,\)"):
        kiln.ops.linear_act(torch.randn(3, 6), torch.randn(5, 6), torch.randn(4))


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype int64"):
        kiln.ops.linear_act(torch.ones(3, 4, dtype=torch.long), torch.randn(5, 4))


def test_mixed_dtypes_name_both():
    with pytest.raises(TypeError, match=r"weight has dtype float64 but x has dtype float32"):
        kiln.ops.linear_act(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64))


def test_mixed_devices_name_both():
    with pytest.raises(ValueError, match=r"bias is on meta but x is on cpu"):
        kiln.ops.linear_act(torch.randn(3, 4), torch.randn(5, 4), torch.empty(5, device="meta"))


def test_weight_on_another_device_names_both():
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu \(weight \(5, 4\), x \(3, 4\)\)"):
        kiln.ops.linear_act(torch.randn(3, 4), torch.empty(5, 4, device="meta"))


def test_one_dimensional_weight_names_its_shape():
    with pytest.raises(ValueError, match=r"weight must be 2-D \(out, in\), got shape \(4,\)"):
        kiln.ops.linear_act(torch.randn(3, 4), torch.randn(4))


def test_zero_dim_input_names_both_shapes():
    with pytest.raises(ValueError, match=r"x \(\) vs weight \(5, 4\)"):
        kiln.ops.linear_act(torch.tensor(1.0), torch.randn(5, 4))


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*identity, relu"):
        kiln.ops.linear_act(torch.randn(3, 4), torch.randn(5, 4), activation="swish")


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()
    model = kiln.nn.MLP([12, 16, 3], activation="gelu").double()
    x = torch.randn(5, 12, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.square().sum().backward()
    assert rel_err(out, eager) < 1e-12
    for got, p in zip(grads, model.parameters()):
        assert rel_err(got, p.grad) < 1e-12


# --- dropout (fused into the epilogue) -----------------------------------------------


def _next_pair():
    """The (seed, offset) the next dropout call will use (syncs kiln's generator first)."""
    return kiln.ops.random.seed_offset(kiln.ops.random.next_seed_offset(0))


def _check_dropout(backend, lead, k, n, activation, dtype, p=0.3, device="cpu", bias=True):
    """Forward and gradients against torch's ops in float64 on the same mask: the one the
    reference Philox gives for the (seed, offset) the call drew."""
    (x, w, b, dy), (x64, w64, b64, dy64) = _inputs(lead, k, n, dtype, bias, device)
    for t in (x, w, b, x64, w64, b64):
        if t is not None:
            t.requires_grad_()
    with kiln.backend.use(backend):
        seed, offset = _next_pair()
        out = kiln.ops.linear_act(x, w, b, activation, dropout=p)
        kiln.ops.linear_act(x.detach(), w.detach(), None, activation, dropout=p)  # a call between
        out.backward(dy)
    keep = kiln.ops.random.keep_mask(seed, offset, (*lead, n), p)
    ref = TORCH_ACT[activation](F.linear(x64, w64, b64)) * (keep.double() / (1 - p))
    ref.backward(dy64)
    bound = BOUND[dtype]
    assert rel_err(out, ref) < bound, "forward"
    assert (out.detach().cpu()[~keep] == 0).all(), "mask"  # every dropped element is exactly 0
    assert rel_err(x.grad, x64.grad) < bound, "dx"
    assert rel_err(w.grad, w64.grad) < bound, "dweight"
    if bias:
        assert rel_err(b.grad, b64.grad) < bound, "dbias"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [((7,), 19, 33), ((2, 40), 21, 70)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_matches_torch_on_the_same_mask(backend, dtype, shape, activation):
    _check_dropout(backend, *shape, activation, dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dropout_matches_torch_triton_interpreted(activation):
    _check_dropout("triton", (40,), 20, 45, activation, torch.float32, p=0.5)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_dropout_cpu_across_row_blocks(monkeypatch, activation):
    cpu_kernel = importlib.import_module("kiln.kernels.cpu.linear_act")
    monkeypatch.setattr(cpu_kernel, "_BLOCK_BYTES", 1 << 14)
    monkeypatch.setattr(cpu_kernel, "_MIN_BLOCK_ROWS", 8)
    assert cpu_kernel._rows_per_block(120, 8) < 500
    _check_dropout("cpu", (500,), 17, 120, activation, torch.float64, p=0.2)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "silu"])
def test_dropout_outputs_identical_across_forms(activation):
    """The same (seed, offset) drops the same elements in every form: the forward outputs
    agree to float32 rounding and are zero in the same places."""
    (x, w, b, _), _ = _inputs((37,), 23, 45, torch.float32)
    outs = {}
    for backend in ("reference", "cpu", "triton"):
        kiln.ops.random.set_rng_state({"seed": 2**40 + 5, "offset": 2**32 - 700,
                                       "torch_seed": torch.initial_seed()})
        with kiln.backend.use(backend):
            outs[backend] = kiln.ops.linear_act(x, w, b, activation, dropout=0.4)
    for backend in ("cpu", "triton"):
        assert rel_err(outs[backend], outs["reference"]) < BOUND[torch.float32]
        assert torch.equal(outs[backend] == 0, outs["reference"] == 0)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_dropout_gradient_is_zero_exactly_where_the_output_was_dropped(backend):
    # identity activation, positive inputs and weights: z > 0 everywhere, so y == 0 only where dropped
    x = (torch.rand(31, 9) + 0.1).requires_grad_()
    w = (torch.rand(17, 9) + 0.1).requires_grad_()
    with kiln.backend.use(backend):
        out = kiln.ops.linear_act(x, w, None, "identity", dropout=0.5)
        (dz,) = torch.autograd.grad(out, out, torch.ones_like(out), retain_graph=True)
        out.backward(torch.ones_like(out))
    dropped = out == 0
    assert 0 < dropped.float().mean() < 1
    # dW = dz^T x with dz = mask / (1 - p): recover dz from the gradient of w row by row
    want_dw = (~dropped).float().t() @ x.detach() * 2.0
    assert rel_err(w.grad, want_dw) < BOUND[torch.float32]


@pytest.mark.parametrize("activation", ["tanh", "gelu"])  # act'(saved): act(z) kept apart, and z
def test_dropout_gradcheck_and_gradgradcheck_cpu(activation):
    x, w, b = _double_inputs(5)
    _next_pair()
    state = kiln.ops.random.get_rng_state()

    def f(*args):  # one mask for every call gradcheck makes
        kiln.ops.random.set_rng_state(state)
        return kiln.ops.linear_act(*args, activation=activation, dropout=0.4)

    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_dropout_create_graph_gradients_equal_the_kernel_gradients():
    x, w, b = _double_inputs(6)
    with kiln.backend.use("cpu"):
        y = kiln.ops.linear_act(x, w, b, "gelu", dropout=0.5)
        dy = torch.randn_like(y)
        plain = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        graphed = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    for got, want in zip(graphed, plain):
        assert got.grad_fn is not None
        assert rel_err(got, want) < 1e-12


def test_dropout_p_one_gives_zeros_and_bad_p_is_named():
    x, w = torch.randn(4, 5, requires_grad=True), torch.randn(3, 5)
    out = kiln.ops.linear_act(x, w, None, "gelu", dropout=1.0)
    assert torch.equal(out, torch.zeros(4, 3))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"linear_act: dropout probability has to be between 0 and 1, but got 1.5"):
        kiln.ops.linear_act(x, w, dropout=1.5)
    with pytest.raises(TypeError, match=r"linear_act: p must be a float"):
        kiln.ops.linear_act(x, w, dropout="0.1")
    with pytest.raises(TypeError):
        kiln.ops.linear_act(x, w, None, "relu", 0.1)  # keyword-only


def test_dropout_zero_size():
    x = torch.randn(0, 5, requires_grad=True)
    out = kiln.ops.linear_act(x, torch.randn(3, 5), None, "relu", dropout=0.5)
    assert out.shape == (0, 3)


def test_linear_module_dropout_train_and_eval():
    layer = kiln.nn.Linear(12, 20, activation="relu", dropout=0.25).double()
    assert "dropout=0.25" in repr(layer)
    x = torch.randn(9, 12, dtype=torch.float64)
    seed, offset = _next_pair()
    out = layer(x)
    keep = kiln.ops.random.keep_mask(seed, offset, (9, 20), 0.25)
    ref = F.relu(F.linear(x, layer.weight, layer.bias)) * keep / 0.75
    assert rel_err(out, ref) < 1e-12
    layer.eval()
    assert rel_err(layer(x), F.relu(F.linear(x, layer.weight, layer.bias))) < 1e-12
    with pytest.raises(TypeError):
        kiln.nn.Linear(3, 4, True, None, None, "relu", 0.1)  # activation, dropout keyword-only
    with pytest.raises(ValueError, match=r"dropout probability has to be between 0 and 1"):
        kiln.nn.Linear(3, 4, dropout=1.2)
    # a torch Linear's state_dict loads as before
    layer.load_state_dict(torch.nn.Linear(12, 20).double().state_dict())


def test_mlp_fuses_its_hidden_dropout():
    torch.manual_seed(0)
    model = kiln.nn.MLP([10, 16, 16, 3], activation="tanh", dropout=0.2).double()
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert [m.dropout for m in model] == [0.2, 0.2, 0.0]
    x = torch.randn(6, 10, dtype=torch.float64)
    pairs = []
    kiln.ops.random.set_rng_state(kiln.ops.random.get_rng_state())
    pairs.append(_next_pair())
    out = model(x)
    h = x
    for layer, numel in zip(model, (6 * 16, 6 * 16, None)):
        h = F.linear(h, layer.weight, layer.bias)
        if numel is not None:
            seed, offset = pairs[-1]
            h = torch.tanh(h) * kiln.ops.random.keep_mask(seed, offset, h.shape, 0.2) / 0.8
            pairs.append((seed, offset + numel))
    assert rel_err(out, h) < 1e-12
    model.eval()
    assert rel_err(model(x), model(x)) == 0


def test_dropout_compile_fullgraph_cpu_equals_eager():
    torch._dynamo.reset()
    model = kiln.nn.MLP([12, 16, 3], activation="gelu", dropout=0.3).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    _next_pair()
    state = kiln.ops.random.get_rng_state()
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    kiln.ops.random.set_rng_state(state)
    eager = model(x)
    eager.square().sum().backward()
    assert rel_err(out, eager) < 1e-12
    for got, p in zip(grads, model.parameters()):
        assert rel_err(got, p.grad) < 1e-12
    assert not torch.equal(compiled(x), out)  # the counter advances inside the compiled graph


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [((1,), 1, 1), ((65,), 70, 130), ((3, 333), 257, 515),
                                   ((1000,), 1024, 768)], ids=str)
def test_matches_torch_gpu(backend, dtype, shape, activation):
    _check(backend, *shape, activation, dtype, device="cuda")


@pytest.mark.gpu
def test_compile_fullgraph_triton_gpu():
    torch._dynamo.reset()
    model = kiln.nn.MLP([64, 128, 10], activation="relu").cuda()
    x = torch.randn(33, 64, device="cuda")
    with kiln.backend.use("triton"):
        out = torch.compile(model, fullgraph=True)(x)
        assert rel_err(out, model(x)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("region", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_autocast_runs_in_the_region_dtype_as_torch(backend, region):
    (x, w, b, _), _ = _inputs((33,), 64, 48, torch.float32, device="cuda")
    with kiln.backend.use(backend), torch.autocast("cuda", dtype=region):
        out, ref = kiln.ops.linear_act(x, w, b, "gelu"), F.gelu(F.linear(x, w, b))
    assert out.dtype == ref.dtype == region
    assert rel_err(out, ref) < BOUND[region]


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [((65,), 70, 130), ((3, 333), 257, 515)], ids=str)
def test_dropout_matches_torch_gpu(backend, dtype, shape, activation):
    _check_dropout(backend, *shape, activation, dtype, p=0.3, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_dropout_gpu_forms_drop_the_same_elements(activation):
    (x, w, b, _), _ = _inputs((1000,), 256, 384, torch.float32, device="cuda")
    outs = {}
    for backend in ("triton", "cuda", "reference"):
        kiln.ops.random.set_rng_state({"seed": 12345, "offset": 2**32 - 1000, "torch_seed": torch.initial_seed()})
        with kiln.backend.use(backend):
            outs[backend] = kiln.ops.linear_act(x, w, b, activation, dropout=0.2)
    for backend in ("triton", "cuda"):
        assert torch.equal(outs[backend] == 0, outs["reference"] == 0)


def test_autocast_lets_a_low_precision_input_meet_a_float32_weight_as_f_linear():
    torch.manual_seed(0)
    x = torch.randn(6, 16).bfloat16()
    w, b = torch.randn(8, 16), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = kiln.ops.linear_act(x, w, b, "relu")
        theirs = torch.relu(F.linear(x, w, b))
        mha = kiln.nn.MultiheadAttention(16, 4, batch_first=True)
        attended, _ = mha(x.float(), x.float(), x.float(), need_weights=False)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and attended.dtype == torch.bfloat16
    assert rel_err(ours, theirs) < BOUND[torch.bfloat16]
