"""Each regularizer, initialization and the lottery ticket do what notes 11, 14 and 15 say."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kiln
from kiln.train import regularizers as R
from tests.numerics import BOUND, rel_err

F64 = torch.float64


def _net(dtype=F64, activation="tanh"):
    torch.manual_seed(0)
    return nn.Sequential(kiln.nn.Linear(6, 8, activation=activation, dtype=dtype),
                         kiln.nn.LayerNorm(8, dtype=dtype), kiln.nn.Linear(8, 4, dtype=dtype))


def _batch(n=12, dtype=F64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


# --- weight decay ------------------------------------------------------------------------------

def test_decay_excludes_biases_and_norm_parameters_by_default():
    model = _net()
    assert R.no_decay_names(model) == {"0.bias", "1.weight", "1.bias", "2.bias"}
    decayed, rest = R.decay_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert [id(p) for p in decayed["params"]] == [id(model[0].weight), id(model[2].weight)]
    assert len(rest["params"]) == 4
    only_first = R.decay_groups(model, 0.1, exclude=lambda name, p: not name.startswith("0."))
    assert [id(p) for p in only_first[0]["params"]] == [id(model[0].weight), id(model[0].bias)]
    with pytest.raises(ValueError, match="exclude"):
        R.decay_groups(model, 0.1, exclude=["nope"])
    opt = kiln.optim.AdamW(R.decay_groups(model, 0.1), lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_l2_penalty_is_half_lambda_squared_norm_with_gradient_lambda_w():
    model = _net()
    lam = 0.3
    penalty = R.l2_penalty(model, lam)
    ref = lam / 2 * (model[0].weight.pow(2).sum() + model[2].weight.pow(2).sum())
    assert rel_err(penalty, ref) < BOUND[F64]
    penalty.backward()
    assert rel_err(model[0].weight.grad, lam * model[0].weight) < BOUND[F64]
    assert rel_err(model[2].weight.grad, lam * model[2].weight) < BOUND[F64]
    for p in (model[0].bias, model[1].weight, model[1].bias, model[2].bias):
        assert p.grad is None


def test_coupled_l2_step_is_the_notes_shrink():
    """theta <- (1 - lr gamma) theta - lr dL/dtheta (14.2) with plain SGD on L + l2_penalty."""
    model = _net()
    x, y = _batch()
    w0 = model[0].weight.detach().clone()
    loss = kiln.ops.cross_entropy(model(x), y)
    g, = torch.autograd.grad(loss, model[0].weight, retain_graph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (loss + R.l2_penalty(model, 0.5)).backward()
    opt.step()
    assert rel_err(model[0].weight, (1 - 0.1 * 0.5) * w0 - 0.1 * g) < BOUND[F64]


# --- gradient-norm and gradient-variance penalties ---------------------------------------------

def _closures(model, x, y, m):
    chunks = list(zip(x.chunk(m), y.chunk(m)))
    return [lambda xb=xb, yb=yb: kiln.ops.cross_entropy(model(xb), yb) for xb, yb in chunks]


def _torch_objective(model, x, y, m, lam, alpha):
    """The notes' L_SGD with torch ops only (float64 double backward), for reference."""
    params = list(model.parameters())
    tmodel = lambda xb: F.linear(F.layer_norm(torch.tanh(F.linear(xb, params[0], params[1])), (8,),  # noqa: E731
                                              params[2], params[3]), params[4], params[5])
    losses = [F.cross_entropy(tmodel(xb), yb) for xb, yb in zip(x.chunk(m), y.chunk(m))]
    grads = [torch.autograd.grad(l, params, create_graph=True) for l in losses]
    full = [sum(g[i] for g in grads) / m for i in range(len(params))]
    obj = sum(losses) / m + lam / 4 * sum((f * f).sum() for f in full)
    obj = obj + alpha / (4 * m) * sum(sum(((gi - fi) ** 2).sum() for gi, fi in zip(g, full)) for g in grads)
    return torch.autograd.grad(obj, params)


@pytest.mark.parametrize("lam,alpha,m", [(0.5, 0.0, 1), (0.0, 2.0, 3), (0.5, 2.0, 4)])
def test_penalized_backward_exact_matches_torch_double_backward(lam, alpha, m):
    model = _net()
    x, y = _batch()
    ref = _torch_objective(model, x, y, m, lam, alpha)
    out = R.penalized_backward(_closures(model, x, y, m), model.parameters(), grad_norm=lam,
                               grad_variance=alpha, method="exact")
    assert out["grad_norm_penalty"] >= 0 and out["grad_variance_penalty"] >= 0
    for p, r in zip(model.parameters(), ref):
        assert rel_err(p.grad, r) < 1e-9


@pytest.mark.parametrize("lam,alpha,m", [(0.5, 0.0, 1), (0.5, 2.0, 4)])
def test_finite_difference_matches_exact_double_backward(lam, alpha, m):
    model = _net()
    x, y = _batch()
    R.penalized_backward(_closures(model, x, y, m), model.parameters(), grad_norm=lam,
                         grad_variance=alpha, method="exact")
    exact = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    R.penalized_backward(_closures(model, x, y, m), model.parameters(), grad_norm=lam,
                         grad_variance=alpha, method="finite_difference")
    for p, e, b in zip(model.parameters(), exact, before):
        assert rel_err(p.grad, e) < 1e-6
        assert torch.equal(p, b)   # the perturbations are undone bit for bit


def test_finite_differences_see_the_same_dropout_masks_as_the_exact_form():
    torch.manual_seed(0)
    model = nn.Sequential(kiln.nn.Linear(6, 8, activation="tanh", dtype=F64), nn.Dropout(0.3),
                          kiln.nn.Linear(8, 4, dtype=F64))
    x, y = _batch()
    results, rng_after = [], []
    for method in ("exact", "finite_difference"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        R.penalized_backward(_closures(model, x, y, 3), model.parameters(), grad_norm=0.5, grad_variance=1.0,
                             method=method)
        results.append([p.grad.clone() for p in model.parameters()])
        rng_after.append(torch.get_rng_state())
    for a, b in zip(*results):
        assert rel_err(b, a) < 1e-6
    assert torch.equal(rng_after[0], rng_after[1])   # the training stream continues the same way


def test_hessian_vector_product_forms_agree():
    model = _net()
    x, y = _batch()
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    fn = lambda: kiln.ops.cross_entropy(model(x), y)  # noqa: E731
    exact = R.hessian_vector_product(fn, params, v, "exact")
    fd = R.hessian_vector_product(fn, params, v, "finite_difference")
    assert rel_err(torch.cat([h.flatten() for h in fd]), torch.cat([h.flatten() for h in exact])) < 1e-6


def test_auto_falls_back_to_finite_differences_when_an_op_refuses_double_backward():
    torch.manual_seed(0)
    trunk = kiln.nn.Linear(6, 8, activation="tanh", dtype=F64)
    head = kiln.nn.Linear(8, 4, dtype=F64)
    x, y = _batch()
    refusing = lambda: kiln.ops.linear_cross_entropy(trunk(x), head.weight, y, linear_bias=head.bias)  # noqa: E731
    params = [*trunk.parameters(), *head.parameters()]
    with pytest.raises(RuntimeError, match="double backward"):
        R.penalized_backward([refusing], params, grad_norm=0.5, method="exact")
    assert all(p.grad is None for p in params)   # the refusal left no partial gradient behind
    R.penalized_backward([refusing], params, grad_norm=0.5, method="auto")
    auto = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    differentiable = lambda: kiln.ops.cross_entropy(head(trunk(x)), y)  # noqa: E731
    R.penalized_backward([differentiable], params, grad_norm=0.5, method="exact")
    for p, a in zip(params, auto):
        assert rel_err(a, p.grad) < 1e-6


def test_no_penalty_is_the_plain_gradient_and_bad_arguments_are_named():
    model = _net()
    x, y = _batch()
    R.penalized_backward(_closures(model, x, y, 1), model.parameters())
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    kiln.ops.cross_entropy(model(x), y).backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-12, atol=0) for a, p in zip(got, model.parameters()))
    with pytest.raises(ValueError, match="grad_norm"):
        R.penalized_backward(_closures(model, x, y, 1), model.parameters(), grad_norm=-1)
    with pytest.raises(ValueError, match="weights"):
        R.penalized_backward(_closures(model, x, y, 2), model.parameters(), weights=[1.0])
    with pytest.raises(ValueError, match="method"):
        R.penalized_backward(_closures(model, x, y, 1), model.parameters(), method="nope")


# --- ensembles, augmentation, stochastic depth, label smoothing ----------------------------------

def test_ensemble_averages_softmax_probabilities():
    torch.manual_seed(0)
    members = [nn.Linear(5, 3, dtype=F64) for _ in range(3)]
    x = torch.randn(7, 5, dtype=F64)
    ref = sum(torch.softmax(m(x), -1) for m in members) / 3
    out = R.Ensemble(members)(x)
    assert rel_err(out, ref) < BOUND[F64]
    assert torch.allclose(out.sum(-1), torch.ones(7, dtype=F64))
    with pytest.raises(ValueError, match="models"):
        R.Ensemble([])


def test_mixup_mixes_inputs_and_targets_with_the_same_weights_and_is_seeded():
    x = torch.randn(64, 10, dtype=F64)
    y = torch.randint(0, 5, (64,))
    xm, ym = R.mixup(x, y, 0.4, torch.Generator().manual_seed(3), num_classes=5)
    xm2, ym2 = R.mixup(x, y, 0.4, torch.Generator().manual_seed(3), num_classes=5)
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)
    assert torch.allclose(ym.sum(-1), torch.ones(64, dtype=F64))
    # each row is l x_i + (1 - l) x_j for the j whose label mass it carries
    onehot = F.one_hot(y, 5).double()
    for i in range(64):
        lam_candidates = []
        for j in range(64):
            a = (xm[i] - x[j]) @ (x[i] - x[j]) / max(float((x[i] - x[j]).pow(2).sum()), 1e-30)
            if torch.allclose(a * x[i] + (1 - a) * x[j], xm[i], atol=1e-10):
                lam_candidates.append((a, j))
        assert lam_candidates
        a, j = lam_candidates[0]
        assert 0 <= a <= 1 and torch.allclose(a * onehot[i] + (1 - a) * onehot[j], ym[i], atol=1e-10)
    # Beta(alpha, alpha) weights: mean 1/2; alpha < 1 piles them near 0 and 1
    lam = ym.max(-1).values
    assert lam.min() >= 0.5 - 1e-12
    loss = kiln.ops.cross_entropy(torch.randn(64, 5, dtype=F64), ym)   # soft targets are accepted
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="num_classes"):
        R.mixup(x, y, 0.4)
    with pytest.raises(ValueError, match="alpha"):
        R.mixup(x, y, 0.0, num_classes=5)


def test_gamma_draws_have_the_right_mean_and_variance():
    for alpha in (0.2, 1.0, 3.0):
        g = R._gamma(alpha, (200000,), torch.Generator().manual_seed(0))
        assert abs(g.mean().item() - alpha) < 0.02 * max(1, alpha)
        assert abs(g.var().item() - alpha) < 0.05 * max(1, alpha)


def test_augment_images_shifts_and_rotates_and_is_seeded():
    x = torch.zeros(2, 64, dtype=F64)
    x[:, 3 * 8 + 3] = 1.0
    # no shift and no rotation is the identity
    shifted = R.augment_images(x, torch.Generator().manual_seed(0), max_shift=0.0, max_degrees=0.0)
    assert torch.allclose(shifted, x, atol=1e-12)
    out = R.augment_images(x.repeat(50, 1), torch.Generator().manual_seed(1))
    again = R.augment_images(x.repeat(50, 1), torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and out.shape == (100, 64)
    assert not torch.allclose(out[0], out[1])
    # the ink moves at most max_shift plus what a 10 degree rotation moves it (centre within 1.5 px)
    img = out.reshape(100, 8, 8)
    coords = torch.arange(8, dtype=F64)
    mass = img.sum((1, 2))
    cy = (img.sum(2) * coords).sum(1) / mass
    cx = (img.sum(1) * coords).sum(1) / mass
    assert ((cy - 3).abs().max() < 1.6) and ((cx - 3).abs().max() < 1.6)
    assert ((cy - 3).abs().max() > 0.2)
    nchw = R.augment_images(x.reshape(2, 1, 8, 8), torch.Generator().manual_seed(1))
    assert nchw.shape == (2, 1, 8, 8)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(20000, 3)
    out = R.drop_path(x, 0.25, training=True)
    assert torch.equal(out[:, 0:1].expand(-1, 3), out)   # per sample, not per element
    assert abs(out.mean().item() - 1) < 0.02
    assert torch.equal(R.drop_path(x, 0.25, training=False), x)
    from kiln.models.vit import drop_path
    assert drop_path is R.drop_path
    with pytest.raises(ValueError, match="p must"):
        R.drop_path(x, 1.0, True)


def test_label_smoothing_is_torchs():
    logits = torch.randn(9, 5, dtype=F64)
    y = torch.randint(0, 5, (9,))
    out = R.smoothed_cross_entropy(0.1)(logits, y)
    assert rel_err(out, F.cross_entropy(logits, y, label_smoothing=0.1)) < BOUND[F64]


# --- transfer learning, multi-task ----------------------------------------------------------------

def test_transfer_learning_loads_the_trunk_freezes_it_and_trains_the_head():
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    loaded = R.load_trunk(model, pretrained.state_dict(), exclude=["3."])   # not the 10-class head
    assert "0.weight" in loaded and "1.running_mean" in loaded and "3.weight" not in loaded
    assert torch.equal(model[0].weight, pretrained[0].weight)
    trunk = nn.Sequential(*model[:3])
    R.freeze(trunk)
    model.train()   # a parent's train() must not unfreeze the trunk's batch-norm statistics
    assert not trunk.training and model[3].training
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    head_before = model[3].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
        opt.step()
    assert all(torch.equal(v, trunk.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(model[3].weight, head_before)
    R.freeze(trunk, False)
    model.train()
    assert trunk.training and all(p.requires_grad for p in trunk.parameters())
    with pytest.raises(ValueError, match="shape"):
        R.load_trunk(model, pretrained.state_dict())


def test_multitask_heads_sum_weighted_losses():
    torch.manual_seed(0)
    heads = R.MultiTaskHeads({"digit": nn.Linear(8, 10), "parity": nn.Linear(8, 2)}, {"digit": 1.0, "parity": 0.5})
    feats = torch.randn(4, 8)
    out = heads(feats)
    assert out["digit"].shape == (4, 10) and out["parity"].shape == (4, 2)
    y = torch.randint(0, 10, (4,))
    targets = {"digit": y, "parity": y % 2}
    loss = heads.loss(out, targets, {"digit": F.cross_entropy, "parity": F.cross_entropy})
    ref = F.cross_entropy(out["digit"], y) + 0.5 * F.cross_entropy(out["parity"], y % 2)
    assert torch.allclose(loss, ref)
    with pytest.raises(ValueError, match="weights"):
        R.MultiTaskHeads({"a": nn.Linear(2, 2)}, {"b": 1.0})


# --- initialization (notes 11) --------------------------------------------------------------------

def _deep_relu(depth=20, width=256):
    return nn.Sequential(*[m for _ in range(depth) for m in (kiln.nn.Linear(width, width), nn.ReLU())])


def _activation_variances(model, x):
    out = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                out.append(x.pow(2).mean().item())   # the second moment the notes' recursion keeps
    return out


def _mean_activation_variances(scheme, std=0.01, networks=8):
    """Per-layer second moment of the activations, averaged over ``networks`` independent
    initializations: the notes' Var is over the random weights, and one width-256 network's
    per-layer draw wanders by ~10% a layer around it."""
    # not torch.manual_seed: inputs drawn from the init generator's stream would equal weight rows
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(123))
    model = _deep_relu()
    runs = []
    for seed in range(networks):
        R.init_(model, scheme, std=std, generator=torch.Generator().manual_seed(seed))
        runs.append(_activation_variances(model, x))
    return [sum(v) / networks for v in zip(*runs)], x.pow(2).mean().item()


def test_he_init_keeps_activation_variance_through_20_relu_layers_and_small_normal_collapses():
    he, x_var = _mean_activation_variances("he_normal")
    assert len(he) == 20 and all(x_var / 2 <= v <= x_var * 2 for v in he), he
    small, _ = _mean_activation_variances("normal", std=0.01)
    assert small[-1] / x_var < 1e-30   # each layer multiplies it by 256 * 1e-4 / 2 ~ 0.013
    big, _ = _mean_activation_variances("normal", std=0.2)
    assert big[-1] / x_var > 1e10   # 256 * 0.04 / 2 ~ 5 per layer: explodes


def test_init_schemes_give_their_variance_and_zero_biases():
    layer = nn.Linear(400, 300)
    expect = {"he_normal": 2 / 400, "he_uniform": 2 / 400, "lecun_normal": 1 / 400, "lecun_uniform": 1 / 400,
              "xavier_normal": 2 / 700, "xavier_uniform": 2 / 700, "normal": 0.05 ** 2, "uniform": 0.05 ** 2 / 3}
    for scheme, var in expect.items():
        R.init_(layer, scheme, std=0.05, generator=torch.Generator().manual_seed(0))
        assert abs(layer.weight.var().item() / var - 1) < 0.03, scheme
        assert torch.equal(layer.bias, torch.zeros(300))
    with pytest.raises(ValueError, match="scheme"):
        R.init_(layer, "orthogonal")


# --- lottery ticket (notes 15) ----------------------------------------------------------------------

def test_prune_masks_remove_the_smallest_weights_per_layer_and_iterate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    masks = R.prune_masks(model, 0.5)
    assert set(masks) == {"0.weight", "2.weight"}
    for name, w in R.prunable(model).items():
        kept, pruned = w[masks[name] == 1].abs(), w[masks[name] == 0].abs()
        assert int(masks[name].sum()) == masks[name].numel() // 2 and kept.min() >= pruned.max()
    # a second round on other weights keeps the first round's pruned weights pruned
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    masks2 = R.prune_masks(model, 0.8, masks)
    for name in masks:
        assert (masks2[name] <= masks[name]).all()
        assert masks2[name].numel() - int(masks2[name].sum()) == round(0.8 * masks2[name].numel())
    glob = R.prune_masks(model, 0.5, scope="global")
    total = sum(m.sum().item() for m in glob.values())
    assert total == round(0.5 * (200 + 100))
    with pytest.raises(ValueError, match="sparsity"):
        R.prune_masks(model, 1.0)
    with pytest.raises(ValueError, match="prev_masks"):
        R.prune_masks(model, 0.5, {"nope": torch.ones(1)})


def test_masks_stay_applied_after_optimizer_steps_and_rewind_restores_the_initial_ticket():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    masks = R.prune_masks(model, 0.7)
    opt = kiln.optim.Adam(model.parameters(), lr=0.1)
    handle = R.keep_masks_applied(opt, model, masks)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 5, (8,))).backward()
        opt.step()   # Adam's momentum would revive pruned weights without the hook
        assert abs(R.sparsity_of(model) - 0.7) < 1e-3
    handle.remove()
    R.rewind(model, initial, masks)
    for name, w in R.prunable(model).items():
        assert torch.equal(w, initial[name] * masks[name])
    assert torch.equal(model[0].bias, initial["0.bias"])
