"""Every optimizer of a run is built here, by name: the one place that picks the implementation.

torch.optim for now; kiln.optim (fused steps, torch's signatures) takes over this table when it lands.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


def make_optimizer(name: str, params: Iterable, lr: float, **kwargs) -> torch.optim.Optimizer:
    """``OPTIMIZERS[name](params, lr=lr, **kwargs)``; ``kwargs`` are the class's own (torch's names)."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, lr=lr, **kwargs)
