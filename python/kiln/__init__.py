"""kiln: hand-written fused kernels (Triton, CUDA C++, numba) behind autograd-aware PyTorch ops."""

from . import backend, ops
from .backend import use

__version__ = "0.1.0"

__all__ = ["backend", "ops", "use", "nn", "__version__"]


def __getattr__(name):
    # kiln.nn loads on first use so that `import kiln` stays light for op-only users.
    if name == "nn":
        import importlib

        return importlib.import_module("kiln.nn")
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
