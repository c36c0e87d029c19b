"""Every optimizer of a run is built here, by name: the one place that picks the implementation.

kiln.optim: torch's signatures and state_dicts, one fused multi-tensor step per parameter group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

import kiln.optim

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": kiln.optim.SGD,
    "adam": kiln.optim.Adam,
    "adamw": kiln.optim.AdamW,
    "rmsprop": kiln.optim.RMSprop,
    "ngd": kiln.optim.NGD,
}


def make_optimizer(name: str, params: Iterable, lr: float, **kwargs) -> torch.optim.Optimizer:
    """``OPTIMIZERS[name](params, lr=lr, **kwargs)``; ``kwargs`` are the class's own (torch's names)."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, lr=lr, **kwargs)
