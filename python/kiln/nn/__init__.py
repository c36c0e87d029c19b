"""Drop-in nn.Modules built only on kiln.ops."""

from .linear import MLP, Linear

__all__ = ["Linear", "MLP"]
