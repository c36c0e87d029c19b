"""kiln's fused ops: autograd-aware, registered with torch.library, one file per family."""

from . import cross_entropy as _cross_entropy_family
from . import linear_act as _linear_act_family
from .cross_entropy import cross_entropy, log_softmax, softmax
from .linear_act import linear_act
from .linear_cross_entropy import linear_cross_entropy

# op name (as kiln.backend.use(..., ops=[...]) takes it) -> {backend: dtypes it covers};
# what `kiln info` and the dispatcher consult. linear_cross_entropy runs on the kernels
# of "cross_entropy" and follows its choice.
BACKEND_DTYPES = {
    "linear_act": _linear_act_family.DTYPES,
    "softmax": _cross_entropy_family.DTYPES,
    "cross_entropy": _cross_entropy_family.DTYPES,
}

__all__ = ["linear_act", "softmax", "log_softmax", "cross_entropy", "linear_cross_entropy",
           "BACKEND_DTYPES"]
