"""The fused optimizer ops (kiln.ops.optim): every form against the reference, which
tests/optim checks against torch.optim; chunk and block edges; errors; torch.compile."""

import pytest
import torch

import kiln
from kiln.kernels.cpu import optim as cpu_optim
from kiln.ops import optim as ops_optim

SHAPES = [(13, 7), (1,), (1000,), (0,), (5, 1, 3)]


def _lists(count, dtype, device="cpu", seed=0, positive=(), small=()):
    """count lists of random tensors; those in positive are second moments (> 0), those in
    small are first moments of a centered RMSprop (their square stays below the second's)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):
        ts = [torch.randn(s, dtype=torch.float64, generator=g) for s in SHAPES]
        if k in positive:
            ts = [t.abs() + 0.5 for t in ts]
        if k in small:
            ts = [0.1 * t for t in ts]
        out.append([t.to(device=device, dtype=dtype) for t in ts])
    return out


def _steps():
    return [torch.tensor(float(3 + i)) for i in range(len(SHAPES))]


CASES = {
    "sgd_step": (3, (), lambda p, g, b, first: kiln.ops.sgd_step(
        p, g, b, lr=0.1, weight_decay=0.05, momentum=0.9, dampening=0.1, maximize=True, first_step=first)),
    "sgd_step_nesterov": (3, (), lambda p, g, b, first: kiln.ops.sgd_step(
        p, g, b, lr=0.1, momentum=0.9, nesterov=True, first_step=first)),
    "sgd_step_plain": (2, (), lambda p, g, first: kiln.ops.sgd_step(p, g, lr=0.1, weight_decay=0.05)),
    "adam_step": (5, (3, 4), lambda p, g, m, v, vmax, first: kiln.ops.adam_step(
        p, g, m, v, vmax, _steps(), lr=0.01, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, amsgrad=True,
        maximize=True)),
    "adamw_step": (4, (3,), lambda p, g, m, v, first: kiln.ops.adam_step(
        p, g, m, v, None, _steps(), lr=0.01, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1,
        decoupled_weight_decay=True)),
    "rmsprop_step": (5, (2,), lambda p, g, sq, b, a, first: kiln.ops.rmsprop_step(
        p, g, sq, b, a, lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.1, momentum=0.5, centered=True,
        maximize=True)),
    "rmsprop_step_plain": (3, (2,), lambda p, g, sq, first: kiln.ops.rmsprop_step(
        p, g, sq, lr=0.01, alpha=0.9, eps=1e-8)),
    "ngd_step": (2, (), lambda p, g, first: kiln.ops.ngd_step(p, g, lr=0.1)),
    "ngd_step_per_tensor": (2, (), lambda p, g, first: kiln.ops.ngd_step(p, g, lr=0.1, per_tensor=True,
                                                                           maximize=True)),
}


def _run_case(name, backend, dtype, device="cpu", first=False):
    count, positive, call = CASES[name]
    lists = _lists(count, dtype, device, positive=positive, small=(4,) if name == "rmsprop_step" else ())
    with kiln.use(backend):
        call(*lists, first)
    return lists


def _check(got_lists, want_lists, bound):
    for k, (got, want) in enumerate(zip(got_lists, want_lists)):
        for i, (a, b) in enumerate(zip(got, want)):
            a, b = a.double().cpu(), b.double().cpu()
            if b.numel():
                assert ((a - b).norm() / b.norm()).item() < bound, (k, i)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_matches_reference_across_chunks(name, dtype, monkeypatch):
    monkeypatch.setattr(cpu_optim, "CHUNK", 64)  # tensors span several chunks, with ragged ends
    first = name.startswith("sgd_step") and name != "sgd_step_plain"
    for is_first in ((True, False) if first else (False,)):
        _check(_run_case(name, "cpu", dtype, first=is_first), _run_case(name, "reference", dtype, first=is_first),
               1e-13 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(name, monkeypatch):
    if not kiln.backend.triton_interpreted():
        pytest.skip("runs the triton form on CPU tensors under TRITON_INTERPRET=1")
    from kiln.kernels.triton import optim as triton_optim

    monkeypatch.setattr(triton_optim, "CHUNK", 64)
    monkeypatch.setattr(triton_optim, "BLOCK", 32)
    _check(_run_case(name, "triton", torch.float32), _run_case(name, "reference", torch.float32), 1e-6)


def test_triton_interpreted_float64():
    if not kiln.backend.triton_interpreted():
        pytest.skip("runs the triton form on CPU tensors under TRITON_INTERPRET=1")
    _check(_run_case("adam_step", "triton", torch.float64), _run_case("adam_step", "reference", torch.float64), 1e-13)


def test_non_contiguous_tensors_are_updated_in_place():
    p = torch.randn(6, 4, dtype=torch.float64).t()
    g = torch.randn(4, 6, dtype=torch.float64)
    b = torch.randn(6, 4, dtype=torch.float64).t()
    p_ref, b_ref = p.clone(), b.clone()
    with kiln.use("cpu"):
        kiln.ops.sgd_step([p], [g], [b], lr=0.1, momentum=0.9)
    ops_optim.reference_sgd_step([p_ref], [g], [b_ref], 0.1, 0.0, 0.9, 0.0, False, False, False)
    assert not p.is_contiguous()
    assert torch.allclose(p, p_ref, rtol=1e-14, atol=0) and torch.allclose(b, b_ref, rtol=1e-14, atol=0)


def test_zero_size_and_empty_lists_do_nothing():
    kiln.ops.adam_step([], [], [], [], None, [], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    p = torch.empty(0, 3)
    kiln.ops.ngd_step([p], [torch.empty(0, 3)], lr=0.1)
    assert p.shape == (0, 3)


def test_float16_on_cpu_runs_on_reference_unless_cpu_is_asked():
    p, g = [torch.ones(5, dtype=torch.float16)], [torch.ones(5, dtype=torch.float16)]
    kiln.ops.sgd_step(p, g, lr=0.5)
    assert torch.equal(p[0], torch.full((5,), 0.5, dtype=torch.float16))
    with kiln.use("cpu"), pytest.raises(kiln.backend.BackendError, match="cannot run sgd_step"):
        kiln.ops.sgd_step(p, g, lr=0.5)


def test_per_op_backend_choice_names_the_optim_ops():
    assert {"sgd_step", "adam_step", "rmsprop_step", "ngd_step"} <= set(kiln.backend.op_names())
    p, g = [torch.ones(3, dtype=torch.float64)], [torch.ones(3, dtype=torch.float64)]
    with kiln.use("reference", ops=["ngd_step"]):
        kiln.ops.ngd_step(p, g, lr=3 ** 0.5)
    assert torch.allclose(p[0], torch.zeros(3, dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("call, error, message", [
    (lambda: kiln.ops.sgd_step([torch.zeros(2)], [torch.zeros(3)], lr=0.1), ValueError, r"grads\[0\] must match"),
    (lambda: kiln.ops.sgd_step([torch.zeros(2)], [], lr=0.1), ValueError, "grads has 0 tensors but params has 1"),
    (lambda: kiln.ops.sgd_step([torch.zeros(2), torch.zeros(2, dtype=torch.float64)],
                               [torch.zeros(2), torch.zeros(2, dtype=torch.float64)], lr=0.1),
     TypeError, "share params"),
    (lambda: kiln.ops.sgd_step([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], lr=0.1),
     TypeError, "floating-point"),
    (lambda: kiln.ops.sgd_step([torch.zeros(2)], [torch.zeros(2)], lr=0.1, momentum=0.9), ValueError,
     "momentum_buffers are required"),
    (lambda: kiln.ops.adam_step([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], None,
                                [torch.tensor(1.0)], lr=0.1, beta1=0.9, beta2=0.9, eps=1e-8, amsgrad=True),
     ValueError, "max_exp_avg_sqs are required"),
    (lambda: kiln.ops.rmsprop_step([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], lr=0.1, alpha=0.9,
                                   eps=1e-8, centered=True), ValueError, "grad_avgs are required"),
    (lambda: kiln.ops.ngd_step([torch.zeros(2)], [torch.sparse_coo_tensor([[0]], [1.0], (2,))], lr=0.1),
     RuntimeError, "dense"),
])
def test_bad_inputs_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_compile_fullgraph_cpu_backend():
    torch._dynamo.reset()
    p, g, m, v = _lists(4, torch.float64, positive=(3,))
    p_ref, m_ref, v_ref = [t.clone() for t in p], [t.clone() for t in m], [t.clone() for t in v]
    steps = _steps()

    def step(p, g, m, v):
        kiln.ops.adam_step(p, g, m, v, None, steps, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8)

    with kiln.use("cpu"):
        torch.compile(step, fullgraph=True)(p, g, m, v)
        step(p_ref, g, m_ref, v_ref)
    _check([p, m, v], [p_ref, m_ref, v_ref], 1e-14)


# --- GPU ----------------------------------------------------------------------------------

GPU_BOUND = {torch.float32: 1e-6, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_matches_reference(name, backend, dtype):
    got = _run_case(name, backend, dtype, device="cuda")
    # the GPU forms compute in float32 (float64 for float64) from the stored values
    count, positive, call = CASES[name]
    want = [[t.to(torch.float64 if dtype == torch.float64 else torch.float32).cpu() for t in ts]
            for ts in _lists(count, dtype, "cuda", positive=positive, small=(4,) if name == "rmsprop_step" else ())]
    with kiln.use("reference"):
        call(*want, False)
    _check(got, want, GPU_BOUND[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_many_tensors_one_launch(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [int(s) for s in torch.randint(1, 70000, (300,), generator=g, device="cuda")]
    p = [torch.randn(s, device="cuda", generator=g) for s in sizes]
    grads = [torch.randn(s, device="cuda", generator=g) for s in sizes]
    p_ref = [t.clone() for t in p]
    with kiln.use(backend):
        kiln.ops.ngd_step(p, grads, lr=0.1)
    with kiln.use("reference"):
        kiln.ops.ngd_step(p_ref, grads, lr=0.1)
    _check([p], [p_ref], 1e-6)


@pytest.mark.gpu
def test_gpu_optimizer_default_backend_matches_torch():
    w = torch.randn(1000, 37, device="cuda", requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    kopt, topt = kiln.optim.AdamW([w], lr=0.01), torch.optim.AdamW([w_ref], lr=0.01)
    for step in range(20):
        gr = torch.randn(1000, 37, device="cuda", generator=torch.Generator(device="cuda").manual_seed(step))
        w.grad, w_ref.grad = gr.clone(), gr.clone()
        kopt.step()
        topt.step()
    assert ((w - w_ref).norm() / w_ref.norm()).item() < 1e-6
