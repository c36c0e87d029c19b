"""Input checks shared by the ops: one place for the wording of every error."""

from __future__ import annotations

import torch


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_floating(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {_dtype(t)} "
                            f"(shape {tuple(t.shape)})")


def check_same_device_dtype(op: str, **tensors) -> None:
    """All given tensors (None skipped) share the first one's device and dtype."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device} "
                             f"({name} {tuple(t.shape)}, {first_name} {tuple(first.shape)})")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {_dtype(t)} but {first_name} has dtype "
                            f"{_dtype(first)} ({name} {tuple(t.shape)}, {first_name} "
                            f"{tuple(first.shape)}); cast them to one dtype")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_parameters(op: str, x: torch.Tensor, **params) -> None:
    """The parameters of a normalization (weight, bias, running statistics; None skipped)
    are tensors on x's device, all of one dtype: x's, or float32 for a float16 / bfloat16 x
    (torch's mixed precision: a half-precision activation, float32 parameters; the output
    keeps x's dtype)."""
    named = [(n, t) for n, t in params.items() if t is not None]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device} "
                             f"({name} {tuple(t.shape)}, x {tuple(x.shape)})")
    if not named:
        return
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {_dtype(t)} but {first_name} has dtype "
                            f"{_dtype(first)} ({name} {tuple(t.shape)}, {first_name} "
                            f"{tuple(first.shape)}); parameters share one dtype")
    if first.dtype == x.dtype or (x.dtype in _LOW_PRECISION and first.dtype == torch.float32):
        return
    allowed = "x's dtype" + (" or float32" if x.dtype in _LOW_PRECISION else "")
    raise TypeError(f"{op}: {first_name} has dtype {_dtype(first)} but x has dtype {_dtype(x)} "
                    f"({first_name} {tuple(first.shape)}, x {tuple(x.shape)}); parameters must "
                    f"have {allowed}")
