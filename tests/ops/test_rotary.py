import pytest
import torch

import kiln
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]


def _randn(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_pairs(x):
    """GPT-J's rotate_every_two: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


def _explicit(x, cos, sin, interleaved, unsqueeze_dim=1):
    """HF's apply_rotary_pos_emb for one tensor (GPT-J's with interleaved)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return x * cos + (_rotate_pairs(x) if interleaved else _rotate_half(x)) * sin


def _tables(B, T, D, dtype, device="cpu", interleaved=False, per_batch=False):
    """cos / sin as LlamaRotaryEmbedding writes them, with random positions."""
    g = torch.Generator().manual_seed(5)
    pos = torch.randint(0, 4096, (B if per_batch else 1, T), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    f = pos[..., None].double() * inv
    emb = f.repeat_interleave(2, -1) if interleaved else torch.cat((f, f), -1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _check(backend, B, Hq, Hk, T, D, dtype, interleaved=False, per_batch=False, device="cpu", layout="bhtd"):
    cos, sin = _tables(B, T, D, dtype, device, interleaved, per_batch)
    if layout == "bhtd":
        q, k = _randn(B, Hq, T, D, dtype=dtype, device=device), _randn(B, Hk, T, D, seed=1, dtype=dtype, device=device)
        dims = 1
    elif layout == "bthd_transposed":  # the (1, 2) transpose of a contiguous (B, T, H, D)
        q = _randn(B, T, Hq, D, dtype=dtype, device=device).transpose(1, 2)
        k = _randn(B, T, Hk, D, seed=1, dtype=dtype, device=device).transpose(1, 2)
        dims = 1
    else:  # (B, T, H, D), unsqueeze_dim=2
        q, k = _randn(B, T, Hq, D, dtype=dtype, device=device), _randn(B, T, Hk, D, seed=1, dtype=dtype, device=device)
        dims = 2
    dq, dk = _randn(*q.shape, seed=2, dtype=dtype, device=device), _randn(*k.shape, seed=3, dtype=dtype, device=device)
    ours = [t.detach().clone().requires_grad_() for t in (q, k)]
    if layout == "bthd_transposed":
        ours = [t.detach().transpose(1, 2).clone().transpose(1, 2).requires_grad_() for t in (q, k)]
        assert not ours[0].is_contiguous()
    theirs = [t.detach().cpu().double().requires_grad_() for t in (q, k)]
    with kiln.backend.use(backend):
        q_rot, k_rot = kiln.ops.rotary_embedding(*ours, cos, sin, interleaved=interleaved, unsqueeze_dim=dims)
        torch.autograd.backward((q_rot, k_rot), (dq, dk))
    c64, s64 = cos.cpu().double(), sin.cpu().double()
    ref_q, ref_k = (_explicit(t, c64, s64, interleaved, dims) for t in theirs)
    torch.autograd.backward((ref_q, ref_k), (dq.cpu().double(), dk.cpu().double()))
    bound = BOUND[dtype]
    assert q_rot.dtype == dtype and q_rot.shape == q.shape and k_rot.shape == k.shape
    assert rel_err(q_rot, ref_q) < bound and rel_err(k_rot, ref_k) < bound, "forward"
    assert rel_err(ours[0].grad, theirs[0].grad) < bound, "dq"
    assert rel_err(ours[1].grad, theirs[1].grad) < bound, "dk"


CASES = [(1, 1, 1, 1, 2), (2, 4, 2, 5, 8), (2, 3, 3, 7, 6), (1, 2, 1, 3, 128)]  # B, Hq, Hk, T, D


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_matches_explicit_formula(backend, dtype, interleaved, case):
    _check(backend, *case, dtype, interleaved)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", CASES[1:], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_matches_explicit_formula_triton_interpreted(interleaved, case):
    _check("triton", *case, torch.float32, interleaved)


@pytest.mark.parametrize("layout", ["bhtd", "bthd_transposed", "bthd"])
@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_layouts_and_per_batch_tables(backend, layout):
    _check(backend, 2, 4, 2, 5, 8, torch.float32, per_batch=True, layout=layout)
    _check(backend, 2, 4, 2, 5, 8, torch.float32, interleaved=True, layout=layout)


def test_transposed_input_is_not_copied():
    """q viewed as (B, H, T, D) from a contiguous (B, T, H, D) comes back in that layout."""
    q = _randn(2, 5, 4, 8).transpose(1, 2)
    cos, sin = _tables(2, 5, 8, torch.float64)
    with kiln.backend.use("cpu"):
        q_rot, _ = kiln.ops.rotary_embedding(q, q, cos, sin)
    assert q_rot.stride() == q.stride()


def test_position_ids_index_tables():
    D, P = 8, 16
    g = torch.Generator().manual_seed(0)
    cos_table, sin_table = _randn(P, D, seed=7), _randn(P, D, seed=8)
    pos = torch.randint(0, P, (2, 5), generator=g)
    q, k = _randn(2, 3, 5, D), _randn(2, 1, 5, D, seed=1)
    with kiln.backend.use("cpu"):
        q_rot, k_rot = kiln.ops.rotary_embedding(q, k, cos_table, sin_table, position_ids=pos)
    assert rel_err(q_rot, _explicit(q, cos_table[pos], sin_table[pos], False)) < 1e-12
    assert rel_err(k_rot, _explicit(k, cos_table[pos], sin_table[pos], False)) < 1e-12


def test_input_is_not_modified():
    q, k = _randn(1, 2, 3, 4), _randn(1, 2, 3, 4, seed=1)
    q0, k0 = q.clone(), k.clone()
    cos, sin = _tables(1, 3, 4, torch.float64)
    with kiln.backend.use("cpu"):
        kiln.ops.rotary_embedding(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_gradcheck_and_gradgradcheck_with_table_grads():
    q, k = _randn(1, 2, 3, 4).requires_grad_(), _randn(1, 1, 3, 4, seed=1).requires_grad_()
    cos, sin = _randn(1, 3, 4, seed=2).requires_grad_(), _randn(1, 3, 4, seed=3).requires_grad_()
    for interleaved in (False, True):
        fn = lambda q, k, c, s: kiln.ops.rotary_embedding(q, k, c, s, interleaved=interleaved)
        with kiln.backend.use("cpu"):
            assert torch.autograd.gradcheck(fn, (q, k, cos, sin))
            assert torch.autograd.gradgradcheck(fn, (q, k, cos, sin))


@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (1, 2, 0, 4)], ids=str)
def test_zero_size(shape):
    B, T = shape[0], shape[2]
    q, k = torch.zeros(shape, requires_grad=True), torch.zeros(shape, requires_grad=True)
    cos, sin = torch.ones(1, T, 4), torch.zeros(1, T, 4)
    q_rot, k_rot = kiln.ops.rotary_embedding(q, k, cos, sin)
    assert q_rot.shape == shape
    (q_rot.sum() + k_rot.sum()).backward()
    assert q.grad.shape == shape


def test_autocast_follows_torch():
    """torch runs the composite in its inputs' dtype inside an autocast region: so does kiln."""
    for dtype in (torch.float32, torch.bfloat16):
        q, cos, sin = _randn(1, 2, 3, 8, dtype=dtype), *_tables(1, 3, 8, dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, _ = kiln.ops.rotary_embedding(q, q, cos, sin)
            theirs = _explicit(q, cos, sin, False)
        assert ours.dtype == theirs.dtype
        assert rel_err(ours, theirs) < BOUND[torch.bfloat16]


# --- bad input ------------------------------------------------------------------------


def test_bad_shapes_name_both():
    q, cos = torch.randn(2, 4, 5, 8), torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match=r"k must match q's batch, sequence and head dims: q \(2, 4, 5, 8\) vs k \(2, 4, 6, 8\)"):
        kiln.ops.rotary_embedding(q, torch.randn(2, 4, 6, 8), cos, cos)
    with pytest.raises(ValueError, match=r"cos and sin must be \(B or 1, T, D\) = \(2 or 1, 5, 8\), got \(1, 4, 8\)"):
        kiln.ops.rotary_embedding(q, q, cos[:, :4], cos[:, :4])
    with pytest.raises(ValueError, match=r"cos and sin must have the same shape: cos \(1, 5, 8\) vs sin \(5, 8\)"):
        kiln.ops.rotary_embedding(q, q, cos, cos[0])
    with pytest.raises(ValueError, match="head dim D must be even"):
        kiln.ops.rotary_embedding(q[..., :7], q[..., :7], cos[..., :7], cos[..., :7])
    with pytest.raises(ValueError, match=r"q must be 4-D, got shape \(4, 5, 8\)"):
        kiln.ops.rotary_embedding(q[0], q, cos, cos)


def test_bad_dtypes_and_position_ids():
    q, cos = torch.randn(1, 2, 3, 4), torch.randn(1, 3, 4)
    with pytest.raises(TypeError, match="cos has dtype float64 but q has dtype float32"):
        kiln.ops.rotary_embedding(q, q, cos.double(), cos.double())
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        kiln.ops.rotary_embedding(q, q, cos[0], cos[0], position_ids=torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"position_ids must be \(B or 1, T\) = \(1 or 1, 3\), got \(1, 2\)"):
        kiln.ops.rotary_embedding(q, q, cos[0], cos[0], position_ids=torch.zeros(1, 2, dtype=torch.int64))


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()
    q, k = _randn(2, 3, 5, 8).requires_grad_(), _randn(2, 1, 5, 8, seed=1).requires_grad_()
    cos, sin = _tables(2, 5, 8, torch.float64)

    def fn(q, k):
        a, b = kiln.ops.rotary_embedding(q, k, cos, sin)
        return a.square().sum() + b.sum()

    with kiln.backend.use("cpu"):
        torch.compile(fn, fullgraph=True)(q, k).backward()
        grads = [t.grad.clone() for t in (q, k)]
        for t in (q, k):
            t.grad = None
        fn(q, k).backward()
    for got, t in zip(grads, (q, k)):
        assert rel_err(got, t.grad) < 1e-12


# --- the module ------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding_module_matches_llama_formula(interleaved):
    dim, base = 16, 500000.0
    rope = kiln.nn.RotaryEmbedding(dim, 4096, base, interleaved=interleaved)
    assert list(rope.state_dict()) == []  # inv_freq is not persistent, as HF's
    pos = torch.tensor([[0, 1, 7, 4095], [3, 2, 1, 0]])
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    cos, sin = rope(x, pos)
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    f = pos[..., None].float() * inv
    emb = f.repeat_interleave(2, -1) if interleaved else torch.cat((f, f), -1)
    assert cos.dtype == torch.bfloat16 and cos.shape == (2, 4, dim)
    assert torch.equal(cos, emb.cos().bfloat16()) and torch.equal(sin, emb.sin().bfloat16())


def test_module_tables_drive_the_op():
    rope = kiln.nn.RotaryEmbedding(8)
    pos = torch.arange(5)[None]
    q = _randn(1, 2, 5, 8, dtype=torch.float32)
    cos, sin = rope(q, pos)
    with kiln.backend.use("cpu"):
        q_rot, _ = kiln.ops.rotary_embedding(q, q, cos, sin)
    assert rel_err(q_rot, _explicit(q.double(), cos.double(), sin.double(), False)) < BOUND[torch.float32]


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(2, 32, 8, 2048, 128)], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_explicit_formula_gpu(backend, dtype, interleaved, case):
    _check(backend, *case, dtype, interleaved, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bthd_transposed", "bthd"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_layouts_gpu(backend, layout):
    _check(backend, 2, 4, 2, 33, 64, torch.bfloat16, per_batch=True, layout=layout, device="cuda")
