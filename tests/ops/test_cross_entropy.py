import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]
GPU_BACKENDS = ["triton", "cuda"]
# (rows, classes): one row, one class, classes no block multiple, GPT-2's and a padded vocab.
ROW_SHAPES = [(1, 1), (1, 9), (3, 7), (5, 1000), (2, 50257), (3, 32003)]


def _randn(*shape, scale=1.0, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _same_values_in_float64(t):
    return t.detach().cpu().double().clone().requires_grad_()


# --- softmax / log_softmax -------------------------------------------------------------


def _check_softmax(backend, fn, torch_fn, x, dim, dtype):
    x64 = _same_values_in_float64(x)
    x = x.detach().clone().requires_grad_()
    dy = _randn(*x.shape, seed=1, dtype=dtype, device=x.device)
    with kiln.backend.use(backend):
        out = fn(x, dim)
        out.backward(dy)
    ref = torch_fn(x64, dim)
    ref.backward(dy.double().cpu())
    assert rel_err(out, ref) < BOUND[dtype], "forward"
    assert rel_err(x.grad, x64.grad) < BOUND[dtype], "dx"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_softmax_family_matches_torch(backend, log, dtype, shape):
    fn, torch_fn = (kiln.ops.log_softmax, torch.log_softmax) if log else (kiln.ops.softmax, torch.softmax)
    _check_softmax(backend, fn, torch_fn, _randn(*shape, scale=3, dtype=dtype), -1, dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_family_triton_interpreted(log, shape):
    fn, torch_fn = (kiln.ops.log_softmax, torch.log_softmax) if log else (kiln.ops.softmax, torch.softmax)
    _check_softmax("triton", fn, torch_fn, _randn(*shape, scale=3, dtype=torch.float32), -1, torch.float32)


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_softmax_over_any_dim_of_a_3d_tensor(backend, dim):
    x = _randn(4, 5, 6).transpose(0, 2)  # non-contiguous too
    _check_softmax(backend, kiln.ops.log_softmax, torch.log_softmax, x, dim, torch.float64)
    _check_softmax(backend, kiln.ops.softmax, torch.softmax, x, dim, torch.float64)


def test_log_softmax_large_logits_float32():
    x = _randn(4, 1000, scale=1e4, dtype=torch.float32)
    _check_softmax("cpu", kiln.ops.log_softmax, torch.log_softmax, x, -1, torch.float32)


def test_softmax_large_logits_float32():
    # At |x| ~ 1e4 softmax saturates: float64's gradient is ~1e-47 (from probabilities
    # float32 cannot hold), so its relative error says nothing. The gradient's error is
    # measured against the scale of dy instead (|dx| <= 2 |dy| for softmax).
    x = _randn(4, 1000, scale=1e4, dtype=torch.float32).requires_grad_()
    dy = _randn(4, 1000, seed=1, dtype=torch.float32)
    with kiln.backend.use("cpu"):
        out = kiln.ops.softmax(x, -1)
        out.backward(dy)
    x64 = _same_values_in_float64(x)
    ref = torch.softmax(x64, -1)
    ref.backward(dy.double())
    assert rel_err(out, ref) < BOUND[torch.float32]
    assert (x.grad.double() - x64.grad).norm() / dy.double().norm() < BOUND[torch.float32]


def test_softmax_gradcheck_cpu():
    x = _randn(3, 11).requires_grad_()
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(lambda t: kiln.ops.softmax(t, -1), (x,))
        assert torch.autograd.gradcheck(lambda t: kiln.ops.log_softmax(t, 0), (x,))


# --- cross_entropy ---------------------------------------------------------------------


def _targets(n, c, ignore_every=0, seed=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return t.to(device)


def _check_ce(backend, logits, target, dtype, **kwargs):
    x64 = _same_values_in_float64(logits)
    x = logits.detach().clone().requires_grad_()
    weight = kwargs.pop("weight", None)
    w64 = None if weight is None else weight.double().cpu()
    with kiln.backend.use(backend):
        out = kiln.ops.cross_entropy(x, target, weight=weight, **kwargs)
    ref = F.cross_entropy(x64, target.cpu(), weight=w64, **kwargs)
    dy = _randn(*ref.shape, seed=5)
    out.backward(dy.to(device=out.device, dtype=out.dtype))
    ref.backward(dy)
    assert out.dtype == logits.dtype
    assert rel_err(out, ref) < BOUND[dtype], "loss"
    assert rel_err(x.grad, x64.grad) < BOUND[dtype], "dlogits"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cross_entropy_matches_torch(backend, dtype, reduction, shape):
    n, c = shape
    logits = _randn(n, c, scale=3, dtype=dtype)
    _check_ce(backend, logits, _targets(n, c), dtype, reduction=reduction)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_triton_interpreted(reduction, shape):
    n, c = shape
    weight = _randn(c, seed=3).abs().float() + 0.1
    # One class: loss and gradient are 0 up to rounding, which no relative error can
    # measure; there smoothing is off and the (exactly 0) gradient is compared as is.
    _check_ce("triton", _randn(n, c, scale=3, dtype=torch.float32), _targets(n, c, ignore_every=2 if n > 2 else 0),
              torch.float32, weight=weight, label_smoothing=0.1 if c > 1 else 0.0, reduction=reduction)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cross_entropy_weights_ignore_index_smoothing(backend, reduction, weighted, smoothing):
    n, c = 13, 37
    weight = _randn(c, seed=3).abs() + 0.1 if weighted else None
    _check_ce(backend, _randn(n, c), _targets(n, c, ignore_every=4), torch.float64,
              weight=weight, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cross_entropy_custom_ignore_index_and_spatial_input(backend):
    logits = _randn(2, 5, 3, 4)  # (N, C, d1, d2)
    target = _targets(24, 5, seed=4).reshape(2, 3, 4)
    target[0, 1, 2] = 3
    for reduction in ("mean", "none"):
        _check_ce(backend, logits, target, torch.float64, reduction=reduction, ignore_index=3)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cross_entropy_unbatched(backend):
    _check_ce(backend, _randn(7), torch.tensor(4), torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cross_entropy_every_target_ignored_gives_what_torch_gives(backend, reduction):
    logits = _randn(4, 6).requires_grad_()
    target = torch.full((4,), -100)
    with kiln.backend.use(backend):
        out = kiln.ops.cross_entropy(logits, target, reduction=reduction)
    ref = F.cross_entropy(logits.detach(), target, reduction=reduction)
    assert torch.equal(out.isnan(), ref.isnan())  # mean is 0/0 in torch too
    assert torch.equal(torch.nan_to_num(out.detach()), torch.nan_to_num(ref))
    if reduction != "mean":
        out.sum().backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_cross_entropy_near_tied_large_logits_float32(backend, smoothing):
    # Many logits within a few units of 1e4: a float32 lse = m + log(s) would be off by
    # ulp(1e4) ~ 1e-3 and so would every probability; the kernels keep m and log(s) apart.
    logits = 1e4 + _randn(8, 1000, scale=3, dtype=torch.float32)
    logits[1] = -1e4 + _randn(1000, scale=3, seed=7, dtype=torch.float32)
    _check_ce(backend, logits, _targets(8, 1000), torch.float32, label_smoothing=smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_large_logits_stay_finite_and_right(dtype):
    logits = _randn(6, 300, scale=1e4, dtype=dtype)
    logits[0, :] = -1e4  # a row of equal, very negative logits
    backend = "cpu" if dtype == torch.float32 else "reference"  # bfloat16 on CPU: the reference
    _check_ce(backend, logits, _targets(6, 300), dtype)


def test_cross_entropy_gradcheck_cpu():
    x = _randn(5, 8).requires_grad_()
    t = _targets(5, 8, ignore_every=3)
    w = _randn(8, seed=9).abs() + 0.1
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(
            lambda a: kiln.ops.cross_entropy(a, t, weight=w, label_smoothing=0.2), (x,))


# --- bad input -------------------------------------------------------------------------


def test_target_out_of_range_names_the_value():
    with pytest.raises(ValueError, match=r"target value 7 is out of range for 7 classes"):
        kiln.ops.cross_entropy(torch.randn(3, 7), torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match=r"target value -1 is out of range"):
        kiln.ops.cross_entropy(torch.randn(3, 7), torch.tensor([0, -1, 1]))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"target shape \(4,\) does not match input \(3, 7\)"):
        kiln.ops.cross_entropy(torch.randn(3, 7), torch.zeros(4, dtype=torch.long))
    # a float target is a class-probability target: it must have the input's shape
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match input \(3, 7\) "
                                         r"\(class probabilities: expected \(3, 7\)"):
        kiln.ops.cross_entropy(torch.randn(3, 7), torch.zeros(3))


def test_weight_shape_and_target_dtype():
    with pytest.raises(ValueError, match=r"weight must have shape \(7,\).*got \(6,\)"):
        kiln.ops.cross_entropy(torch.randn(3, 7), torch.zeros(3, dtype=torch.long), weight=torch.ones(6))
    with pytest.raises(TypeError, match=r"target must hold class indices as int64 .*got dtype int32 "
                                        r"\(target \(3,\), input \(3, 7\)\)"):
        kiln.ops.cross_entropy(torch.randn(3, 7), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"class-probability target has dtype float64 but input has dtype float32"):
        kiln.ops.cross_entropy(torch.randn(3, 7), torch.rand(3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"ignore_index \(2\) is not supported for class-probability targets"):
        kiln.ops.cross_entropy(torch.randn(3, 7), torch.rand(3, 7), ignore_index=2)


def test_byte_class_indices_as_torch():
    x, t = _randn(4, 6), torch.tensor([0, 5, 2, 1], dtype=torch.uint8)
    assert rel_err(kiln.ops.cross_entropy(x, t), F.cross_entropy(x, t)) < 1e-12


def test_softmax_dim_out_of_range():
    with pytest.raises(IndexError, match=r"dim 2 is out of range for x of shape \(3, 4\)"):
        kiln.ops.softmax(torch.randn(3, 4), dim=2)


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()

    def loss_fn(x, t):
        return kiln.ops.cross_entropy(kiln.ops.log_softmax(x, -1) * 2, t, label_smoothing=0.1)

    x = _randn(6, 10).requires_grad_()
    t = _targets(6, 10)
    out = torch.compile(loss_fn, fullgraph=True)(x, t)
    (grad,) = torch.autograd.grad(out, x)
    eager = loss_fn(x, t)
    (eager_grad,) = torch.autograd.grad(eager, x)
    assert rel_err(out, eager) < 1e-12 and rel_err(grad, eager_grad) < 1e-12


# --- class-probability (soft) targets ---------------------------------------------------


def _probabilities(*shape, dtype=torch.float64, device="cpu", seed=11, dim=1):
    return _randn(*shape, seed=seed).softmax(dim).to(device=device, dtype=dtype)


def _check_soft(backend, logits, target, dtype, **kwargs):
    """Loss, dlogits and dtarget against F.cross_entropy in float64."""
    x64, q64 = _same_values_in_float64(logits), _same_values_in_float64(target)
    x = logits.detach().clone().requires_grad_()
    q = target.detach().clone().requires_grad_()
    weight = kwargs.pop("weight", None)
    with kiln.backend.use(backend):
        out = kiln.ops.cross_entropy(x, q, weight=weight, **kwargs)
    ref = F.cross_entropy(x64, q64, weight=None if weight is None else weight.double().cpu(), **kwargs)
    dy = _randn(*ref.shape, seed=5)
    out.backward(dy.to(device=out.device, dtype=out.dtype))
    ref.backward(dy)
    assert out.dtype == logits.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < BOUND[dtype], "loss"
    assert rel_err(x.grad, x64.grad) < BOUND[dtype], "dlogits"
    assert rel_err(q.grad, q64.grad) < BOUND[dtype], "dtarget"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(1, 9), (3, 7), (5, 1000), (2, 32003)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_soft_targets_match_torch(backend, dtype, reduction, shape):
    n, c = shape
    weight = (_randn(c, seed=3).abs() + 0.1).to(dtype)
    _check_soft(backend, _randn(n, c, scale=3, dtype=dtype), _probabilities(n, c, dtype=dtype), dtype,
                weight=weight, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_soft_targets_weights_smoothing_reductions(backend, reduction, weighted, smoothing):
    # torch's mean with class probabilities divides by the number of rows, not by a weight sum;
    # targets that are not distributions (rows not summing to 1) are taken as they are, as torch does.
    n, c = 13, 37
    weight = _randn(c, seed=3).abs() + 0.1 if weighted else None
    target = _randn(n, c, seed=8).abs()
    _check_soft(backend, _randn(n, c), target, torch.float64, weight=weight, reduction=reduction,
                label_smoothing=smoothing)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_soft_targets_spatial_and_unbatched(backend):
    weight = _randn(5, seed=3).abs() + 0.1
    for reduction in ("mean", "none"):
        _check_soft(backend, _randn(2, 5, 3, 4), _probabilities(2, 5, 3, 4), torch.float64, weight=weight,
                    reduction=reduction, label_smoothing=0.2)
    _check_soft(backend, _randn(7), _probabilities(7, dim=0), torch.float64)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(1, 9), (3, 7), (5, 1000), (2, 5000)], ids=str)
def test_soft_targets_triton_interpreted(shape):
    n, c = shape
    weight = _randn(c, seed=3).abs().float() + 0.1
    _check_soft("triton", _randn(n, c, scale=3, dtype=torch.float32), _probabilities(n, c, dtype=torch.float32),
                torch.float32, weight=weight, label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_soft_targets_near_tied_large_logits_float32(backend):
    logits = 1e4 + _randn(8, 1000, scale=3, dtype=torch.float32)
    logits[1] = -1e4 + _randn(1000, scale=3, seed=7, dtype=torch.float32)
    _check_soft(backend, logits, _probabilities(8, 1000, dtype=torch.float32), torch.float32, label_smoothing=0.1)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_soft_backward_may_overwrite_the_logits_in_place(backend):
    from kiln.ops.cross_entropy import _implementation

    logits = _randn(6, 45, scale=4, dtype=torch.float32)
    target = _probabilities(6, 45, dtype=torch.float32)
    weight = torch.rand(45, generator=torch.Generator().manual_seed(2)) + 0.5
    grad = _randn(6, seed=3, dtype=torch.float32)
    with kiln.backend.use(backend):
        kernels = _implementation("cross_entropy", logits)
        _, row_max, row_logsum = kernels.cross_entropy_soft_forward(logits, target, weight, 0.1)
        fresh = kernels.cross_entropy_soft_backward(grad, logits, target, weight, row_max, row_logsum, 0.1)
        aliased = logits.clone()
        returned = kernels.cross_entropy_soft_backward(grad, aliased, target, weight, row_max, row_logsum, 0.1,
                                                       out=aliased)
    assert returned.data_ptr() == aliased.data_ptr()
    assert torch.equal(aliased, fresh)


def test_soft_targets_gradcheck_cpu():
    x = _randn(5, 8).requires_grad_()
    q = _probabilities(5, 8).requires_grad_()
    w = _randn(8, seed=9).abs() + 0.1
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b: kiln.ops.cross_entropy(a, b, weight=w, label_smoothing=0.2, reduction="none"), (x, q))


# --- the fidelity contract: double backward, autocast, zero-size, torch's names ---------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_double_backward(backend):
    x = _randn(5, 8).requires_grad_()
    t = _targets(5, 8, ignore_every=3)
    q = _probabilities(5, 8).requires_grad_()
    w = _randn(8, seed=9).abs() + 0.1
    with kiln.backend.use(backend):
        assert torch.autograd.gradgradcheck(lambda a: kiln.ops.cross_entropy(a, t, weight=w, label_smoothing=0.2), (x,))
        assert torch.autograd.gradgradcheck(
            lambda a, b: kiln.ops.cross_entropy(a, b, weight=w, label_smoothing=0.2, reduction="none"), (x, q))
        assert torch.autograd.gradgradcheck(lambda a: kiln.ops.softmax(a, -1), (x,))
        assert torch.autograd.gradgradcheck(lambda a: kiln.ops.log_softmax(a, 0), (x,))


def test_double_backward_values_match_torch():
    """A Hessian-vector product through each op, against torch's."""
    x = _randn(4, 6).requires_grad_()
    t = torch.tensor([1, 0, -100, 5])
    v = _randn(4, 6, seed=4)
    for fn, torch_fn in [(lambda a: kiln.ops.cross_entropy(a, t, label_smoothing=0.1),
                          lambda a: F.cross_entropy(a, t, label_smoothing=0.1)),
                         (lambda a: (kiln.ops.softmax(a, -1) ** 3).sum(), lambda a: (torch.softmax(a, -1) ** 3).sum()),
                         (lambda a: (kiln.ops.log_softmax(a, -1) ** 2).sum(),
                          lambda a: (torch.log_softmax(a, -1) ** 2).sum())]:
        hv = []
        for f in (fn, torch_fn):
            (g,) = torch.autograd.grad(f(x), x, create_graph=True)
            (h,) = torch.autograd.grad((g * v).sum(), x)
            hv.append(h)
        assert rel_err(hv[0], hv[1]) < 1e-10


@pytest.mark.parametrize("region", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_follows_torch(region):
    x = _randn(6, 40, scale=3, dtype=torch.float32)
    t = _targets(6, 40)
    q = _probabilities(6, 40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=region):
        x_low = x.to(region)
        cases = [(kiln.ops.cross_entropy(x, t), F.cross_entropy(x, t)),
                 (kiln.ops.cross_entropy(x_low, t, reduction="none"), F.cross_entropy(x_low, t, reduction="none")),
                 (kiln.ops.cross_entropy(x_low, q.to(region)), F.cross_entropy(x_low, q.to(region))),
                 # CPU autocast leaves softmax alone: bfloat16 in, bfloat16 out (on CUDA it is float32)
                 (kiln.ops.softmax(x_low, -1), torch.softmax(x_low, -1)),
                 (kiln.ops.log_softmax(x, -1), torch.log_softmax(x, -1))]
    for ours, theirs in cases:
        assert ours.dtype == theirs.dtype
        assert rel_err(ours, theirs) < BOUND[torch.bfloat16]


_EMPTY_CASES = [((0, 5), (0,)), ((2, 5, 0), (2, 0)), ((0, 5, 3), (0, 3))]


@pytest.mark.parametrize("shapes", _EMPTY_CASES, ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_zero_size_gives_what_torch_gives(backend, reduction, soft, shapes):
    shape, target_shape = shapes
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    t = torch.zeros(shape, dtype=torch.float64) if soft else torch.zeros(target_shape, dtype=torch.long)
    with kiln.backend.use(backend):
        out = kiln.ops.cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x_ref, t, reduction=reduction)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out.isnan(), ref.isnan())  # the mean of nothing is nan in torch
    assert torch.equal(out.detach().nan_to_num(), ref.detach().nan_to_num())
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_targets_with_no_classes_as_torch(reduction):
    out = kiln.ops.cross_entropy(torch.zeros(3, 0), torch.zeros(3, 0), reduction=reduction)
    ref = F.cross_entropy(torch.zeros(3, 0), torch.zeros(3, 0), reduction=reduction)
    assert out.shape == ref.shape and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


def test_softmax_of_empty_input():
    for shape, dim in [((0, 5), 1), ((3, 0), 1), ((3, 0), 0)]:
        x = torch.zeros(shape, requires_grad=True)
        out = kiln.ops.softmax(x, dim)
        assert out.shape == torch.softmax(x, dim).shape
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_signature_is_torchs():
    import inspect

    ours = inspect.signature(kiln.ops.cross_entropy).parameters
    theirs = inspect.signature(F.cross_entropy).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name


def test_deprecated_size_average_and_reduce_map_as_in_torch():
    x, t = _randn(4, 6), _targets(4, 6)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        with pytest.warns(UserWarning):
            ours = kiln.ops.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            theirs = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        assert ours.shape == theirs.shape and rel_err(ours, theirs) < 1e-12


def test_compile_fullgraph_soft_targets():
    torch._dynamo.reset()

    def loss_fn(x, q):
        return kiln.ops.cross_entropy(x, q, label_smoothing=0.1)

    x = _randn(6, 10).requires_grad_()
    q = _probabilities(6, 10)
    out = torch.compile(loss_fn, fullgraph=True)(x, q)
    (grad,) = torch.autograd.grad(out, x)
    ref = F.cross_entropy(x, q, label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert rel_err(out, ref) < 1e-12 and rel_err(grad, ref_grad) < 1e-12


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 9), (3, 7), (5, 1000), (64, 32003)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_soft_targets_match_torch(backend, dtype, shape):
    n, c = shape
    weight = (_randn(c, seed=3).abs() + 0.1).to(device="cuda", dtype=dtype)
    for reduction in ("mean", "none"):
        _check_soft(backend, _randn(n, c, scale=3, dtype=dtype, device="cuda"),
                    _probabilities(n, c, dtype=dtype, device="cuda"), dtype, weight=weight, label_smoothing=0.1,
                    reduction=reduction)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_soft_backward_may_overwrite_the_logits_in_place(backend):
    from kiln.ops.cross_entropy import _implementation

    logits = _randn(6, 4099, scale=4, dtype=torch.float32, device="cuda")
    target = _probabilities(6, 4099, dtype=torch.float32, device="cuda")
    grad = _randn(6, seed=3, dtype=torch.float32, device="cuda")
    with kiln.backend.use(backend):
        kernels = _implementation("cross_entropy", logits)
        _, row_max, row_logsum = kernels.cross_entropy_soft_forward(logits, target, None, 0.1)
        fresh = kernels.cross_entropy_soft_backward(grad, logits, target, None, row_max, row_logsum, 0.1)
        aliased = logits.clone()
        kernels.cross_entropy_soft_backward(grad, aliased, target, None, row_max, row_logsum, 0.1, out=aliased)
    assert torch.equal(aliased, fresh)


@pytest.mark.gpu
def test_gpu_autocast_follows_torch():
    x = _randn(6, 40, scale=3, dtype=torch.float32, device="cuda")
    t = _targets(6, 40, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x_low = x.bfloat16()
        cases = [(kiln.ops.cross_entropy(x_low, t), F.cross_entropy(x_low, t)),
                 (kiln.ops.softmax(x_low, -1), torch.softmax(x_low, -1)),  # float32 on CUDA
                 (kiln.ops.log_softmax(x_low, -1), torch.log_softmax(x_low, -1))]
    for ours, theirs in cases:
        assert ours.dtype == theirs.dtype
        assert rel_err(ours, theirs) < BOUND[torch.bfloat16]



@pytest.mark.gpu
@pytest.mark.parametrize("shape", ROW_SHAPES + [(4096, 128256)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_forms_match_torch(backend, dtype, shape):
    n, c = shape
    logits = _randn(n, c, scale=3, dtype=dtype, device="cuda")
    weight = (_randn(c, seed=3).abs() + 0.1).to(device="cuda", dtype=dtype)
    _check_ce(backend, logits, _targets(n, c, ignore_every=5, device="cuda"), dtype,
              weight=weight, label_smoothing=0.1)
    _check_softmax(backend, kiln.ops.softmax, torch.softmax, logits, -1, dtype)
    _check_softmax(backend, kiln.ops.log_softmax, torch.log_softmax, logits, -1, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_forms_large_logits(backend, dtype):
    logits = _randn(64, 32003, scale=1e4, dtype=dtype, device="cuda")
    _check_ce(backend, logits, _targets(64, 32003, device="cuda"), dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_backward_may_overwrite_the_logits_in_place(backend):
    """linear_cross_entropy hands its own chunk of logits as ``out``: aliasing must be exact."""
    from kiln.ops.cross_entropy import _implementation

    dtype = torch.float32
    logits = _randn(6, 45, scale=4, dtype=dtype)
    target = torch.tensor([3, -100, 0, 44, 7, 7])
    weight = torch.rand(45, generator=torch.Generator().manual_seed(2), dtype=dtype) + 0.5
    grad = _randn(6, seed=3, dtype=torch.float32)
    with kiln.backend.use(backend):
        kernels = _implementation("cross_entropy", logits)
        _, row_max, row_logsum = kernels.cross_entropy_forward(logits, target, weight, -100, 0.1)
        fresh = kernels.cross_entropy_backward(grad, logits, target, weight, row_max, row_logsum, -100, 0.1)
        aliased = logits.clone()
        returned = kernels.cross_entropy_backward(grad, aliased, target, weight, row_max, row_logsum,
                                                  -100, 0.1, out=aliased)
    assert returned.data_ptr() == aliased.data_ptr()
    assert torch.equal(aliased, fresh)
