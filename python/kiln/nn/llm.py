"""The layers of a LLaMA-style decoder on kiln.ops: RMSNorm (torch.nn.RMSNorm's drop-in,
Gemma's offset as an extra), GatedMLP (SwiGLU / GeGLU feed-forward) and RotaryEmbedding
(the cos / sin tables of Hugging Face's LlamaRotaryEmbedding).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln import ops


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` on kiln.ops.rms_norm: same constructor, parameter ``weight``,
    state_dict and eps=None default (torch's: the computation dtype's epsilon).

    ``offset`` (keyword-only, kiln's extra) scales by ``offset + weight``: Gemma's norm is
    offset=1. The weight then starts at ``1 - offset`` (zeros for Gemma, as Gemma's own
    initialisation), so that a fresh layer scales by 1 whatever the offset.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 offset: float = 0.0):
        self.offset = float(offset)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", offset={self.offset}" if self.offset else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset, normalized_shape=self.normalized_shape)


# activation -> (the gated op, its extra arguments)
_GATED = {"silu": ("swiglu", ()), "gelu": ("geglu", ("none",)), "gelu_tanh": ("geglu", ("tanh",))}


class GatedMLP(nn.Module):
    """The LLaMA / Gemma feed-forward layer: down(act(gate(x)) * up(x)).

    The gate and up projections are ONE GEMM (kiln.ops.linear_act, identity activation) on
    a concatenated weight ``gate_up_weight`` (2 * intermediate_size, hidden_size): rows
    [0, I) are gate_proj's, rows [I, 2I) up_proj's. Then kiln.ops.swiglu / geglu, then the
    down projection ``down_weight`` (hidden_size, intermediate_size). activation: "silu"
    (SwiGLU, LLaMA), "gelu" or "gelu_tanh" (GeGLU, Gemma's gelu_pytorch_tanh).

    The weight is stored concatenated, not concatenated at each forward: a torch.cat of the
    two (I, H) weights re-copies 2 I H values per call, which at LLaMA-7B's 4096 x 11008 is
    as much memory traffic as the GEMM's own operand reads for up to a few hundred tokens
    (bench/results/llm_ops_cpu.md has the measurement). A LLaMA-style MLP loads either with
    ``load_from(gate_proj, up_proj, down_proj)`` (nn.Linear modules or weight tensors) or
    through ``load_state_dict`` with its ``gate_proj.weight`` / ``up_proj.weight`` /
    ``down_proj.weight`` (and ``.bias``) keys, which a load hook concatenates.
    """

    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if activation not in _GATED:
            raise ValueError(f"GatedMLP: activation must be one of {', '.join(map(repr, _GATED))}, "
                             f"got {activation!r}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size, self.activation = hidden_size, intermediate_size, activation
        self.gate_up_weight = nn.Parameter(torch.empty(2 * intermediate_size, hidden_size, **factory))
        self.down_weight = nn.Parameter(torch.empty(hidden_size, intermediate_size, **factory))
        if bias:
            self.gate_up_bias = nn.Parameter(torch.empty(2 * intermediate_size, **factory))
            self.down_bias = nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("gate_up_bias", None)
            self.register_parameter("down_bias", None)
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._from_llama_keys)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for each of the three projections."""
        I = self.intermediate_size
        for weight, bias in ((self.gate_up_weight[:I], None if self.gate_up_bias is None else self.gate_up_bias[:I]),
                             (self.gate_up_weight[I:], None if self.gate_up_bias is None else self.gate_up_bias[I:]),
                             (self.down_weight, self.down_bias)):
            with torch.no_grad():
                nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
                if bias is not None:
                    bound = 1 / weight.shape[1] ** 0.5 if weight.shape[1] > 0 else 0
                    nn.init.uniform_(bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"activation={self.activation!r}, bias={self.down_bias is not None}")

    @torch.no_grad()
    def load_from(self, gate_proj, up_proj, down_proj) -> "GatedMLP":
        """Copy a LLaMA-style MLP's three projections (nn.Linear, or weight tensors) in."""
        def parts(p):
            return (p.weight, p.bias) if isinstance(p, nn.Module) else (p, None)

        (wg, bg), (wu, bu), (wd, bd) = parts(gate_proj), parts(up_proj), parts(down_proj)
        I, H = self.intermediate_size, self.hidden_size
        for name, w, shape in (("gate_proj", wg, (I, H)), ("up_proj", wu, (I, H)), ("down_proj", wd, (H, I))):
            if tuple(w.shape) != shape:
                raise ValueError(f"GatedMLP.load_from: {name}'s weight must be {shape}, got {tuple(w.shape)}")
        has_bias = self.down_bias is not None
        if any((b is not None) != has_bias for b in (bg, bu, bd)):
            raise ValueError(f"GatedMLP.load_from: this GatedMLP has bias={has_bias}; the projections' biases "
                             f"must all be {'present' if has_bias else 'absent'}")
        self.gate_up_weight[:I].copy_(wg)
        self.gate_up_weight[I:].copy_(wu)
        self.down_weight.copy_(wd)
        if has_bias:
            self.gate_up_bias[:I].copy_(bg)
            self.gate_up_bias[I:].copy_(bu)
            self.down_bias.copy_(bd)
        return self

    def _from_llama_keys(self, state_dict, prefix, *args) -> None:
        # gate_proj.weight + up_proj.weight -> gate_up_weight, down_proj.weight -> down_weight
        for kind in ("weight", "bias"):
            gate, up, down = (prefix + f"{p}_proj.{kind}" for p in ("gate", "up", "down"))
            if gate in state_dict and up in state_dict:
                state_dict[prefix + f"gate_up_{kind}"] = torch.cat([state_dict.pop(gate), state_dict.pop(up)])
            if down in state_dict:
                state_dict[prefix + f"down_{kind}"] = state_dict.pop(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        I = self.intermediate_size
        gate_up = self.ops.linear_act(x, self.gate_up_weight, self.gate_up_bias, "identity")
        gated, extra = _GATED[self.activation]
        hidden = getattr(self.ops, gated)(gate_up[..., :I], gate_up[..., I:], *extra)
        return self.ops.linear_act(hidden, self.down_weight, self.down_bias, "identity")


class RotaryEmbedding(nn.Module):
    """cos / sin tables of rotary position embedding, as Hugging Face's
    LlamaRotaryEmbedding (default rope type): ``forward(x, position_ids)`` returns cos, sin
    (B, T, dim) in x's dtype, computed in float32 from ``inv_freq = 1 / base^(2i / dim)``,
    laid out cat(f, f) for kiln.ops.rotary_embedding's rotate-half form, or (f0, f0, f1,
    f1, ...) with ``interleaved=True`` (keyword-only) for its interleaved form.
    """

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000.0, device=None, *,
                 interleaved: bool = False):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be even and positive, got {dim}")
        self.dim, self.max_position_embeddings, self.base = dim, max_position_embeddings, base
        self.interleaved = interleaved
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, max_position_embeddings={self.max_position_embeddings}, base={self.base}"
                + (", interleaved=True" if self.interleaved else ""))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):  # float32 whatever the region
            freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(x.dtype), sin.to(x.dtype)
