"""The architectures of the notes, built only on kiln.nn: one file per family, a dataclass config each."""

from .mlp import MLP, MLPConfig

__all__ = ["MLP", "MLPConfig"]
