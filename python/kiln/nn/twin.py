"""``torch_twin(model)``: the same model built from torch.nn, holding the same weights.

The twin is what a user would have written without kiln: the baseline kiln is measured against
(bench/model_epoch_time.py, `kiln bench`'s model cases) and a check of a model's numerics.
It is a deep copy of the model in which

- every kiln.nn module named like a torch.nn class (Linear, Conv2d, LayerNorm, BatchNorm*,
  RMSNorm, Dropout, MultiheadAttention, LSTM / GRU / RNN and their cells, the Transformer
  layers and stacks, CrossEntropyLoss) becomes that torch.nn class built with the same
  arguments; where kiln's has an extra argument (Linear's and Conv2d's ``activation``, Linear's
  ``dropout``, RMSNorm's ``offset``) a small subclass of the torch class applies it with
  torch.nn.functional (``LinearAct``, ``Conv2dAct``, ``RMSNormOffset``);
- every module whose class calls kiln ops itself declares them as its class attribute ``ops``
  (``kiln.ops``: CausalSelfAttention, CrossAttention, GatedMLP, the notes' residual and highway
  cells, LinearCrossEntropyLoss, and the models that compute their loss, TransformerLM,
  Seq2SeqTransformer, RNNLM); its twin is that class with ``ops = TorchOps``, the same
  functions written with torch (F.scaled_dot_product_attention, F.cross_entropy on F.linear's
  logits, ...), so the module keeps its own forward and only the op calls change;
- every other module is kept (torch's own, and kiln modules whose forward is plain torch code
  around their children: the positional encodings, MLP, MaxOverShifts, RotaryEmbedding,
  CellRNN, the kiln.models containers).

The twin's modules hold the copy's Parameter and buffer objects themselves (tied weights stay
tied) under the same names, so ``twin.load_state_dict(model.state_dict())`` and the reverse
work. A kiln.nn module it cannot convert raises ``TwinError`` naming its path and class.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
import torch.nn.functional as F
from torch import Tensor, nn

import kiln.ops
from kiln.ops.linear_act import TORCH_ACTIVATIONS

from . import attention, cached_attention, conv, dropout, linear, llm, loss, norm, rnn, transformer


class TwinError(TypeError):
    """A module torch_twin cannot express with torch.nn."""


# ------------------------------------------------------------------------------------------------
# the ops, written with torch


def _attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
               scale: Optional[float] = None, dropout_p: float = 0.0, attn_bias: Optional[Tensor] = None) -> Tensor:
    """kiln.ops.attention's function on F.scaled_dot_product_attention: the causal mask aligned
    bottom-right when Tq != Tk, True in key_padding_mask hides a key, a query that sees no key
    gives 0."""
    Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != Hq:  # grouped-query attention: each k / v head serves Hq / Hkv query heads
        k, v = (t.repeat_interleave(Hq // k.shape[1], dim=1) for t in (k, v))
    if key_padding_mask is None and attn_bias is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(Tk - Tq)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    blind = ~visible.any(-1, keepdim=True)        # queries that see no key: 0, as kiln's kernels
    mask = visible | blind
    if attn_bias is not None:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf) + attn_bias
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(blind, 0.0)


def _linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "identity",
                dropout: float = 0.0) -> Tensor:
    out = TORCH_ACTIVATIONS[activation or "identity"](F.linear(x, weight, bias))
    return F.dropout(out, dropout) if dropout else out


def _linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                          reduction: str = "mean", ignore_index: Optional[int] = None, label_smoothing: float = 0.0,
                          options=None, chunk_rows: Optional[int] = None, bias: Optional[Tensor] = None) -> Tensor:
    """kiln.ops.linear_cross_entropy's function as torch users write it: F.cross_entropy of the
    F.linear logits (which this forms)."""
    linear_bias = bias if linear_bias is None else linear_bias
    V, out_features, H = linear_weight.shape[0], linear_weight.shape[1:-1], linear_weight.shape[-1]
    rows = input.shape[:-1]
    logits = F.linear(input.reshape(-1, H), linear_weight.reshape(-1, H),
                      None if linear_bias is None else linear_bias.reshape(-1)).reshape(-1, V, *out_features)
    if target.is_floating_point():   # class probabilities, laid out as the logits
        target = target.reshape(-1, V, *out_features)
    else:
        target = target.reshape(-1, *out_features)
    out = F.cross_entropy(logits, target, weight=weight, reduction=reduction,
                          ignore_index=-100 if ignore_index is None else ignore_index,
                          label_smoothing=label_smoothing)
    return out.reshape(*rows, *out_features) if reduction == "none" else out


class TorchOps:
    """The kiln.ops functions the ``ops``-declaring modules call, with kiln's signatures, written
    with torch's own ops; a twin module's ``ops``."""

    attention = staticmethod(_attention)
    linear_act = staticmethod(_linear_act)
    linear_cross_entropy = staticmethod(_linear_cross_entropy)
    cross_entropy = staticmethod(F.cross_entropy)
    swiglu = staticmethod(lambda gate, up: F.silu(gate) * up)
    geglu = staticmethod(lambda gate, up, approximate="none": F.gelu(gate, approximate=approximate) * up)


@functools.lru_cache(maxsize=None)
def _with_torch_ops(cls: type) -> type:
    """``cls`` with ``ops = TorchOps``: its own forward, torch's ops."""
    return type(f"Torch{cls.__name__}", (cls,), {"ops": TorchOps, "__module__": __name__,
                                                "__doc__": f"{cls.__qualname__} on torch's ops (torch_twin)."})


# ------------------------------------------------------------------------------------------------
# torch.nn classes with kiln's extra arguments


class LinearAct(nn.Linear):
    """nn.Linear, then an activation (kiln.ops.linear_act's names), then dropout in training."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str = "identity", dropout: float = 0.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation, self.dropout = activation, dropout

    def forward(self, input: Tensor) -> Tensor:
        out = TORCH_ACTIVATIONS[self.activation](super().forward(input))
        return F.dropout(out, self.dropout, self.training) if self.dropout else out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, dropout={self.dropout}"


class Conv2dAct(nn.Conv2d):
    """nn.Conv2d, then an activation (kiln.ops.linear_act's names)."""

    def __init__(self, *args, activation: str = "identity", **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return TORCH_ACTIVATIONS[self.activation](super().forward(input))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class RMSNormOffset(nn.RMSNorm):
    """nn.RMSNorm scaling by ``offset + weight`` (Gemma's norm: offset 1)."""

    def __init__(self, *args, offset: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset = offset

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight + self.offset
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


# ------------------------------------------------------------------------------------------------
# kiln.nn class -> its torch.nn twin, built on the meta device (the kiln module's tensors move in)


def _linear(m: linear.Linear) -> nn.Module:
    args = (m.in_features, m.out_features, m.bias is not None)
    if m.activation == "identity" and not m.dropout:
        return nn.Linear(*args)
    return LinearAct(*args, activation=m.activation, dropout=m.dropout)


def _conv2d(m: conv.Conv2d) -> nn.Module:
    kwargs = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                  bias=m.bias is not None, padding_mode=m.padding_mode)
    if m.activation == "identity":
        return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, **kwargs)
    return Conv2dAct(m.in_channels, m.out_channels, m.kernel_size, activation=m.activation, **kwargs)


def _conv_transpose2d(m: conv.ConvTranspose2d) -> nn.Module:
    return nn.ConvTranspose2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                              output_padding=m.output_padding, groups=m.groups, bias=m.bias is not None,
                              dilation=m.dilation, padding_mode=m.padding_mode)


def _batch_norm(torch_class: type) -> Callable[[nn.Module], nn.Module]:
    return lambda m: torch_class(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                                 track_running_stats=m.track_running_stats)


def _layer_norm(m: norm.LayerNorm) -> nn.Module:
    return nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                        bias=m.bias is not None)


def _rms_norm(m: llm.RMSNorm) -> nn.Module:
    if m.offset:
        return RMSNormOffset(m.normalized_shape, m.eps, m.elementwise_affine, offset=m.offset)
    return nn.RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine)


def _multihead_attention(m: attention.MultiheadAttention) -> nn.Module:
    return nn.MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                                 add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim,
                                 vdim=m.vdim, batch_first=m.batch_first)


def _recurrent(m: rnn._RNNBase) -> nn.Module:
    kwargs = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
                  bidirectional=m.bidirectional)
    with warnings.catch_warnings():   # torch's "dropout with one layer" warning: the kiln module gave it
        warnings.simplefilter("ignore")
        if m.mode == "LSTM":
            return nn.LSTM(m.input_size, m.hidden_size, proj_size=m.proj_size, **kwargs)
        if m.mode == "GRU":
            return nn.GRU(m.input_size, m.hidden_size, **kwargs)
        return nn.RNN(m.input_size, m.hidden_size, nonlinearity=m.nonlinearity, **kwargs)


def _cell(torch_class: type) -> Callable[[nn.Module], nn.Module]:
    def build(m):
        extra = {"nonlinearity": m.nonlinearity} if torch_class is nn.RNNCell else {}
        return torch_class(m.input_size, m.hidden_size, bias=m.bias, **extra)
    return build


def _transformer_layer(torch_class: type) -> Callable[[nn.Module], nn.Module]:
    def build(m):
        attn = m.self_attn
        return torch_class(attn.embed_dim, attn.num_heads, dim_feedforward=m.linear1.out_features,
                           dropout=m.dropout.p, activation=m.activation, layer_norm_eps=m.norm1.eps,
                           batch_first=attn.batch_first, norm_first=m.norm_first, bias=m.linear1.bias is not None)
    return build


def _encoder(m: transformer.TransformerEncoder) -> nn.Module:
    with warnings.catch_warnings():   # torch's notes on when its nested-tensor path applies
        warnings.simplefilter("ignore")
        return nn.TransformerEncoder(_TORCH[transformer.TransformerEncoderLayer](m.layers[0]), m.num_layers,
                                     enable_nested_tensor=m.enable_nested_tensor, mask_check=m.mask_check)


def _decoder(m: transformer.TransformerDecoder) -> nn.Module:
    return nn.TransformerDecoder(_TORCH[transformer.TransformerDecoderLayer](m.layers[0]), m.num_layers)


def _cross_entropy(m: loss.CrossEntropyLoss) -> nn.Module:
    return nn.CrossEntropyLoss(weight=m.weight, ignore_index=m.ignore_index, reduction=m.reduction,
                               label_smoothing=m.label_smoothing)


_TORCH: dict[type, Callable[[nn.Module], nn.Module]] = {
    linear.Linear: _linear,
    conv.Conv2d: _conv2d,
    conv.ConvTranspose2d: _conv_transpose2d,
    norm.LayerNorm: _layer_norm,
    norm.BatchNorm1d: _batch_norm(nn.BatchNorm1d),
    norm.BatchNorm2d: _batch_norm(nn.BatchNorm2d),
    norm.BatchNorm3d: _batch_norm(nn.BatchNorm3d),
    llm.RMSNorm: _rms_norm,
    dropout.Dropout: lambda m: nn.Dropout(m.p, m.inplace),
    attention.MultiheadAttention: _multihead_attention,
    rnn.LSTM: _recurrent,
    rnn.GRU: _recurrent,
    rnn.RNN: _recurrent,
    rnn.LSTMCell: _cell(nn.LSTMCell),
    rnn.GRUCell: _cell(nn.GRUCell),
    rnn.RNNCell: _cell(nn.RNNCell),
    transformer.TransformerEncoderLayer: _transformer_layer(nn.TransformerEncoderLayer),
    transformer.TransformerDecoderLayer: _transformer_layer(nn.TransformerDecoderLayer),
    transformer.TransformerEncoder: _encoder,
    transformer.TransformerDecoder: _decoder,
    loss.CrossEntropyLoss: _cross_entropy,
}

# kiln.nn modules whose forward is torch code around their children: kept, children converted
_KEPT: tuple[type, ...] = (attention.SinusoidalPositionalEncoding, attention.LearnedPositionalEmbedding,
                           linear.MLP, conv.MaxOverShifts, llm.RotaryEmbedding, rnn.CellRNN)


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def _move_in(twin: nn.Module, module: nn.Module, path: str) -> nn.Module:
    """The twin (built on the meta device) takes ``module``'s Parameter and buffer objects, by name."""
    theirs, ours = _tensors(twin), _tensors(module)
    same_state = twin.state_dict(keep_vars=True).keys() == module.state_dict(keep_vars=True).keys()
    if theirs.keys() != ours.keys() or not same_state:
        raise TwinError(f"torch_twin: {path or 'the model'} ({type(module).__qualname__}): its torch.nn twin "
                        f"{type(twin).__qualname__} names its tensors differently: {sorted(theirs)} vs kiln's "
                        f"{sorted(ours)}")
    for name, tensor in ours.items():
        owner_path, _, attr = name.rpartition(".")
        owner = twin.get_submodule(owner_path)
        if attr in owner._parameters:
            setattr(owner, attr, tensor)   # through __setattr__: nn.RNNBase keeps its _flat_weights current
        else:
            owner._buffers[attr] = tensor
    for name, sub in twin.named_modules():
        try:
            sub.training = module.get_submodule(name).training
        except AttributeError:
            sub.training = module.training
    return twin


def _convert(module: nn.Module, path: str) -> nn.Module:
    cls = type(module)
    if cls in _TORCH:
        if cls in (transformer.TransformerEncoder, transformer.TransformerDecoder):
            # the stack around the layers' own twins (torch's constructor deep-copies one layer)
            with torch.device("meta"):
                twin = _TORCH[cls](module)
            twin.layers = nn.ModuleList(_convert(layer, f"{path}.layers.{i}") for i, layer in enumerate(module.layers))
            twin.norm = None if module.norm is None else _convert(module.norm, f"{path}.norm")
            twin.training = module.training
            return twin
        with torch.device("meta"):
            twin = _TORCH[cls](module)
        return _move_in(twin, module, path)
    if getattr(cls, "ops", None) is kiln.ops:
        module.__class__ = _with_torch_ops(cls)
    elif isinstance(module, tuple(_TORCH)) or (cls.__module__.startswith("kiln.nn.") and cls.__module__ != __name__
                                               and not issubclass(cls, _KEPT)):
        raise TwinError(f"torch_twin: cannot express {path or 'the model'} ({cls.__module__}.{cls.__qualname__}) "
                        "with torch.nn: it is not one of the kiln.nn classes with a torch twin")
    for name, child in list(module.named_children()):
        twin = _convert(child, f"{path}.{name}" if path else name)
        if twin is not child:
            setattr(module, name, twin)
    return module


def torch_twin(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that runs torch's own modules and ops only, with the same
    weights under the same state_dict keys (the module docstring says how each kind converts).
    ``module`` itself is left as it is."""
    twin = _convert(copy.deepcopy(module), "")
    left = [name for name, t in _tensors(twin).items() if t.is_meta]
    if left:
        raise TwinError(f"torch_twin: tensors {left} were not moved into the twin")
    return twin


class KilnOpRecorder(TorchDispatchMode):
    """Records, in ``seen``, every kiln:: op that runs inside it (forward or backward): how a
    test or a benchmark checks that a twin runs no kiln op, and that its kiln model does."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kiln":
            self.seen.add(str(func))
        return func(*args, **(kwargs or {}))
