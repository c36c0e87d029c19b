import importlib

import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]
# (N, C), (N, C, L), (N, C, H, W); channel and spatial sizes no block multiple, batch 1 with L > 1.
SHAPES = [(2, 3), (7, 5), (4, 5, 7), (1, 3, 50), (3, 4, 5, 6), (2, 3, 17, 9)]


def _randn(*shape, scale=1.0, offset=0.0, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (offset + torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _running(C, dtype, device="cpu"):
    return _randn(C, seed=5, dtype=dtype, device=device), (_randn(C, seed=6).abs() + 0.5).to(device=device, dtype=dtype)


def _check(backend, shape, dtype, training=True, affine=True, device="cpu", offset=0.0, scale=1.0,
           channels_last=False, steps=1, momentum=0.1):
    C = shape[1]
    w = _randn(C, seed=1, dtype=dtype, device=device) if affine else None
    b = _randn(C, seed=2, dtype=dtype, device=device) if affine else None
    rm, rv = _running(C, dtype, device)
    rm64, rv64 = rm.cpu().double(), rv.cpu().double()
    for step in range(steps):
        x = _randn(*shape, offset=offset, scale=scale, dtype=dtype, device=device, seed=10 + step)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        dy = _randn(*shape, seed=20 + step, dtype=dtype, device=device)
        ours = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        theirs = [t.detach().cpu().double().clone().requires_grad_() if t is not None else None
                  for t in (x, w, b)]
        with kiln.backend.use(backend):
            y = kiln.ops.batch_norm(ours[0], rm, rv, ours[1], ours[2], training, momentum)
            y.backward(dy)
        ref = F.batch_norm(theirs[0], rm64, rv64, theirs[1], theirs[2], training, momentum)
        ref.backward(dy.cpu().double())
        assert rel_err(y, ref) < BOUND[dtype], f"forward, step {step}"
        for name, a, r in zip(("dx", "dweight", "dbias"), ours, theirs):
            if a is not None:
                assert rel_err(a.grad, r.grad) < BOUND[dtype], f"{name}, step {step}"
    assert rel_err(rm, rm64) < BOUND[dtype], "running_mean"
    assert rel_err(rv, rv64) < BOUND[dtype], "running_var"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_matches_torch(backend, dtype, training, shape):
    _check(backend, shape, dtype, training)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_triton_interpreted(training, shape):
    _check("triton", shape, torch.float32, training)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_running_statistics_after_several_steps(backend):
    _check(backend, (6, 4, 9), torch.float32, steps=4, momentum=0.3)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_affine_off(backend):
    _check(backend, (4, 3, 11), torch.float32, affine=False)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_channels_last_input(backend):
    _check(backend, (3, 5, 4, 7), torch.float32, channels_last=True)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_large_offset_small_spread_float32(backend):
    """Channels with mean 1e4 and std 1e-2 (torch's float32 batch_norm is off by ~2e-2)."""
    _check(backend, (8, 3, 300), torch.float32, offset=1e4, scale=1e-2)


def test_large_channel_cpu():
    _check("cpu", (64, 3, 28, 28), torch.float32)


def test_constant_channel():
    x = torch.full((4, 2, 5), -3.5).requires_grad_()
    with kiln.backend.use("cpu"):
        y = kiln.ops.batch_norm(x, None, None, torch.ones(2), torch.full((2,), 0.25), training=True)
        y.sum().backward()
    assert torch.equal(y, torch.full_like(y, 0.25))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_no_running_stats_in_training():
    x = _randn(5, 3, 4)
    with kiln.backend.use("cpu"):
        y = kiln.ops.batch_norm(x, None, None, training=True)
    assert rel_err(y, F.batch_norm(x, None, None, training=True)) < 1e-12


def test_gradcheck_cpu_backend():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    with kiln.backend.use("cpu"):
        for training in (True, False):
            rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
            fn = lambda *a: kiln.ops.batch_norm(a[0], rm.clone(), rv.clone(), a[1], a[2], training)
            assert torch.autograd.gradcheck(fn, (x, w, b))


# --- double backward -------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_cpu_backend(training, affine):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    params = (torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True),
              torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)) if affine else ()
    rm, rv = _running(3, torch.float64)

    def fn(x, *wb):
        return kiln.ops.batch_norm(x, rm.clone(), rv.clone(), *wb, training=training)

    with kiln.backend.use("cpu"):
        assert torch.autograd.gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_torch(training):
    """d/dtheta of L + ||dL/dx||^2 + ||dL/dw||^2 against F.batch_norm."""
    x, w, b = _randn(5, 3, 4), _randn(3, seed=1), _randn(3, seed=2)
    results = []
    for forward in (kiln.ops.batch_norm, F.batch_norm):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = _running(3, torch.float64)
        with kiln.backend.use("cpu"):
            y = forward(xi, rm, rv, wi, bi, training)
            loss = (y * torch.arange(4.0, dtype=torch.float64)).square().sum()
            dx, dw = torch.autograd.grad(loss, (xi, wi), create_graph=True)
            (loss + dx.square().sum() + dw.square().sum()).backward()
        results.append((xi.grad, wi.grad, bi.grad, rm, rv))
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-12


# --- autocast and mixed precision --------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_autocast_output_dtype_and_values_as_torch(training, x_dtype):
    """torch's autocast lists batch_norm nowhere: it runs in x's dtype, float32 parameters
    and running statistics with a bfloat16 x included (mixed precision)."""
    x, w, b = _randn(6, 4, 9, dtype=x_dtype), _randn(4, seed=1, dtype=torch.float32), \
        _randn(4, seed=2, dtype=torch.float32)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    rm, rv = _running(4, torch.float32)
    rm_t, rv_t = rm.clone(), rv.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kiln.ops.batch_norm(ours[0], rm, rv, ours[1], ours[2], training)
        ref = F.batch_norm(theirs[0], rm_t, rv_t, theirs[1], theirs[2], training)
    assert y.dtype == ref.dtype == x_dtype
    dy = _randn(6, 4, 9, seed=3, dtype=x_dtype)
    y.backward(dy)
    ref.backward(dy)
    bound = BOUND[x_dtype]
    assert rel_err(y, ref) < bound
    for name, a, r in zip(("dx", "dweight", "dbias"), ours, theirs):
        assert a.grad.dtype == r.grad.dtype, name
        assert rel_err(a.grad, r.grad) < bound, name
    assert rm.dtype == rv.dtype == torch.float32
    assert rel_err(rm, rm_t) < bound and rel_err(rv, rv_t) < bound


def test_autocast_rules_are_on_the_devices_torch_has_them():
    # torch's policy lists batch_norm for neither device.
    name = torch.ops.kiln.batch_norm.default.name()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU") is False
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA") is False


# --- zero-size -------------------------------------------------------------------------


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (2, 3, 0), (0, 3, 2, 2)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_zero_size_matches_torch_without_a_kernel(monkeypatch, backend, training, shape):
    """torch's empty output, zero parameter gradients and untouched running statistics."""
    def no_kernel(*args):
        raise AssertionError("a kernel was asked to run on an empty input")

    monkeypatch.setattr(importlib.import_module("kiln.ops.batch_norm"), "_implementation", no_kernel)
    x, w, b = _randn(*shape), _randn(3, seed=1), _randn(3, seed=2)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    rm, rv = _running(3, torch.float64)
    rm_t, rv_t = rm.clone(), rv.clone()
    with kiln.backend.use(backend):
        y = kiln.ops.batch_norm(ours[0], rm, rv, ours[1], ours[2], training)
        y.sum().backward()
    ref = F.batch_norm(theirs[0], rm_t, rv_t, theirs[1], theirs[2], training)
    ref.sum().backward()
    assert y.shape == ref.shape
    for a, r in zip(ours, theirs):
        assert a.grad is not None and a.grad.shape == r.grad.shape and torch.equal(a.grad, r.grad)
    assert torch.equal(rm, rm_t) and torch.equal(rv, rv_t)


def test_zero_batch_without_running_statistics_as_torch():
    for training in (True, False):  # torch returns the empty result even in eval here
        y = kiln.ops.batch_norm(torch.randn(0, 4), None, None, training=training)
        assert y.shape == F.batch_norm(torch.randn(0, 4), None, None, training=training).shape


def test_zero_channels_with_weight_errs_as_torch():
    x, w = torch.randn(3, 0), torch.ones(0)
    with pytest.raises(IndexError) as theirs:
        F.batch_norm(x, None, None, w, training=True)
    with pytest.raises(IndexError) as ours:
        kiln.ops.batch_norm(x, None, None, w, training=True)
    assert str(ours.value) == str(theirs.value)


# --- bad input ------------------------------------------------------------------------


def test_training_with_one_value_per_channel_raises():
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 4\)"):
        kiln.ops.batch_norm(torch.randn(1, 4), None, None, training=True)


def test_weight_of_the_wrong_shape_names_both():
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\) for x \(2, 4, 3\).*got \(3,\)"):
        kiln.ops.batch_norm(torch.randn(2, 4, 3), None, None, torch.ones(3), training=True)


def test_eval_needs_running_statistics():
    with pytest.raises(ValueError, match="eval mode"):
        kiln.ops.batch_norm(torch.randn(2, 4), None, None, training=False)


def test_one_dimensional_input_is_rejected():
    with pytest.raises(ValueError, match=r"at least 2 dims, got \(5,\)"):
        kiln.ops.batch_norm(torch.randn(5), None, None, training=True)


def test_running_statistics_on_another_device_name_both():
    with pytest.raises(ValueError, match=r"running_var is on meta but x is on cpu \(running_var \(4,\), x \(2, 4\)\)"):
        kiln.ops.batch_norm(torch.randn(2, 4), torch.zeros(4), torch.empty(4, device="meta"))


def test_running_statistics_of_another_dtype_name_both():
    with pytest.raises(TypeError, match=r"running_mean has dtype float64 but weight has dtype float32"):
        kiln.ops.batch_norm(torch.randn(2, 4), torch.zeros(4, dtype=torch.float64),
                            torch.ones(4, dtype=torch.float64), torch.ones(4), training=True)


def test_running_mean_of_the_wrong_shape_names_both():
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\) for x \(2, 4\).*got \(5,\)"):
        kiln.ops.batch_norm(torch.randn(2, 4), torch.zeros(5), torch.ones(4))


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()
    x, w, b = (_randn(5, 3, 4).requires_grad_(), _randn(3, seed=1).requires_grad_(),
               _randn(3, seed=2).requires_grad_())
    rm, rv = _running(3, torch.float64)
    rm_e, rv_e = rm.clone(), rv.clone()
    fn = lambda x, w, b, rm, rv: kiln.ops.batch_norm(x, rm, rv, w, b, True).square().sum()
    with kiln.backend.use("cpu"):
        torch.compile(fn, fullgraph=True)(x, w, b, rm, rv).backward()
        grads = [t.grad.clone() for t in (x, w, b)]
        for t in (x, w, b):
            t.grad = None
        fn(x, w, b, rm_e, rv_e).backward()
    for got, t in zip(grads, (x, w, b)):
        assert rel_err(got, t.grad) < 1e-12
    assert rel_err(rm, rm_e) < 1e-12 and rel_err(rv, rv_e) < 1e-12


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(64, 256, 28, 28)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_torch_gpu(backend, dtype, training, shape):
    _check(backend, shape, dtype, training, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_large_offset_small_spread_gpu(backend):
    _check(backend, (64, 8, 1000), torch.float32, device="cuda", offset=1e4, scale=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("region", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_autocast_keeps_the_input_dtype_as_torch(backend, region):
    x = _randn(8, 4, 33, dtype=region, device="cuda")
    w, b = _randn(4, seed=1, dtype=torch.float32, device="cuda"), _randn(4, seed=2, dtype=torch.float32, device="cuda")
    with kiln.backend.use(backend), torch.autocast("cuda", dtype=region):
        y, ref = kiln.ops.batch_norm(x, None, None, w, b, True), F.batch_norm(x, None, None, w, b, True)
    assert y.dtype == ref.dtype == region
    assert rel_err(y, ref) < BOUND[region]
