"""The regularizers of notes 14, the initializations of notes 11 and the lottery ticket of notes 15,
each a small piece that composes with any model and optimizer (kiln's or torch's).

* Weight decay (14.2): the notes' L2 penalty gamma/2 ||theta_W||^2 (gradient gamma theta_W), biases and
  normalization parameters excluded by default: ``l2_penalty`` for the coupled form (added to the
  loss), ``decay_groups`` for the decoupled form (param groups for AdamW).
* The implicit-regularization penalties of 14.3: L + lambda/4 ||dL/dtheta||^2 and the gradient-variance
  term alpha/(4m) sum_t ||dL/dtheta(B_t) - dL/dtheta(D)||^2 over m microbatches B_t of the batch D
  (the notes write B for the number of minibatches in the sum, as Smith et al. 2021 write m).
  ``penalized_backward`` forms their gradient with exact double backward, or, where an op refuses
  double backward, with finite-difference Hessian-vector products
  (grad(theta + eps v) - grad(theta - eps v)) / (2 eps).
* Ensembling, MixUp, image augmentation for the 8 x 8 digits, stochastic depth (``drop_path``), label
  smoothing (kiln's cross_entropy), transfer learning (``freeze``, ``load_trunk``) and multi-task heads.
* ``init_``: He / Xavier / LeCun, normal or uniform, with torch.nn.init only.
* Lottery ticket: iterative magnitude pruning (``prune_masks``), ``apply_masks``, masks kept applied
  after every optimizer step (``keep_masks_applied``) and rewinding to the initial weights (``rewind``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Weight decay (notes 14.2)

NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def no_decay_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters weight decay leaves
    alone by default: every bias, and every parameter of a normalization layer (its gain too:
    decaying a gain towards 0 shrinks the normalized signal, not the function's complexity)."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param_name == "bias" or param_name.endswith("_bias") or isinstance(module, NORM_TYPES):
                names.add(full)
    return names


def _decayed(model: nn.Module, exclude) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, decayed?) for every trainable parameter."""
    if exclude is None:
        skip = no_decay_names(model)
        excluded = lambda name, p: name in skip  # noqa: E731
    elif callable(exclude):
        excluded = exclude
    else:
        skip = set(exclude)
        unknown = skip - {name for name, _ in model.named_parameters()}
        if unknown:
            raise ValueError(f"exclude names parameters the model does not have: {sorted(unknown)}")
        excluded = lambda name, p: name in skip  # noqa: E731
    return [(name, p, not excluded(name, p)) for name, p in model.named_parameters() if p.requires_grad]


def decay_groups(model: nn.Module, weight_decay: float,
                 exclude: Callable[[str, nn.Parameter], bool] | Iterable[str] | None = None) -> list[dict]:
    """Two param groups for a decoupled-decay optimizer (``kiln.optim.AdamW(decay_groups(model, 0.05))``):
    the decayed parameters with ``weight_decay``, the rest with 0. ``exclude``: a predicate
    ``(name, parameter) -> bool`` or a collection of parameter names; default ``no_decay_names``."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    rows = _decayed(model, exclude)
    groups = [{"params": [p for _, p, d in rows if d], "weight_decay": weight_decay},
              {"params": [p for _, p, d in rows if not d], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def l2_penalty(model: nn.Module, lam: float,
               exclude: Callable[[str, nn.Parameter], bool] | Iterable[str] | None = None) -> Tensor:
    """The notes' coupled L2 penalty lam/2 sum ||theta_W||^2 to add to the loss: its gradient is
    lam * theta_W, so one SGD step is theta_W <- (1 - lr lam) theta_W - lr dL/dtheta_W."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    decayed = [p for _, p, d in _decayed(model, exclude) if d]
    if not decayed:
        return torch.zeros(())
    return lam / 2 * sum(p.pow(2).sum() for p in decayed)


# ---------------------------------------------------------------------------------------------
# Gradient-norm and gradient-variance penalties (notes 14.3)

# What torch and kiln say when an op has no differentiable backward; any other error is a bug
# to surface, not a reason to fall back.
_NO_DOUBLE_BACKWARD = ("double backward", "differentiate twice", "create_graph", "not implemented",
                       "does not require grad and does not have a grad_fn")


def _grads(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


class _SameRandomness:
    """Each closure evaluation starts from the same CPU (and CUDA) RNG state, so a loss with
    dropout draws the same masks at theta + eps v as at theta - eps v."""

    def __init__(self, params: Sequence[Tensor]):
        self.cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.cuda]

    def reset(self) -> None:
        torch.set_rng_state(self.cpu_state)
        for d, state in zip(self.cuda, self.cuda_states):
            torch.cuda.set_rng_state(state, d)


def _fd_step(params: Sequence[Tensor], vectors: Sequence[Tensor], eps: float | None) -> float:
    if eps is not None:
        return eps
    # central differences: the truncation error ~ eps^2 and the rounding error ~ u / eps balance
    # at eps ~ u^(1/3), scaled to the parameters' size along v
    u = torch.finfo(params[0].dtype).eps
    v_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in vectors))
    p_norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
    if v_norm == 0:
        return 0.0
    return u ** (1 / 3) * max(1.0, p_norm) / v_norm


def hessian_vector_product(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor],
                           method: str = "exact", eps: float | None = None) -> list[Tensor]:
    """H v, H the Hessian of ``loss_fn()`` (a closure that recomputes the loss) with respect to
    ``params``. ``method="exact"``: double backward; ``"finite_difference"``: the central difference
    (grad(theta + eps v) - grad(theta - eps v)) / (2 eps), parameters restored bit for bit after."""
    params = list(params)
    vectors = [v.detach() for v in vectors]
    if len(vectors) != len(params):
        raise ValueError(f"vectors: {len(vectors)} tensors for {len(params)} params")
    if method == "exact":
        grads = _grads(loss_fn(), params, create_graph=True)
        return [h.detach() for h in _grads(_dot(grads, vectors), params)]
    if method != "finite_difference":
        raise ValueError(f"method must be 'exact' or 'finite_difference', got {method!r}")
    step = _fd_step(params, vectors, eps)
    if step == 0.0:
        return [torch.zeros_like(p) for p in params]
    saved = [p.detach().clone() for p in params]
    rng = _SameRandomness(params)
    try:
        sides = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, p0, v in zip(params, saved, vectors):
                    p.copy_(p0 + sign * step * v)
            rng.reset()
            with torch.enable_grad():
                sides.append(_grads(loss_fn(), params))
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                p.copy_(p0)
    return [(gp - gm) / (2 * step) for gp, gm in zip(*sides)]


def penalized_backward(loss_fns: Sequence[Callable[[], Tensor]], params: Iterable[Tensor], *,
                       grad_norm: float = 0.0, grad_variance: float = 0.0,
                       weights: Sequence[float] | None = None, method: str = "auto",
                       eps: float | None = None) -> dict[str, float]:
    """Accumulate into each ``param.grad`` the gradient of the notes' L_SGD (14.3):

        L + grad_norm/4 ||dL/dtheta||^2 + grad_variance/(4m) sum_t ||dL_t/dtheta - dL/dtheta||^2

    ``loss_fns``: m closures, the mean loss of microbatch t (m = 1: the gradient-norm penalty
    alone). L = sum_t w_t L_t with ``weights`` w_t (default 1/m; pass each microbatch's share of
    the examples when they differ in size), the batch loss. ``method``: ``"exact"`` (double
    backward through every op), ``"finite_difference"`` (m Hessian-vector products by central
    differences: the gradient of the penalties is sum_t H_t u_t) or ``"auto"`` (exact, and finite
    differences when an op refuses double backward). The closures must be deterministic given the
    RNG state (each evaluation starts from the same one). Returns the loss and both penalties.
    """
    params = [p for p in params if p.requires_grad]
    m = len(loss_fns)
    if m == 0:
        raise ValueError("loss_fns is empty")
    if grad_norm < 0 or grad_variance < 0:
        raise ValueError(f"grad_norm and grad_variance must be >= 0, got {grad_norm}, {grad_variance}")
    w = [1.0 / m] * m if weights is None else [float(x) for x in weights]
    if len(w) != m:
        raise ValueError(f"weights: {len(w)} values for {m} loss_fns")
    if method not in ("auto", "exact", "finite_difference"):
        raise ValueError(f"method must be 'auto', 'exact' or 'finite_difference', got {method!r}")
    penalized = grad_norm > 0 or grad_variance > 0
    if method != "finite_difference":
        rng = _SameRandomness(params)
        try:
            return _penalized_exact(loss_fns, params, w, grad_norm, grad_variance, penalized)
        except RuntimeError as e:
            if method == "exact" or not any(s in str(e) for s in _NO_DOUBLE_BACKWARD):
                raise
            rng.reset()   # the finite-difference pass sees the randomness the exact one saw
    return _penalized_finite_difference(loss_fns, params, w, grad_norm, grad_variance, eps)


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads):
        g = g.detach()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


def _penalties(losses, grads, w, grad_norm, grad_variance):
    full = [sum(wt * g[i] for wt, g in zip(w, grads)) for i in range(len(grads[0]))]
    loss = sum(wt * l for wt, l in zip(w, losses))
    norm_term = grad_norm / 4 * _dot(full, full)
    dev = [[gi - fi for gi, fi in zip(g, full)] for g in grads]
    var_term = grad_variance / (4 * len(grads)) * sum(_dot(d, d) for d in dev)
    return loss, full, dev, norm_term, var_term


def _penalized_exact(loss_fns, params, w, grad_norm, grad_variance, penalized):
    losses = [fn() for fn in loss_fns]
    # gradients come back from autograd.grad and are added to .grad only once all of them
    # exist: an op refusing double backward midway leaves .grad untouched for the fallback
    grads = [_grads(l, params, create_graph=penalized) for l in losses]
    loss, full, _, norm_term, var_term = _penalties(losses, grads, w, grad_norm, grad_variance)
    if penalized:
        total = _grads(norm_term + var_term, params)
        full = [f + t for f, t in zip(full, total)]
    _accumulate(params, full)
    return {"loss": float(loss.detach()), "grad_norm_penalty": float(norm_term.detach()),
            "grad_variance_penalty": float(var_term.detach())}


def _penalized_finite_difference(loss_fns, params, w, grad_norm, grad_variance, eps):
    # the closures run in order as in the exact form (microbatch t's dropout follows t - 1's);
    # each one's perturbed re-evaluations start from the RNG state its first evaluation saw
    states, losses, grads = [], [], []
    for fn in loss_fns:
        states.append(_SameRandomness(params))
        with torch.enable_grad():
            loss_t = fn()
            grads.append(_grads(loss_t, params))
        losses.append(loss_t.detach())
    after = _SameRandomness(params)
    loss, full, dev, norm_term, var_term = _penalties(losses, grads, w, grad_norm, grad_variance)
    m = len(loss_fns)
    # d/dtheta of grad_norm/4 ||g||^2 = grad_norm/2 H g = sum_t w_t H_t (grad_norm/2 g); of the
    # variance term: grad_variance/(2m) sum_t (H_t - H) d_t = sum_t H_t (grad_variance/(2m)) (d_t - w_t S),
    # S = sum_s d_s (0 when the weights are equal)
    total_dev = [sum(d[i] for d in dev) for i in range(len(params))]
    out = [f.clone() for f in full]
    for t, fn in enumerate(loss_fns):
        u = [w[t] * grad_norm / 2 * f + grad_variance / (2 * m) * (d - w[t] * s)
             for f, d, s in zip(full, dev[t], total_dev)]
        if all(float(x.abs().max()) == 0 for x in u if x.numel()):
            continue
        states[t].reset()
        hv = hessian_vector_product(fn, params, u, method="finite_difference", eps=eps)
        out = [o + h for o, h in zip(out, hv)]
    after.reset()
    _accumulate(params, out)
    return {"loss": float(loss), "grad_norm_penalty": float(norm_term), "grad_variance_penalty": float(var_term)}


# ---------------------------------------------------------------------------------------------
# Ensembles, data augmentation, stochastic depth, label smoothing (notes 14.4, 14.5)


class Ensemble(nn.Module):
    """K independently trained classifiers; the prediction is the mean of their softmax
    probabilities (returned as probabilities, not logits: ``argmax`` and ``log`` of it work)."""

    def __init__(self, models: Iterable[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(models)
        if len(self.members) == 0:
            raise ValueError("models is empty")

    def forward(self, *args, **kwargs) -> Tensor:
        return torch.stack([torch.softmax(m(*args, **kwargs), dim=-1) for m in self.members]).mean(0)


def mixup(x: Tensor, y: Tensor, alpha: float, generator: torch.Generator | None = None,
          num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """MixUp (Zhang et al. 2018): x' = l x + (1 - l) x[perm], y' likewise, l ~ Beta(alpha, alpha)
    per example, perm a random pairing. ``y``: class indices (``num_classes`` needed) or class
    probabilities (N, C). Returns the mixed inputs and soft targets for cross_entropy."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if num_classes is None:
            raise ValueError("num_classes is needed when y holds class indices")
        y = F.one_hot(y.long(), num_classes).to(x.dtype)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows for {n} inputs")
    # torch's Beta has no generator argument: draw it as G1 / (G1 + G2) from uniforms we own
    g = _gamma(alpha, (2, n), generator)
    lam = (g[0] / (g[0] + g[1])).to(x.device, x.dtype)
    perm = torch.randperm(n, generator=generator).to(x.device)
    lx = lam.reshape(n, *(1,) * (x.dim() - 1))
    ly = lam.reshape(n, *(1,) * (y.dim() - 1)).to(y.dtype)
    return lx * x + (1 - lx) * x[perm], ly * y + (1 - ly) * y[perm]


def _gamma(alpha: float, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Gamma(alpha, 1) draws from ``generator`` (Marsaglia-Tsang, boosted for alpha < 1)."""
    a = alpha if alpha >= 1 else alpha + 1
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(shape, dtype=torch.float64)
    todo = torch.ones(shape, dtype=torch.bool)
    while todo.any():
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        v = (1 + c * z) ** 3
        r = torch.rand(shape, generator=generator, dtype=torch.float64)
        ok = (v > 0) & (torch.log(r.clamp_min(1e-300)) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        take = ok & todo
        out[take] = (d * v)[take]
        todo &= ~ok
    if alpha < 1:
        out = out * torch.rand(shape, generator=generator, dtype=torch.float64) ** (1 / alpha)
    return out


def random_shift(x: Tensor, shift: int) -> Tensor:
    """Each 8 x 8 image (a row of 64) moved by a whole number of pixels, up to ``shift`` in each
    direction, the uncovered border zero (the standardized background): the augmentation of
    notes 14.5 and 18.3, exact (no interpolation; ``augment_images`` is the bilinear shift and
    rotation). Draws from torch's generator, which a checkpoint saves."""
    n = x.shape[0]
    images = F.pad(x.reshape(n, 8, 8), (shift, shift, shift, shift))
    dy, dx = (torch.randint(0, 2 * shift + 1, (n,), device=x.device) for _ in range(2))
    grid = torch.arange(8, device=x.device)
    rows = (dy[:, None] + grid)[:, :, None].expand(n, 8, 8 + 2 * shift)
    images = images.gather(1, rows)
    cols = (dx[:, None] + grid)[:, None, :].expand(n, 8, 8)
    return images.gather(2, cols).reshape(n, 64)


def augment_images(x: Tensor, generator: torch.Generator | None = None, *, size: int = 8,
                   max_shift: float = 1.0, max_degrees: float = 10.0) -> Tensor:
    """Small random shifts (up to ``max_shift`` pixels each way) and rotations (up to
    ``max_degrees``) of square images given as rows of ``size * size`` (the digits) or as
    (N, C, size, size); bilinear, zero (the standardized background) outside. Seeded by ``generator``."""
    flat = x.dim() == 2
    images = x.reshape(x.shape[0], 1, size, size) if flat else x
    n = images.shape[0]
    draws = torch.rand(3, n, generator=generator, dtype=torch.float64) * 2 - 1
    angle = draws[0] * math.radians(max_degrees)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2/size
    tx, ty = (draws[1:] * max_shift * 2 / size)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(x.shape)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop a residual branch for whole samples, scale the survivors by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop_path: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape[0], *(1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


def smoothed_cross_entropy(label_smoothing: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Label smoothing (the targets mixed with the uniform distribution): kiln's fused
    cross_entropy with torch's ``label_smoothing``, as a ``loss(logits, target)``."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    from kiln.ops import cross_entropy

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(logits, target, label_smoothing=label_smoothing)

    return loss


# ---------------------------------------------------------------------------------------------
# Transfer learning and multi-task heads (notes 14.4)


def freeze(module: nn.Module, frozen: bool = True) -> nn.Module:
    """Stop (or, ``frozen=False``, restart) training ``module``'s parameters, and keep its
    batch-norm statistics fixed while frozen (eval mode, pinned through a parent's ``train()`` by
    an instance attribute on each submodule: save frozen models by state_dict, not by pickling the
    module). Returns the module."""
    for p in module.parameters():
        p.requires_grad_(not frozen)
    for sub in module.modules():
        if frozen:
            # a parent's model.train() calls train() on each submodule: pin each to eval
            sub.train = (lambda m: lambda mode=True: nn.Module.train(m, False))(sub)  # type: ignore[method-assign]
        elif "train" in sub.__dict__:
            del sub.train
    module.train(not frozen)
    return module


def load_trunk(model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "",
               exclude: Iterable[str] = ()) -> list[str]:
    """Load a pretrained trunk into ``model``: the entries of ``state_dict`` (keys under
    ``prefix``, stripped) that the model has, except the keys starting with one of ``exclude``
    (the pretrained head). Returns the keys loaded; a shape mismatch is an error naming the key."""
    own = model.state_dict()
    picked = {}
    exclude = tuple(exclude)
    for key, value in state_dict.items():
        if not key.startswith(prefix) or (exclude and key.startswith(exclude)):
            continue
        name = key[len(prefix):]
        if name in own:
            if own[name].shape != value.shape:
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)}, the model's "
                                 f"{name!r} {tuple(own[name].shape)}")
            picked[name] = value
    if not picked:
        raise ValueError(f"state_dict has no entry (under prefix {prefix!r}) that the model has")
    model.load_state_dict(picked, strict=False)
    return sorted(picked)


class MultiTaskHeads(nn.Module):
    """A shared trunk's features through one head per task: ``forward(features)`` returns
    ``{name: head(features)}``; ``loss(outputs, targets, loss_fns)`` is the weighted sum."""

    def __init__(self, heads: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None):
        super().__init__()
        if not heads:
            raise ValueError("heads is empty")
        self.heads = nn.ModuleDict(heads)
        self.weights = {name: 1.0 for name in heads} if weights is None else dict(weights)
        if set(self.weights) != set(heads):
            raise ValueError(f"weights names {sorted(self.weights)}, heads {sorted(heads)}")

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {name: head(features) for name, head in self.heads.items()}

    def loss(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
             loss_fns: Mapping[str, Callable[[Tensor, Tensor], Tensor]]) -> Tensor:
        return sum(self.weights[name] * loss_fns[name](outputs[name], targets[name]) for name in self.heads)


# ---------------------------------------------------------------------------------------------
# Initialization (notes 11), torch.nn.init only

INIT_SCHEMES = ("he_normal", "he_uniform", "xavier_normal", "xavier_uniform", "lecun_normal", "lecun_uniform",
                "normal", "uniform")


def _weighted_layers(model: nn.Module):
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            yield module


def init_(model: nn.Module, scheme: str, std: float = 0.01, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialize every Linear and Conv weight of ``model`` in place, biases to zero.

    he_*: Var = 2 / fan_in (ReLU, notes 11.3); lecun_*: Var = 1 / fan_in (the notes' 11.2
    "Glorot/Xavier" variance for linear / tanh); xavier_*: torch's Glorot, Var = 2 / (fan_in + fan_out);
    ``normal`` / ``uniform``: N(0, std^2) / U(-std, std) whatever the width (the unscaled baseline)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    init = nn.init
    kw = {"generator": generator} if generator is not None else {}
    with torch.no_grad():
        for layer in _weighted_layers(model):
            w = layer.weight
            if scheme == "he_normal":
                init.kaiming_normal_(w, nonlinearity="relu", **kw)
            elif scheme == "he_uniform":
                init.kaiming_uniform_(w, nonlinearity="relu", **kw)
            elif scheme == "lecun_normal":
                init.kaiming_normal_(w, nonlinearity="linear", **kw)
            elif scheme == "lecun_uniform":
                init.kaiming_uniform_(w, nonlinearity="linear", **kw)
            elif scheme == "xavier_normal":
                init.xavier_normal_(w, **kw)
            elif scheme == "xavier_uniform":
                init.xavier_uniform_(w, **kw)
            elif scheme == "normal":
                init.normal_(w, 0.0, std, **kw)
            else:
                init.uniform_(w, -std, std, **kw)
            if layer.bias is not None:
                init.zeros_(layer.bias)
    return model


# ---------------------------------------------------------------------------------------------
# Lottery ticket (notes 15): iterative magnitude pruning with rewinding


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights a ticket prunes: every Linear / Conv weight (biases and norms stay dense)."""
    names = {id(layer.weight) for layer in _weighted_layers(model)}
    return {name: p for name, p in model.named_parameters() if id(p) in names}


def prune_masks(model: nn.Module, sparsity: float, prev_masks: Mapping[str, Tensor] | None = None,
                scope: str = "layer") -> dict[str, Tensor]:
    """Masks (1 keep, 0 pruned, the weights' dtype) that zero the ``sparsity`` fraction of the
    smallest-magnitude prunable weights. ``sparsity`` is the total fraction pruned, counting the
    weights ``prev_masks`` already pruned (they stay pruned): one round of iterative pruning.
    ``scope="layer"``: that fraction of each tensor; ``"global"``: of all of them together."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    weights = prunable(model)
    prev = dict(prev_masks or {})
    unknown = set(prev) - set(weights)
    if unknown:
        raise ValueError(f"prev_masks names weights the model does not prune: {sorted(unknown)}")
    scores = {}
    for name, w in weights.items():
        score = w.detach().abs().double().clone()
        if name in prev:
            score[prev[name] == 0] = -1.0   # already pruned: below every live weight
        scores[name] = score
    if scope == "layer":
        groups = [[name] for name in weights]
    else:
        groups = [list(weights)]
    masks = {}
    for group in groups:
        flat = torch.cat([scores[n].flatten() for n in group])
        k = int(round(sparsity * flat.numel()))
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k > 0:
            keep[torch.argsort(flat, stable=True)[:k]] = False
        start = 0
        for n in group:
            size = scores[n].numel()
            masks[n] = keep[start:start + size].reshape(scores[n].shape).to(weights[n].dtype)
            start += size
    return masks


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned weights in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device))


def keep_masks_applied(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping[str, Tensor]):
    """Re-apply ``masks`` after every ``optimizer.step()`` (momentum would otherwise revive pruned
    weights). Returns the hook handle: ``.remove()`` it to stop."""
    apply_masks(model, masks)
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: apply_masks(model, masks))


def rewind(model: nn.Module, initial_state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """The ticket: the initial weights (``initial_state``, a state_dict saved before training)
    with the pruned ones zeroed."""
    model.load_state_dict(initial_state)
    apply_masks(model, masks)


def sparsity_of(model: nn.Module) -> float:
    """The fraction of the prunable weights that are exactly zero."""
    weights = list(prunable(model).values())
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
