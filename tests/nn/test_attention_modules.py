"""kiln.nn.MultiheadAttention and the Transformer layers against torch's, float64, same state_dict:
outputs, attention weights, and the gradients of the inputs, the float masks and every parameter."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.numerics import BOUND, rel_err

TOL = BOUND[torch.float64]
E, H = 16, 4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64)


def _twin(kiln_cls, torch_cls, *args, **kwargs):
    """(ours, theirs): the torch module with random parameters, kiln's loaded from its state_dict."""
    theirs = torch_cls(*args, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for i, p in enumerate(theirs.parameters()):
            p.copy_(_randn(*p.shape, seed=100 + i) * 0.3 + (1.0 if p.dim() == 1 and "norm" in str(i) else 0.0))
    ours = kiln_cls(*args, dtype=torch.float64, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _bool_mask(shape, seed, p=0.3):
    m = torch.rand(shape, generator=_gen(seed)) < p
    m[..., 0] = False  # every query keeps a key: torch's need_weights path gives NaN otherwise
    return m


def _float_mask(shape, seed):
    return _randn(*shape, seed=seed).masked_fill(_bool_mask(shape, seed + 1), -math.inf)


def _run(module, tensors, call):
    """call(module, *leaves) with fresh leaves; returns (outputs, leaf grads, parameter grads)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point() and t.requires_grad) for t in tensors]
    module.zero_grad()
    outs = call(module, *leaves)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    sum(o.square().sum() for o in outs).backward()
    return outs, [t.grad for t in leaves if t.requires_grad], {n: p.grad for n, p in module.named_parameters()}


def _compare(ours, theirs, tensors, call_ours, call_theirs=None):
    got = _run(ours, tensors, call_ours)
    want = _run(theirs, tensors, call_theirs or call_ours)
    assert len(got[0]) == len(want[0])
    for a, b in zip(got[0], want[0]):
        assert a.shape == b.shape and rel_err(a, b) < TOL, "output"
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert rel_err(a, b) < TOL, f"grad of input {i}"
    for name, g in want[2].items():
        assert g is not None, name
        assert rel_err(got[2][name], g) < TOL, f"grad of {name}"


# --- MultiheadAttention ------------------------------------------------------------------

B, L, S = 3, 7, 9


def _case(name):
    """(constructor kwargs, self-attention?, forward kwargs builder (seed) -> dict of masks etc.)"""
    cases = {
        "plain": ({}, True, lambda: {"need_weights": False}),
        "weights_avg_bool_mask": ({}, True, lambda: {"attn_mask": _bool_mask((L, L), 1)}),
        "weights_per_head_float3d": ({}, True, lambda: {"attn_mask": _float_mask((B * H, L, L), 2),
                                                        "average_attn_weights": False}),
        "bool_mask_2d": ({}, True, lambda: {"attn_mask": _bool_mask((L, L), 3), "need_weights": False}),
        "float_mask_3d_grad": ({}, True, lambda: {"attn_mask": _float_mask((B * H, L, L), 4).requires_grad_(),
                                                  "need_weights": False}),
        "bool_padding": ({}, True, lambda: {"key_padding_mask": _bool_mask((B, L), 5), "need_weights": False}),
        "float_padding_and_mask": ({}, True, lambda: {"key_padding_mask": _float_mask((B, L), 6),
                                                      "attn_mask": _bool_mask((L, L), 7), "need_weights": False}),
        "causal_hint_padding": ({}, True, lambda: {
            "attn_mask": torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64),
            "is_causal": True, "key_padding_mask": _bool_mask((B, L), 8), "need_weights": False}),
        "causal_hint": ({}, True, lambda: {"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1),
                                           "is_causal": True, "need_weights": False}),
        "cross_kdim_vdim": ({"kdim": 6, "vdim": 5}, False, lambda: {
            "attn_mask": _float_mask((L, S), 9), "key_padding_mask": _bool_mask((B, S), 10),
            "need_weights": False}),
        "cross_weights": ({}, False, lambda: {"key_padding_mask": _bool_mask((B, S), 11)}),
        "bias_kv": ({"add_bias_kv": True}, True, lambda: {
            "attn_mask": _bool_mask((L, L), 12), "key_padding_mask": _bool_mask((B, L), 13), "need_weights": False}),
        "zero_attn": ({"add_zero_attn": True}, False, lambda: {
            "attn_mask": _float_mask((B * H, L, S), 14), "key_padding_mask": _float_mask((B, S), 15),
            "need_weights": False}),
        "bias_kv_zero_attn_weights": ({"add_bias_kv": True, "add_zero_attn": True}, False, lambda: {
            "attn_mask": _bool_mask((L, S), 16), "key_padding_mask": _bool_mask((B, S), 17),
            "average_attn_weights": False}),
        "no_bias": ({"bias": False}, True, lambda: {"key_padding_mask": _bool_mask((B, L), 18),
                                                    "need_weights": False}),
    }
    return cases[name]


CASES = ["plain", "weights_avg_bool_mask", "weights_per_head_float3d", "bool_mask_2d", "float_mask_3d_grad",
         "bool_padding", "float_padding_and_mask", "causal_hint_padding", "causal_hint", "cross_kdim_vdim",
         "cross_weights", "bias_kv", "zero_attn", "bias_kv_zero_attn_weights", "no_bias"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_mha_matches_torch(batch_first, case):
    ctor, self_attention, forward_kwargs = _case(case)
    ours, theirs = _twin(kiln.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, batch_first=batch_first,
                         **ctor)
    kw = forward_kwargs()
    masks = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}
    flags = {n: t for n, t in kw.items() if not isinstance(t, torch.Tensor)}
    lay = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1).contiguous())
    x = lay(_randn(B, L, E, seed=20)).requires_grad_()
    if self_attention:
        tensors = [x, *masks.values()]
        call = lambda m, x, *ms: m(x, x, x, **dict(zip(masks, ms)), **flags)
    else:
        key = lay(_randn(B, S, ctor.get("kdim", E), seed=21)).requires_grad_()
        value = lay(_randn(B, S, ctor.get("vdim", E), seed=22)).requires_grad_()
        tensors = [x, key, value, *masks.values()]
        call = lambda m, q, k, v, *ms: m(q, k, v, **dict(zip(masks, ms)), **flags)
    _compare(ours, theirs, tensors, call)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_unbatched(need_weights):
    ours, theirs = _twin(kiln.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, add_bias_kv=True)
    x = _randn(L, E, seed=1).requires_grad_()
    tensors = [x, _bool_mask((L,), 2), _float_mask((H, L, L), 3)]
    call = lambda m, x, kpm, mask: m(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights,
                                     average_attn_weights=False)
    _compare(ours, theirs, tensors, call)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_fully_masked_row_is_zero(need_weights):
    """torch: 0 on its SDPA path (need_weights=False), NaN with need_weights=True; kiln: 0 on both."""
    ours, theirs = _twin(kiln.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, batch_first=True)
    x = _randn(B, L, E, seed=1)
    kpm = _bool_mask((B, L), 2)
    kpm[1] = True
    out, weights = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    ref, _ = theirs(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    assert torch.isfinite(out).all()
    assert rel_err(out[1], theirs.out_proj.bias.expand(L, E)) < TOL  # attention 0: out_proj's bias alone
    assert rel_err(out[[0, 2]], ref[[0, 2]]) < TOL
    if need_weights:
        assert torch.isnan(ref[1]).all() and torch.equal(weights[1], torch.zeros_like(weights[1]))
    else:
        assert rel_err(out, ref) < TOL


def test_mha_dropout_in_training_is_torchs_dropout_and_eval_ignores_it():
    ours, theirs = _twin(kiln.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, dropout=0.4)
    x = _randn(L, B, E, seed=1)
    mask = _bool_mask((L, L), 2)
    # need_weights=True: torch's slow path drops the (B*H, L, S) probabilities with F.dropout, as kiln
    torch.manual_seed(5)
    out, w = ours(x, x, x, attn_mask=mask)
    torch.manual_seed(5)
    ref, w_ref = theirs(x, x, x, attn_mask=mask)
    assert rel_err(out, ref) < TOL and rel_err(w, w_ref) < TOL
    # need_weights=False: dropped (differs from the dropout-free output), right shape, mean preserved
    ours_eval = _twin(kiln.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, dropout=0.4)[0].eval()
    clean, _ = ours_eval(x, x, x, attn_mask=mask, need_weights=False)
    noisy, _ = ours(x, x, x, attn_mask=mask, need_weights=False)
    assert noisy.shape == clean.shape and not torch.allclose(noisy, clean)
    xs = x[:, :1].expand(L, 2000, E)
    mean = ours(xs, xs, xs, attn_mask=mask, need_weights=False)[0].mean(1)
    assert rel_err(mean, clean[:, 0]) < 0.05
    ours.eval()
    assert torch.equal(ours(x, x, x, attn_mask=mask, need_weights=False)[0], clean)


def _signature(f):
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]


@pytest.mark.parametrize("name", ["MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
                                  "TransformerEncoder", "TransformerDecoder"])
def test_signatures_are_torchs(name):
    ours, theirs = getattr(kiln.nn, name), getattr(torch.nn, name)
    assert _signature(ours.__init__) == _signature(theirs.__init__)
    assert _signature(ours.forward) == _signature(theirs.forward)


def test_mha_errors_name_the_argument():
    mha = kiln.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    with pytest.raises(RuntimeError, match="need attn_mask if specifying the is_causal hint"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask should have shape \(4, 4\), got \(4, 5\)"):
        mha(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask should have shape \(4, 4, 4\), got \(2, 4, 4\)"):
        mha(x, x, x, attn_mask=torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 4\).*got \(2, 5\)"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="only bool and floating types of attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"query's last dim must be embed_dim 8, got query \(2, 4, 6\)"):
        mha(torch.randn(2, 4, 6), x, x)


def test_mha_compiles_fullgraph_with_masks():
    torch._dynamo.reset()
    ours, _ = _twin(kiln.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, batch_first=True)
    x = _randn(B, L, E, seed=1).requires_grad_()
    kpm, mask = _bool_mask((B, L), 2), _float_mask((B * H, L, L), 3)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)

    def fn(x):
        a = ours(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)[0]
        b = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        c, w = ours(x, x, x, attn_mask=causal)
        return a.square().sum() + b.square().sum() + c.sum() + w.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)  # see the layers' test
    compiled.backward()
    grad = x.grad.clone()
    x.grad = None
    eager = fn(x)
    eager.backward()
    assert rel_err(compiled, eager) < TOL and rel_err(grad, x.grad) < TOL


# --- Transformer layers ------------------------------------------------------------------

D_MODEL, FF, T_SRC, T_TGT = 16, 24, 7, 6
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "F.gelu": F.gelu, "tanh_callable": torch.tanh}


def _layer_twins(kind, batch_first, norm_first, activation, bias=True):
    cls = {"encoder": "TransformerEncoderLayer", "decoder": "TransformerDecoderLayer"}[kind]
    return _twin(getattr(kiln.nn, cls), getattr(torch.nn, cls), D_MODEL, H, FF, dropout=0.0,
                 activation=ACTIVATIONS[activation], batch_first=batch_first, norm_first=norm_first, bias=bias)


def _seq(T, batch_first, seed):
    x = _randn(B, T, D_MODEL, seed=seed)
    return (x if batch_first else x.transpose(0, 1).contiguous()).requires_grad_()


def _encoder_inputs(batch_first, causal=False):
    src = _seq(T_SRC, batch_first, 1)
    if causal:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T_SRC, dtype=torch.float64)
    else:
        mask = _float_mask((T_SRC, T_SRC), 2)
    return [src, mask, _bool_mask((B, T_SRC), 3)]


def _decoder_inputs(batch_first):
    tgt, memory = _seq(T_TGT, batch_first, 1), _seq(T_SRC, batch_first, 2)
    tgt_mask = torch.ones(T_TGT, T_TGT, dtype=torch.bool).triu(1)
    return [tgt, memory, tgt_mask, _float_mask((T_TGT, T_SRC), 3), _bool_mask((B, T_TGT), 4),
            _bool_mask((B, T_SRC), 5)]


def _encode(m, src, mask, kpm, causal=False):
    return m(src, src_mask=mask, src_key_padding_mask=kpm, is_causal=causal)


def _decode(m, tgt, memory, tgt_mask, memory_mask, tgt_kpm, memory_kpm):
    return m(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_kpm,
             memory_key_padding_mask=memory_kpm, tgt_is_causal=True)


# (batch_first, norm_first, activation): each value of each argument, not their product (time)
ENCODER_CASES = [(False, False, "relu"), (True, True, "relu"), (False, True, "gelu"), (True, False, "gelu"),
                 (True, False, "F.gelu"), (False, True, "tanh_callable")]
DECODER_CASES = [(False, False, "relu"), (True, True, "gelu"), (True, False, "tanh_callable"),
                 (False, True, "relu")]


@pytest.mark.parametrize("batch_first,norm_first,activation", ENCODER_CASES, ids=str)
def test_encoder_layer_trains_as_torch(batch_first, norm_first, activation):
    ours, theirs = _layer_twins("encoder", batch_first, norm_first, activation)
    causal = activation == "relu"
    _compare(ours, theirs, _encoder_inputs(batch_first, causal), lambda m, *a: _encode(m, *a, causal=causal))


@pytest.mark.parametrize("batch_first,norm_first,activation", DECODER_CASES, ids=str)
def test_decoder_layer_trains_as_torch(batch_first, norm_first, activation):
    ours, theirs = _layer_twins("decoder", batch_first, norm_first, activation)
    _compare(ours, theirs, _decoder_inputs(batch_first), _decode)


def test_layers_without_bias():
    ours, theirs = _layer_twins("encoder", True, True, "gelu", bias=False)
    _compare(ours, theirs, _encoder_inputs(True), _encode)
    ours, theirs = _layer_twins("decoder", True, False, "relu", bias=False)
    _compare(ours, theirs, _decoder_inputs(True), _decode)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_layers_in_eval_under_no_grad_run_kiln_and_match_torch(kind, monkeypatch):
    """torch takes its fused fast path here; kiln has none and still runs kiln.ops.attention.
    The oracle is torch's eval output on its slow path (grad enabled): its fast path returns
    NaN everywhere for these float masks in float64 (torch 2.13)."""
    ours, theirs = _layer_twins(kind, True, False, "relu")
    ours.eval(), theirs.eval()
    calls = []
    real = kiln.ops.attention
    monkeypatch.setattr(kiln.ops, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = _encoder_inputs(True) if kind == "encoder" else _decoder_inputs(True)
    call = _encode if kind == "encoder" else _decode
    with torch.no_grad():
        out = call(ours, *inputs)
    ref = call(theirs, *inputs)
    assert calls and rel_err(out, ref) < TOL


def test_layer_dropout_is_active_in_training_only():
    layer = kiln.nn.TransformerEncoderLayer(D_MODEL, H, FF, dropout=0.5, batch_first=True, dtype=torch.float64)
    src = _randn(B, T_SRC, D_MODEL, seed=1)
    torch.manual_seed(0)
    a = layer(src)
    b = layer(src)
    assert not torch.allclose(a, b)
    layer.eval()
    assert torch.equal(layer(src), layer(src))


def test_stacks_match_torch():
    enc_layer, _ = _layer_twins("encoder", True, False, "gelu")
    ours = kiln.nn.TransformerEncoder(enc_layer, 2, norm=kiln.nn.LayerNorm(D_MODEL, dtype=torch.float64))
    theirs = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D_MODEL, H, FF, dropout=0.0, activation="gelu", batch_first=True,
                                         dtype=torch.float64),
        2, norm=torch.nn.LayerNorm(D_MODEL, dtype=torch.float64), enable_nested_tensor=False)
    with torch.no_grad():
        for i, p in enumerate(theirs.parameters()):
            p.copy_(_randn(*p.shape, seed=300 + i) * 0.3)
    ours.load_state_dict(theirs.state_dict())
    _compare(ours, theirs, _encoder_inputs(True, causal=True),
             lambda m, src, mask, kpm: m(src, mask=mask, src_key_padding_mask=kpm))

    dec_layer, _ = _layer_twins("decoder", False, True, "relu")
    ours = kiln.nn.TransformerDecoder(dec_layer, 2)
    theirs = torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(D_MODEL, H, FF, dropout=0.0, norm_first=True, dtype=torch.float64), 2)
    with torch.no_grad():
        for i, p in enumerate(theirs.parameters()):
            p.copy_(_randn(*p.shape, seed=400 + i) * 0.3)
    ours.load_state_dict(theirs.state_dict())
    _compare(ours, theirs, _decoder_inputs(False), _decode)


def test_layers_compile_fullgraph_with_masks():
    torch._dynamo.reset()
    enc, _ = _layer_twins("encoder", True, False, "relu")
    dec, _ = _layer_twins("decoder", True, True, "gelu")
    src, mask, kpm = _encoder_inputs(True)
    tgt, memory, *dec_masks = _decoder_inputs(True)

    def fn(src, tgt):
        memory = _encode(enc, src, mask, kpm)
        return _decode(dec, tgt, memory, *dec_masks).square().sum()

    # aot_eager: the whole forward and backward traced (fullgraph) without inductor's codegen, which
    # takes minutes on a 2-core machine; kiln.ops.attention's own test compiles with inductor
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(src, tgt)
    compiled.backward()
    grads = [src.grad.clone(), tgt.grad.clone()]
    src.grad = tgt.grad = None
    eager = fn(src, tgt)
    eager.backward()
    assert rel_err(compiled, eager) < TOL
    assert rel_err(grads[0], src.grad) < TOL and rel_err(grads[1], tgt.grad) < TOL
