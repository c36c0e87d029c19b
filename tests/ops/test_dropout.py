"""kiln.ops.dropout, kiln.nn.Dropout and kiln's dropout generator (kiln.ops.random).

The mask is a pure function of (seed, offset, index): the forms must agree bit for bit,
so most checks here are exact equalities, and the oracle for values is torch's own
arithmetic (x * mask / (1 - p)) on the mask the reference Philox gives.
"""

import importlib
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.ops import random as kiln_random
from tests.numerics import BOUND, rel_err

dropout_module = importlib.import_module("kiln.ops.dropout")

# (seed, offset): small, a seed with both 32-bit halves set, offsets whose counters cross 2**32.
PAIRS = [(0, 0), (12345, 7), (2**40 + 977, 2**32 - 100), (2**61 + 3, 2**33 + 5)]


def _pair(seed, offset):
    return torch.tensor([seed, offset], dtype=torch.int64)


def _next_pair():
    """The (seed, offset) the next dropout call will use (syncs with torch's seed first)."""
    return kiln_random.seed_offset(kiln_random.next_seed_offset(0))


def _x(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# --- the generator ---------------------------------------------------------------------


def test_philox_known_answer():
    # Random123's known-answer test for Philox 4x32-10, counter 0 and key 0: first word 0x6627e8d5.
    assert kiln_random.philox_word(0, torch.zeros(1, dtype=torch.int64)).item() == 0x6627E8D5


def test_numba_philox_equals_the_reference():
    import numpy as np
    from numba import njit

    from kiln.kernels.cpu.philox import key_of, philox_word

    @njit
    def words(k0, k1, offset, out):
        for i in range(out.size):
            out[i] = philox_word(k0, k1, offset + np.uint64(i))

    for seed, offset in PAIRS:
        out = np.empty(257, np.uint64)
        words(*key_of(seed), np.uint64(offset), out)
        want = kiln_random.philox_word(seed, torch.arange(257) + offset)
        assert np.array_equal(out.astype(np.int64), want.numpy()), (seed, offset)


def test_triton_randint_equals_the_reference():
    import triton
    import triton.language as tl

    @triton.jit
    def words(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        word = tl.randint(seed, offset + i.to(tl.int64))
        tl.store(out_ptr + i, word.to(tl.int64) & 0xFFFFFFFF, mask=i < n)

    for seed, offset in PAIRS:
        out = torch.empty(300, dtype=torch.int64)
        words[(triton.cdiv(300, 128),)](out, seed, offset, 300, BLOCK=128)
        assert torch.equal(out, kiln_random.philox_word(seed, torch.arange(300) + offset)), (seed, offset)


def test_threshold_rule():
    assert kiln_random.keep_threshold(0.0) == 0
    assert kiln_random.keep_threshold(0.5) == 2**30
    assert kiln_random.keep_threshold(1 - 1e-12) == 2**31 - 1  # never 2**31: a word can keep


def test_offset_advances_by_the_elements_each_call_consumes():
    seed, offset = _next_pair()
    kiln.ops.dropout(torch.randn(7, 11), 0.5)
    assert kiln_random.get_rng_state()["offset"] == offset + 77
    assert kiln_random.get_rng_state()["seed"] == seed


def test_manual_seed_makes_masks_reproducible():
    x = torch.ones(100, 100)
    torch.manual_seed(1234)
    first, second = kiln.ops.dropout(x, 0.5), kiln.ops.dropout(x, 0.5)
    assert not torch.equal(first, second)  # the counter moved on
    torch.manual_seed(1234)  # the same seed again: noticed although initial_seed is unchanged
    assert torch.equal(kiln.ops.dropout(x, 0.5), first)
    assert torch.equal(kiln.ops.dropout(x, 0.5), second)
    torch.manual_seed(1235)
    assert not torch.equal(kiln.ops.dropout(x, 0.5), first)


def test_manual_seed_twice_in_a_row_and_torch_draws_between():
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    a = kiln.ops.dropout(x, 0.3)
    torch.randn(10)  # other torch randomness between calls does not reseed kiln
    b = kiln.ops.dropout(x, 0.3)
    torch.manual_seed(7)
    torch.manual_seed(7)
    assert torch.equal(kiln.ops.dropout(x, 0.3), a)
    torch.randn(10)
    assert torch.equal(kiln.ops.dropout(x, 0.3), b)


def test_get_set_rng_state_resumes_exactly():
    x = torch.ones(50, 40)
    torch.manual_seed(3)
    kiln.ops.dropout(x, 0.5)
    kiln_state, torch_state = kiln_random.get_rng_state(), torch.get_rng_state()
    following = [kiln.ops.dropout(x, 0.5) for _ in range(3)]
    torch.manual_seed(99)  # anything in between: another seed, draws, dropout calls
    kiln.ops.dropout(x, 0.5)
    torch.set_rng_state(torch_state)
    kiln_random.set_rng_state(kiln_state)
    for want in following:
        assert torch.equal(kiln.ops.dropout(x, 0.5), want)
    # the restore order does not matter
    kiln_random.set_rng_state(kiln_state)
    torch.set_rng_state(torch_state)
    assert torch.equal(kiln.ops.dropout(x, 0.5), following[0])


def test_set_rng_state_names_what_is_missing():
    with pytest.raises(ValueError, match=r"set_rng_state: state lacks offset, torch_seed"):
        kiln_random.set_rng_state({"seed": 1})


# --- the forms agree -------------------------------------------------------------------


def _dropout(x, p, seed_offset, save_mask=False):
    """The custom op's y (its second output, the stored mask, aside)."""
    return dropout_module._dropout(x, p, seed_offset, save_mask)[0]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed,offset", PAIRS)
def test_masks_identical_across_forms(seed, offset, p):
    x = _x((37, 53))
    outs = {}
    for backend in ("reference", "cpu", "triton"):
        with kiln.backend.use(backend):
            outs[backend] = _dropout(x, p, _pair(seed, offset))
    assert torch.equal(outs["cpu"], outs["reference"])
    assert torch.equal(outs["triton"], outs["reference"])
    keep = kiln_random.keep_mask(seed, offset, x.shape, p)
    assert torch.equal(outs["cpu"] != 0, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_form_stores_the_mask_under_autograd_and_its_backward_reads_it(dtype, monkeypatch):
    x = _x((41, 29), dtype)
    with kiln.backend.use("cpu"):
        y, mask = dropout_module._dropout(x, 0.3, _pair(3, 17), True)
        assert mask.dtype == torch.uint8 and torch.equal(mask.bool(), kiln_random.keep_mask(3, 17, x.shape, 0.3))
        assert torch.equal(y, _dropout(x, 0.3, _pair(3, 17)))
        leaf = x.clone().requires_grad_()
        torch.manual_seed(4)
        out = kiln.ops.dropout(leaf, 0.3)
        dy = torch.randn_like(out)
        monkeypatch.setattr(dropout_module, "_dropout_backward", None)  # the mask is read, nothing regenerated
        (dx,) = torch.autograd.grad(out, leaf, dy)
    assert torch.equal(dx, dy * (1 / 0.7) * (out != 0).to(dtype))
    with kiln.backend.use("cpu"), torch.no_grad():  # nothing to differentiate: no mask is written
        assert dropout_module._dropout_call(x, 0.3, _pair(3, 17), False)[1].numel() == 0


@pytest.mark.usefixtures("poison_empty")
def test_cpu_float64_equals_the_reference():
    x = _x((301, 7), torch.float64)
    with kiln.backend.use("cpu"):
        got = _dropout(x, 0.25, _pair(5, 11))
    with kiln.backend.use("reference"):
        want = _dropout(x, 0.25, _pair(5, 11))
    assert torch.equal(got, want)


# --- statistics and values -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_exact_scale(p, dtype):
    n = 1_000_000
    x = torch.rand(n, dtype=dtype) + 0.5  # never 0: a zero output means dropped
    with kiln.backend.use("cpu"):
        out = kiln.ops.dropout(x, p)
    kept = out != 0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.double().mean().item() - (1 - p)) < 4 * sigma
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    assert torch.equal(out[kept], x[kept] * scale)  # exactly x / (1 - p), as torch's x * noise
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))


def test_different_offsets_give_independent_masks():
    n, p = 1_000_000, 0.5
    first = kiln_random.keep_mask(42, 0, (n,), p)
    second = kiln_random.keep_mask(42, n, (n,), p)
    other_seed = kiln_random.keep_mask(43, 0, (n,), p)
    for other in (second, other_seed):
        agree = (first == other).double().mean().item()
        want = p * p + (1 - p) * (1 - p)
        assert abs(agree - want) < 4 * math.sqrt(want * (1 - want) / n)
    # neighbouring elements are not correlated either
    a, b = first[:-1].double(), first[1:].double()
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 4 / math.sqrt(n)


def test_matches_torch_dropout_with_the_same_mask():
    x = _x((33, 65), torch.float64).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    seed, offset = _next_pair()
    out = kiln.ops.dropout(x, 0.3)
    keep = kiln_random.keep_mask(seed, offset, x.shape, 0.3)
    ref = x_ref * (keep.double() / (1 - 0.3))
    assert rel_err(out, ref) < BOUND[torch.float64]
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    assert rel_err(x.grad, x_ref.grad) < BOUND[torch.float64]


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_backward_uses_the_forward_mask(backend):
    x = (_x((45, 29)).abs() + 0.1).requires_grad_()
    with kiln.backend.use(backend):
        out = kiln.ops.dropout(x, 0.4)
        kiln.ops.dropout(x.detach(), 0.4)  # another call between forward and backward
        out.backward(torch.ones_like(out))
    assert torch.equal(x.grad == 0, out == 0)
    scale = torch.tensor(1 / 0.6, dtype=torch.float32)
    assert torch.equal(x.grad[out != 0], scale.expand(int((out != 0).sum())))


def test_nan_and_inf_stay_nan_where_dropped_as_torch():
    x = torch.full((4000,), float("nan"))
    x[::2] = float("inf")
    out = kiln.ops.dropout(x, 0.5)
    assert torch.isnan(out[1::2]).all()
    assert (torch.isinf(out[::2]) | torch.isnan(out[::2])).all()  # kept inf stays inf, dropped is NaN
    assert torch.isnan(out[::2]).any() and torch.isinf(out[::2]).any()


# --- autograd --------------------------------------------------------------------------


def _fixed_mask(fn, p):
    """fn's dropout with one mask for every call (gradcheck calls it many times)."""
    _next_pair()  # seeds the generator now, so that the saved state is what calls see
    state = kiln_random.get_rng_state()

    def wrapped(*args):
        kiln_random.set_rng_state(state)
        return fn(*args, p)
    return wrapped


def test_gradcheck_and_gradgradcheck_cpu():
    x = _x((6, 7), torch.float64).requires_grad_()
    with kiln.backend.use("cpu"):
        f = _fixed_mask(kiln.ops.dropout, 0.35)
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))


def test_double_backward_regenerates_the_mask():
    """The create_graph backward (PyTorch ops, mask rebuilt from (seed, offset)) gives the
    kernel's gradient, and its own gradient in dy is the forward's mask / (1 - p) again."""
    x = (_x((20, 30), torch.float64).abs() + 0.1).requires_grad_()
    dy = torch.ones(20, 30, dtype=torch.float64, requires_grad=True)
    with kiln.backend.use("cpu"):
        out = kiln.ops.dropout(x, 0.5)
        plain = torch.autograd.grad(out, x, dy, retain_graph=True)[0]
        (dx,) = torch.autograd.grad(out, x, dy, create_graph=True)
    assert dx.grad_fn is not None
    assert torch.equal(dx, plain)
    (ddy,) = torch.autograd.grad(dx.sum(), dy)
    assert torch.equal(ddy, (out != 0).double() * 2.0)


# --- edge cases and errors -------------------------------------------------------------


def test_p_zero_eval_and_empty_return_the_input():
    x = torch.randn(3, 4)
    assert kiln.ops.dropout(x, 0.0) is x
    assert kiln.ops.dropout(x, 0.7, training=False) is x
    empty = torch.randn(0, 5)
    assert kiln.ops.dropout(empty, 0.5) is empty


def test_p_one_gives_zeros_as_torch():
    x = torch.randn(5, 6, requires_grad=True)
    out = kiln.ops.dropout(x, 1.0)
    assert torch.equal(out, F.dropout(x, 1.0))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_probability_names_it(p):
    with pytest.raises(ValueError, match=r"dropout: dropout probability has to be between 0 and 1, but got"):
        kiln.ops.dropout(torch.randn(3), p)
    with pytest.raises(ValueError, match=r"dropout probability has to be between 0 and 1"):
        kiln.nn.Dropout(p)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match=r"dropout: input must be a floating-point tensor, got dtype int64"):
        kiln.ops.dropout(torch.ones(3, dtype=torch.long), 0.5)


def test_inplace_writes_the_input():
    x = torch.randn(20, 20)
    _next_pair()
    state = kiln_random.get_rng_state()
    want = kiln.ops.dropout(x, 0.5)
    kiln_random.set_rng_state(state)
    y = x.clone()
    out = kiln.ops.dropout(y, 0.5, inplace=True)
    assert out is y and torch.equal(y, want)


def test_non_contiguous_input():
    base = _x((30, 40))
    x = base.t()
    seed, offset = _next_pair()
    out = kiln.ops.dropout(x, 0.5)
    keep = kiln_random.keep_mask(seed, offset, x.shape, 0.5)  # index = position in x's row-major order
    assert out.shape == x.shape
    assert torch.equal(out, x * keep.float() * 2.0)


def test_bfloat16_on_cpu_runs_on_the_reference():
    x = _x((16, 8), torch.bfloat16)
    seed, offset = _next_pair()
    out = kiln.ops.dropout(x, 0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out != 0, kiln_random.keep_mask(seed, offset, x.shape, 0.5) & (x != 0))


def test_autocast_leaves_the_dtype_as_torch():
    x = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = kiln.ops.dropout(x, 0.5), F.dropout(x, 0.5)
    assert out.dtype == ref.dtype == torch.float32


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_equals_eager_and_advances_the_counter():
    torch._dynamo.reset()
    x = _x((17, 23)).requires_grad_()
    f = lambda t: kiln.ops.dropout(t, 0.4) * 3.0
    compiled = torch.compile(f, fullgraph=True)
    _next_pair()
    state = kiln_random.get_rng_state()
    eager = [f(x) for _ in range(2)]
    kiln_random.set_rng_state(state)
    traced = [compiled(x) for _ in range(2)]
    assert not torch.equal(traced[0], traced[1])  # the offset is read at run time, not baked in
    for got, want in zip(traced, eager):
        assert torch.equal(got, want)
    traced[0].sum().backward()
    assert torch.equal(x.grad != 0, traced[0] != 0)


# --- kiln.nn.Dropout -------------------------------------------------------------------


def test_module_has_torchs_signature_and_state():
    assert inspect.signature(kiln.nn.Dropout.__init__) == inspect.signature(torch.nn.Dropout.__init__)
    assert inspect.signature(kiln.nn.Dropout.forward) == inspect.signature(torch.nn.Dropout.forward)
    m = kiln.nn.Dropout(0.2, inplace=True)
    assert (m.p, m.inplace, repr(m)) == (0.2, True, "Dropout(p=0.2, inplace=True)")
    assert m.state_dict() == {}


def test_module_train_and_eval():
    m = kiln.nn.Dropout(0.5)
    x = torch.randn(40, 40)
    _next_pair()
    state = kiln_random.get_rng_state()
    out = m(x)
    kiln_random.set_rng_state(state)
    assert torch.equal(out, kiln.ops.dropout(x, 0.5))
    m.eval()
    assert m(x) is x


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(1,), (1000, 333), (4096, 1027)], ids=str)
def test_gpu_masks_equal_the_reference(backend, shape, dtype):
    x = _x(shape, dtype).cuda() + 3.0  # never 0
    for seed, offset in PAIRS:
        with kiln.backend.use(backend):
            out = _dropout(x, 0.3, _pair(seed, offset))
        keep = kiln_random.keep_mask(seed, offset, shape, 0.3, device="cuda")
        assert torch.equal(out != 0, keep)
        want = (x.float() * (keep.float() * (1 / 0.7))).to(dtype)
        assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backward_and_keep_rate(backend):
    x = torch.rand(1_000_000, device="cuda", requires_grad=True)
    with kiln.backend.use(backend):
        out = kiln.ops.dropout(x + 0.5, 0.1)
        out.sum().backward()
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.9) < 4 * math.sqrt(0.09 / 1e6)
    assert torch.equal(x.grad != 0, kept)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_triton():
    torch._dynamo.reset()
    x = torch.randn(64, 64, device="cuda")
    f = lambda t: kiln.ops.dropout(t, 0.5)
    _next_pair()
    state = kiln_random.get_rng_state()
    eager = f(x)
    kiln_random.set_rng_state(state)
    with kiln.backend.use("triton"):
        assert torch.equal(torch.compile(f, fullgraph=True)(x), eager)


def test_kiln_manual_seed_restarts_dropout_even_after_torch_draws():
    x = torch.ones(1000)
    kiln.manual_seed(5)
    torch.randn(10)                                  # weight init between seeding and dropout
    first = kiln.ops.dropout(x, 0.5, True)
    kiln.ops.dropout(x, 0.5, True)                   # the generator moves on
    kiln.manual_seed(5)
    torch.randn(10)
    assert torch.equal(kiln.ops.dropout(x, 0.5, True), first)
    torch.manual_seed(5)
    assert torch.equal(kiln.ops.dropout(x, 0.5, True), first)   # = torch.manual_seed then dropout at once
