import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]
SHAPES = [(1,), (7,), (3, 5), (2, 3, 1000), (16385,)]  # no block multiple, one element, a chunk + 1
# (kiln op, its keyword arguments, torch's composite)
OPS = {
    "swiglu": (lambda g, u: kiln.ops.swiglu(g, u), lambda g, u: F.silu(g) * u),
    "geglu": (lambda g, u: kiln.ops.geglu(g, u), lambda g, u: F.gelu(g) * u),
    "geglu_tanh": (lambda g, u: kiln.ops.geglu(g, u, approximate="tanh"),
                   lambda g, u: F.gelu(g, approximate="tanh") * u),
}


def _randn(*shape, dtype=torch.float64, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _check(backend, op, shape, dtype, device="cpu"):
    ours_fn, torch_fn = OPS[op]
    gate, up = _randn(*shape, dtype=dtype, device=device), _randn(*shape, seed=1, dtype=dtype, device=device)
    dy = _randn(*shape, seed=2, dtype=dtype, device=device, scale=1.0)
    ours = [t.detach().clone().requires_grad_() for t in (gate, up)]
    theirs = [t.detach().cpu().double().requires_grad_() for t in (gate, up)]
    with kiln.backend.use(backend):
        y = ours_fn(*ours)
        y.backward(dy)
    ref = torch_fn(*theirs)
    ref.backward(dy.cpu().double())
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_err(y, ref) < BOUND[dtype], "forward"
    for name, a, r in zip(("dgate", "dup"), ours, theirs):
        assert rel_err(a.grad, r.grad) < BOUND[dtype], name


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_matches_torch(backend, op, dtype, shape):
    _check(backend, op, shape, dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(7,), (2, 3, 700)], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_matches_torch_triton_interpreted(op, shape):
    _check("triton", op, shape, torch.float32)


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_saturating_inputs_stay_finite(backend):
    """silu / gelu of +-100 are z and 0 in float32: no inf / nan from exp overflow."""
    g = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0], requires_grad=True)
    u = torch.ones(5, requires_grad=True)
    with kiln.backend.use(backend):
        for op in OPS:
            g.grad = u.grad = None
            y = OPS[op][0](g, u)
            y.sum().backward()
            g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
            ref = OPS[op][1](g64, u64)
            ref.sum().backward()
            assert rel_err(y, ref) < BOUND[torch.float32], op
            assert rel_err(g.grad, g64.grad) < BOUND[torch.float32], op


def test_only_the_needed_gradient():
    gate, up = _randn(4, 6), _randn(4, 6, seed=1).requires_grad_()
    with kiln.backend.use("cpu"):
        kiln.ops.swiglu(gate, up).sum().backward()
    assert gate.grad is None and rel_err(up.grad, F.silu(gate)) < 1e-12


@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck_and_gradgradcheck_cpu_backend(op):
    gate = _randn(3, 4, scale=1.0).requires_grad_()
    up = _randn(3, 4, seed=1, scale=1.0).requires_grad_()
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(OPS[op][0], (gate, up))
        assert torch.autograd.gradgradcheck(OPS[op][0], (gate, up))


def test_non_contiguous_inputs():
    gate, up = _randn(8, 6).t(), _randn(6, 16, seed=1)[:, ::2]
    with kiln.backend.use("cpu"):
        y = kiln.ops.swiglu(gate, up)
    assert rel_err(y, F.silu(gate) * up) < 1e-12


@pytest.mark.parametrize("shape", [(0,), (2, 0, 5)], ids=str)
def test_zero_size(shape):
    gate, up = torch.zeros(shape, requires_grad=True), torch.zeros(shape, requires_grad=True)
    y = kiln.ops.geglu(gate, up)
    assert y.shape == shape
    y.sum().backward()
    assert gate.grad.shape == shape and up.grad.shape == shape


def test_autocast_follows_torch():
    """torch runs F.silu(g) * u in its inputs' dtype inside an autocast region: so does kiln."""
    for dtype in (torch.float32, torch.bfloat16):
        g, u = _randn(4, 32, dtype=dtype), _randn(4, 32, seed=1, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = kiln.ops.swiglu(g, u), F.silu(g) * u
        assert ours.dtype == theirs.dtype
        assert rel_err(ours, theirs) < BOUND[torch.bfloat16]


# --- bad input ------------------------------------------------------------------------


def test_shape_mismatch_names_both():
    with pytest.raises(ValueError, match=r"swiglu: gate and up must have the same shape: gate \(2, 8\) vs up \(2, 7\)"):
        kiln.ops.swiglu(torch.randn(2, 8), torch.randn(2, 7))


def test_mixed_dtypes_name_both():
    with pytest.raises(TypeError, match="up has dtype float64 but gate has dtype float32"):
        kiln.ops.geglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64))


def test_integer_input_and_bad_approximate():
    with pytest.raises(TypeError, match="gate must be a floating-point tensor"):
        kiln.ops.swiglu(torch.ones(2, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        kiln.ops.geglu(torch.ones(2), torch.ones(2), approximate="erf")


def test_per_op_backend_choice():
    g, u = _randn(4, 8), _randn(4, 8, seed=1)
    with kiln.backend.use("reference", ops=["swiglu"]):
        assert rel_err(kiln.ops.swiglu(g, u), F.silu(g) * u) < 1e-12


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()
    g, u = _randn(5, 12).requires_grad_(), _randn(5, 12, seed=1).requires_grad_()
    fn = lambda g, u: kiln.ops.swiglu(g, u).square().sum() + kiln.ops.geglu(g, u, "tanh").sum()
    with kiln.backend.use("cpu"):
        torch.compile(fn, fullgraph=True)(g, u).backward()
        grads = [t.grad.clone() for t in (g, u)]
        for t in (g, u):
            t.grad = None
        fn(g, u).backward()
    for got, t in zip(grads, (g, u)):
        assert rel_err(got, t.grad) < 1e-12


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(4096, 11008), (3, 4097)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_torch_gpu(backend, op, dtype, shape):
    _check(backend, op, shape, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_misaligned_views_gpu(backend):
    """Flat views starting one element in: the cuda form takes its scalar path."""
    base = torch.randn(2, 1001, device="cuda", requires_grad=True)
    g, u = base[0, 1:], base[1, 1:]
    with kiln.backend.use(backend):
        y = kiln.ops.swiglu(g, u)
    assert rel_err(y, F.silu(g.double()) * u.double()) < BOUND[torch.float32]


# --- the module ------------------------------------------------------------------------


class _LlamaMLP(torch.nn.Module):
    """Hugging Face's LlamaMLP / GemmaMLP, written out."""

    def __init__(self, hidden, inter, act, bias):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=bias, dtype=torch.float64)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=bias, dtype=torch.float64)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=bias, dtype=torch.float64)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_mlp_matches_llama_mlp(activation, bias):
    torch.manual_seed(0)
    theirs = _LlamaMLP(12, 20, activation, bias)
    via_load_from = kiln.nn.GatedMLP(12, 20, activation, bias=bias, dtype=torch.float64)
    via_load_from.load_from(theirs.gate_proj, theirs.up_proj, theirs.down_proj)
    via_state_dict = kiln.nn.GatedMLP(12, 20, activation, bias=bias, dtype=torch.float64)
    via_state_dict.load_state_dict(theirs.state_dict())
    x = _randn(2, 3, 12, scale=1.0)
    dy = _randn(2, 3, 12, seed=5, scale=1.0)
    ref = theirs(x.requires_grad_())
    ref.backward(dy)
    for ours in (via_load_from, via_state_dict):
        x2 = x.detach().clone().requires_grad_()
        with kiln.backend.use("cpu"):
            y = ours(x2)
            y.backward(dy)
        assert rel_err(y, ref) < 1e-10
        assert rel_err(x2.grad, x.grad) < 1e-10
        I = 20
        assert rel_err(ours.gate_up_weight.grad[:I], theirs.gate_proj.weight.grad) < 1e-10
        assert rel_err(ours.gate_up_weight.grad[I:], theirs.up_proj.weight.grad) < 1e-10
        assert rel_err(ours.down_weight.grad, theirs.down_proj.weight.grad) < 1e-10
        ours.zero_grad()


def test_gated_mlp_state_dict_and_errors():
    mlp = kiln.nn.GatedMLP(8, 16)
    assert list(mlp.state_dict()) == ["gate_up_weight", "down_weight"]
    assert "activation='silu'" in repr(mlp)
    with pytest.raises(ValueError, match="activation must be one of 'silu', 'gelu', 'gelu_tanh', got 'relu'"):
        kiln.nn.GatedMLP(8, 16, activation="relu")
    with pytest.raises(ValueError, match=r"up_proj's weight must be \(16, 8\), got \(16, 9\)"):
        mlp.load_from(torch.zeros(16, 8), torch.zeros(16, 9), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="has bias=False"):
        mlp.load_from(torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
