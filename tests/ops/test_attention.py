import math
import sys

import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.memory import extra_peak_bytes, needs_peak_reset
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]
HEAD_DIMS = [16, 32, 64, 80, 96, 128]


def _randn(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _explicit(q, k, v, causal, mask, scale):
    """softmax(q k^T scale + mask) v written out, bottom-right causal, for masks SDPA lacks."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    Tq, Tk = q.shape[2], k.shape[2]
    seen = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    seen = seen[None, None] & (~mask[:, None, None, :] if mask is not None else True)
    p = torch.softmax(s.masked_fill(~seen, -math.inf), -1).nan_to_num(0.0)
    return p @ v


def _err(out, ref, floor):
    """rel_err, except that a gradient that is 0 in exact arithmetic (T = 1: dq = 0) is
    measured against ``floor`` (the size of the upstream gradient) instead of its own noise."""
    if not torch.isfinite(out).all():
        return float("inf")
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    return diff / max(ref.norm().item(), floor)


def _check(backend, B, Hq, Hkv, Tq, Tk, D, dtype, causal=False, mask=None, device="cpu", oracle="sdpa",
           bound=None):
    bound = BOUND[dtype] if bound is None else bound
    q = _randn(B, Hq, Tq, D, dtype=dtype, device=device, seed=1)
    k = _randn(B, Hkv, Tk, D, dtype=dtype, device=device, seed=2)
    v = _randn(B, Hkv, Tk, D, dtype=dtype, device=device, seed=3)
    do = _randn(B, Hq, Tq, D, dtype=dtype, device=device, seed=4)
    ours = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    theirs = [t.detach().cpu().double().clone().requires_grad_() for t in (q, k, v)]
    with kiln.backend.use(backend):
        out = kiln.ops.attention(*ours, causal=causal, key_padding_mask=None if mask is None else mask.to(device))
        out.backward(do)
    scale = 1 / math.sqrt(D)
    if oracle == "sdpa":
        ref = F.scaled_dot_product_attention(*theirs, is_causal=causal, enable_gqa=Hq != Hkv)
    else:
        ref = _explicit(*theirs, causal, mask, scale)
    ref.backward(do.cpu().double())
    assert rel_err(out, ref) < bound, "forward"
    # With one key, p = 1 and dq = p (dp - delta) k = 0 exactly: measure its noise against do.
    floor = do.double().norm().item() if Tk == 1 else 0.0
    for name, a, r in zip(("dq", "dk", "dv"), ours, theirs):
        assert _err(a.grad, r.grad, floor) < bound, name


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("T", [1, 17, 129, 1000], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_self_attention_matches_sdpa(backend, dtype, causal, T):
    _check(backend, 2, 2, 2, T, T, 32, dtype, causal)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_every_head_dim(backend, D):
    _check(backend, 1, 2, 2, 37, 37, D, torch.float32, causal=True)


@pytest.mark.parametrize("Tq,Tk", [(5, 33), (33, 5), (129, 300)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cross_attention_causal_bottom_right(backend, causal, Tq, Tk):
    _check(backend, 2, 2, 2, Tq, Tk, 16, torch.float64, causal, oracle="explicit")


@pytest.mark.parametrize("Hkv", [1, 2])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_grouped_query_attention(backend, Hkv):
    _check(backend, 2, 4, Hkv, 40, 40, 16, torch.float64, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_key_padding_mask_with_a_fully_masked_row(backend, causal):
    mask = torch.rand(3, 45, generator=torch.Generator().manual_seed(7)) < 0.4
    mask[1] = True  # batch 1 sees nothing: zeros, never NaN
    _check(backend, 3, 2, 1, 45, 45, 16, torch.float64, causal, mask=mask, oracle="explicit")


def test_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v = (_randn(1, 1, 4, 16, seed=s).requires_grad_() for s in (1, 2, 3))
    mask = torch.ones(1, 4, dtype=torch.bool)
    with kiln.backend.use("cpu"):
        out = kiln.ops.attention(q, k, v, key_padding_mask=mask)
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_cpu_blocks_smaller_than_the_sequence(monkeypatch):
    """Several query and key blocks, causal blocks skipped, with the online rescaling."""
    from kiln.kernels.cpu import attention as cpu_attention

    monkeypatch.setattr(cpu_attention, "BLOCK_Q", 16)
    monkeypatch.setattr(cpu_attention, "BLOCK_K", 24)
    for causal in (False, True):
        _check("cpu", 1, 2, 1, 70, 101, 16, torch.float64, causal, oracle="explicit")


def test_large_scores_stay_finite():
    q = _randn(1, 2, 50, 32) * 30
    k = _randn(1, 2, 50, 32, seed=2) * 30  # scores up to ~1e3 / sqrt(32)
    v = _randn(1, 2, 50, 32, seed=3)
    with kiln.backend.use("cpu"):
        out = kiln.ops.attention(q.float(), k.float(), v.float())
    ref = F.scaled_dot_product_attention(q, k, v)
    assert rel_err(out, ref) < 1e-4  # scores of 1e3 in float32 carry ~6e-5 relative rounding


@pytest.mark.parametrize("scale", [0.3, 0.0, -0.3], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float32_explicit_scale_of_either_sign(scale, causal):
    """float32 runs its softmax in base 2 only for scale > 0 (its row max is scale times
    the max of the scores); 0 and negative scales take the natural-exp form: both as SDPA,
    with a padding mask, and the lse backward reads agrees (the gradients)."""
    q, k, v, do = (_randn(2, 2, 300, 32, seed=s) for s in range(4))
    mask = _randn(2, 300, seed=5) > 1.0
    ours = [t.float().requires_grad_() for t in (q, k, v)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v)]
    with kiln.backend.use("cpu"):
        out = kiln.ops.attention(*ours, causal=causal, key_padding_mask=mask, scale=scale)
        out.backward(do.float())
    ref = _explicit(*theirs, causal, mask, scale)
    ref.backward(do)
    assert rel_err(out, ref) < BOUND[torch.float32], "forward"
    for name, a, r in zip("qkv", ours, theirs):
        assert rel_err(a.grad, r.grad) < BOUND[torch.float32], name


def test_gradcheck_cpu_backend():
    q, k, v = (_randn(1, 2, 6, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    mask = torch.tensor([[False, True, False, False, False, True]])
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(lambda *a: kiln.ops.attention(*a, causal=True, key_padding_mask=mask),
                                        (q, k, v))


def test_non_contiguous_inputs():
    q = _randn(2, 9, 3, 16).transpose(1, 2)  # (B, T, H, D) viewed as (B, H, T, D)
    k, v = _randn(2, 9, 3, 16, seed=2).transpose(1, 2), _randn(2, 9, 3, 16, seed=3).transpose(1, 2)
    with kiln.backend.use("cpu"):
        out = kiln.ops.attention(q, k, v, causal=True)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-12


_PEAK_SCRIPT = """
    import sys, torch
    import kiln
    T = int(sys.argv[1])
    q, k, v = (torch.randn(1, 1, T, 16, requires_grad=True) for _ in range(3))
    with kiln.backend.use("cpu"):
        kiln.ops.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8]).sum().backward()  # compile numba first
        reset_peak()
        kiln.ops.attention(q, k, v, causal=True).sum().backward()
    print(peak_growth())
"""


@needs_peak_reset
def test_no_t_by_t_buffer_at_t_8192():
    peak = extra_peak_bytes(_PEAK_SCRIPT, 8192)
    t_by_t = 8192 * 8192 * 4  # 256 MiB for one float32 score matrix
    assert peak < t_by_t / 8, f"peak extra memory {peak / 2**20:.1f} MiB"


# --- bad input ------------------------------------------------------------------------


def test_heads_must_divide():
    with pytest.raises(ValueError, match=r"heads must divide q heads.*\(1, 3, 4, 8\) has 3, k \(1, 2, 4, 8\) has 2"):
        kiln.ops.attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_head_dims_must_match():
    with pytest.raises(ValueError, match=r"q \(1, 2, 4, 8\) vs k \(1, 2, 4, 16\)"):
        kiln.ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))


def test_padding_mask_shape_and_dtype():
    q = torch.randn(2, 1, 4, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, Tk\) = \(2, 4\), got \(2, 5\)"):
        kiln.ops.attention(q, q, q, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        kiln.ops.attention(q, q, q, key_padding_mask=torch.zeros(2, 4))


def test_attn_bias_dtype_shape_and_device():
    q = torch.randn(2, 3, 4, 8)
    with pytest.raises(TypeError, match=r"attn_bias must be a floating additive mask.*bool"):
        kiln.ops.attention(q, q, q, attn_bias=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_bias must broadcast to .* = \(2, 3, 4, 4\).*got \(3, 3, 4, 4\)"):
        kiln.ops.attention(q, q, q, attn_bias=torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"got \(4, 5\) \(q \(2, 3, 4, 8\), k \(2, 3, 4, 8\)\)"):
        kiln.ops.attention(q, q, q, attn_bias=torch.zeros(4, 5))
    with pytest.raises(TypeError, match="attn_bias has dtype float64 but q has dtype float32"):
        kiln.ops.attention(q, q, q, attn_bias=torch.zeros(4, 4, dtype=torch.float64))


def test_cuda_form_refuses_attn_bias_by_name():
    attention_op = sys.modules["kiln.ops.attention"]
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="cuda backend takes no attn_bias"):
        attention_op.cuda_forward(q, q, q, False, None, 0.25, torch.zeros(1, 1, 4, 4))


def test_bad_dropout_p():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        kiln.ops.attention(q, q, q, dropout_p=1.5)


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()
    q, k, v = (_randn(1, 2, 9, 16, seed=s).requires_grad_() for s in (1, 2, 3))
    fn = lambda q, k, v: kiln.ops.attention(q, k, v, causal=True).square().sum()
    with kiln.backend.use("cpu"):
        torch.compile(fn, fullgraph=True)(q, k, v).backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward()
    for got, t in zip(grads, (q, k, v)):
        assert rel_err(got, t.grad) < 1e-12


# --- Triton (interpreted on CPU) and GPU -------------------------------------------------


@pytest.mark.parametrize("case", [(1, 2, 2, 17, 17, 16, False), (1, 2, 1, 33, 5, 16, True),
                                  (1, 2, 2, 5, 33, 80, True), (1, 2, 2, 70, 70, 64, True)], ids=str)
def test_triton_interpreted(case):
    *shape, causal = case
    _check("triton", *shape, torch.float32, causal, oracle="explicit")


def test_triton_interpreted_padding_mask():
    mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(7)) < 0.4
    mask[1] = True
    _check("triton", 2, 2, 1, 20, 20, 16, torch.float32, True, mask=mask, oracle="explicit")


@pytest.mark.gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("T", [1, 17, 129, 1000], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_sdpa_gpu(backend, dtype, causal, T, D):
    # float32 dots may run in tf32 (DESIGN.md: 1e-3 there)
    bound = 1e-3 if dtype == torch.float32 else None
    _check(backend, 2, 4, 2, T, T, D, dtype, causal, device="cuda", bound=bound)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cross_attention_and_padding_gpu(backend, dtype):
    bound = 1e-3 if dtype == torch.float32 else None
    mask = torch.rand(3, 300, generator=torch.Generator().manual_seed(7)) < 0.4
    mask[1] = True
    _check(backend, 3, 4, 1, 129, 300, 64, dtype, True, mask=mask, device="cuda", oracle="explicit", bound=bound)


# --- additive masks (attn_bias) ----------------------------------------------------------


def _bias(shape, seed, hide=0.3):
    """A float mask: random values, with -inf on a fraction ``hide`` of the entries."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    return b.masked_fill(torch.rand(shape, generator=g) < hide, -math.inf)


def _check_bias(backend, B, Hq, Hkv, Tq, Tk, D, dtype, bias_shape, causal=False, mask=None, bound=None):
    """kiln with attn_bias (grad wanted) vs the explicit softmax in float64, every gradient."""
    bound = BOUND[dtype] if bound is None else bound
    q, k, v = (_randn(*s, dtype=dtype, seed=i) for i, s in
               enumerate([(B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)], 1))
    do = _randn(B, Hq, Tq, D, dtype=dtype, seed=4)
    bias = _bias(bias_shape, 5)
    ours = [t.detach().clone().requires_grad_() for t in (q, k, v, bias.to(dtype))]
    theirs = [t.detach().double().clone().requires_grad_() for t in (q, k, v, bias)]
    with kiln.backend.use(backend):
        out = kiln.ops.attention(*ours[:3], causal=causal, key_padding_mask=mask, attn_bias=ours[3])
        out.backward(do)
    group = Hq // Hkv
    kr, vr = (t.repeat_interleave(group, 1) for t in theirs[1:3])
    s = theirs[0] @ kr.transpose(-1, -2) / math.sqrt(D) + theirs[3]
    seen = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    if mask is not None:
        seen = seen & ~mask[:, None, None, :]
    s = s.masked_fill(~seen, -math.inf)
    hidden_row = ~torch.isfinite(s).any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(hidden_row, 0.0), -1).masked_fill(hidden_row, 0.0)
    ref = p @ vr
    ref.backward(do.double())
    assert rel_err(out, ref) < bound, "forward"
    for name, a, r in zip(("dq", "dk", "dv", "dbias"), ours, theirs):
        assert _err(a.grad, r.grad, 0.0) < bound, name


BIAS_SHAPES = {"full": (2, 4, 23, 30), "heads": (1, 4, 23, 30), "batch": (2, 1, 23, 30), "2d": (23, 30),
               "keys": (2, 1, 1, 30)}


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_attn_bias_broadcasts_with_gradient(backend, shape):
    _check_bias(backend, 2, 4, 2, 23, 30, 16, torch.float64, BIAS_SHAPES[shape])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_attn_bias_with_causal_and_padding(backend, causal):
    mask = torch.rand(2, 30, generator=torch.Generator().manual_seed(7)) < 0.3
    _check_bias(backend, 2, 2, 1, 23, 30, 16, torch.float64, (2, 2, 23, 30), causal, mask)


def test_attn_bias_matches_sdpa_float_mask():
    q, k, v = (_randn(2, 3, 17, 16, seed=s) for s in (1, 2, 3))
    bias = _bias((2, 3, 17, 17), 5, hide=0.0)
    with kiln.backend.use("cpu"):
        out = kiln.ops.attention(q, k, v, attn_bias=bias)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias)) < 1e-12


def test_attn_bias_cpu_blocks_smaller_than_the_sequence(monkeypatch):
    from kiln.kernels.cpu import attention as cpu_attention

    monkeypatch.setattr(cpu_attention, "BLOCK_Q", 16)
    monkeypatch.setattr(cpu_attention, "BLOCK_K", 24)
    for causal in (False, True):
        _check_bias("cpu", 1, 2, 1, 40, 61, 16, torch.float64, (1, 2, 40, 61), causal)


def test_attn_bias_float32_cpu():
    _check_bias("cpu", 2, 2, 2, 33, 33, 32, torch.float32, (2, 1, 33, 33), causal=True)


def test_attn_bias_hiding_whole_rows_gives_zeros():
    q, k, v = (_randn(1, 2, 5, 16, seed=s).requires_grad_() for s in (1, 2, 3))
    bias = torch.zeros(5, 5, dtype=torch.float64)
    bias[2] = -math.inf
    with kiln.backend.use("cpu"):
        out = kiln.ops.attention(q, k, v, attn_bias=bias)
        out.sum().backward()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_triton_interpreted_attn_bias():
    mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(7)) < 0.3
    _check_bias("triton", 2, 2, 1, 37, 20, 16, torch.float32, (2, 1, 37, 20), True, mask, bound=1e-5)
    _check_bias("triton", 1, 2, 2, 20, 37, 16, torch.float32, (20, 37), False, None, bound=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attn_bias_triton_gpu(dtype):
    bound = 1e-3 if dtype == torch.float32 else BOUND[dtype]
    mask = torch.rand(2, 300, generator=torch.Generator().manual_seed(7)) < 0.3
    q = _randn(2, 4, 129, 64, dtype=dtype, device="cuda", seed=1).requires_grad_()
    k = _randn(2, 2, 300, 64, dtype=dtype, device="cuda", seed=2).requires_grad_()
    v = _randn(2, 2, 300, 64, dtype=dtype, device="cuda", seed=3).requires_grad_()
    bias = _bias((2, 1, 129, 300), 5).to(device="cuda", dtype=dtype).requires_grad_()
    with kiln.backend.use("triton"):
        out = kiln.ops.attention(q, k, v, causal=True, key_padding_mask=mask.cuda(), attn_bias=bias)
    composite = sys.modules["kiln.ops.attention"].composite
    ref = composite(*(t.detach().double().cpu() for t in (q, k, v)), True, mask,
                    bias.detach().double().cpu())[0]
    assert rel_err(out, ref) < bound


# --- the fidelity contract: dropout, double backward, autocast, zero-size, compile ------------


def test_dropout_runs_torchs_rng_on_the_probabilities():
    composite = sys.modules["kiln.ops.attention"].composite
    q, k, v = (_randn(2, 2, 30, 16, seed=s) for s in (1, 2, 3))
    torch.manual_seed(3)
    out = kiln.ops.attention(q, k, v, causal=True, dropout_p=0.3)
    torch.manual_seed(3)
    ref = composite(q, k, v, True, None, None, None, 0.3)[0]
    assert torch.equal(out, ref)
    # statistically: the expectation of dropped-and-rescaled attention is attention itself
    torch.manual_seed(0)
    qs, ks, vs = (t[:1].expand(400, -1, -1, -1) for t in (q, k, v))
    mean = kiln.ops.attention(qs, ks, vs, dropout_p=0.3).mean(0)
    assert rel_err(mean, kiln.ops.attention(q, k, v)[0]) < 0.1
    assert torch.equal(kiln.ops.attention(q, k, v, dropout_p=1.0), torch.zeros_like(q))


def test_dropout_gradients_flow():
    q, k, v = (_randn(1, 2, 6, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    kiln.ops.attention(q, k, v, dropout_p=0.5).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_double_backward_gradgradcheck(backend):
    q, k, v = (_randn(1, 2, 5, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    k, v = k[:, :1].detach().requires_grad_(), v[:, :1].detach().requires_grad_()  # GQA
    bias = _bias((1, 1, 5, 5), 5, hide=0.2).requires_grad_()
    mask = torch.tensor([[False, True, False, False, False]])
    fn = lambda *a: kiln.ops.attention(*a[:3], causal=True, key_padding_mask=mask, attn_bias=a[3])
    with kiln.backend.use(backend):
        assert torch.autograd.gradcheck(fn, (q, k, v, bias))
        assert torch.autograd.gradgradcheck(fn, (q, k, v, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_in_the_regions_dtype(dtype):
    q, k, v = (_randn(2, 2, 19, 16, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    bias = _bias((19, 19), 5, hide=0.0).float()
    with torch.autocast("cpu", dtype=dtype):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        with kiln.backend.use("reference"):
            out = kiln.ops.attention(q, k, v, attn_bias=bias)
    assert out.dtype == ref.dtype == dtype
    assert rel_err(out, ref) < BOUND[dtype]
    with torch.autocast("cpu", dtype=dtype):  # mixed float inputs, as SDPA takes them
        ref = F.scaled_dot_product_attention(q.to(dtype), k, v, attn_mask=bias)
        out = kiln.ops.attention(q.to(dtype), k, v, attn_bias=bias)
    assert out.dtype == ref.dtype == dtype
    assert rel_err(out, ref) < BOUND[dtype]


@pytest.mark.parametrize("shape", [(0, 2, 5, 5), (2, 2, 0, 5), (2, 2, 5, 0)], ids=["B0", "Tq0", "Tk0"])
def test_zero_size_as_sdpa(shape):
    B, H, Tq, Tk = shape
    ours = [_randn(B, H, Tq, 8, seed=1), _randn(B, H, Tk, 8, seed=2), _randn(B, H, Tk, 8, seed=3)]
    ours = [t.requires_grad_() for t in ours]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    with kiln.backend.use("cpu"):
        out = kiln.ops.attention(*ours)
    ref = F.scaled_dot_product_attention(*theirs)
    assert out.shape == ref.shape and torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for a, r in zip(ours, theirs):
        assert torch.equal(a.grad, r.grad)


def test_compile_fullgraph_with_attn_bias():
    torch._dynamo.reset()
    q, k, v = (_randn(1, 2, 9, 16, seed=s).requires_grad_() for s in (1, 2, 3))
    bias = _bias((1, 2, 9, 9), 5, hide=0.2).requires_grad_()
    mask = torch.tensor([[False] * 8 + [True]])
    fn = lambda q, k, v, b: kiln.ops.attention(q, k, v, key_padding_mask=mask, attn_bias=b).square().sum()
    with kiln.backend.use("cpu"):
        torch.compile(fn, fullgraph=True)(q, k, v, bias).backward()
        grads = [t.grad.clone() for t in (q, k, v, bias)]
        for t in (q, k, v, bias):
            t.grad = None
        fn(q, k, v, bias).backward()
    for got, t in zip(grads, (q, k, v, bias)):
        assert rel_err(got, t.grad) < 1e-12
