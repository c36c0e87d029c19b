"""kiln.ops._cpu_eager: eager CPU calls that need no graph run the op's body without
torch.library's dispatch, and give what the dispatched op gives; anything that could observe
the difference (grad, a dispatch mode, torch.compile) still goes through the custom op."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kiln
from kiln.ops import _cpu_eager

layer_norm_module = importlib.import_module("kiln.ops.layer_norm")
rms_norm_module = importlib.import_module("kiln.ops.rms_norm")
cross_entropy_module = importlib.import_module("kiln.ops.cross_entropy")
optim_module = importlib.import_module("kiln.ops.optim")

CASES = {
    "layer_norm": (layer_norm_module, "_layer_norm", lambda x, w: kiln.ops.layer_norm(x, (x.shape[-1],), w, w)),
    "rms_norm": (rms_norm_module, "_rms_norm", lambda x, w: kiln.ops.rms_norm(x, w)),
    "softmax": (cross_entropy_module, "_softmax", lambda x, w: kiln.ops.softmax(x, -1)),
}


class _Dispatched(Exception):
    pass


def _counting(monkeypatch, module, name):
    """Replace the custom op with one that counts its calls and then runs it."""
    op, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or op(*a))
    return calls


@pytest.mark.parametrize("name", list(CASES))
def test_no_grad_calls_skip_the_dispatch_and_match_it(name, monkeypatch):
    module, op_name, call = CASES[name]
    x, w = torch.randn(6, 40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    with kiln.backend.use("cpu"):
        dispatched = call(x.clone().requires_grad_(), w)  # grad needed: through the custom op
        calls = _counting(monkeypatch, module, op_name)
        with torch.no_grad():
            direct = call(x, w)
        assert not calls
        assert torch.equal(direct, dispatched.detach())
        call(x, w)  # no tensor requires grad: direct too
        assert not calls
        call(x.clone().requires_grad_(), w)
        assert len(calls) == 1


def test_a_dispatch_mode_or_grad_mode_turns_the_direct_path_off():
    x = torch.randn(3)
    with torch.no_grad():
        assert _cpu_eager.direct(x)
        with FakeTensorMode():
            assert not _cpu_eager.direct(torch.empty(3))
    assert _cpu_eager.no_grad_needed(x) and not _cpu_eager.no_grad_needed(x.requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _cpu_eager.direct(torch.randn(3))


def test_direct_optimizer_step_bumps_the_versions_of_what_it_mutates(monkeypatch):
    params = [torch.randn(5, dtype=torch.float64) for _ in range(2)]
    grads, m, v = ([torch.randn(5, dtype=torch.float64) for _ in range(2)] for _ in range(3))
    steps = [torch.tensor(1.0) for _ in range(2)]
    before = [t._version for t in (*params, *m, *v, *grads)]
    calls = _counting(monkeypatch, optim_module, "_adam_step")
    with kiln.backend.use("cpu"), torch.no_grad():
        kiln.ops.adam_step(params, grads, m, v, None, steps, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    assert not calls
    after = [t._version for t in (*params, *m, *v, *grads)]
    assert [a - b for a, b in zip(after, before)] == [1] * 6 + [0] * 2
