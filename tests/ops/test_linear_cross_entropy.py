import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.memory import extra_peak_bytes, needs_peak_reset
from tests.numerics import BOUND, rel_err


def _case(n, h, v, dtype=torch.float64, seed=0, ignore_every=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        target[::ignore_every] = -100
    return [t.to(device=device, dtype=dtype) for t in (hidden, weight, bias)], target.to(device)


def _check(backend, n, h, v, dtype, chunk_rows, bias=True, device="cpu", **kwargs):
    (hidden, weight, b), target = _case(n, h, v, dtype, ignore_every=kwargs.pop("ignore_every", 0),
                                        device=device)
    b = b if bias else None
    ours = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    theirs = [t.detach().cpu().double().clone().requires_grad_() for t in ours]
    with kiln.backend.use(backend):
        out = kiln.ops.linear_cross_entropy(ours[0], ours[1], target, linear_bias=ours[2] if bias else None,
                                            chunk_rows=chunk_rows, **kwargs)
    ref = F.cross_entropy(F.linear(theirs[0], theirs[1], theirs[2] if bias else None), target.cpu(), **kwargs)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out.backward(g.to(device=device, dtype=dtype))
    ref.backward(g)
    assert rel_err(out, ref) < BOUND[dtype], "loss"
    for name, a, b_ in zip(("dhidden", "dweight", "dbias"), ours, theirs):
        assert rel_err(a.grad, b_.grad) < BOUND[dtype], name


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_equals_cross_entropy_of_linear(backend, dtype, reduction, chunk_rows):
    _check(backend, 23, 16, 301, dtype, chunk_rows, reduction=reduction, ignore_every=5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_bias_and_smoothing(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    _check(backend, 9, 8, 50, dtype, 4, bias=False, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inference_and_frozen_weight_paths(reduction):
    """mean / sum take the gradients-in-forward path only while autograd records something;
    under no_grad they take the statistics path, and a frozen weight is not differentiated."""
    (hidden, weight, bias), target = _case(13, 6, 29, ignore_every=4)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction=reduction)
    with torch.no_grad():
        out = kiln.ops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, reduction=reduction,
                                            chunk_rows=5)
    assert rel_err(out, ref) < 1e-12
    h = hidden.clone().requires_grad_()
    out = kiln.ops.linear_cross_entropy(h, weight, target, linear_bias=bias, reduction=reduction, chunk_rows=5)
    (3 * out).backward()
    h_ref = hidden.clone().requires_grad_()
    (3 * F.cross_entropy(F.linear(h_ref, weight, bias), target, reduction=reduction)).backward()
    assert rel_err(out, ref) < 1e-12 and rel_err(h.grad, h_ref.grad) < 1e-12
    assert weight.grad is None and bias.grad is None


def test_compiles_fullgraph():
    (hidden, weight, bias), target = _case(10, 8, 37, dtype=torch.float32)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    fn = torch.compile(lambda h, w, b: kiln.ops.linear_cross_entropy(h, w, target, linear_bias=b, chunk_rows=4), fullgraph=True)
    fn(*params).backward()
    refs = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    F.cross_entropy(F.linear(*refs), target).backward()
    for a, b_ in zip(params, refs):
        assert rel_err(a.grad, b_.grad) < BOUND[torch.float32]


def test_leading_dims():
    (hidden, weight, bias), target = _case(6, 5, 11)
    hidden, target = hidden.reshape(2, 3, 5), target.reshape(2, 3)
    out = kiln.ops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, reduction="none", chunk_rows=2)
    ref = F.cross_entropy(F.linear(hidden, weight, bias).reshape(6, 11), target.reshape(6), reduction="none")
    assert out.shape == (2, 3) and rel_err(out.reshape(6), ref) < 1e-12


def test_bad_input_names_shapes():
    (hidden, weight, bias), target = _case(4, 5, 11)
    with pytest.raises(ValueError, match=r"input \(4, 5\) vs linear_weight \(11, 6\)"):
        kiln.ops.linear_cross_entropy(hidden, torch.randn(11, 6, dtype=torch.float64), target)
    with pytest.raises(ValueError, match=r"target value 11 is out of range for 11 classes"):
        kiln.ops.linear_cross_entropy(hidden, weight, torch.tensor([0, 11, 2, 3]))
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match input \(4, 5\)"):
        kiln.ops.linear_cross_entropy(hidden, weight, target[:3])
    with pytest.raises(ValueError, match=r"linear_bias must have shape \(11,\) .*got \(10,\)"):
        kiln.ops.linear_cross_entropy(hidden, weight, target, linear_bias=bias[:10])
    with pytest.raises(ValueError, match=r"weight must have shape \(11,\) .*got \(11, 5\)"):
        kiln.ops.linear_cross_entropy(hidden, weight, target, weight=weight)
    probabilities = torch.rand(4, 11, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ignore_index \(-100\) cannot be given when target \(4, 11\) holds "
                                         r"class probabilities"):
        kiln.ops.linear_cross_entropy(hidden, weight, probabilities, ignore_index=-100)
    with pytest.raises(ValueError, match=r"target \(4, 11\) requires grad.*detach it"):
        kiln.ops.linear_cross_entropy(hidden, weight, probabilities.requires_grad_())
    with pytest.raises(TypeError, match=r"got both linear_bias and bias"):
        kiln.ops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, bias=bias)


# --- torch's F.linear_cross_entropy (torch >= 2.13) ---------------------------------------

_HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(not _HAS_TORCH_LCE, reason=f"torch {torch.__version__} has no "
                                     "F.linear_cross_entropy (added in 2.13)")


def _against_torch(backend, n, h, v, dtype=torch.float64, soft=False, weighted=True, bias=True, chunk_rows=7,
                   device="cpu", **kwargs):
    """kiln.ops.linear_cross_entropy vs F.linear_cross_entropy in float64, same arguments:
    loss, dinput, dlinear_weight, dlinear_bias."""
    (hidden, weight, b), target = _case(n, h, v, dtype, ignore_every=0 if soft else 4, device=device)
    class_weight = (torch.rand(v, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5)
    if soft:
        target = torch.randn(n, v, generator=torch.Generator().manual_seed(5), dtype=torch.float64).softmax(1)
    ours = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    theirs = [t.detach().cpu().double().clone().requires_grad_() for t in ours]
    kw = dict(kwargs, weight=class_weight if weighted else None)
    with kiln.backend.use(backend):
        out = kiln.ops.linear_cross_entropy(
            ours[0], ours[1], target.to(device=device, dtype=dtype) if soft else target,
            linear_bias=ours[2] if bias else None, chunk_rows=chunk_rows,
            **{k: (t.to(device=device, dtype=dtype) if isinstance(t, torch.Tensor) else t) for k, t in kw.items()})
    ref = F.linear_cross_entropy(theirs[0], theirs[1], target.cpu(), linear_bias=theirs[2] if bias else None, **kw)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out.backward(g.to(device=device, dtype=out.dtype))
    ref.backward(g)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < BOUND[dtype], "loss"
    for name, a, b_ in zip(("dinput", "dlinear_weight", "dlinear_bias"), ours, theirs):
        assert rel_err(a.grad, b_.grad) < BOUND[dtype], name


@needs_torch_lce
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_matches_torch_linear_cross_entropy(backend, reduction, soft):
    _against_torch(backend, 23, 16, 301, soft=soft, reduction=reduction, label_smoothing=0.1)


@needs_torch_lce
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_matches_torch_triton_interpreted(soft):
    _against_torch("triton", 9, 8, 50, dtype=torch.float32, soft=soft, chunk_rows=4, label_smoothing=0.1)


@needs_torch_lce
def test_defaults_unbatched_and_options():
    from torch.nn import LinearCrossEntropyOptions

    _against_torch("cpu", 12, 6, 29, weighted=False, bias=False)  # ignore_index None means -100
    _against_torch("cpu", 12, 6, 29, chunk_rows=None, options=LinearCrossEntropyOptions(batch_chunk_size=5))
    (hidden, weight, bias), target = _case(1, 6, 29)
    out = kiln.ops.linear_cross_entropy(hidden[0], weight, target[0], linear_bias=bias)
    ref = F.linear_cross_entropy(hidden[0], weight, target[0], linear_bias=bias)
    assert out.shape == ref.shape == () and rel_err(out, ref) < 1e-12


@needs_torch_lce
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_k_dimensional_loss_as_torch(soft):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = (torch.randn(4, 7, 2, 3, generator=g, dtype=torch.float64).softmax(1) if soft
              else torch.randint(0, 7, (4, 2, 3), generator=g))
    outs = [fn(hidden, weight, target, linear_bias=bias, label_smoothing=0.1)
            for fn in (kiln.ops.linear_cross_entropy, F.linear_cross_entropy)]
    grads = [torch.autograd.grad(o, (hidden, weight, bias)) for o in outs]
    assert rel_err(outs[0], outs[1]) < 1e-12
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-12


@needs_torch_lce
def test_signature_takes_torchs_arguments():
    import inspect

    ours = inspect.signature(kiln.ops.linear_cross_entropy).parameters
    theirs = inspect.signature(F.linear_cross_entropy).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name
    # kiln's extras are keyword-only, so no torch call means anything else here
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in list(ours)[len(theirs):])


def test_former_bias_keyword_still_works():
    (hidden, weight, bias), target = _case(5, 4, 9)
    out = kiln.ops.linear_cross_entropy(hidden, weight, target, bias=bias)
    assert rel_err(out, F.cross_entropy(F.linear(hidden, weight, bias), target)) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_double_backward_is_refused_by_name(reduction):
    (hidden, weight, bias), target = _case(5, 4, 9)
    h = hidden.clone().requires_grad_()
    out = kiln.ops.linear_cross_entropy(h, weight, target, reduction=reduction)
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy: double backward \(create_graph=True\)"):
        torch.autograd.grad(out, h, create_graph=True)
    out = kiln.ops.linear_cross_entropy(h, weight, target, reduction="none")
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy: double backward"):
        torch.autograd.grad(out.sum(), h, create_graph=True)


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows_give_what_torch_gives(reduction, soft):
    hidden = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(0, 9, dtype=torch.float64) if soft else torch.zeros(0, dtype=torch.long)
    out = kiln.ops.linear_cross_entropy(hidden, weight, target, reduction=reduction)
    ref = F.cross_entropy(F.linear(hidden, weight), target, reduction=reduction)
    assert out.shape == ref.shape and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.detach().nan_to_num(), ref.detach().nan_to_num())
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros(0, 4, dtype=torch.float64))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_autocast_runs_the_linear_low_and_returns_float32():
    (hidden, weight, bias), target = _case(12, 8, 40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kiln.ops.linear_cross_entropy(hidden, weight, target, linear_bias=bias)
        ref = F.cross_entropy(F.linear(hidden, weight, bias), target)
    assert out.dtype == ref.dtype == torch.float32
    assert rel_err(out, ref) < BOUND[torch.bfloat16]


_PEAK_SCRIPT = """
    import sys, torch, torch.nn.functional as F
    import kiln
    which, N = sys.argv[1], int(sys.argv[2])
    H, V = 64, 32000
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 8).requires_grad_()
    target = torch.randint(0, V, (N,), generator=g)
    kiln.ops.linear_cross_entropy(hidden[:8], weight, target[:8], chunk_rows=4).backward()  # compile numba first
    reset_peak()
    if which == "kiln":
        loss = kiln.ops.linear_cross_entropy(hidden, weight, target, chunk_rows=128)
    else:
        loss = F.cross_entropy(F.linear(hidden, weight), target)
    loss.backward()
    print(peak_growth())
"""


def _peak_extra_bytes(which, n):
    return extra_peak_bytes(_PEAK_SCRIPT, which, n)


@needs_peak_reset
def test_peak_memory_grows_with_the_chunk_not_with_the_rows():
    logits_bytes = lambda n: n * 32000 * 4
    kiln_small, kiln_large = _peak_extra_bytes("kiln", 1024), _peak_extra_bytes("kiln", 4096)
    torch_large = _peak_extra_bytes("torch", 4096)
    assert torch_large > logits_bytes(4096)  # torch materializes the (N, V) logits (and more)
    # 4x the rows, same chunks: kiln's peak stays put (its temporaries are chunk-sized:
    # logits and dlogits of 128 x 32000, dW), well below one set of full logits.
    assert kiln_large < 1.25 * kiln_small + (4 << 20), (kiln_small, kiln_large)
    assert kiln_large < logits_bytes(4096) / 3, (kiln_large, torch_large)


# --- GPU (torch 2.11 there: the oracle is F.cross_entropy of F.linear, which every torch has) ----


def _composite(input, linear_weight, target, *, linear_bias=None, weight=None, ignore_index=None, **kwargs):
    ignore_index = -100 if ignore_index is None else ignore_index
    return F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight=weight,
                           ignore_index=ignore_index, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_forms_match_torch(backend, reduction, soft, monkeypatch):
    monkeypatch.setattr(F, "linear_cross_entropy", _composite, raising=False)
    _against_torch(backend, 300, 64, 5003, dtype=torch.float32, soft=soft, chunk_rows=128, device="cuda",
                   reduction=reduction, label_smoothing=0.1)
