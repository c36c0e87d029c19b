"""Drop-in nn.Modules built only on kiln.ops."""

from .linear import MLP, Linear
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["Linear", "MLP", "CrossEntropyLoss", "LinearCrossEntropyLoss"]
