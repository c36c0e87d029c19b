"""kiln.nn.CrossEntropyLoss and kiln.nn.LinearCrossEntropyLoss as drop-ins for torch's:
signatures, state_dicts, values and gradients in float64, torch.compile."""

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import kiln
from tests.numerics import BOUND, rel_err

_HAS_TORCH_LCE = hasattr(torch.nn, "LinearCrossEntropyLoss")
needs_torch_lce = pytest.mark.skipif(not _HAS_TORCH_LCE, reason=f"torch {torch.__version__} has no "
                                     "nn.LinearCrossEntropyLoss (added in 2.13)")


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _assert_same_parameters(ours, theirs):
    ours, theirs = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name


# --- CrossEntropyLoss --------------------------------------------------------------------


def test_cross_entropy_loss_signatures_are_torchs():
    _assert_same_parameters(kiln.nn.CrossEntropyLoss.__init__, torch.nn.CrossEntropyLoss.__init__)
    _assert_same_parameters(kiln.nn.CrossEntropyLoss.forward, torch.nn.CrossEntropyLoss.forward)


def _targets_for(shape, soft, seed=2):
    g = _generator(seed)
    if soft:
        return torch.randn(shape, generator=g, dtype=torch.float64).softmax(1 if len(shape) > 1 else 0)
    without_classes = shape[:1] + shape[2:] if len(shape) > 1 else ()
    return torch.randint(0, shape[1] if len(shape) > 1 else shape[0], without_classes, generator=g)


@pytest.mark.parametrize("shape", [(7, 5), (5,), (2, 5, 3, 4)], ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_matches_torch(reduction, soft, shape):
    weight = torch.rand(5, generator=_generator(1), dtype=torch.float64) + 0.5
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
    if not soft:
        kwargs["ignore_index"] = 2
    ours, theirs = kiln.nn.CrossEntropyLoss(**kwargs), torch.nn.CrossEntropyLoss(**kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(shape, generator=_generator(0), dtype=torch.float64, requires_grad=True)
    t = _targets_for(shape, soft)
    out, ref = ours(input=x, target=t), theirs(input=x, target=t)
    assert rel_err(out, ref) < BOUND[torch.float64]
    g = torch.randn(ref.shape, generator=_generator(3), dtype=torch.float64)
    (dx,) = torch.autograd.grad(out, x, g)
    (dx_ref,) = torch.autograd.grad(ref, x, g)
    assert rel_err(dx, dx_ref) < BOUND[torch.float64]


def test_cross_entropy_loss_deprecated_arguments_as_torch():
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (6,), generator=_generator(0))
    for size_average, reduce in [(False, None), (None, False)]:
        with pytest.warns(UserWarning):
            ours = kiln.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            theirs = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
        assert ours.reduction == theirs.reduction
        assert rel_err(ours(x, t), theirs(x, t)) < 1e-12


def test_cross_entropy_loss_loads_torchs_state_dict():
    theirs = torch.nn.CrossEntropyLoss(weight=torch.rand(5, dtype=torch.float64))
    ours = kiln.nn.CrossEntropyLoss(weight=torch.zeros(5, dtype=torch.float64))
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_cross_entropy_loss_compiles_fullgraph(soft):
    torch._dynamo.reset()
    module = kiln.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(6, 10, generator=_generator(0), dtype=torch.float64, requires_grad=True)
    t = _targets_for((6, 10), soft)
    out = torch.compile(module, fullgraph=True)(x, t)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(x, t)
    (dx,) = torch.autograd.grad(out, x)
    (dx_ref,) = torch.autograd.grad(ref, x)
    assert rel_err(out, ref) < 1e-12 and rel_err(dx, dx_ref) < 1e-12


# --- LinearCrossEntropyLoss ---------------------------------------------------------------


@needs_torch_lce
def test_linear_cross_entropy_loss_signatures_are_torchs():
    _assert_same_parameters(kiln.nn.LinearCrossEntropyLoss.__init__, torch.nn.LinearCrossEntropyLoss.__init__)
    _assert_same_parameters(kiln.nn.LinearCrossEntropyLoss.forward, torch.nn.LinearCrossEntropyLoss.forward)


_CONFIGS = [dict(), dict(bias=True), dict(bias=True, weight="class weights", label_smoothing=0.1),
            dict(out_features=(2, 3), bias=True), dict(reduction="none", ignore_index=1),
            dict(reduction="sum", weight="class weights")]


def _config(config, num_classes):
    config = dict(config)
    if config.get("weight") == "class weights":
        config["weight"] = torch.rand(num_classes, generator=_generator(7), dtype=torch.float64) + 0.5
    return config


@needs_torch_lce
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("config", _CONFIGS, ids=lambda c: ",".join(f"{k}" for k in c) or "defaults")
def test_linear_cross_entropy_loss_matches_torch_and_loads_its_state_dict(config, soft):
    in_features, num_classes = 6, 13
    config = _config(config, num_classes)
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(in_features, num_classes, dtype=torch.float64, **config)
    ours = kiln.nn.LinearCrossEntropyLoss(in_features, num_classes, dtype=torch.float64, **config)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    out_features = config.get("out_features", ())
    x = torch.randn(8, in_features, generator=_generator(1), dtype=torch.float64, requires_grad=True)
    t = _targets_for((8, num_classes, *out_features), soft)
    if soft and "ignore_index" in config:  # not allowed with class probabilities: both refuse
        with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):
            theirs(x, t)
        with pytest.raises(ValueError, match=r"ignore_index \(1\) cannot be given"):
            ours(x, t)
        return
    out, ref = ours(input=x, target=t), theirs(input=x, target=t)
    assert out.shape == ref.shape and rel_err(out, ref) < BOUND[torch.float64]
    g = torch.randn(ref.shape, generator=_generator(3), dtype=torch.float64)
    ours_grads = torch.autograd.grad(out, [x, *ours.linear.parameters()], g)
    theirs_grads = torch.autograd.grad(ref, [x, *theirs.linear.parameters()], g)
    for a, b in zip(ours_grads, theirs_grads):
        assert rel_err(a, b) < BOUND[torch.float64]


def test_linear_cross_entropy_loss_state_dict_keys_and_logits():
    module = kiln.nn.LinearCrossEntropyLoss(6, 13, out_features=(2,), bias=True,
                                            weight=torch.ones(13)).double()
    assert list(module.state_dict()) == ["weight", "linear.weight", "linear.bias"]
    assert module.linear.weight.shape == (26, 6)
    x = torch.randn(3, 6, dtype=torch.float64)
    logits = module.logits(x)
    assert logits.shape == (3, 13, 2)
    assert rel_err(logits, F.linear(x, module.linear.weight, module.linear.bias).reshape(3, 13, 2)) < 1e-12


def test_linear_cross_entropy_loss_bad_arguments_name_them():
    with pytest.raises(ValueError, match=r"weight must have shape \(13,\), got \(12,\)"):
        kiln.nn.LinearCrossEntropyLoss(6, 13, weight=torch.ones(12))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        kiln.nn.LinearCrossEntropyLoss(6, 13, label_smoothing=1.5)


def test_linear_cross_entropy_loss_compiles_fullgraph():
    torch._dynamo.reset()
    module = kiln.nn.LinearCrossEntropyLoss(8, 37, bias=True)
    x = torch.randn(10, 8, generator=_generator(0), requires_grad=True)
    t = torch.randint(0, 37, (10,), generator=_generator(1))
    out = torch.compile(module, fullgraph=True)(x, t)
    out.backward()
    ref = F.cross_entropy(F.linear(x.double(), module.linear.weight.double(), module.linear.bias.double()), t)
    assert rel_err(out, ref) < BOUND[torch.float32]


def test_modules_work_on_a_torch_without_linear_cross_entropy():
    """The GPU machine's torch 2.11 has neither nn.LinearCrossEntropyLoss nor
    F.linear_cross_entropy: kiln imports and runs without them (a fresh process where they
    are removed before kiln is imported)."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        for owner, name in ((torch.nn, "LinearCrossEntropyLoss"), (F, "linear_cross_entropy")):
            if hasattr(owner, name):
                delattr(owner, name)
        import kiln
        module = kiln.nn.LinearCrossEntropyLoss(6, 13, bias=True).double()
        x = torch.randn(4, 6, dtype=torch.float64)
        t = torch.randint(0, 13, (4,))
        ref = F.cross_entropy(F.linear(x, module.linear.weight, module.linear.bias), t)
        assert (module(x, t) - ref).abs().item() < 1e-12
        assert (kiln.ops.linear_cross_entropy(x, module.linear.weight, t) -
                F.cross_entropy(F.linear(x, module.linear.weight), t)).abs().item() < 1e-12
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
