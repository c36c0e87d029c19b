"""kiln.patch(model): put kiln's fused ops into a third-party model, in place, keeping its weights.

    report = kiln.patch(model)            # Hugging Face, timm or plain torch model
    print(report)                         # what was replaced (module path, old -> new), what was left and why

The walk replaces what kiln has an exact form for and leaves the rest, saying why. Every weight
stays: where kiln's module subclasses torch's and only adds attributes (Linear, LayerNorm,
BatchNorm, Conv2d, MultiheadAttention, RMSNorm) the module's class is swapped, so the module
object, its Parameter objects, hooks and state_dict keys are the same ones (tied weights stay
tied, an optimizer built before keeps working). Otherwise the kiln module is built with the
same arguments and the very Parameter objects are moved into it (RNNs, Hugging Face's Conv1D
and RMSNorm modules); if the names do not line up they are copied (load_state_dict) and the
report says so. A model patched twice is unchanged the second time.

Forward code kiln does not own is changed only in these scoped ways, never by patching torch
or a library's module: (1) Hugging Face attention goes through transformers' own registry
(``AttentionInterface.register("kiln", ...)`` and ``model.set_attn_implementation("kiln")``);
(2) modules whose forward kiln recognises (its source, parsed, has the known shape) get an
instance attribute ``forward`` (the gated MLP, the causal-LM loss) or a copy of their class's
forward whose global names ``apply_rotary_pos_emb`` / ``F`` point at kiln's (the rotary
embedding, timm's fused attention). The copy lives on that module instance only: other
instances, other models and the library's module are untouched, and ``unpatch`` is deleting
the instance attribute.

Limits: a module replaced by a new kiln module (Hugging Face's Conv1D and RMSNorm, RNNs) is no
longer an instance of the library's class (code that tests ``isinstance(m, Conv1D)``, such as
GPT-2's head pruning, skips it); a module whose forward was copied (rotary, timm attention)
cannot be pickled whole (its state_dict can, unchanged); kiln.nn.MultiheadAttention runs its
explicit path for ``need_weights=True``, torch's default (pass need_weights=False).
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import sys
import textwrap
import types
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln import ops

# The kinds of replacement, as ``ops=[...]`` names them.
KINDS = {
    "linear": "nn.Linear -> kiln.nn.Linear (linear_act)",
    "activation": "an activation module right after a Linear / Conv1D / Conv2d (nn.Sequential, or a "
                  "module whose forward applies it to that layer's output only) fused into linear_act; "
                  "needs 'linear' (or 'conv1d' / 'conv2d') for that layer",
    "conv1d": "Hugging Face Conv1D (GPT-2) -> kiln.patch.Conv1D (linear_act on the transposed weight)",
    "layer_norm": "nn.LayerNorm -> kiln.nn.LayerNorm",
    "batch_norm": "nn.BatchNorm1d/2d/3d -> kiln.nn.BatchNorm1d/2d/3d",
    "conv2d": "nn.Conv2d -> kiln.nn.Conv2d",
    "multihead_attention": "nn.MultiheadAttention -> kiln.nn.MultiheadAttention",
    "rnn": "nn.LSTM / nn.GRU / nn.RNN -> kiln.nn.LSTM / GRU / RNN",
    "rms_norm": "nn.RMSNorm and Hugging Face LlamaRMSNorm-style modules -> kiln.nn.RMSNorm",
    "gated_mlp": "a LLaMA-style gated MLP (down(act(gate(x)) * up(x))) -> kiln.ops.swiglu / geglu",
    "rotary": "Hugging Face apply_rotary_pos_emb inside an attention forward -> kiln.ops.rotary_embedding",
    "attention": "scaled-dot-product attention -> kiln.ops.attention (transformers' attention interface; "
                 "timm's fused Attention)",
    "lm_head_loss": "a Hugging Face *ForCausalLM's lm_head + loss, when labels are passed -> "
                    "kiln.ops.linear_cross_entropy (no logits held; output.logits is None)",
}

# Activation modules kiln's linear_act computes, by the exact class (subclasses may differ).
_TORCH_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
_LIBRARY_ACTIVATIONS = {  # "module.qualname" -> activation; each checked against its source
    "transformers.activations.GELUActivation": "gelu",        # F.gelu, or the erf formula
    "transformers.activations.NewGELUActivation": "gelu_tanh",  # the tanh formula (GPT-2's gelu_new)
    "transformers.activations.GELUTanh": "gelu_tanh",
    "transformers.activations.FastGELUActivation": "gelu_tanh",  # the tanh formula, factored
    "transformers.activations.SiLUActivation": "silu",
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
}


def activation_name(module: nn.Module) -> Optional[str]:
    """linear_act's name of this activation module's function, or None if kiln has none."""
    cls = type(module)
    if cls in _TORCH_ACTIVATIONS:
        return _TORCH_ACTIVATIONS[cls]
    if cls is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return _LIBRARY_ACTIVATIONS.get(f"{cls.__module__}.{cls.__qualname__}")


def _looks_like_activation(module: nn.Module) -> bool:
    return type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations",
                                       "timm.layers.activations")


# ---------------------------------------------------------------------------------------------
# The report.


@dataclass
class Replaced:
    path: str
    old: str
    new: str
    kind: str
    note: str = ""


@dataclass
class Left:
    path: str
    type: str
    reason: str


@dataclass
class PatchReport:
    """What ``kiln.patch`` replaced (module path, old -> new) and what it left, with why.

    ``replaced`` and ``left`` are lists of entries; ``already`` counts modules that were
    kiln's already; ``dry_run`` says nothing was changed. ``print(report)`` is a table."""

    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)
    already: int = 0
    dry_run: bool = False
    ops: tuple = ()

    @property
    def changed(self) -> bool:
        return bool(self.replaced) and not self.dry_run

    def paths(self, kind: Optional[str] = None) -> list:
        return [r.path for r in self.replaced if kind is None or r.kind == kind]

    def __str__(self) -> str:
        head = "kiln.patch" + (" (dry run: nothing changed)" if self.dry_run else "")
        lines = [head]
        if not self.replaced:
            lines.append("nothing to do" + (f": {self.already} module(s) already kiln's" if self.already else ""))
        else:
            rows = [(r.path or "<model>", f"{r.old} -> {r.new}", r.kind, r.note) for r in self.replaced]
            lines.append(f"{'would replace' if self.dry_run else 'replaced'} ({len(rows)}):")
            lines += _table(("module", "old -> new", "kind", "note"), rows)
            if self.already:
                lines.append(f"already kiln's: {self.already} module(s)")
        if self.left:
            lines.append(f"left ({len(self.left)}):")
            lines += _table(("module", "type", "why"), [(l.path or "<model>", l.type, l.reason) for l in self.left])
        return "\n".join(lines)

    __repr__ = __str__


def _table(header, rows) -> list:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    widths[-1] = 0  # the last column runs free
    fmt = lambda row: "  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
    return [fmt(header), fmt(["-" * len(h) for h in header])] + [fmt(r) for r in rows]


def _typename(module_or_cls) -> str:
    cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
    mod = cls.__module__
    short = {"torch.nn.modules": "nn", "kiln.nn": "kiln.nn", "kiln.patch": "kiln.patch"}
    for prefix, name in short.items():
        if mod.startswith(prefix):
            return f"{name}.{cls.__qualname__}"
    return f"{mod.split('.')[0]}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------
# kiln modules for third-party layers that have no torch class to subclass.


class Conv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2: weight (in, out), y = x W + b) on kiln.ops.linear_act, with an
    optional fused ``activation``. Same parameters (weight (nx, nf), bias (nf,)) and state_dict keys.

    linear_act takes an (out, in) weight: the (in, out) one is transposed and made contiguous at
    each call, a copy of in * out values, small next to the GEMM's 2 * tokens * in * out FLOPs."""

    def __init__(self, nf: int, nx: int, activation: str = "identity", device=None, dtype=None):
        super().__init__()
        self.nf, self.nx, self.activation = nf, nx, activation
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear_act(x, self.weight.t(), self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, activation={self.activation}"


class HFRMSNorm(nn.RMSNorm):
    """A Hugging Face LlamaRMSNorm-style module on kiln.ops.rms_norm: ``weight`` and
    ``variance_epsilon`` as the original. Same arithmetic as its forward: normalised in float32,
    cast back to the input's dtype, times the weight (so a float32 weight on a bfloat16 input
    gives float32, as Hugging Face's)."""

    def __init__(self, hidden_size: int, eps: float, device=None, dtype=None):
        super().__init__(hidden_size, eps, True, device, dtype)
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            return ops.rms_norm(x, self.weight, self.eps)
        normed = ops.rms_norm(x.float(), None, self.eps).to(x.dtype)
        return self.weight * normed


class LMHead(nn.Linear):
    """The lm_head of a patched causal LM: kiln.nn.Linear's forward, except while the model's
    fused loss runs, when it keeps its input (the last hidden states) for linear_cross_entropy
    and returns a placeholder that holds no memory (the logits are never formed)."""

    activation = "identity"
    _kiln_capture = None

    def forward(self, input: Tensor) -> Tensor:
        if self._kiln_capture is not None:
            self._kiln_capture.append(input)
            placeholder = input.new_empty(()).expand(*input.shape[:-1], self.out_features)
            self._kiln_capture.append(placeholder)
            return placeholder
        return ops.linear_act(input, self.weight, self.bias, "identity")


# ---------------------------------------------------------------------------------------------
# Reading a module's forward: only what kiln recognises exactly is changed.


def _unwrapped(func):
    while hasattr(func, "__wrapped__"):
        func = func.__wrapped__
    return func


@functools.lru_cache(maxsize=None)
def _forward_ast(cls) -> Optional[ast.FunctionDef]:
    """The class's forward, parsed (None when its source is not available)."""
    func = cls.__dict__.get("forward") or getattr(cls, "forward", None)
    if func is None:
        return None
    try:
        source = textwrap.dedent(inspect.getsource(_unwrapped(func)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0]
    return node if isinstance(node, ast.FunctionDef) else None


def _self_attr(node, self_name: str) -> Optional[str]:
    """'name' for an expression ``self.name``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name:
        return node.attr
    return None


def _self_call(node, self_name: str):
    """(name, args) for ``self.name(args)`` with positional args only."""
    if isinstance(node, ast.Call) and not node.keywords:
        name = _self_attr(node.func, self_name)
        if name is not None:
            return name, node.args
    return None


def _attr_counts(fn: ast.FunctionDef, self_name: str) -> dict:
    counts: dict = {}
    for node in ast.walk(fn):
        name = _self_attr(node, self_name)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _fusible_pairs(cls) -> list:
    """(layer, activation) submodule names such that the class's forward applies
    ``self.activation`` to ``self.layer``'s output and uses neither anywhere else: either nested,
    ``self.act(self.fc(...))``, or two statements in a row, ``h = self.fc(...)``, ``h2 =
    self.act(h)``, with h not read afterwards (unless h2 is h)."""
    fn = _forward_ast(cls)
    if fn is None or not fn.args.args:
        return []
    me = fn.args.args[0].arg
    counts = _attr_counts(fn, me)
    once = lambda *names: all(counts.get(n) == 1 for n in names)
    pairs = []
    for node in ast.walk(fn):  # nested: self.act(self.fc(...))
        outer = _self_call(node, me)
        if outer and len(outer[1]) == 1 and isinstance(outer[1][0], ast.Call):
            layer = _self_attr(outer[1][0].func, me)
            if layer is not None and once(layer, outer[0]):
                pairs.append((layer, outer[0]))
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    for i, (first, second) in enumerate(zip(body, body[1:])):
        if not (isinstance(first, ast.Assign) and isinstance(second, ast.Assign)):
            continue
        if len(first.targets) != 1 or len(second.targets) != 1:
            continue
        h, h2 = first.targets[0], second.targets[0]
        if not (isinstance(h, ast.Name) and isinstance(h2, ast.Name) and isinstance(first.value, ast.Call)):
            continue
        layer = _self_attr(first.value.func, me)
        act = _self_call(second.value, me)
        if layer is None or act is None or len(act[1]) != 1:
            continue
        if not (isinstance(act[1][0], ast.Name) and act[1][0].id == h.id) or not once(layer, act[0]):
            continue
        if h2.id != h.id:  # h must not be read after the activation
            later = [n for s in body[i + 2:] for n in ast.walk(s)]
            if any(isinstance(n, ast.Name) and n.id == h.id for n in later):
                continue
        pairs.append((layer, act[0]))
    return pairs


def _gated_names(cls) -> Optional[tuple]:
    """(gate, up, down, act) for a forward that is ``return self.down(self.act(self.gate(x)) *
    self.up(x))`` (LLaMA's MLP and its copies), directly or through one local variable."""
    fn = _forward_ast(cls)
    if fn is None or len(fn.args.args) != 2:
        return None
    me, x = fn.args.args[0].arg, fn.args.args[1].arg
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return):
        expr = body[0].value
    elif (len(body) == 2 and isinstance(body[0], ast.Assign) and isinstance(body[1], ast.Return)
          and len(body[0].targets) == 1 and isinstance(body[0].targets[0], ast.Name)
          and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        expr = body[0].value
    else:
        return None
    down = _self_call(expr, me)
    if not down or len(down[1]) != 1:
        return None
    prod = down[1][0]
    if not (isinstance(prod, ast.BinOp) and isinstance(prod.op, ast.Mult)):
        return None
    act = _self_call(prod.left, me)
    up = _self_call(prod.right, me)
    if not act or not up or len(act[1]) != 1 or len(up[1]) != 1:
        return None
    gate = _self_call(act[1][0], me)
    if not gate or len(gate[1]) != 1:
        return None
    if not all(isinstance(a, ast.Name) and a.id == x for a in (gate[1][0], up[1][0])):
        return None
    return gate[0], up[0], down[0], act[0]


_LLAMA_RMS_NORM = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""

_APPLY_ROTARY = """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
"""

_ROTATE_HALF = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""


class _Normalise(ast.NodeTransformer):
    """Drops what does not change a function's arithmetic: docstrings, annotations, decorators, its name."""

    def visit_FunctionDef(self, node):
        node.name, node.decorator_list, node.returns = "f", [], None
        for a in node.args.args + node.args.kwonlyargs:
            a.annotation = None
        node.body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        self.generic_visit(node)
        return node


def _shape_of(source_or_func) -> Optional[str]:
    try:
        source = source_or_func if isinstance(source_or_func, str) else inspect.getsource(_unwrapped(source_or_func))
        tree = ast.parse(textwrap.dedent(source))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    return ast.dump(_Normalise().visit(tree.body[0]))


_KNOWN = {name: _shape_of(src) for name, src in
          (("rms_norm", _LLAMA_RMS_NORM), ("rotary", _APPLY_ROTARY), ("rotate_half", _ROTATE_HALF))}


def _is_llama_rms_norm(module: nn.Module) -> Optional[float]:
    """eps, for a module whose forward is LlamaRMSNorm's (eps as ``variance_epsilon`` or ``eps``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or module._modules:
        return None
    cls = type(module)
    func = cls.__dict__.get("forward")
    if func is None:
        return None
    shape = _shape_of(func)
    if shape is None:
        return None
    if shape == _KNOWN["rms_norm"] and isinstance(getattr(module, "variance_epsilon", None), (int, float)):
        return float(module.variance_epsilon)
    if (shape == _KNOWN["rms_norm"].replace("attr='variance_epsilon'", "attr='eps'")
            and isinstance(getattr(module, "eps", None), (int, float))):
        return float(module.eps)
    return None


def _rebound(func, globals_update: dict):
    """A copy of ``func`` (through its functools.wraps wrappers) whose innermost function sees
    ``globals_update`` over its module's globals. None if a wrapper does not hold the function it
    wraps in its closure (then kiln cannot rebuild it)."""
    chain = [func]
    while hasattr(chain[-1], "__wrapped__"):
        chain.append(chain[-1].__wrapped__)

    def rebuild(f, globals_, closure):
        new = types.FunctionType(f.__code__, globals_, f.__name__, f.__defaults__, closure)
        new.__kwdefaults__ = f.__kwdefaults__
        new.__dict__.update(f.__dict__)
        new.__qualname__, new.__doc__, new.__module__ = f.__qualname__, f.__doc__, f.__module__
        return new

    inner = chain[-1]
    new = rebuild(inner, {**inner.__globals__, **globals_update}, inner.__closure__)
    for wrapper, wrapped in zip(reversed(chain[:-1]), reversed(chain[1:])):
        cells = wrapper.__closure__ or ()
        hits = [i for i, c in enumerate(cells) if c.cell_contents is wrapped]
        if len(hits) != 1:
            return None
        closure = tuple(types.CellType(new) if i == hits[0] else c for i, c in enumerate(cells))
        outer = rebuild(wrapper, wrapper.__globals__, closure)
        outer.__wrapped__ = new
        new = outer
    return new


# ---------------------------------------------------------------------------------------------
# kiln's forms of library functions.


def _rotary(q, k, cos, sin, unsqueeze_dim=1):
    """Hugging Face's apply_rotary_pos_emb (rotate-half layout) on kiln.ops.rotary_embedding."""
    if q.dtype != cos.dtype or k.dtype != q.dtype:  # HF promotes mixed dtypes; kiln's op wants one
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        if k.dtype != q.dtype:
            return _APPLY_ROTARY_FALLBACK(q, k, cos, sin, unsqueeze_dim)
    return ops.rotary_embedding(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _APPLY_ROTARY_FALLBACK(q, k, cos, sin, unsqueeze_dim):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    half = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)
    return q * cos + half(q) * sin, k * cos + half(k) * sin


def _additive(mask: Tensor, dtype) -> Tensor:
    """An SDPA-style bool mask (True = attend) as an additive one (-inf = hidden)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


def _run_attention(query, key, value, mask, dropout, scale, causal, bias_extra=None):
    """kiln.ops.attention for SDPA's arguments: mask None, bool (True = attend) or float (added)."""
    padding = bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            B, Tk = query.shape[0], key.shape[2]
            # a padding-only mask, (B, 1, Tq, Tk) with the query dim broadcast: kiln's key padding mask
            if (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-1] == Tk and mask.shape[0] == B
                    and (mask.shape[2] == 1 or mask.stride(2) == 0) and bias_extra is None):
                padding = ~mask[:, 0, 0, :]
            else:
                bias = _additive(mask, query.dtype)
        else:
            bias = mask.to(query.dtype)
    if bias_extra is not None:
        bias = bias_extra.to(query.dtype) if bias is None else bias + bias_extra.to(query.dtype)
    return ops.attention(query, key, value, causal=bool(causal), key_padding_mask=padding, scale=scale,
                         dropout_p=dropout, attn_bias=bias)


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                 position_bias=None, **kwargs):
    """transformers' attention interface on kiln.ops.attention (registered as "kiln").

    query (B, H, Tq, D), key / value (B, Hkv, Tk, D) (grouped-query attention as is); the mask
    as transformers builds it for SDPA (kiln registers sdpa's mask builder for "kiln"): None
    with causality from ``is_causal`` / ``module.is_causal``, or a 4-D bool (True = attend) or
    float mask. Returns (output (B, Tq, H, D), None), as transformers' sdpa_attention_forward."""
    if kwargs.get("softcap") is not None:
        raise ValueError("kiln attention: softcap is not supported; use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None:
        raise ValueError("kiln attention: attention sinks (s_aux) are not supported; use 'eager'")
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_length:
        # as transformers' sdpa path: a prefill into an empty static cache attends to the first keys
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    out = _run_attention(query, key, value, attention_mask, dropout, scaling, is_causal, position_bias)
    return out.transpose(1, 2).contiguous(), None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """F.scaled_dot_product_attention's arguments on kiln.ops.attention (for timm's Attention)."""
    Tq, Tk = query.shape[-2], key.shape[-2]
    if query.dim() != 4:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    if is_causal and Tq != Tk:  # SDPA's causal mask aligns top-left, kiln's bottom-right
        attn_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril()
        is_causal = False
    return _run_attention(query, key, value, attn_mask, dropout_p, scale, is_causal)


class _FunctionalWithKilnSDPA(types.ModuleType):
    """torch.nn.functional as a module's forward sees it after patching: every name is torch's,
    but scaled_dot_product_attention is kiln's."""

    def __getattr__(self, name):
        return getattr(F, name)


_F_KILN = _FunctionalWithKilnSDPA("torch.nn.functional (kiln attention)")
_F_KILN.scaled_dot_product_attention = scaled_dot_product_attention

_GATED = {"silu": lambda g, u: ops.swiglu(g, u), "gelu": lambda g, u: ops.geglu(g, u, "none"),
          "gelu_tanh": lambda g, u: ops.geglu(g, u, "tanh")}


def _gated_forward(self, x):
    """A LLaMA-style MLP's forward on kiln: down(act(gate(x)) * up(x)) with act * up in one op."""
    gate, up, down, activation = self._kiln_gated
    return getattr(self, down)(_GATED[activation](getattr(self, gate)(x), getattr(self, up)(x)))


@functools.lru_cache(maxsize=None)
def _signature(func) -> inspect.Signature:
    return inspect.signature(func)


def _causal_lm_forward(self, *args, **kwargs):
    """A Hugging Face causal LM's forward; with labels, the loss from kiln.ops.linear_cross_entropy
    on the last hidden states and lm_head's weight, the logits never formed (output.logits None).
    Hugging Face's ForCausalLMLoss otherwise: labels shifted left by one with ignore_index (-100)
    padding, or ``shift_labels`` as given; mean over the kept tokens, or sum / num_items_in_batch."""
    forward = type(self).forward
    signature = _signature(forward)
    bound = signature.bind_partial(self, *args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None:
        return forward(self, *args, **kwargs)
    extra = bound.arguments.get("kwargs", {}) if "kwargs" in signature.parameters else {}
    bound.arguments["labels"] = None
    want_dict = extra.pop("return_dict", None)
    if want_dict is None:
        want_dict = getattr(getattr(self, "config", None), "return_dict", True)
    extra["return_dict"] = True
    bound.arguments["kwargs"] = extra
    head = self.get_output_embeddings()
    head._kiln_capture = []
    try:
        out = forward(*bound.args, **bound.kwargs)
        captured = head._kiln_capture
    finally:
        head._kiln_capture = None
    if len(captured) != 2 or getattr(out, "logits", None) is not captured[1]:
        raise RuntimeError(f"kiln.patch: {type(self).__name__}'s forward did not return lm_head's output as its "
                           "logits (it transforms them, or calls lm_head more than once), so the fused loss cannot "
                           "stand in for it; patch with ops that leave out 'lm_head_loss'")
    hidden = captured[0]
    ignore_index = extra.get("ignore_index", -100)
    shift_labels = extra.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    num_items = extra.get("num_items_in_batch")
    loss = ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shift_labels.reshape(-1),
                                    linear_bias=head.bias, ignore_index=ignore_index,
                                    reduction="mean" if num_items is None else "sum")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    loss = loss.float()  # Hugging Face's loss is float32 whatever the model's dtype (it upcasts the logits)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    result = type(out)(loss=loss, **fields)
    return result if want_dict else result.to_tuple()


def _register_hf_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("kiln", hf_attention)
    # masks as transformers builds them for SDPA: None (causal by flag) or 4-D bool, True = attend
    AttentionMaskInterface.register("kiln", sdpa_mask)


# ---------------------------------------------------------------------------------------------
# The walk.


def _is_hf_model(module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


def _instance_forward(module):
    f = module.__dict__.get("forward")
    return getattr(f, "__func__", f)


class _Plan:
    def __init__(self, kinds: set, dry_run: bool):
        self.kinds, self.dry_run = kinds, dry_run
        self.report = PatchReport(dry_run=dry_run, ops=tuple(sorted(kinds)))
        self.actions: list = []
        self.fused: dict = {}         # id(layer module) -> activation name
        self.fused_acts: dict = {}    # id(activation module) -> layer path
        self.done: set = set()        # id of modules handled by a structural rule

    def replace(self, path, old, new, kind, action, note=""):
        self.report.replaced.append(Replaced(path, old, new, kind, note))
        self.actions.append(action)

    def leave(self, path, module_or_type, reason):
        name = module_or_type if isinstance(module_or_type, str) else _typename(module_or_type)
        self.report.left.append(Left(path, name, reason))


def _tree(model: nn.Module):
    """(path, module, parent, name) for every registered submodule, parents first, shared ones once;
    and how many parents hold each module."""
    seen, order, parents = set(), [], {}
    stack = [("", model, None, None)]
    while stack:
        path, module, parent, name = stack.pop()
        parents[id(module)] = parents.get(id(module), 0) + 1
        if id(module) in seen:
            continue
        seen.add(id(module))
        order.append((path, module, parent, name))
        children = [(f"{path}.{n}" if path else n, m, module, n) for n, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))
    return order, parents


def _fusible_layer(module) -> bool:
    from kiln import nn as knn
    if type(module) in (nn.Linear, nn.Conv2d) or _is_hf_conv1d(module):
        return True
    return type(module) in (knn.Linear, knn.Conv2d, Conv1D) and module.activation == "identity"


def _layer_kind(module) -> str:
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"


def _is_hf_conv1d(module) -> bool:
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 2)


def _plan_fusions(plan: _Plan, tree, parents):
    """Activations fused into the layer before them (planned here, done by the layer's own swap)."""
    if "activation" not in plan.kinds:
        return
    for path, module, _, _ in tree:
        if id(module) in plan.done:
            continue
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            keys = list(module._modules)
            pairs = [(a, b) for a, b in zip(keys, keys[1:])]
        elif _instance_forward(module) is None and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            pairs = _fusible_pairs(type(module)) if module._modules else []
        else:
            pairs = []
        for layer_name, act_name in pairs:
            layer, act = module._modules.get(layer_name), module._modules.get(act_name)
            if layer is None or act is None or not _fusible_layer(layer):
                continue
            sub = f"{path}.{act_name}" if path else act_name
            name = activation_name(act)
            if name is None:
                if _looks_like_activation(act):
                    plan.leave(sub, act, "an activation linear_act does not compute (kiln's: relu, gelu, gelu_tanh, "
                                         "tanh, sigmoid, silu)")
                continue
            if _layer_kind(layer) not in plan.kinds:
                plan.leave(sub, act, f"fusing needs the layer before it replaced: add '{_layer_kind(layer)}' to ops")
                continue
            if parents[id(layer)] > 1 or parents[id(act)] > 1 or act._forward_hooks or act._forward_pre_hooks:
                plan.leave(sub, act, "shared with another module, or hooked: not fused")
                continue
            plan.fused[id(layer)] = name
            plan.fused_acts[id(act)] = f"{path}.{layer_name}" if path else layer_name

            def drop(parent=module, key=act_name):
                setattr(parent, key, nn.Identity())

            plan.replace(sub, _typename(act), "nn.Identity", "activation", drop,
                         note=f"fused into {plan.fused_acts[id(act)]}")


def _swap_class(module, cls, **attrs):
    def action():
        module.__class__ = cls
        for k, v in attrs.items():
            setattr(module, k, v)
    return action


def _move_parameters(old: nn.Module, new: nn.Module) -> bool:
    """Put old's Parameter objects into new under the same names; False if they do not line up."""
    old_params = dict(old.named_parameters())
    new_params = dict(new.named_parameters())
    if old_params.keys() != new_params.keys() or any(
            old_params[k].shape != new_params[k].shape for k in old_params):
        return False
    for name, param in old_params.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_path) if owner_path else new
        setattr(owner, leaf, param)
    for name, buf in old.named_buffers():
        owner_path, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_path) if owner_path else new
        if leaf in owner._buffers:
            owner._buffers[leaf] = buf
    return True


def _rebuild(parent, name, old, build):
    """Build kiln's module, move old's parameters in (copy if they do not line up), put it in parent."""
    def action():
        new = build()
        note = ""
        if not _move_parameters(old, new):
            new.load_state_dict(old.state_dict())
            note = "copied"
        new.train(old.training)
        setattr(parent, name, new)
        return note
    return action


def _plan_modules(plan: _Plan, model: nn.Module, tree, parents):
    from kiln import nn as knn

    swaps = {nn.Linear: (knn.Linear, "linear"), nn.LayerNorm: (knn.LayerNorm, "layer_norm"),
             nn.BatchNorm1d: (knn.BatchNorm1d, "batch_norm"), nn.BatchNorm2d: (knn.BatchNorm2d, "batch_norm"),
             nn.BatchNorm3d: (knn.BatchNorm3d, "batch_norm"), nn.Conv2d: (knn.Conv2d, "conv2d"),
             nn.MultiheadAttention: (knn.MultiheadAttention, "multihead_attention"),
             nn.RMSNorm: (knn.RMSNorm, "rms_norm")}
    kiln_types = {cls for cls, _ in swaps.values()} | {Conv1D, HFRMSNorm, LMHead}
    inside_mha: set = set()
    for path, module, parent, name in tree:
        cls = type(module)
        if id(module) in inside_mha:
            continue
        if isinstance(module, nn.MultiheadAttention):  # its out_proj is read by weight, never called
            inside_mha.update(id(m) for m in module.modules() if m is not module)
        if cls in kiln_types or cls in (knn.LSTM, knn.GRU):
            plan.report.already += 1
            if cls in (knn.Linear, knn.Conv2d, Conv1D) and id(module) in plan.fused:
                act = plan.fused[id(module)]
                plan.replace(path, f"{_typename(module)}(activation={module.activation})",
                             f"{_typename(module)}(activation={act})", "activation",
                             _swap_class(module, cls, activation=act))
            continue
        if id(module) in plan.done or cls.__module__.startswith("kiln."):
            continue
        if cls in swaps:
            new_cls, kind = swaps[cls]
            if kind not in plan.kinds:
                continue
            attrs = {}
            if new_cls in (knn.Linear, knn.Conv2d):
                attrs["activation"] = plan.fused.get(id(module), "identity")
            if new_cls is knn.Linear:
                attrs["dropout"] = 0.0   # kiln's fused dropout, off: the model's own Dropout modules stay
            if new_cls is knn.RMSNorm:
                attrs["offset"] = 0.0
            new_name = _typename(new_cls) + (f"(activation={attrs['activation']})"
                                             if attrs.get("activation", "identity") != "identity" else "")
            note = ""
            if cls is nn.MultiheadAttention:
                note = "need_weights=True (torch's default) runs kiln's explicit path"
            plan.replace(path, _typename(cls), new_name, kind, _swap_class(module, new_cls, **attrs), note)
        elif (f"{cls.__module__}.{cls.__qualname__}" == "timm.layers.norm.LayerNorm"
              and not getattr(module, "_fast_norm", True)):
            if "layer_norm" in plan.kinds:  # fast_norm off: its forward is F.layer_norm, as torch's
                plan.replace(path, _typename(cls), "kiln.nn.LayerNorm", "layer_norm",
                             _swap_class(module, knn.LayerNorm), note="timm's LayerNorm, fast_norm off")
        elif _is_hf_conv1d(module):
            if "conv1d" not in plan.kinds:
                continue
            act = plan.fused.get(id(module), "identity")
            w = module.weight
            build = lambda w=w, act=act: Conv1D(w.shape[1], w.shape[0], act, device=w.device, dtype=w.dtype)
            plan.replace(path, "transformers.Conv1D", "kiln.patch.Conv1D" + (f"(activation={act})" if act != "identity"
                                                                             else ""),
                         "conv1d", _rebuild(parent, name, module, build))
        elif cls in (nn.LSTM, nn.GRU, nn.RNN):
            if "rnn" not in plan.kinds:
                continue
            _plan_rnn(plan, path, module, parent, name)
        elif "rms_norm" in plan.kinds and cls.__name__.endswith("RMSNorm") and _is_llama_rms_norm(module) is not None:
            eps = _is_llama_rms_norm(module)
            w = module.weight
            build = lambda w=w, eps=eps: HFRMSNorm(w.shape[0], eps, device=w.device, dtype=w.dtype)
            plan.replace(path, _typename(module), "kiln.patch.HFRMSNorm", "rms_norm",
                         _rebuild(parent, name, module, build))
        elif isinstance(module, (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.modules.batchnorm._BatchNorm,
                                 nn.RNNBase)) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            plan.leave(path, module, f"a subclass of torch's {_typename(cls.__mro__[1])} with its own code: "
                                     "kiln's form may not match it")
        elif cls.__name__.endswith("RMSNorm"):
            plan.leave(path, module, "an RMSNorm whose forward is not LlamaRMSNorm's (e.g. Gemma's 1 + weight)")
        elif not module._modules and module._parameters and not _is_hf_model(module):
            plan.leave(path, module, "kiln has no form for this module type (torch's runs)")


def _plan_rnn(plan, path, module, parent, name):
    from kiln import nn as knn
    cls = type(module)
    kiln_cls = {nn.LSTM: knn.LSTM, nn.GRU: knn.GRU, nn.RNN: knn.RNN}[cls]
    args = dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                bias=module.bias, batch_first=module.batch_first, dropout=float(module.dropout),
                bidirectional=module.bidirectional)
    if cls is nn.RNN:
        args["nonlinearity"] = module.nonlinearity
    if getattr(module, "proj_size", 0):
        args["proj_size"] = module.proj_size
    try:
        inspect.signature(kiln_cls).bind(**args)
    except TypeError:
        plan.leave(path, module, f"{_typename(kiln_cls)} does not take torch.nn.{cls.__name__}'s arguments "
                                 "in this kiln version")
        return
    w = module.weight_ih_l0
    build = lambda: kiln_cls(**args, device=w.device, dtype=w.dtype) if _takes_factory(kiln_cls) else \
        kiln_cls(**args).to(device=w.device, dtype=w.dtype)
    plan.replace(path, _typename(cls), _typename(kiln_cls), "rnn",
                 _rebuild(parent, name, module, build))


def _takes_factory(cls) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return "device" in params and "dtype" in params


def _plan_structural(plan: _Plan, model: nn.Module, tree, parents):
    """Forward-level rules: HF attention implementation, causal-LM loss, gated MLPs, rotary, timm attention."""
    hf_roots: list = []  # the outermost transformers models: set_attn_implementation recurses itself
    for path, module, _, _ in tree:
        if not _is_hf_model(module):
            continue
        if not any(r == "" or path.startswith(r + ".") for r in hf_roots):
            hf_roots.append(path)
            _plan_hf_attention(plan, path, module)
        if "lm_head_loss" in plan.kinds:
            _plan_lm_head(plan, path, module)
    for path, module, _, _ in tree:
        cls = type(module)
        forward = _instance_forward(module)
        if forward is not None:
            if forward in (_gated_forward,) or getattr(forward, "_kiln", False):
                plan.report.already += 1
            continue
        if module._modules and "gated_mlp" in plan.kinds:
            names = _gated_names(cls)
            if names and _plan_gated(plan, path, module, names):
                continue
        if "rotary" in plan.kinds and _uses_global(cls, "apply_rotary_pos_emb"):
            _plan_rotary(plan, path, module)
        elif "attention" in plan.kinds and cls.__module__.startswith("timm") and _uses_sdpa(cls):
            _plan_timm_attention(plan, path, module)


def _uses_global(cls, name) -> bool:
    func = cls.__dict__.get("forward")
    return func is not None and name in _unwrapped(func).__code__.co_names


def _uses_sdpa(cls) -> bool:
    func = cls.__dict__.get("forward")
    if func is None:
        return False
    code = _unwrapped(func).__code__
    return "F" in code.co_names and "scaled_dot_product_attention" in code.co_names


def _plan_gated(plan, path, module, names) -> bool:
    from kiln import nn as knn
    gate, up, down, act = (module._modules.get(n) for n in names)
    if any(m is None for m in (gate, up, down, act)):
        return False
    activation = activation_name(act)
    linear_ok = lambda m: type(m) is nn.Linear or (type(m) is knn.Linear and m.activation == "identity")
    if activation not in _GATED or not all(linear_ok(m) for m in (gate, up, down)):
        plan.leave(path, module, f"a gated MLP whose activation ({_typename(act)}) or projections kiln has no "
                                 "gated form for")
        return False

    plan.done.add(id(module))

    def action():
        module._kiln_gated = (*names[:3], activation)
        module.forward = types.MethodType(_gated_forward, module)

    op = "swiglu" if activation == "silu" else "geglu"
    plan.replace(path, f"{_typename(module)}.forward", f"kiln.ops.{op}", "gated_mlp", action,
                 note="gate and up stay two GEMMs (one fused GEMM needs a concatenated weight: new Parameter, "
                      "new state_dict keys)")
    return True


def _plan_rotary(plan, path, module):
    cls = type(module)
    func = cls.__dict__["forward"]
    glob = _unwrapped(func).__globals__
    rope, half = glob.get("apply_rotary_pos_emb"), glob.get("rotate_half")
    if rope is None or _shape_of(rope) != _KNOWN["rotary"] or half is None or _shape_of(half) != _KNOWN["rotate_half"]:
        plan.leave(path, module, "its apply_rotary_pos_emb is not the LLaMA form (partial or interleaved rotary)")
        return
    new = _rebound(func, {"apply_rotary_pos_emb": _rotary})
    if new is None:
        plan.leave(path, module, "its forward's decorators could not be rebuilt around kiln's rotary")
        return
    new._kiln = True

    def action():
        module.forward = types.MethodType(new, module)

    plan.replace(path, f"{_typename(module)}.forward", "kiln.ops.rotary_embedding", "rotary", action,
                 note="this instance's forward sees kiln's apply_rotary_pos_emb")


def _plan_timm_attention(plan, path, module):
    if not getattr(module, "fused_attn", False):
        plan.leave(path, module, "fused_attn is False: its forward does not call scaled_dot_product_attention")
        return
    func = type(module).__dict__["forward"]
    new = _rebound(func, {"F": _F_KILN})
    if new is None:
        plan.leave(path, module, "its forward's decorators could not be rebuilt")
        return
    new._kiln = True

    def action():
        module.forward = types.MethodType(new, module)

    plan.replace(path, f"{_typename(module)}.forward", "kiln.ops.attention", "attention", action,
                 note="this instance's F.scaled_dot_product_attention is kiln's")


def _plan_hf_attention(plan, path, model):
    if "attention" in plan.kinds:
        current = getattr(model.config, "_attn_implementation", None)
        if current == "kiln":
            plan.report.already += 1
        elif not hasattr(model, "set_attn_implementation"):
            plan.leave(path, model, "this transformers version has no set_attn_implementation")
        elif not type(model)._can_set_attn_implementation():
            plan.leave(path, model, "its attention does not go through transformers' AttentionInterface")
        else:
            def action(model=model):
                _register_hf_attention()
                model.set_attn_implementation("kiln")

            plan.replace(path, f"attn_implementation={current}", "attn_implementation=kiln", "attention", action,
                         note="transformers' AttentionInterface, masks as for sdpa")


def _plan_lm_head(plan, path, model):
    from kiln import nn as knn
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return
    if _instance_forward(model) is _causal_lm_forward:
        plan.report.already += 1
        return
    head = model.get_output_embeddings()
    forward = type(model).forward
    names = _unwrapped(forward).__code__.co_names
    try:
        loss_name = model.loss_function.__name__
    except Exception:  # noqa: BLE001 - a model without transformers' loss mapping
        loss_name = None
    reason = None
    if type(head) not in (nn.Linear, knn.Linear, LMHead) or getattr(head, "activation", "identity") != "identity":
        reason = f"its output embedding is a {_typename(head)}, not a Linear"
    elif "labels" not in inspect.signature(forward).parameters or "lm_head" not in names:
        reason = "its forward does not take labels and call lm_head"
    elif loss_name != "ForCausalLMLoss":
        reason = f"its loss is {loss_name}, not transformers' ForCausalLMLoss"
    elif getattr(model.config, "final_logit_softcapping", None) is not None:
        reason = "it soft-caps its logits before the loss"
    if reason:
        plan.leave(path, model, f"lm_head + loss not fused: {reason}")
        return

    def action():
        head.__class__ = LMHead
        model.forward = types.MethodType(_causal_lm_forward, model)

    plan.done.add(id(head))
    head_path = f"{path}.lm_head" if path else "lm_head"
    plan.replace(head_path, f"{_typename(head)} + {loss_name}", "kiln.ops.linear_cross_entropy", "lm_head_loss",
                 action, note="with labels: the loss without the logits (output.logits None)")


def patch(model: nn.Module, ops: Optional[Iterable[str]] = None, dry_run: bool = False) -> PatchReport:
    """Replace, in place and keeping every weight, the parts of ``model`` kiln has fused forms for.

    ops: the kinds to replace (default all): linear, activation, conv1d, layer_norm, batch_norm,
    conv2d, multihead_attention, rnn, rms_norm, gated_mlp, rotary, attention, lm_head_loss (see
    kiln.patch.KINDS for what each covers). dry_run: only report. Returns a PatchReport: what was
    replaced (module path, old -> new) and what was left and why; print it for a table. Patching
    a patched model changes nothing (the report says so).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"kiln.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if ops is None:
        kinds = set(KINDS)
    else:
        if isinstance(ops, str):
            raise TypeError(f"kiln.patch: ops must be a list of names, got the string {ops!r}; "
                            f"write ops=[{ops!r}]")
        kinds = set(ops)
        unknown = sorted(kinds - set(KINDS))
        if unknown:
            raise ValueError(f"kiln.patch: unknown ops {unknown}; valid ones: {', '.join(KINDS)}")
    plan = _Plan(kinds, dry_run)
    tree, parents = _tree(model)
    _plan_structural(plan, model, tree, parents)
    _plan_fusions(plan, tree, parents)
    _plan_modules(plan, model, tree, parents)
    if not dry_run:
        for entry, action in zip(list(plan.report.replaced), plan.actions):
            note = action()
            if note:
                entry.note = (entry.note + "; " if entry.note else "") + "parameters copied (new objects)"
    return plan.report


class _CallableModule(types.ModuleType):
    """``kiln.patch`` is this module and also the function: kiln.patch(model) calls patch."""

    def __call__(self, model, ops=None, dry_run=False):
        return patch(model, ops=ops, dry_run=dry_run)


sys.modules[__name__].__class__ = _CallableModule
