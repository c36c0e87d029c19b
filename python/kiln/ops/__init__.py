"""kiln's fused ops: autograd-aware, registered with torch.library, one file per family."""

import importlib

from .linear_act import linear_act

# op name -> {backend: dtypes it covers}; what `kiln info` and the dispatcher consult.
BACKEND_DTYPES = {
    name: importlib.import_module(f"{__name__}.{name}").DTYPES for name in ("linear_act",)
}

__all__ = ["linear_act", "BACKEND_DTYPES"]
