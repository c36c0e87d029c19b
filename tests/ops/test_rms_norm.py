import pytest
import torch
import torch.nn.functional as F

import kiln
import kiln.kernels.triton.rms_norm as triton_rms_norm
from kiln.ops.rms_norm import default_eps
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]
# (leading dims, normalized_shape): widths no block multiple, one row, two trailing dims.
SHAPES = [((3,), (1,)), ((2, 3), (7,)), ((1,), (769,)), ((4,), (5120,)), ((5,), (3, 11)),
          ((2, 2), (4, 65))]


def _randn(*shape, scale=1.0, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _err(out, ref, floor):
    """rel_err, except that a reference near 0 (width 1: dx cancels exactly) is measured
    against floor."""
    if not torch.isfinite(out).all():
        return float("inf")
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    return diff / max(ref.norm().item(), floor)


def _torch_rms_norm(x, shape, weight, eps, offset):
    """torch's rms_norm, with Gemma's offset as (offset + weight)."""
    return F.rms_norm(x, shape, None if weight is None else offset + weight, eps)


def _check(backend, lead, shape, dtype, affine=True, device="cpu", offset=0.0, eps=None, scale=1.0):
    bound = BOUND[dtype]
    x = _randn(*lead, *shape, dtype=dtype, device=device, scale=scale)
    w = _randn(*shape, seed=1, dtype=dtype, device=device) if affine else None
    dy = _randn(*lead, *shape, seed=3, dtype=dtype, device=device)
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w)]
    theirs = [t.detach().cpu().double().clone().requires_grad_() if t is not None else None for t in (x, w)]
    with kiln.backend.use(backend):
        y = kiln.ops.rms_norm(ours[0], ours[1], eps=eps, offset=offset, normalized_shape=shape)
        y.backward(dy)
    ref_eps = default_eps(dtype) if eps is None else eps
    ref = _torch_rms_norm(theirs[0], shape, theirs[1], ref_eps, offset)
    ref.backward(dy.cpu().double())
    assert y.dtype == dtype
    assert rel_err(y, ref) < bound, "forward"
    floor = dy.double().norm().item()
    for name, a, r in zip(("dx", "dweight"), ours, theirs):
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


@pytest.mark.usefixtures("poison_empty")
def test_triton_streamed_rows_and_partials(monkeypatch):
    """Rows longer than the register block take the chunked path; several programs each
    write a dw partial row."""
    monkeypatch.setattr(triton_rms_norm, "MAX_BLOCK_N", 64)
    monkeypatch.setattr(triton_rms_norm, "MAX_BLOCK_N_BWD", 64)
    monkeypatch.setattr(triton_rms_norm, "CHUNK_N_BWD", 32)
    _check("triton", (7,), (150,), torch.float32)
    _check("triton", (5,), (150,), torch.float32, affine=False, offset=1.0)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_affine_off_and_gemma_offset(backend, affine, offset):
    _check(backend, (3,), (37,), torch.float32, affine=affine, offset=offset)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_explicit_eps_and_small_rows(backend):
    """eps dominates rows of mean square 1e-6: it must be added, not dropped."""
    _check(backend, (4,), (33,), torch.float32, eps=1e-4, scale=1e-3)


def test_default_eps_is_torchs():
    assert default_eps(torch.float32) == torch.finfo(torch.float32).eps
    assert default_eps(torch.float64) == torch.finfo(torch.float64).eps
    # torch's opmath kernel: float32's eps for bfloat16 (rows of mean square 1e-4 stay ~1)
    x = torch.full((1, 8), 1e-2, dtype=torch.bfloat16)
    assert torch.equal(kiln.ops.rms_norm(x), F.rms_norm(x, (8,)))


def test_bfloat16_falls_back_to_reference_on_cpu_and_matches_torch():
    x, w = _randn(4, 64, dtype=torch.bfloat16), _randn(64, seed=1, dtype=torch.bfloat16)
    y = kiln.ops.rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, F.rms_norm(x.double(), (64,), w.double())) < BOUND[torch.bfloat16]


def test_gradcheck_cpu_backend():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(lambda x, w: kiln.ops.rms_norm(x, w, offset=0.5), (x, w))


@pytest.mark.parametrize("affine", [True, False])
def test_gradgradcheck(affine):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True) if affine else None
    inputs = (x, w) if affine else (x,)
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradgradcheck(lambda x, w=None: kiln.ops.rms_norm(x, w, eps=1e-3, offset=1.0),
                                             inputs)


def test_non_contiguous_input_and_leading_dims():
    x = _randn(6, 9, 2, 4).transpose(1, 3)
    with kiln.backend.use("cpu"):
        y = kiln.ops.rms_norm(x)
    assert rel_err(y, F.rms_norm(x, (9,), eps=torch.finfo(torch.float64).eps)) < 1e-12


def test_deterministic_weight_grad():
    x, dy = _randn(1000, 33, dtype=torch.float32), _randn(1000, 33, seed=4, dtype=torch.float32)
    grads = []
    for _ in range(2):
        w = torch.ones(33, requires_grad=True)
        with kiln.backend.use("cpu"):
            kiln.ops.rms_norm(x, w).backward(dy)
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (3, 0)], ids=str)
def test_zero_size(shape):
    N = shape[-1]
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, dtype=torch.float64, requires_grad=True)
    y = kiln.ops.rms_norm(x, w)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.rms_norm(x2, (N,), w2)
    assert y.shape == ref.shape
    y.sum().backward()
    ref.sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


def test_autocast_follows_torch():
    """torch's CPU autocast runs rms_norm in the input dtype: so does kiln's."""
    for dtype in (torch.float32, torch.bfloat16):
        x, w = _randn(4, 32, dtype=dtype), _randn(32, seed=1, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = kiln.ops.rms_norm(x, w), F.rms_norm(x, (32,), w)
        assert ours.dtype == theirs.dtype
        assert rel_err(ours, theirs) < BOUND[torch.bfloat16]


# --- bad input ------------------------------------------------------------------------


def test_weight_of_the_wrong_shape_names_both():
    with pytest.raises(ValueError, match=r"x \(2, 8\) vs normalized_shape \(7,\)"):
        kiln.ops.rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \(8,\), got \(7,\)"):
        kiln.ops.rms_norm(torch.randn(2, 8), torch.ones(7), normalized_shape=8)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        kiln.ops.rms_norm(torch.ones(2, 8, dtype=torch.int64))


def test_mixed_dtypes_name_both():
    with pytest.raises(TypeError, match="weight has dtype float64 but x has dtype float32"):
        kiln.ops.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.float64))


def test_negative_eps_is_rejected():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        kiln.ops.rms_norm(torch.randn(2, 8), eps=-1.0)


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()
    x, w = _randn(5, 12).requires_grad_(), _randn(12, seed=1).requires_grad_()
    fn = lambda x, w: kiln.ops.rms_norm(x, w, eps=1e-6).square().sum()
    with kiln.backend.use("cpu"):
        torch.compile(fn, fullgraph=True)(x, w).backward()
        grads = [t.grad.clone() for t in (x, w)]
        for t in (x, w):
            t.grad = None
        fn(x, w).backward()
    for got, t in zip(grads, (x, w)):
        assert rel_err(got, t.grad) < 1e-12


# --- the module ------------------------------------------------------------------------


def test_module_is_torch_rmsnorm_drop_in():
    torch.manual_seed(0)
    theirs = torch.nn.RMSNorm((4, 6), eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = kiln.nn.RMSNorm((4, 6), eps=1e-5, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == ["weight"]
    x = _randn(3, 4, 6)
    assert rel_err(ours(x), theirs(x)) < 1e-12
    assert kiln.nn.RMSNorm(8, elementwise_affine=False).weight is None
    assert kiln.nn.RMSNorm(8).normalized_shape == (8,)
    assert "RMSNorm((8,), eps=None, elementwise_affine=True" in repr(kiln.nn.RMSNorm(8))


def test_module_gemma_offset():
    ours = kiln.nn.RMSNorm(6, eps=1e-6, offset=1.0, dtype=torch.float64)
    torch.nn.init.zeros_(ours.weight)  # Gemma initialises its weight to 0: the scale is 1
    x = _randn(2, 6)
    assert rel_err(ours(x), F.rms_norm(x, (6,), eps=1e-6)) < 1e-12


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("lead,shape", SHAPES + [((4096,), (4096,)), ((64,), (12288,))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_matches_torch_gpu(backend, dtype, lead, shape, offset):
    _check(backend, lead, shape, dtype, device="cuda", offset=offset)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_weight_gpu(backend):
    _check(backend, (33,), (1000,), torch.bfloat16, affine=False, device="cuda")
