import math

import pytest
import torch

import kiln
from tests.numerics import rel_err


def test_linear_loads_a_torch_state_dict_and_matches():
    torch_linear = torch.nn.Linear(13, 7).double()
    ours = kiln.nn.Linear(13, 7).double()
    assert ours.state_dict().keys() == torch_linear.state_dict().keys()
    ours.load_state_dict(torch_linear.state_dict())
    x = torch.randn(4, 3, 13, dtype=torch.float64)
    assert rel_err(ours(x), torch_linear(x)) < 1e-12


def test_linear_without_bias_has_torch_keys():
    assert kiln.nn.Linear(3, 2, bias=False).state_dict().keys() == \
        torch.nn.Linear(3, 2, bias=False).state_dict().keys()


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_mlp_matches_the_torch_stack(activation):
    torch_act = {"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "gelu": torch.nn.GELU()}[activation]
    reference = torch.nn.Sequential(torch.nn.Linear(10, 32), torch_act,
                                    torch.nn.Linear(32, 32), torch_act,
                                    torch.nn.Linear(32, 3)).double()
    mlp = kiln.nn.MLP([10, 32, 32, 3], activation=activation).double()
    # Same layer order, so torch's numbered keys map one to one onto the kiln layers.
    linear_states = [m.state_dict() for m in reference if isinstance(m, torch.nn.Linear)]
    for layer, state in zip(mlp, linear_states):
        layer.load_state_dict(state)
    x = torch.randn(8, 10, dtype=torch.float64)
    out, want = mlp(x), reference(x)
    out.sum().backward()
    want.sum().backward()
    assert rel_err(out, want) < 1e-12
    ref_linears = [m for m in reference if isinstance(m, torch.nn.Linear)]
    for ours, theirs in zip(mlp, ref_linears):
        assert rel_err(ours.weight.grad, theirs.weight.grad) < 1e-12
        assert rel_err(ours.bias.grad, theirs.bias.grad) < 1e-12


def test_mlp_needs_two_sizes():
    with pytest.raises(ValueError, match=r"at least \(in, out\) sizes, got \[4\]"):
        kiln.nn.MLP([4])


def test_cross_entropy_loss_module_matches_torch_and_its_state_dict():
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    ours = kiln.nn.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(7, 5, dtype=torch.float64)
    t = torch.randint(0, 5, (7,))
    assert rel_err(ours(x, t), theirs(x, t)) < 1e-12


def test_linear_cross_entropy_loss_is_a_linear_head():
    head = torch.nn.Linear(6, 13).double()
    ours = kiln.nn.LinearCrossEntropyLoss(6, 13, label_smoothing=0.1).double()
    assert ours.state_dict().keys() == head.state_dict().keys()
    ours.load_state_dict(head.state_dict())
    hidden = torch.randn(2, 4, 6, dtype=torch.float64)
    target = torch.randint(0, 13, (2, 4))
    want = torch.nn.functional.cross_entropy(head(hidden).reshape(8, 13), target.reshape(8),
                                             label_smoothing=0.1)
    assert rel_err(ours(hidden, target), want) < 1e-12
    assert rel_err(ours.logits(hidden), head(hidden)) < 1e-12


# --- normalization ---------------------------------------------------------------------


@pytest.mark.parametrize("shape,normalized", [((4, 6, 10), (10,)), ((3, 5, 4), (5, 4))], ids=str)
def test_layer_norm_loads_a_torch_state_dict_and_matches(shape, normalized):
    theirs = torch.nn.LayerNorm(normalized, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = kiln.nn.LayerNorm(normalized, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    assert rel_err(ours(x), theirs(x)) < 1e-12
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("module,shape", [("BatchNorm1d", (8, 5)), ("BatchNorm1d", (4, 5, 7)),
                                          ("BatchNorm2d", (3, 5, 6, 4))], ids=str)
def test_batch_norm_tracks_torch_through_train_and_eval(module, shape, momentum):
    theirs = getattr(torch.nn, module)(5, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = getattr(kiln.nn, module)(5, momentum=momentum, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
        assert rel_err(ours(x), theirs(x)) < 1e-12
    for name, buf in theirs.state_dict().items():
        assert rel_err(ours.state_dict()[name], buf) < 1e-12, name
    ours.eval(), theirs.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    assert rel_err(ours(x), theirs(x)) < 1e-12


def test_batch_norm_without_running_stats_uses_batch_stats_in_eval():
    theirs = torch.nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64).eval()
    ours = kiln.nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert rel_err(ours(x), theirs(x)) < 1e-12


def test_batch_norm_module_rejects_a_wrong_rank():
    with pytest.raises(ValueError, match="expected 4D input"):
        kiln.nn.BatchNorm2d(3)(torch.randn(2, 3, 4))


# --- attention -------------------------------------------------------------------------


def _torch_mha_twin(E, H, **kwargs):
    theirs = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(std=0.3)
    ours = kiln.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_self_attention_causal_and_padding_matches_torch(batch_first):
    ours, theirs = _torch_mha_twin(16, 4, batch_first=batch_first)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 11, 16) if batch_first else (11, 3, 16), generator=g, dtype=torch.float64)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[0, 8:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = ours(x_ours, x_ours, x_ours, key_padding_mask=pad, attn_mask=causal)
    ref, _ = theirs(x_theirs, x_theirs, x_theirs, key_padding_mask=pad, attn_mask=causal.isneginf(),
                    need_weights=False)
    assert rel_err(out, ref) < 1e-12
    out.square().sum().backward()
    ref.square().sum().backward()
    assert rel_err(x_ours.grad, x_theirs.grad) < 1e-12
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-12, name


def test_mha_cross_attention_with_other_kv_dims():
    ours, theirs = _torch_mha_twin(16, 2, kdim=6, vdim=5, batch_first=True)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 12, 6, generator=g, dtype=torch.float64), torch.randn(2, 12, 5, generator=g, dtype=torch.float64)
    out, _ = ours(q, k, v)
    ref, _ = theirs(q, k, v, need_weights=False)
    assert rel_err(out, ref) < 1e-12


def test_sinusoidal_encoding_is_the_notes_formula():
    pe = kiln.nn.SinusoidalPositionalEncoding(6, max_len=20)
    x = torch.zeros(2, 5, 6)
    out = pe(x, offset=3)
    for t in range(5):
        for i in range(3):
            angle = (t + 3) / 10000 ** (2 * i / 6)
            assert abs(out[1, t, 2 * i].item() - math.sin(angle)) < 1e-6
            assert abs(out[1, t, 2 * i + 1].item() - math.cos(angle)) < 1e-6
    assert list(pe.state_dict()) == []
    with pytest.raises(ValueError, match="exceed max_len 20"):
        pe(torch.zeros(1, 30, 6))


def test_learned_positional_embedding_adds_its_rows():
    pe = kiln.nn.LearnedPositionalEmbedding(10, 4)
    x = torch.randn(2, 3, 4)
    assert torch.equal(pe(x, offset=2), x + pe.weight[2:5])
