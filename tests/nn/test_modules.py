import inspect
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
                                          ("BatchNorm2d", (3, 5, 6, 4)), ("BatchNorm3d", (2, 5, 3, 4, 2))],
                         ids=str)
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


def test_batch_norm3d_rejects_a_wrong_rank():
    with pytest.raises(ValueError, match="expected 5D input"):
        kiln.nn.BatchNorm3d(3)(torch.randn(2, 3, 4, 4))


# --- torch's signatures, zero-size, torch.compile, double backward (linear and norms) ----

NAMED_LIKE_TORCH = ["Linear", "LayerNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", NAMED_LIKE_TORCH)
@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_signature_is_torchs(name, method):
    """torch's arguments (names, kinds, defaults) in torch's order; kiln's extras only after
    them, keyword-only with defaults (Linear's activation)."""
    ours = _parameters(getattr(getattr(kiln.nn, name), method))
    theirs = _parameters(getattr(getattr(torch.nn, name), method))
    assert ours[:len(theirs)] == theirs
    for extra_name, kind, default in ours[len(theirs):]:
        assert kind is inspect.Parameter.KEYWORD_ONLY and default is not inspect.Parameter.empty, extra_name


@pytest.mark.parametrize("name,args,shape", [("Linear", (6, 4), (3, 6)), ("LayerNorm", (6,), (3, 6)),
                                             ("BatchNorm1d", (6,), (3, 6)),
                                             ("BatchNorm2d", (6,), (2, 6, 2, 2)),
                                             ("BatchNorm3d", (6,), (2, 6, 2, 1, 2))])
def test_forward_takes_input_by_keyword(name, args, shape):
    ours, theirs = getattr(kiln.nn, name)(*args).double(), getattr(torch.nn, name)(*args).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    assert rel_err(ours(input=x), theirs(input=x)) < 1e-12


def test_linear_activation_is_keyword_only_after_torchs_arguments():
    layer = kiln.nn.Linear(3, 2, True, None, torch.float64, activation="tanh")
    assert layer.weight.dtype == torch.float64 and layer.activation == "tanh"
    with pytest.raises(RuntimeError, match="device string: tanh"):
        kiln.nn.Linear(3, 2, True, "tanh")  # the 4th positional is torch's device


def _twins(name, *args, **kwargs):
    theirs = getattr(torch.nn, name)(*args, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = getattr(kiln.nn, name)(*args, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _run_both(ours, theirs, x):
    """Forward and backward of both modules on copies of x; (output, x grad) each."""
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = module(xi)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)).sum().backward()
        results.append((y, xi.grad))
    return results


def _assert_same_grads_and_buffers(ours, theirs):
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert a.grad is not None and a.grad.shape == b.grad.shape, name
        assert torch.equal(a.grad, b.grad) if a.grad.numel() == 0 or not b.grad.any() else \
            rel_err(a.grad, b.grad) < 1e-12, name
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("sizes,lead", [((8, 0), (3,)), ((0, 4), (3,)), ((5, 4), (0,)), ((0, 0), (2,)),
                                        ((5, 4), (2, 0))], ids=str)
def test_linear_zero_size_as_torch(sizes, lead):
    """Linear(8, 0), Linear(0, 4) (output: the bias broadcast), an empty batch: torch's
    output and gradients (zeros, or dy summed for the bias)."""
    ours, theirs = _twins("Linear", *sizes)
    (y, dx), (ref, ref_dx) = _run_both(ours, theirs, torch.randn(*lead, sizes[0], dtype=torch.float64))
    assert y.shape == ref.shape and torch.equal(y, ref)
    assert dx.shape == ref_dx.shape and torch.equal(dx, ref_dx)
    _assert_same_grads_and_buffers(ours, theirs)


def test_layer_norm_empty_batch_has_torchs_zero_parameter_grads():
    ours, theirs = _twins("LayerNorm", (3, 4))
    (y, dx), (ref, ref_dx) = _run_both(ours, theirs, torch.randn(0, 5, 3, 4, dtype=torch.float64))
    assert y.shape == ref.shape and dx.shape == ref_dx.shape
    assert torch.equal(ours.weight.grad, torch.zeros(3, 4, dtype=torch.float64))
    _assert_same_grads_and_buffers(ours, theirs)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (0, 4)), ("BatchNorm1d", (0, 4, 3)),
                                        ("BatchNorm2d", (0, 4, 2, 2)), ("BatchNorm3d", (0, 4, 1, 2, 2))],
                         ids=str)
def test_batch_norm_empty_batch_as_torch(name, shape, train):
    """torch: an empty result in train and eval, zero parameter gradients, the running
    statistics untouched, num_batches_tracked still counted in training."""
    ours, theirs = _twins(name, 4)
    ours.train(train), theirs.train(train)
    (y, dx), (ref, ref_dx) = _run_both(ours, theirs, torch.randn(shape, dtype=torch.float64))
    assert y.shape == ref.shape and dx.shape == ref_dx.shape
    _assert_same_grads_and_buffers(ours, theirs)
    assert int(ours.num_batches_tracked) == (1 if train else 0)


def test_batch_norm_one_value_per_channel_in_training_errs_as_torch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        kiln.nn.BatchNorm1d(3)(torch.randn(1, 3))


@pytest.mark.parametrize("name,args,kwargs,shape", [
    ("Linear", (6, 5), {}, (4, 3, 6)),
    ("LayerNorm", ((3, 5),), {}, (4, 3, 5)),
    ("LayerNorm", (5,), {"elementwise_affine": False}, (4, 3, 5)),
    ("BatchNorm1d", (5,), {}, (4, 5, 3)),
    ("BatchNorm2d", (5,), {"momentum": None}, (3, 5, 2, 3)),
    ("BatchNorm3d", (5,), {}, (2, 5, 2, 2, 3)),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(name, args, kwargs, shape, train):
    """The compiled module (its buffers updated in place) against the same module eager."""
    torch._dynamo.reset()
    compiled_module, eager_module = _twins(name, *args, **kwargs)
    eager_module = getattr(kiln.nn, name)(*args, dtype=torch.float64, **kwargs)
    eager_module.load_state_dict(compiled_module.state_dict())
    compiled_module.train(train), eager_module.train(train)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with kiln.backend.use("cpu"):
        for _ in range(2):  # twice: the running statistics move between the steps
            (y, dx), (ref, ref_dx) = _run_both(compiled, eager_module, x)
            assert rel_err(y, ref) < 1e-12 and rel_err(dx, ref_dx) < 1e-12
    for (pname, a), b in zip(compiled_module.named_parameters(), eager_module.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-12, pname
    for (bname, a), b in zip(compiled_module.named_buffers(), eager_module.buffers()):
        assert rel_err(a, b) < 1e-12, bname


def test_gradient_norm_penalty_matches_torch_modules():
    """loss + ||dloss/dtheta||^2, then backward (a gradient penalty needs the double
    backward of every layer): the kiln network against the same torch modules."""
    torch_act = {"gelu": torch.nn.GELU(), "tanh": torch.nn.Tanh(), "silu": torch.nn.SiLU()}
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 16), torch_act["gelu"], torch.nn.LayerNorm(16),
                                 torch.nn.Linear(16, 8), torch_act["tanh"], torch.nn.BatchNorm1d(8),
                                 torch.nn.Linear(8, 8), torch_act["silu"], torch.nn.Linear(8, 1)).double()
    ours = torch.nn.Sequential(kiln.nn.Linear(6, 16, activation="gelu"), kiln.nn.LayerNorm(16),
                               kiln.nn.Linear(16, 8, activation="tanh"), kiln.nn.BatchNorm1d(8),
                               kiln.nn.Linear(8, 8, activation="silu"), kiln.nn.Linear(8, 1)).double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(std=0.5)
    stateful = [m for m in theirs if list(m.state_dict())]
    for layer, twin in zip(ours, stateful):
        layer.load_state_dict(twin.state_dict())
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randn(10, 1, generator=g, dtype=torch.float64)
    losses = []
    for model in (ours, theirs):
        with kiln.backend.use("cpu"):
            loss = torch.nn.functional.mse_loss(model(x), target)
            grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
            total = loss + sum(gr.square().sum() for gr in grads)
            total.backward()
        losses.append(total)
    assert rel_err(losses[0], losses[1]) < 1e-12
    ours_params = list(ours.parameters())
    theirs_params = list(theirs.parameters())
    assert len(ours_params) == len(theirs_params)
    for a, b in zip(ours_params, theirs_params):
        assert rel_err(a.grad, b.grad) < 1e-10


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
