"""kiln: hand-written fused kernels (Triton, CUDA C++, numba) behind autograd-aware PyTorch ops."""

from . import backend, ops
from .backend import use
from .ops.random import manual_seed

__version__ = "0.1.0"

__all__ = ["backend", "ops", "use", "manual_seed", "nn", "optim", "patch", "__version__"]


def __getattr__(name):
    # kiln.nn, kiln.optim and kiln.patch load on first use so that `import kiln` stays light for
    # op-only users. kiln.patch is a module that is also callable: kiln.patch(model) runs kiln.patch.patch
    if name in ("nn", "optim", "patch"):
        import importlib

        return importlib.import_module(f"kiln.{name}")
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
