"""kiln.ops._cpu_eager: eager CPU calls run the op's body without torch.library's dispatch
(under the op's own autograd formula when a gradient is needed) and give what the dispatched
op gives; anything that could observe the difference (a dispatch mode, a profiler,
torch.compile) still goes through the custom op."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kiln
from kiln.ops import _cpu_eager

optim_module = importlib.import_module("kiln.ops.optim")


def _module(name):
    return importlib.import_module(f"kiln.ops.{name}")


# op -> (module, its caller, a call of the public function on (x (6, 40), w (40,)))
CASES = {
    "layer_norm": ("layer_norm", "_layer_norm_call", lambda x, w: kiln.ops.layer_norm(x, (x.shape[-1],), w, w)),
    "rms_norm": ("rms_norm", "_rms_norm_call", lambda x, w: kiln.ops.rms_norm(x, w)),
    "softmax": ("cross_entropy", "_softmax_call", lambda x, w: kiln.ops.softmax(x * w, -1)),
    "cross_entropy": ("cross_entropy", "_cross_entropy_call",
                      lambda x, w: kiln.ops.cross_entropy(x * w, torch.arange(6) % 40, reduction="none")),
    "linear_act": ("linear_act", "_linear_act_call",
                   lambda x, w: kiln.ops.linear_act(x, w.reshape(8, 5).repeat(1, 8), w[:8], "gelu")),
    "gated_act": ("gated", "_gated_act_call", lambda x, w: kiln.ops.swiglu(x, x * w)),
    "attention": ("attention", "_attention_call",
                  lambda x, w: kiln.ops.attention(*(x.reshape(1, 2, 3, 40) * w,) * 3, causal=True)),
    "lstm_sequence": ("rnn", "_lstm_sequence_call",
                      lambda x, w: kiln.ops.lstm(x.reshape(3, 2, 40), *(torch.zeros(2, 10, dtype=x.dtype),) * 2,
                                                 w.reshape(40, 1) * torch.ones(40, 40, dtype=x.dtype),
                                                 torch.ones(40, 10, dtype=x.dtype) / 10)[0]),
}


def _counting(monkeypatch, module, name):
    """Make the op's caller count the calls that go through the custom op's dispatch."""
    caller, calls = getattr(module, name), []
    op = caller.op
    monkeypatch.setattr(caller, "op", lambda *a: calls.append(1) or op(*a))
    return calls


def _run(call, x, w):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = call(x, w)
    return (out, *torch.autograd.grad(out, (x, w), torch.ones_like(out)))


@pytest.mark.parametrize("name", list(CASES))
def test_eager_calls_skip_the_dispatch_and_match_it(name, monkeypatch):
    module_name, caller, call = CASES[name]
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 40, dtype=torch.float64, generator=g), torch.randn(40, dtype=torch.float64, generator=g)
    with kiln.backend.use("cpu"):
        calls = _counting(monkeypatch, _module(module_name), caller)
        direct = _run(call, x, w)  # forward under autograd and backward, no dispatch
        with torch.no_grad():
            no_grad = call(x, w)
        call(x, w)  # no tensor requires grad
        assert not calls
        monkeypatch.setattr(_cpu_eager, "direct", lambda *tensors: False)
        dispatched = _run(call, x, w)
        assert calls
    for ours, theirs in zip(direct, dispatched):
        assert torch.equal(ours, theirs)
    assert torch.equal(no_grad, dispatched[0].detach())


def test_double_backward_through_the_direct_path_matches_the_dispatched_one(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)

    def penalty():
        y = kiln.ops.linear_act(x, weight, None, "gelu")
        (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(dx.pow(2).sum(), (x, weight))

    with kiln.backend.use("cpu"):
        direct = penalty()
        monkeypatch.setattr(_cpu_eager, "direct", lambda *tensors: False)
        dispatched = penalty()
    for ours, theirs in zip(direct, dispatched):
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)


def test_functorch_transforms_and_non_strided_tensors_turn_the_direct_path_off():
    seen = []
    torch.func.grad(lambda x: seen.append(_cpu_eager.direct(x)) or x.sum())(torch.randn(3))
    torch.vmap(lambda x: seen.append(_cpu_eager.direct(x)) or x)(torch.randn(2, 3))
    assert seen == [False, False]
    assert not _cpu_eager.direct(torch.randn(3), torch.eye(3).to_sparse())
    assert not _cpu_eager.direct(torch.empty(3, device="meta"))
    assert _cpu_eager.direct(torch.randn(3), torch.nn.Parameter(torch.randn(3)), None)


def test_a_profiler_turns_the_direct_path_off():
    x = torch.randn(3)
    assert _cpu_eager.direct(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not _cpu_eager.direct(x)


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
    op, calls = optim_module._adam_step, []
    monkeypatch.setattr(optim_module, "_adam_step", lambda *a: calls.append(1) or op(*a))
    with kiln.backend.use("cpu"), torch.no_grad():
        kiln.ops.adam_step(params, grads, m, v, None, steps, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    assert not calls
    after = [t._version for t in (*params, *m, *v, *grads)]
    assert [a - b for a, b in zip(after, before)] == [1] * 6 + [0] * 2
