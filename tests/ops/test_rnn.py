import pytest
import torch

import kiln
from tests.numerics import BOUND, rel_err

HOST_BACKENDS = ["cpu", "reference"]


def _twins(kind, dtype, device="cpu", **kwargs):
    """A torch module in float64 and kiln's twin holding the same weights in ``dtype``."""
    theirs = getattr(torch.nn, kind)(dtype=torch.float64, **kwargs)
    ours = getattr(kiln.nn, kind)(dtype=torch.float64, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours.to(device=device, dtype=dtype), theirs


def _grads_match(ours, theirs, dtype):
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert rel_err(a.grad, b.grad) < BOUND[dtype], name


def _check_layer(backend, kind, T, B, I, H, layers, bidirectional, batch_first, dtype, device="cpu", bound=None,
                 **extra):
    bound = BOUND[dtype] if bound is None else bound
    ours, theirs = _twins(kind, dtype, device, input_size=I, hidden_size=H, num_layers=layers,
                          bidirectional=bidirectional, batch_first=batch_first, **extra)
    g = torch.Generator().manual_seed(0)
    D = 2 if bidirectional else 1
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g, dtype=torch.float64)
    states = [torch.randn(layers * D, B, H, generator=g, dtype=torch.float64) for _ in range(2 if kind == "LSTM" else 1)]
    x_o, x_t = x.to(device, dtype, copy=True).requires_grad_(), x.clone().requires_grad_()
    s_o = [s.to(device, dtype, copy=True).requires_grad_() for s in states]
    s_t = [s.clone().requires_grad_() for s in states]
    with kiln.backend.use(backend):
        out, fin = ours(x_o, tuple(s_o) if kind == "LSTM" else s_o[0])
    ref, fin_ref = theirs(x_t, tuple(s_t) if kind == "LSTM" else s_t[0])
    fin, fin_ref = (list(fin), list(fin_ref)) if kind == "LSTM" else ([fin], [fin_ref])
    assert rel_err(out, ref) < bound, "output"
    for a, b in zip(fin, fin_ref):
        assert rel_err(a, b) < bound, "final state"
    # a loss touching the output and every final state
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    loss = lambda o, f: (o * w.to(o.device, o.dtype)).sum() + sum(s.square().sum() for s in f)
    with kiln.backend.use(backend):
        loss(out, fin).backward()
    loss(ref, fin_ref).backward()
    assert rel_err(x_o.grad, x_t.grad) < bound, "dx"
    for a, b in zip(s_o, s_t):
        assert rel_err(a.grad, b.grad) < bound, "d initial state"
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert rel_err(a.grad, b.grad) < bound, name


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, True), (3, True, False)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_layers_match_torch(backend, kind, dtype, layers, bidirectional, batch_first, T):
    _check_layer(backend, kind, T, 3, 5, 7, layers, bidirectional, batch_first, dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("T,layers,bidirectional,batch_first", [(1, 1, False, False), (11, 2, True, True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_elman_layers_match_torch(backend, nonlinearity, dtype, layers, bidirectional, batch_first, T):
    _check_layer(backend, "RNN", T, 3, 5, 7, layers, bidirectional, batch_first, dtype, nonlinearity=nonlinearity)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_wide_hidden_cpu(kind):
    _check_layer("cpu", kind, 9, 4, 33, 129, 1, True, True, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cells_match_torch(backend, kind, bias):
    ours, theirs = _twins(kind, torch.float64, input_size=6, hidden_size=11, bias=bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    states = [torch.randn(4, 11, generator=g, dtype=torch.float64) for _ in range(2 if kind == "LSTMCell" else 1)]
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    so, st = [s.clone().requires_grad_() for s in states], [s.clone().requires_grad_() for s in states]
    with kiln.backend.use(backend):
        out = ours(xo, tuple(so) if kind == "LSTMCell" else so[0])
    ref = theirs(xt, tuple(st) if kind == "LSTMCell" else st[0])
    out, ref = (list(out), list(ref)) if kind == "LSTMCell" else ([out], [ref])
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-12
    sum(o.square().sum() for o in out).backward()
    sum(r.square().sum() for r in ref).backward()
    for a, b in zip([xo, *so], [xt, *st]):
        assert rel_err(a.grad, b.grad) < 1e-12
    _grads_match(ours, theirs, torch.float64)


def test_unbatched_and_default_states():
    ours, theirs = _twins("GRU", torch.float64, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(6, 3, dtype=torch.float64)
    out, h = ours(x)
    ref, h_ref = theirs(x)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-12 and rel_err(h, h_ref) < 1e-12


def test_dropout_between_layers_is_applied_in_training():
    lstm = kiln.nn.LSTM(4, 5, num_layers=2, dropout=0.5).double()
    x = torch.randn(7, 2, 4, dtype=torch.float64)
    torch.manual_seed(0)
    a, _ = lstm(x)
    torch.manual_seed(1)
    b, _ = lstm(x)
    assert not torch.equal(a, b)  # different dropout masks
    lstm.eval()
    assert torch.equal(lstm(x)[0], lstm(x)[0])


def test_gradcheck_cpu_backend():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    h0, c0 = (torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    w_ih = torch.randn(20, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w_hh = torch.randn(20, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, generator=g, requires_grad=True)
    with kiln.backend.use("cpu"):
        assert torch.autograd.gradcheck(lambda *a: kiln.ops.lstm(*a, reverse=True)[0], (x, h0, c0, w_ih, w_hh, b))
        assert torch.autograd.gradcheck(lambda x, h, wi, wh, b: kiln.ops.gru(x, h, wi, wh[:15], b[:15], b[5:])[0],
                                        (x, h0, w_ih[:15], w_hh, b))


# --- bad input ------------------------------------------------------------------------


def test_weight_shapes_are_named():
    x, h = torch.randn(3, 2, 4), torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"w_ih must be \(4 \* hidden, input\) = \(20, 4\).*got \(20, 3\)"):
        kiln.ops.lstm(x, h, h, torch.randn(20, 3), torch.randn(20, 5))
    with pytest.raises(ValueError, match=r"w_hh must be \(3 \* hidden, hidden\), got \(20, 5\)"):
        kiln.ops.gru(x, h, torch.randn(15, 4), torch.randn(20, 5))
    with pytest.raises(ValueError, match=r"h0 must have shape \(batch, hidden\) = \(2, 5\) for x \(3, 2, 4\), "
                                         r"got \(3, 5\)"):
        kiln.ops.gru(x, torch.zeros(3, 5), torch.randn(15, 4), torch.randn(15, 5))
    with pytest.raises(ValueError, match=r"rnn_tanh: w_hh must be \(1 \* hidden, hidden\) = \(5, 5\), got \(5, 4\)"):
        kiln.ops.rnn_tanh(x, h, torch.randn(5, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"rnn_relu: b_hh must have shape \(1 \* hidden,\) = \(5,\) for w_hh "
                                         r"\(5, 5\), got \(4,\)"):
        kiln.ops.rnn_relu(x, h, torch.randn(5, 4), torch.randn(5, 5), None, torch.randn(4))
    with pytest.raises(ValueError, match=r"w_hr must be \(proj, hidden\) = \(proj, 5\) for w_hh \(20, 3\), "
                                         r"got \(3, 4\)"):
        kiln.ops.lstm(x, torch.zeros(2, 3), h, torch.randn(20, 4), torch.randn(20, 3), w_hr=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"w_hh must be \(4 \* hidden, proj\) = \(20, 3\), got \(20, 5\)"):
        kiln.ops.lstm(x, torch.zeros(2, 3), h, torch.randn(20, 4), torch.randn(20, 5), w_hr=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"batch_sizes must be 3 non-increasing positive counts starting at the "
                                         r"batch size 2 for x \(3, 2, 4\), got \[2, 1, 2\]"):
        kiln.ops.rnn_tanh(x, h, torch.randn(5, 4), torch.randn(5, 5), batch_sizes=[2, 1, 2])
    with pytest.raises(TypeError, match=r"rnn_tanh: w_hh has dtype float64 but x has dtype float32"):
        kiln.ops.rnn_tanh(x, h, torch.randn(5, 4), torch.randn(5, 5, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_empty_batch_and_empty_sequence(kind):
    """B = 0 and T = 0 run no kernel; gradients are zeros of the right shapes."""
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    for T, B in ((3, 0), (0, 2)):
        x = torch.randn(T, B, 4, dtype=torch.float64, requires_grad=True)
        h0 = torch.randn(B, 5, dtype=torch.float64, requires_grad=True)
        w_ih = torch.randn(G * 5, 4, dtype=torch.float64, requires_grad=True)
        w_hh = torch.randn(G * 5, 5, dtype=torch.float64, requires_grad=True)
        op = getattr(kiln.ops, kind)
        out, *finals = op(x, h0, h0, w_ih, w_hh) if kind == "lstm" else op(x, h0, w_ih, w_hh)
        assert out.shape == (T, B, 5) and all(f.shape == (B, 5) for f in finals)
        if T == 0:
            assert all(torch.equal(f, h0) for f in finals)  # no step: the initial state
        (out.sum() + sum(f.sum() for f in finals)).backward()
        assert torch.equal(w_hh.grad, torch.zeros_like(w_hh)) and x.grad.shape == x.shape


def _sequence_args(kind, g):
    T, B, H = 3, 2, 3
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    if kind == "lstm":
        return (r(T, B, G * H), r(B, H), r(B, H), r(G * H, H) * 0.5), lambda *a: kiln.ops.rnn._lstm_sequence(*a)[:2]
    if kind == "gru":
        return (r(T, B, G * H), r(B, H), r(G * H, H) * 0.5, r(G * H)), lambda *a: kiln.ops.rnn._gru_sequence(*a)[0]
    relu = kind == "rnn_relu"
    return (r(T, B, H), r(B, H), r(H, H) * 0.5), lambda *a: kiln.ops.rnn._rnn_sequence(*a, relu)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_sequence_ops_gradcheck_and_gradgradcheck(kind, backend):
    """The sequence ops' backward (the form's kernels) and double backward (the registered
    backward under create_graph recomputes the forward in differentiable torch ops)."""
    import kiln.ops.rnn  # noqa: F401  (the module, for its custom ops)

    args, fn = _sequence_args(kind, torch.Generator().manual_seed(11))
    args = tuple(a.detach().requires_grad_() for a in args)
    with kiln.backend.use(backend):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_elman_gradcheck_cpu_backend():
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    x, h0, w_ih, w_hh, b_ih, b_hh = r(4, 3, 2), r(3, 5), r(5, 2), r(5, 5), r(5), r(5)
    with kiln.backend.use("cpu"):
        for op in (kiln.ops.rnn_tanh, kiln.ops.rnn_relu):
            assert torch.autograd.gradcheck(lambda *a: op(*a, reverse=True)[0], (x, h0, w_ih, w_hh, b_ih, b_hh))
            assert torch.autograd.gradcheck(lambda *a: op(*a, batch_sizes=[3, 3, 2, 1])[0],
                                            (x, h0, w_ih, w_hh, b_ih, b_hh))


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_autocast_runs_in_the_regions_dtype(kind):
    """torch's policy for recurrent layers ("lower"): the output has the region's dtype. torch's
    own CPU modules disagree with each other here (RNN lowers, its GRU kernel stays float32,
    its LSTM goes to oneDNN, which may refuse bfloat16), so the dtype follows the policy and
    the values are checked against float64 within the bfloat16 bound; for RNN also against
    torch's module in the same region."""
    torch.manual_seed(0)
    ours = getattr(kiln.nn, kind)(6, 8, 2, bidirectional=True)
    theirs = getattr(torch.nn, kind)(6, 8, 2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, fin = ours(x)
    fin = fin[0] if kind == "LSTM" else fin
    assert out.dtype == torch.bfloat16 and fin.dtype == torch.bfloat16
    ref, fin_ref = theirs.double()(x.double())
    fin_ref = fin_ref[0] if kind == "LSTM" else fin_ref
    assert rel_err(out, ref) < BOUND[torch.bfloat16] and rel_err(fin, fin_ref) < BOUND[torch.bfloat16]
    if kind == "RNN":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs_out, _ = theirs.float()(x)
        assert theirs_out.dtype == out.dtype and rel_err(out, theirs_out) < BOUND[torch.bfloat16]
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


# --- torch.compile ---------------------------------------------------------------------


def test_compile_fullgraph_cpu_backend():
    """The ops trace without a graph break (the modules: tests/nn/test_rnn_modules.py)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=g)
    h0 = torch.randn(2, 4, dtype=torch.float64, generator=g)
    params = [torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
              for shape in ((16, 3), (16, 4), (16,), (12, 4), (12, 4), (12,))]

    def fn(x, h0, wi, wh, b, gwi, gwh, gb):
        out, h, c = kiln.ops.lstm(x, h0, h0, wi, wh, b, reverse=True)
        out2, _ = kiln.ops.gru(out, h, gwi, gwh, gb, gb)
        out3, h3 = kiln.ops.rnn_relu(out2, h, gwi[:4], gwh[:4], gb[:4], gb[4:8], reverse=True)
        return out3.square().sum() + c.sum() + h3.sum()

    with kiln.backend.use("cpu"):
        torch.compile(fn, fullgraph=True)(x, h0, *params).backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        fn(x, h0, *params).backward()
    for a, p in zip(grads, params):
        assert rel_err(a, p.grad) < 1e-12


@pytest.mark.parametrize("B, H", [(3, 7), (20, 40)], ids=["one-tile", "several-tiles"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "RNN-relu"])
def test_layers_match_torch_triton_interpreted(kind, B, H):
    """Interpreted tiles are 16 x 16 with BLOCK_K 32: B 20, H 40 reach two row tiles, three
    unit tiles (each backward chunk stored by its one owner) and two reduction chunks."""
    extra = {"nonlinearity": "relu"} if kind == "RNN-relu" else {}
    _check_layer("triton", kind.split("-")[0], 3, B, 5, H, 1, True, False, torch.float32, **extra)


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "RNN-relu"])
def test_layers_match_torch_triton_gpu(kind, dtype, T):
    bound = 1e-3 if dtype == torch.float32 else None  # tf32 dots
    extra = {"nonlinearity": "relu"} if kind == "RNN-relu" else {}
    _check_layer("triton", kind.split("-")[0], T, 5, 33, 129, 2, True, True, dtype, device="cuda", bound=bound,
                 **extra)


@pytest.mark.gpu
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_elman_layers_match_torch_cuda_gpu(nonlinearity, dtype, T):
    # The Elman RNN runs the step loop over the cuda step kernels (no persistent kernel).
    _check_layer("cuda", "RNN", T, 5, 33, 129, 2, True, True, dtype, device="cuda", nonlinearity=nonlinearity)


def _sequence_fits(kind, B, H, w_dtype):
    from kiln.ops import rnn

    w = torch.empty(0, device="cuda", dtype=w_dtype)
    return rnn.cuda_sequence_fits(4 if kind.upper() == "LSTM" else 3, B, H, w)


@pytest.mark.gpu
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_layers_match_torch_cuda_gpu(kind, dtype, T):
    # B = 5, H = 129: no tile multiple; the forward and the backward run the persistent kernels
    # (rnn_sequence_fits answers for both).
    assert _sequence_fits(kind, 5, 129, dtype)
    _check_layer("cuda", kind, T, 5, 33, 129, 2, True, True, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_layers_match_torch_cuda_gpu_step_loop_fallback(kind, dtype):
    # H = 2048: a block's gate rows of w_hh do not fit in shared memory (H100 or A100), so
    # the forward and the backward are the step loops over the step kernels.
    assert not _sequence_fits(kind, 3, 2048, dtype)
    _check_layer("cuda", kind, 3, 3, 8, 2048, 1, False, False, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("B,H", [(1, 1), (1, 33), (17, 129), (130, 65), (130, 129), (3, 2048)], ids=str)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_cuda_kernels_match_reference(kind, w_dtype, B, H):
    """Every cuda step kernel and the sequence forward and backward against the float64
    reference on the same (rounded) weights: the cuda form's dots are float32 FFMA for every
    weight dtype, so the float32 bound holds. (130, 65) and (130, 129) span several staged
    row tiles of the persistent kernels; (3, 2048) is their step-loop fallback."""
    from kiln.ops import rnn

    G, T = {"lstm": 4, "gru": 3}.get(kind, 1), 5
    g = torch.Generator().manual_seed(B * 1000 + H)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    w = (rnd(G * H, H) / H ** 0.5).to(w_dtype)
    w64, w_cu = w.double(), w.cuda()
    b = None if H == 33 else (rnd(G * H) * 0.5).to(w_dtype)
    b64, b_cu = (None, None) if b is None else (b.double(), b.cuda())
    cu = lambda t: t.to("cuda", torch.float32)  # noqa: E731
    bound = BOUND[torch.float32]

    def close(ours, ref, what):
        for i, (a, r) in enumerate(zip(ours, ref)):
            assert rel_err(a, r) < bound, f"{kind} {what} output {i}"

    gx, h, c = rnd(B, G * H), rnd(B, H), rnd(B, H)
    dh_next, dc_next = rnd(B, H), rnd(B, H)
    if kind == "lstm":
        fwd = rnn.lstm_step_forward(gx, h, c, w64)
        close(rnn._CUDA.lstm_step_forward(cu(gx), cu(h), cu(c), w_cu), fwd, "step forward")
        _, c_next, gates = fwd
        close(rnn._CUDA.lstm_step_backward(cu(dh_next), cu(dc_next), cu(gates), cu(c), cu(c_next), w_cu),
              rnn.lstm_step_backward(dh_next, dc_next, gates, c, c_next, w64), "step backward")
        gx_all = rnd(T, B, G * H)
        seq = rnn.lstm_sequence_forward(gx_all, h, c, w64)
        close(rnn._CUDA.lstm_sequence_forward(cu(gx_all), cu(h), cu(c), w_cu), seq, "sequence forward")
        h_all, c_all, gates_all = seq
        dh_all, dc_all = rnd(T, B, H), rnd(T, B, H)
        close(rnn._CUDA.lstm_sequence_backward(cu(dh_all), cu(dc_all), cu(gates_all), cu(h), cu(c), cu(h_all),
                                               cu(c_all), w_cu),
              rnn.lstm_sequence_backward(dh_all, dc_all, gates_all, h, c, h_all, c_all, w64), "sequence backward")
    elif kind.startswith("rnn"):
        relu = kind == "rnn_relu"
        fwd = rnn.rnn_step_forward(gx, h, w64, relu)
        close([rnn._CUDA.rnn_step_forward(cu(gx), cu(h), w_cu, relu)], [fwd], "step forward")
        close(rnn._CUDA.rnn_step_backward(cu(dh_next), cu(fwd), w_cu, relu),
              rnn.rnn_step_backward(dh_next, fwd, w64, relu), "step backward")
        gx_all = rnd(T, B, H)
        seq = rnn.rnn_sequence_forward(gx_all, h, w64, relu)
        close([rnn.rnn_sequence_forward(cu(gx_all), cu(h), w_cu, relu, kernels=rnn._CUDA)], [seq],
              "sequence forward")
        dh_all = rnd(T, B, H)
        close(rnn.rnn_sequence_backward(cu(dh_all), cu(h), cu(seq), w_cu, relu, kernels=rnn._CUDA),
              rnn.rnn_sequence_backward(dh_all, h, seq, w64, relu), "sequence backward")
        return
    else:
        fwd = rnn.gru_step_forward(gx, h, w64, b64)
        close(rnn._CUDA.gru_step_forward(cu(gx), cu(h), w_cu, b_cu), fwd, "step forward")
        saved = fwd[1]
        close(rnn._CUDA.gru_step_backward(cu(dh_next), cu(saved), cu(h), w_cu),
              rnn.gru_step_backward(dh_next, saved, h, w64), "step backward")
        gx_all = rnd(T, B, G * H)
        seq = rnn.gru_sequence_forward(gx_all, h, w64, b64)
        close(rnn._CUDA.gru_sequence_forward(cu(gx_all), cu(h), w_cu, b_cu), seq, "sequence forward")
        h_all, saved_all = seq
        dh_all = rnd(T, B, H)
        close(rnn._CUDA.gru_sequence_backward(cu(dh_all), cu(saved_all), cu(h), cu(h_all), w_cu),
              rnn.gru_sequence_backward(dh_all, saved_all, h, h_all, w64), "sequence backward")
    assert _sequence_fits(kind, B, H, w_dtype) == (H != 2048)  # persistent forward and backward ran


# --- the notes' cells -------------------------------------------------------------------


def _notes_step(kind, cell, x, h):
    """The notes' formulas written out in plain torch."""
    phi = torch.tanh if cell.nonlinearity == "tanh" else torch.relu
    if kind == "RNNCell":
        return phi(x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh)
    if kind == "ResidualRNNCell":
        return h @ cell.weight_skip.T + phi(x @ cell.weight_ih.T + h @ cell.weight_hh.T + cell.bias)
    H = cell.hidden_size
    h_tilde = phi(x @ cell.weight_ih[:H].T + cell.bias[:H] + h @ cell.weight_hh[:H].T)
    a = torch.sigmoid(x @ cell.weight_ih[H:].T + cell.bias[H:] + h @ cell.weight_hh[H:].T)
    return h_tilde * a + x * (1 - a)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("kind", ["RNNCell", "ResidualRNNCell", "HighwayRNNCell"])
def test_notes_cells_in_a_bidirectional_rnn(kind, nonlinearity):
    torch.manual_seed(0)
    cell = getattr(kiln.nn, kind)(6, 6, nonlinearity=nonlinearity, dtype=torch.float64)
    rnn = kiln.nn.CellRNN(cell, bidirectional=True, batch_first=True)
    x = torch.randn(3, 9, 6, dtype=torch.float64, requires_grad=True)
    out, h_n = rnn(x)
    # the same recurrence, written out
    xs = x.detach().clone().requires_grad_()
    fwd, h = [], torch.zeros(3, 6, dtype=torch.float64)
    for t in range(9):
        h = _notes_step(kind, rnn.cell, xs[:, t], h)
        fwd.append(h)
    bwd, g = [None] * 9, torch.zeros(3, 6, dtype=torch.float64)
    for t in reversed(range(9)):
        g = _notes_step(kind, rnn.reverse_cell, xs[:, t], g)
        bwd[t] = g
    ref = torch.cat([torch.stack(fwd, 1), torch.stack(bwd, 1)], -1)
    assert rel_err(out, ref) < 1e-12 and rel_err(h_n, torch.stack([h, g])) < 1e-12
    out.square().sum().backward()
    ref.square().sum().backward()
    assert rel_err(x.grad, xs.grad) < 1e-12


def test_rnn_cell_is_torch_rnn_cell():
    ours, theirs = _twins("RNNCell", torch.float64, input_size=4, hidden_size=5, nonlinearity="relu")
    x, h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert rel_err(ours(x, h), theirs(x, h)) < 1e-12


def test_highway_cell_needs_matching_sizes():
    with pytest.raises(ValueError, match="input_size must equal hidden_size; got 4 and 5"):
        kiln.nn.HighwayRNNCell(4, 5)


@pytest.mark.parametrize("blocks", ["serial", "one row per block"])
def test_eager_cpu_lstm_layer_and_stack_gradcheck_and_gradgradcheck(monkeypatch, blocks):
    """The eager cpu forms (a layer in one numba call each way, kiln.nn.LSTM's unidirectional
    stack as one autograd node) run here, and their backward and double backward (which
    recomputes the layers in PyTorch ops) pass gradcheck and gradgradcheck, both
    directions, with and without biases; also with the step loop split into parallel
    blocks of batch rows (what B >= 16 runs with two threads), here one row a block."""
    import kiln.kernels.cpu.rnn as rnn_kernels
    import kiln.ops.rnn as rnn_ops

    if blocks != "serial":
        monkeypatch.setattr(rnn_kernels, "_batch_chunks", lambda B: B)

    calls = {"layer": 0, "stack": 0}
    layer, stack = rnn_ops._lstm_layer_cpu, rnn_ops._lstm_stack_cpu

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(rnn_ops, "_lstm_layer_cpu", count("layer", layer))
    monkeypatch.setattr(rnn_ops, "_lstm_stack_cpu", count("stack", stack))
    g = torch.Generator().manual_seed(13)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = r(4, 2, 3), r(2, 5), r(2, 5), r(20, 3), r(20, 5), r(20), r(20)
    with kiln.backend.use("cpu"):
        for reverse in (False, True):
            fn = lambda *a: torch.cat([o.flatten() for o in kiln.ops.lstm(*a, reverse=reverse)])  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
            assert torch.autograd.gradgradcheck(fn, (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
        for bias in (True, False):
            lstm = kiln.nn.LSTM(3, 5, num_layers=2, bias=bias, dtype=torch.float64)
            hs, cs = r(2, 2, 5), r(2, 2, 5)

            def stack(x, hs, cs):
                out, (h_n, c_n) = lstm(x, (hs, cs))
                return torch.cat([out.flatten(), h_n.flatten(), c_n.flatten()])

            assert torch.autograd.gradcheck(stack, (x, hs, cs))
            assert torch.autograd.gradgradcheck(stack, (x, hs, cs))
    assert calls["layer"] > 0 and calls["stack"] > 0


@pytest.mark.parametrize("parties", [2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lstm_hidden_unit_split_cpu(monkeypatch, parties, bidirectional, dtype):
    """The eager cpu LSTM layer's step loop split over hidden units (a team of `parties`
    workers, each its units' four gates for every row, meeting at a spin barrier every
    step; what B >= 16, H >= 256 run with two numba threads) matches torch forward and
    backward, both directions and stacked; H 40 gives parts of 32 + 8 and 16 + 16 + 8
    units. With fewer numba threads than parts (one thread, or 3 parts on 2) the team
    never forms and the first part runs every unit alone: the same results."""
    import kiln.kernels.cpu.rnn as rnn_kernels

    asked = []
    monkeypatch.setattr(rnn_kernels, "_unit_parts", lambda B, H: asked.append((B, H)) or parties)
    _check_layer("cpu", "LSTM", 5, 3, 7, 40, 2, bidirectional, False, dtype)
    assert asked, "the layer kernels did not run"


def test_lstm_hidden_unit_split_taken_at_bench_width():
    """At B 16, H 256 the unit split is what runs with two numba threads (none with one, nor
    with more: 128 units a part at least), and it matches torch in float32."""
    import numba

    import kiln.kernels.cpu.rnn as rnn_kernels

    threads = numba.get_num_threads()
    parties = rnn_kernels._unit_parts(16, 256)
    assert parties == (2 if threads == 2 and rnn_kernels.SPIN_BARRIER else 1)
    assert rnn_kernels._unit_parts(8, 256) == 1  # small batch: serial
    _check_layer("cpu", "LSTM", 3, 16, 8, 256, 1, False, False, torch.float32)
