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
