"""kiln: hand-written fused kernels (Triton, CUDA C++, numba) behind autograd-aware PyTorch ops."""

from . import backend, ops
from .backend import use

__version__ = "0.1.0"

__all__ = ["backend", "ops", "use", "nn", "patch", "__version__"]


def __getattr__(name):
    # kiln.nn and kiln.patch load on first use so that `import kiln` stays light for op-only users.
    # kiln.patch is a module that is also callable: kiln.patch(model) runs kiln.patch.patch
    if name in ("nn", "patch"):
        import importlib

        return importlib.import_module(f"kiln.{name}")
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
