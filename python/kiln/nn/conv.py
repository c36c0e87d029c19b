"""Convolutions on linear_act, and the notes' invariance by max over shifts (notes 14.5).

A convolution is not a kernel of its own in kiln (docs/design.md, "conv2d"): F.unfold lays each
receptive field out as a row (im2col), and linear_act multiplies the rows by the flattened
filters with the bias and the activation in its epilogue. The transposed convolution is the
adjoint: linear_act maps each input pixel to its k x k block of output contributions, and
F.fold sums the overlapping blocks (col2im); its bias comes after the sum, so it cannot be fused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln import backend, ops

# the backends im2col has a form for (None: the device's default)
_IM2COL_BACKENDS = (None, *ops.BACKEND_DTYPES["im2col"])


def _unbatched(input: Tensor, name: str) -> bool:
    if input.dim() not in (3, 4):
        raise ValueError(f"kiln.nn.{name}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, "
                         f"got shape {tuple(input.shape)}")
    return input.dim() == 3


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` as an implicit GEMM on ``kiln.ops.linear_act``, with an optional fused
    ``activation`` (keyword-only, after torch's arguments).

    Same arguments, parameters, initialization and state_dict keys as torch's Conv2d (every
    padding, padding_mode, stride, dilation and groups). The unfolded input holds C k_h k_w
    values per output pixel: memory grows by k_h k_w over the input, as any im2col.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, activation: Optional[str] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.activation = activation or "identity"

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        unbatched = _unbatched(input, "Conv2d")
        if unbatched:
            input = input.unsqueeze(0)
        if input.shape[1] != self.in_channels:
            raise ValueError(f"kiln.nn.Conv2d: input has {input.shape[1]} channels, the layer expects "
                             f"{self.in_channels} (input shape {tuple(input.shape)})")
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            # torch's own split of the padding: asymmetric for "same" with an even kernel
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        N, _, H, W = input.shape
        kh, kw = self.kernel_size
        (sh, sw), (dh, dw) = self.stride, self.dilation
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if Ho < 1 or Wo < 1:
            raise ValueError(f"kiln.nn.Conv2d: input {tuple(input.shape)} (padded by {padding}) is smaller "
                             f"than the dilated kernel {self.kernel_size} (dilation {self.dilation})")
        g = self.groups
        if input.is_cpu and backend.requested("im2col") in _IM2COL_BACKENDS:
            # kiln's im2col: tap-major rows (N, L, k_h k_w C/g) read from channels-last memory, and
            # the filters flattened in the same order (under a backend im2col has no form of, such
            # as triton everywhere, the unfold is torch's as on a GPU)
            c, o = self.in_channels // g, self.out_channels // g
            columns = [ops.im2col(input[:, i * c:(i + 1) * c] if g > 1 else input, self.kernel_size,
                                  self.dilation, padding, self.stride) for i in range(g)]
            weights = [w.permute(0, 2, 3, 1).reshape(o, -1) for w in (weight.split(o) if g > 1 else (weight,))]
        else:
            # (N, C k_h k_w, L): channel-major, then kernel rows and columns, as weight.flatten(1)
            unfolded = F.unfold(input, self.kernel_size, self.dilation, padding, self.stride)
            columns = unfolded.reshape(N, g, -1, Ho * Wo).transpose(-1, -2).unbind(1)   # g x (N, L, C/g k k)
            weights = weight.reshape(g, self.out_channels // g, -1).unbind(0)
        biases = (None,) * g if bias is None else bias.reshape(g, -1)
        out = torch.cat([ops.linear_act(columns[i], weights[i], biases[i], self.activation)
                         for i in range(g)], dim=-1) if g > 1 else \
            ops.linear_act(columns[0], weights[0], biases[0], self.activation)
        # (N, L, O) -> (N, O, Ho, Wo), contiguous as torch's output (x.view(N, -1) must work)
        out = out.transpose(1, 2).reshape(N, self.out_channels, Ho, Wo).contiguous()
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}"
                                       if self.activation != "identity" else "")


class ConvTranspose2d(nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` (the notes' learned upsampling) on ``kiln.ops.linear_act``
    and F.fold; torch's arguments, parameters and state_dict keys, ``output_size`` in forward."""

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        unbatched = _unbatched(input, "ConvTranspose2d")
        if unbatched:
            input = input.unsqueeze(0)
        if input.shape[1] != self.in_channels:
            raise ValueError(f"kiln.nn.ConvTranspose2d: input has {input.shape[1]} channels, the layer "
                             f"expects {self.in_channels} (input shape {tuple(input.shape)})")
        output_padding = self._output_padding(input, output_size, list(self.stride), list(self.padding),
                                              list(self.kernel_size), 2, list(self.dilation))
        N, C, H, W = input.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        Ho = (H - 1) * sh - 2 * ph + dh * (kh - 1) + output_padding[0] + 1
        Wo = (W - 1) * sw - 2 * pw + dw * (kw - 1) + output_padding[1] + 1
        g = self.groups
        pixels = input.reshape(N, g, C // g, H * W).transpose(-1, -2)           # (N, g, HW, C/g)
        # weight (C, O/g, kh, kw): group i maps its C/g inputs to (O/g) kh kw block entries
        weights = self.weight.reshape(g, C // g, -1).transpose(-1, -2)          # (g, O/g k k, C/g)
        blocks = torch.cat([ops.linear_act(pixels[:, i], weights[i], None, "identity")
                            for i in range(g)], dim=-1)                         # (N, HW, O k k)
        out = F.fold(blocks.transpose(1, 2), (Ho, Wo), self.kernel_size, self.dilation, self.padding,
                     self.stride)
        if self.bias is not None:
            out = out + self.bias[:, None, None]
        return out.squeeze(0) if unbatched else out


class MaxOverShifts(nn.Module):
    """The notes' invariant function f(X) = max_phi g(X * phi) (14.5), phi ranging over the cyclic
    translations of the image by up to ``max_shift`` pixels in each direction (all of them when
    ``max_shift`` is None: then f is exactly invariant to every cyclic translation, the notes'
    group argument). ``reduce="mean"`` averages instead of taking the maximum.

    The shifted copies run through ``module`` as one batch of N x (number of shifts) images.
    """

    def __init__(self, module: nn.Module, max_shift: Optional[int] = 1, reduce: str = "max"):
        super().__init__()
        if reduce not in ("max", "mean"):
            raise ValueError(f"MaxOverShifts: reduce must be 'max' or 'mean', got {reduce!r}")
        if max_shift is not None and max_shift < 0:
            raise ValueError(f"MaxOverShifts: max_shift must be >= 0 or None, got {max_shift}")
        self.module, self.max_shift, self.reduce = module, max_shift, reduce

    def shifts(self, height: int, width: int) -> list[tuple[int, int]]:
        if self.max_shift is None:
            return [(i, j) for i in range(height) for j in range(width)]
        r = range(-self.max_shift, self.max_shift + 1)
        return [(i, j) for i in r for j in r]

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"MaxOverShifts: expected (N, C, H, W), got shape {tuple(input.shape)}")
        N = input.shape[0]
        shifts = self.shifts(*input.shape[-2:])
        shifted = torch.stack([input.roll(s, dims=(-2, -1)) for s in shifts], dim=1)   # (N, S, C, H, W)
        out = self.module(shifted.flatten(0, 1))
        out = out.reshape(N, len(shifts), *out.shape[1:])
        return out.amax(1) if self.reduce == "max" else out.mean(1)

    def extra_repr(self) -> str:
        return f"max_shift={self.max_shift}, reduce={self.reduce!r}"
