"""kiln.optim against torch.optim: 50 steps of every configuration that changes the math,
in float64 (1e-12 relative) and float32 (1e-6), params and state; state_dicts in both
directions; schedulers; torch's arguments and errors."""

import copy
import inspect
import itertools

import pytest
import torch

import kiln
import kiln.optim

SHAPES = [(7, 5), (300,), (1,), (3, 4, 6), (0, 3)]
STEPS = 50
BOUND = {torch.float64: 1e-12, torch.float32: 1e-6}


def _sgd_configs():
    for momentum, dampening, nesterov, weight_decay, maximize in itertools.product(
            (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.1), (False, True)):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        if momentum == 0 and dampening != 0:
            continue
        yield "SGD", dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=weight_decay, maximize=maximize)


def _adam_configs():
    for name, amsgrad, weight_decay, maximize in itertools.product(
            ("Adam", "AdamW"), (False, True), (0.0, 0.1), (False, True)):
        yield name, dict(lr=0.01, betas=(0.8, 0.95), amsgrad=amsgrad, weight_decay=weight_decay, maximize=maximize)


def _rmsprop_configs():
    for centered, momentum, weight_decay, maximize in itertools.product(
            (False, True), (0.0, 0.7), (0.0, 0.1), (False, True)):
        yield "RMSprop", dict(lr=0.01, alpha=0.9, centered=centered, momentum=momentum, weight_decay=weight_decay,
                              maximize=maximize)


CONFIGS = [*_sgd_configs(), *_adam_configs(), *_rmsprop_configs()]


def _ids(case):
    name, kw = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in kw.items() if k not in ("lr", "betas", "alpha"))


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=g).requires_grad_() for s in SHAPES]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, dtype=p.dtype, generator=g) * (1 + i) for i, p in enumerate(params)]


def _run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        for p, gr in zip(params, _grads(params, step)):
            p.grad = gr.clone()
        opt.step()


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _assert_close(kparams, tparams, kopt, topt, bound):
    for i, (kp, tp) in enumerate(zip(kparams, tparams)):
        assert _rel(kp, tp) < bound, (i, _rel(kp, tp))
        ks, ts = kopt.state.get(kp, {}), topt.state.get(tp, {})
        assert set(ks) == set(ts), (i, set(ks), set(ts))
        for key in ts:
            if key == "step":
                assert ks[key].dtype == ts[key].dtype and ks[key].device == ts[key].device
                assert ks[key].item() == ts[key].item()
            else:
                assert _rel(ks[key], ts[key]) < bound, (i, key, _rel(ks[key], ts[key]))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CONFIGS, ids=_ids)
def test_matches_torch(case, dtype, backend):
    name, kw = case
    tparams, kparams = _params(dtype), _params(dtype)
    topt, kopt = getattr(torch.optim, name)(tparams, **kw), getattr(kiln.optim, name)(kparams, **kw)
    with kiln.use(backend):
        _run(kopt, kparams, STEPS)
    _run(topt, tparams, STEPS)
    _assert_close(kparams, tparams, kopt, topt, BOUND[dtype])


@pytest.mark.parametrize("case", [c for c in CONFIGS if c[1].get("maximize") and c[1].get("weight_decay")],
                         ids=_ids)
def test_matches_torch_triton_interpreted(case):
    """The Triton form (TRITON_INTERPRET=1 on CPU tensors), with chunks and blocks smaller
    than the tensors so that a tensor spans several programs."""
    if not kiln.backend.triton_interpreted():
        pytest.skip("runs the triton form on CPU tensors under TRITON_INTERPRET=1")
    name, kw = case
    tparams, kparams = _params(torch.float32), _params(torch.float32)
    topt, kopt = getattr(torch.optim, name)(tparams, **kw), getattr(kiln.optim, name)(kparams, **kw)
    with kiln.use("triton"):
        _run(kopt, kparams, 10)
    _run(topt, tparams, 10)
    _assert_close(kparams, tparams, kopt, topt, BOUND[torch.float32])


def _ngd_oracle(params, lr, per_tensor, maximize):
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            norm = p.grad.double().norm() if per_tensor else total
            if norm > 0:
                p.add_(p.grad.double() / norm, alpha=lr if maximize else -lr)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_ngd_matches_the_notes(maximize, per_tensor, dtype, backend):
    kparams, oparams = _params(dtype), _params(dtype)
    opt = kiln.optim.NGD(kparams, lr=0.03, per_tensor=per_tensor, maximize=maximize)
    for step in range(STEPS):
        for kp, op, gr in zip(kparams, oparams, _grads(kparams, step)):
            kp.grad, op.grad = gr.clone(), gr.clone()
        with kiln.use(backend):
            opt.step()
        _ngd_oracle(oparams, 0.03, per_tensor, maximize)
    for kp, op in zip(kparams, oparams):
        assert _rel(kp, op) < BOUND[dtype]
    assert not opt.state


def test_ngd_moves_lr_per_step_and_stands_still_on_zero_gradient():
    params = _params(torch.float64)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g * 1e6
    kiln.optim.NGD(params, lr=0.25).step()
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert abs(moved.item() - 0.25) < 1e-14
    for p in params:
        p.grad = torch.zeros_like(p)
    after = [p.detach().clone() for p in params]
    kiln.optim.NGD(params, lr=0.25).step()
    assert all(torch.equal(p.detach(), a) for p, a in zip(params, after))


def test_ngd_group_norm_spans_dtypes_of_a_group():
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float32, requires_grad=True)
    a.grad, b.grad = torch.randn(5, dtype=torch.float64), torch.randn(6)
    a0, b0 = a.detach().clone(), b.detach().clone()
    kiln.optim.NGD([a, b], lr=0.5).step()
    total = torch.sqrt((a.grad ** 2).sum() + (b.grad.double() ** 2).sum())
    assert _rel(a.detach(), a0 - 0.5 * a.grad / total) < 1e-12
    assert _rel(b.detach(), b0 - 0.5 * b.grad.double() / total) < 1e-6


@pytest.mark.parametrize("case", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
                                  ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
                                  ("AdamW", dict(lr=0.01, amsgrad=True)),
                                  ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1))],
                         ids=_ids)
@pytest.mark.parametrize("direction", ["torch->kiln", "kiln->torch"])
def test_state_dict_round_trip_continues_identically(case, direction):
    name, kw = case
    dtype = torch.float64
    src_params, dst_params, ref_params = _params(dtype), _params(dtype), _params(dtype)
    src_cls, dst_cls = ((getattr(torch.optim, name), getattr(kiln.optim, name)) if direction == "torch->kiln"
                        else (getattr(kiln.optim, name), getattr(torch.optim, name)))
    src, ref = src_cls(src_params, **kw), getattr(torch.optim, name)(ref_params, **kw)
    _run(src, src_params, 5)
    _run(ref, ref_params, 5)
    saved = copy.deepcopy(src.state_dict())
    for key, value in saved["state"][0].items():
        want = ref.state_dict()["state"][0][key]
        assert value.dtype == want.dtype and value.device == want.device and value.shape == want.shape, key
    assert set(saved["param_groups"][0]) == set(ref.state_dict()["param_groups"][0])
    with torch.no_grad():
        for d, s in zip(dst_params, src_params):
            d.copy_(s)
    dst = dst_cls(dst_params, **kw)
    dst.load_state_dict(saved)
    _run(dst, dst_params, 10, start=5)
    _run(ref, ref_params, 10, start=5)
    _assert_close(dst_params, ref_params, dst, ref, 1e-12)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_lr_scheduler_and_tensor_lr(name):
    kparams, tparams = _params(torch.float64), _params(torch.float64)
    kw = dict(momentum=0.9) if name == "SGD" else {}
    # a tensor lr each (the schedulers update a tensor lr in place)
    kopt = getattr(kiln.optim, name)(kparams, lr=torch.tensor(0.02, dtype=torch.float64), **kw)
    topt = getattr(torch.optim, name)(tparams, lr=torch.tensor(0.02, dtype=torch.float64), **kw)
    ksched = torch.optim.lr_scheduler.StepLR(kopt, step_size=3, gamma=0.5)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=3, gamma=0.5)
    for step in range(10):
        for opt, params, sched in ((kopt, kparams, ksched), (topt, tparams, tsched)):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.step()
            sched.step()
    assert float(kopt.param_groups[0]["lr"]) == float(topt.param_groups[0]["lr"])
    assert abs(float(kopt.param_groups[0]["lr"]) - 0.02 * 0.5 ** 3) < 1e-15
    _assert_close(kparams, tparams, kopt, topt, 1e-12)


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_params_without_grad_are_skipped_and_groups_keep_their_own_hyperparameters(name):
    kparams, tparams = _params(torch.float64), _params(torch.float64)

    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], "lr": 0.003, "weight_decay": 0.2}]

    kw = dict(lr=0.01) | (dict(momentum=0.9) if name != "Adam" else {})
    kopt, topt = getattr(kiln.optim, name)(groups(kparams), **kw), getattr(torch.optim, name)(groups(tparams), **kw)
    for step in range(6):
        for opt, params in ((kopt, kparams), (topt, tparams)):
            for i, (p, g) in enumerate(zip(params, _grads(params, step))):
                p.grad = None if (i == 1 and step % 2) or i == 3 else g
            opt.step()
    assert 3 not in {i for i, p in enumerate(kparams) if p in kopt.state}
    _assert_close(kparams, tparams, kopt, topt, 1e-12)


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_complex_and_non_contiguous_and_mixed_dtype_params(name):
    def make():
        g = torch.Generator().manual_seed(3)
        base = torch.randn(6, 4, dtype=torch.float64, generator=g)
        return [torch.randn(5, 3, dtype=torch.complex128, generator=g).requires_grad_(),
                base.t().requires_grad_(),  # non-contiguous leaf
                torch.randn(9, dtype=torch.float32, generator=g).requires_grad_()]

    kparams, tparams = make(), make()
    kw = dict(lr=0.01) | (dict(momentum=0.9) if name != "Adam" else {})
    kopt, topt = getattr(kiln.optim, name)(kparams, **kw), getattr(torch.optim, name)(tparams, **kw)
    for step in range(8):
        for opt, params in ((kopt, kparams), (topt, tparams)):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
            opt.step()
    assert not kparams[1].is_contiguous()
    for kp, tp in zip(kparams, tparams):
        bound = 1e-6 if kp.dtype == torch.float32 else 1e-12
        assert _rel(torch.view_as_real(kp) if kp.is_complex() else kp,
                    torch.view_as_real(tp) if tp.is_complex() else tp) < bound


def test_closure_returns_the_loss():
    w = torch.randn(3, requires_grad=True)
    opt = kiln.optim.Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(30):
        last = opt.step(closure)
    assert last < first


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_signatures_match_torch(name):
    kiln_sig = inspect.signature(getattr(kiln.optim, name))
    torch_sig = inspect.signature(getattr(torch.optim, name))
    strip = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]
    assert strip(kiln_sig) == strip(torch_sig)


def test_ngd_signature():
    params = inspect.signature(kiln.optim.NGD).parameters
    assert list(params) == ["params", "lr", "per_tensor", "maximize"]
    assert params["lr"].default is inspect.Parameter.empty and params["per_tensor"].default is False
    with pytest.raises(TypeError):
        kiln.optim.NGD([torch.zeros(1, requires_grad=True)])


@pytest.mark.parametrize("name, kw, message", [
    ("SGD", dict(lr=-1.0), "Invalid learning rate"),
    ("SGD", dict(momentum=-0.1), "Invalid momentum value"),
    ("SGD", dict(weight_decay=-0.1), "Invalid weight_decay value"),
    ("SGD", dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    ("SGD", dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    ("Adam", dict(lr=-1.0), "Invalid learning rate"),
    ("Adam", dict(eps=-1.0), "Invalid epsilon value"),
    ("Adam", dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    ("Adam", dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
    ("Adam", dict(weight_decay=-1.0), "Invalid weight_decay value"),
    ("Adam", dict(betas=(0.9, torch.tensor(0.99))), "betas must be either both floats or both Tensors"),
    ("AdamW", dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1"),
    ("RMSprop", dict(lr=-1.0), "Invalid learning rate"),
    ("RMSprop", dict(alpha=-0.5), "Invalid alpha value"),
    ("RMSprop", dict(eps=-1.0), "Invalid epsilon value"),
    ("RMSprop", dict(momentum=-1.0), "Invalid momentum value"),
    ("NGD", dict(lr=-1.0), "Invalid learning rate"),
])
def test_invalid_hyperparameters_as_torch(name, kw, message):
    p = [torch.zeros(2, requires_grad=True)]
    if name == "NGD" or "lr" not in kw:
        kw = dict(lr=kw.pop("lr", 1e-3)) | kw
    with pytest.raises(ValueError, match=message):
        getattr(kiln.optim, name)(p, **kw)
    if name != "NGD":
        with pytest.raises(ValueError, match=message):
            getattr(torch.optim, name)(p, **kw)


@pytest.mark.parametrize("name, flag", [("Adam", "capturable"), ("AdamW", "differentiable"),
                                        ("SGD", "differentiable"), ("RMSprop", "capturable")])
def test_unsupported_flags_are_refused_by_name(name, flag):
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        getattr(kiln.optim, name)([torch.zeros(2, requires_grad=True)], **{flag: True})


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_foreach_and_fused_flags_run_the_fused_step(name):
    for flags in (dict(foreach=True), dict(foreach=False)) + ((dict(fused=True),) if name != "RMSprop" else ()):
        w = torch.ones(4, requires_grad=True)
        opt = getattr(kiln.optim, name)([w], lr=0.1, **flags)
        w.grad = torch.ones(4)
        opt.step()
        assert (w.detach() < 1).all()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "NGD"])
def test_sparse_gradient_is_a_clear_error(name):
    w = torch.zeros(5, requires_grad=True)
    w.grad = torch.sparse_coo_tensor([[1, 3]], [1.0, 2.0], (5,))
    opt = getattr(kiln.optim, name)([w], lr=0.1)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_kiln_optim_is_lazy_and_exposed():
    assert kiln.optim.Adam.__module__ == "kiln.optim.adam"
    assert issubclass(kiln.optim.NGD, torch.optim.Optimizer)


def _replace_state_tensor(opt, params, key):
    state = opt.state[params[0]]
    if key in state:
        state[key] = state[key].clone()


def _reset_state(opt, params):
    opt.state[params[2]] = {}


def _delete_state(opt, params):
    del opt.state[params[3]]


def _move_param_data(opt, params):
    with torch.no_grad():
        params[1].data = params[1].data.clone()


def _set_step_counter(opt, params):
    state = opt.state[params[0]]
    if "step" in state:
        state["step"].fill_(2.0)


def _toggle_flag(opt, params):
    group = opt.param_groups[0]
    if "amsgrad" in group:  # amsgrad can be turned off only (torch's state lacks max_exp_avg_sq before)
        group["amsgrad"], group["maximize"] = False, not group["maximize"]
    else:
        group["momentum"] = 0.5 if group["momentum"] == 0.9 else 0.9


def _drop_a_grad(opt, params):
    params[0].grad = None


def _non_contiguous_grad(opt, params):
    params[0].grad = params[0].grad.t().clone().t() if params[0].dim() == 2 else params[0].grad


def _load_own_state_dict(opt, params):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _repoint_state_data(opt, params):
    """A state tensor's storage swapped in place (.data), its dict entry left as it is."""
    state = opt.state[params[1]]
    for key in ("exp_avg", "momentum_buffer", "step"):
        if key in state:
            state[key].data = state[key].data.clone()


def _new_state_dict_object(opt, params):
    opt.state[params[3]] = dict(opt.state[params[3]])


MUTATIONS = [lambda o, p: _replace_state_tensor(o, p, "exp_avg"), lambda o, p: _replace_state_tensor(o, p, "step"),
             lambda o, p: _replace_state_tensor(o, p, "momentum_buffer"), _reset_state, _delete_state,
             _move_param_data, _set_step_counter, _toggle_flag, _drop_a_grad, _non_contiguous_grad,
             _load_own_state_dict, _repoint_state_data, _new_state_dict_object]
MUTATION_IDS = ["replace-exp_avg", "replace-step", "replace-momentum_buffer", "reset-state", "delete-state",
                "move-param-data", "set-step", "toggle-flag", "drop-grad", "non-contiguous-grad", "load-state-dict",
                "repoint-state-data", "new-state-dict-object"]


def _steps_with_a_change(case, mutate, kparams, tparams):
    """Eight steps of kiln.optim's and torch.optim's optimizer ``case`` on their own copies of the
    same parameters, with ``mutate`` applied to both before the fifth step."""
    name, kw = case
    kopt, topt = getattr(kiln.optim, name)(kparams, **kw), getattr(torch.optim, name)(tparams, **kw)
    for step in range(8):
        for opt, params in ((kopt, kparams), (topt, tparams)):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g.to(p.device)  # (_grads draws on the CPU)
            if step == 4:
                mutate(opt, params)
            opt.step()
    return kparams, tparams, kopt, topt


@pytest.mark.parametrize("mutate", MUTATIONS, ids=MUTATION_IDS)
@pytest.mark.parametrize("case", [("Adam", dict(lr=0.01, weight_decay=0.1)), ("AdamW", dict(lr=0.01, amsgrad=True)),
                                  ("SGD", dict(lr=0.05, momentum=0.9))], ids=_ids)
def test_cached_step_plans_follow_changes_between_steps(case, mutate):
    """kiln.optim reuses a group's lists from step to step (StepPlan): whatever changes between
    two steps (state replaced, reset or deleted, a parameter's data moved, a counter set,
    a flag toggled, a gradient dropped or non-contiguous, a reloaded state_dict), the next
    steps still match torch's, which rebuilds everything every step."""
    with kiln.use("cpu"):
        _assert_close(*_steps_with_a_change(case, mutate, _params(torch.float64), _params(torch.float64)), 1e-12)


def test_step_counters_keep_their_identity_and_count():
    """The plan re-points the step counters into one buffer: each counter stays the tensor
    torch's state_dict names, 0-d, of torch's dtype, counting every step."""
    params = _params(torch.float32)
    opt = kiln.optim.Adam(params, lr=0.01)
    _run(opt, params, 2)
    counters = [opt.state[p]["step"] for p in params]
    _run(opt, params, 3, start=2)
    for p, c in zip(params, counters):
        assert opt.state[p]["step"] is c and c.dim() == 0 and c.dtype == torch.float32 and c.item() == 5.0
    saved = copy.deepcopy(opt.state_dict())
    assert [s["step"].item() for s in saved["state"].values()] == [5.0] * len(params)


@pytest.mark.parametrize("name,key", [("Adam", "exp_avg"), ("SGD", "momentum_buffer")])
def test_state_of_the_wrong_size_is_an_error_not_a_cached_step(name, key):
    """A state tensor replaced by one of another size is refused by the op layer's checks,
    also once the step's lists are cached."""
    params = _params(torch.float64)
    opt = getattr(kiln.optim, name)(params, lr=0.01, **({"momentum": 0.9} if name == "SGD" else {}))
    _run(opt, params, 3)
    opt.state[params[1]][key] = torch.zeros(params[1].numel() + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=key):
        _run(opt, params, 1, start=3)


_PLANNED = [("SGD", dict(lr=0.05, momentum=0.9)), ("SGD", dict(lr=0.05)), ("Adam", dict(lr=0.01)),
            ("AdamW", dict(lr=0.01, amsgrad=True))]


@pytest.mark.parametrize("case", _PLANNED, ids=_ids)
def test_steady_steps_take_the_quick_plan_check(case, monkeypatch):
    """Once a group's plan holds, a step with the same parameters, state and gradient layouts
    runs on the plan's quick check alone (no params_with_grad, holds, per-step lists): the
    ~0.4 ms a step this saves at 200 tensors is what the plan is for. The steps still match
    torch's."""
    name, kw = case
    kparams, tparams = _params(torch.float64), _params(torch.float64)
    kopt, topt = getattr(kiln.optim, name)(kparams, **kw), getattr(torch.optim, name)(tparams, **kw)
    with kiln.use("cpu"):
        _run(kopt, kparams, 3)

        def full_path(*args):
            raise AssertionError("a steady step took the full path")

        monkeypatch.setattr(type(kopt), "_step_group", full_path)
        _run(kopt, kparams, 4, start=3)
    _run(topt, tparams, 7)
    _assert_close(kparams, tparams, kopt, topt, 1e-12)


@pytest.mark.parametrize("mutate", [_drop_a_grad, _non_contiguous_grad, _repoint_state_data],
                         ids=["drop-grad", "non-contiguous-grad", "repoint-state-data"])
@pytest.mark.parametrize("case", _PLANNED[::2], ids=_ids)
def test_quick_plan_check_without_the_layout_guard(case, mutate, monkeypatch):
    """Where torch has no TensorGuards (the C check of the gradients' layouts), the quick
    check's maps do that work, and still notice a gradient dropped or non-contiguous."""
    from kiln.optim import _common

    monkeypatch.setattr(_common, "_TensorGuards", None)
    with kiln.use("cpu"):
        kparams, tparams, kopt, topt = _steps_with_a_change(case, mutate, _params(torch.float64),
                                                            _params(torch.float64))
    assert kopt._kiln_plans[0].grad_guard is None
    _assert_close(kparams, tparams, kopt, topt, 1e-12)


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=0.01))])
@pytest.mark.parametrize("change", ["grad-dtype", "param-resized", "param-dtype"])
def test_changed_layouts_after_planned_steps_are_refused(name, kw, change):
    """A gradient whose dtype changed in place (.data), a parameter resized or cast in place:
    the planned step does not run on the old table; the op layer's checks name the list."""
    params = _params(torch.float64)
    opt = getattr(kiln.optim, name)(params, **kw)
    with kiln.use("cpu"):
        _run(opt, params, 3)
        for p, g in zip(params, _grads(params, 3)):
            p.grad = g
        with torch.no_grad():
            if change == "grad-dtype":
                params[1].grad.data = params[1].grad.data.float()
            elif change == "param-resized":
                params[1].data = torch.zeros(400, dtype=torch.float64)
                params[1].grad = torch.ones(400, dtype=torch.float64)
            else:
                params[1].data = params[1].data.float()
                params[1].grad = torch.ones(params[1].shape)
        with pytest.raises(ValueError, match=r"must match params\["):
            opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_step_hooks_and_profiler_see_every_step(name):
    """kiln's step skips torch's step wrapper only where it would do nothing: registered step
    hooks (the optimizer's and global) run around every step, and a profiler sees
    torch's Optimizer.step#<class>.step range."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = _params(torch.float32)
    opt = getattr(kiln.optim, name)(params, lr=0.01)
    calls = []
    with kiln.use("cpu"):
        _run(opt, params, 3)
        handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
                   opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
                   register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global-pre")),
                   register_optimizer_step_post_hook(lambda o, a, k: calls.append("global-post"))]
        try:
            _run(opt, params, 2, start=3)
        finally:
            for h in handles:
                h.remove()
        assert calls == ["global-pre", "pre", "post", "global-post"] * 2
        _run(opt, params, 1, start=5)
        assert len(calls) == 8
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _run(opt, params, 1, start=6)
    assert any(e.name == f"Optimizer.step#{name}.step" for e in prof.events())


@pytest.mark.gpu
@pytest.mark.parametrize("mutate", [_drop_a_grad, _repoint_state_data, _new_state_dict_object],
                         ids=["drop-grad", "repoint-state-data", "new-state-dict-object"])
@pytest.mark.parametrize("case", _PLANNED[::2], ids=_ids)
def test_gpu_quick_plan_check_follows_changes(case, mutate):
    """On CUDA the plan's quick check runs as on the CPU (the step then takes the op layer's
    lists): the same changes between steps are noticed."""
    kparams = [p.detach().cuda().requires_grad_() for p in _params(torch.float64)]
    tparams = [p.detach().clone().requires_grad_() for p in kparams]
    _assert_close(*_steps_with_a_change(case, mutate, kparams, tparams), 1e-12)  # both on CUDA
