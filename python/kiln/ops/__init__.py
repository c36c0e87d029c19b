"""kiln's fused ops: autograd-aware, registered with torch.library, one file per family."""

from . import attention as _attention_family
from . import batch_norm as _batch_norm_family
from . import cross_entropy as _cross_entropy_family
from . import dropout as _dropout_family
from . import gated as _gated_family
from . import im2col as _im2col_family
from . import layer_norm as _layer_norm_family
from . import linear_act as _linear_act_family
from . import optim as _optim_family
from . import random  # kiln's dropout generator: get_rng_state / set_rng_state
from . import rms_norm as _rms_norm_family
from . import rnn as _rnn_family
from . import rotary as _rotary_family
from .attention import attention
from .batch_norm import batch_norm
from .cross_entropy import cross_entropy, log_softmax, softmax
from .dropout import dropout
from .gated import geglu, swiglu
from .im2col import im2col
from .layer_norm import layer_norm
from .linear_act import linear_act
from .linear_cross_entropy import linear_cross_entropy
from .optim import adam_step, ngd_step, rmsprop_step, sgd_step
from .rms_norm import rms_norm
from .rnn import gru, gru_cell, lstm, lstm_cell, rnn_relu, rnn_relu_cell, rnn_tanh, rnn_tanh_cell
from .rotary import rotary_embedding

# op name (as kiln.backend.use(..., ops=[...]) takes it) -> {backend: dtypes it covers};
# what `kiln info` and the dispatcher consult. linear_cross_entropy runs on the kernels
# of "cross_entropy" and follows its choice.
BACKEND_DTYPES = {
    "linear_act": _linear_act_family.DTYPES,
    "dropout": _dropout_family.DTYPES,
    "softmax": _cross_entropy_family.DTYPES,
    "cross_entropy": _cross_entropy_family.DTYPES,
    "layer_norm": _layer_norm_family.DTYPES,
    "batch_norm": _batch_norm_family.DTYPES,
    "attention": _attention_family.DTYPES,
    "lstm": _rnn_family.DTYPES,
    "gru": _rnn_family.DTYPES,
    "rms_norm": _rms_norm_family.DTYPES,
    "swiglu": _gated_family.DTYPES,
    "geglu": _gated_family.DTYPES,
    "rotary_embedding": _rotary_family.DTYPES,
    "im2col": _im2col_family.DTYPES,
    "rnn": _rnn_family.DTYPES,
    "sgd_step": _optim_family.DTYPES,
    "adam_step": _optim_family.DTYPES,
    "rmsprop_step": _optim_family.DTYPES,
    "ngd_step": _optim_family.DTYPES,
}

__all__ = ["linear_act", "dropout", "random", "softmax", "log_softmax", "cross_entropy", "linear_cross_entropy",
           "layer_norm", "batch_norm", "attention",
           "lstm", "gru", "lstm_cell", "gru_cell", "rnn_tanh", "rnn_relu", "rnn_tanh_cell",
           "rnn_relu_cell", "rms_norm", "swiglu", "geglu", "rotary_embedding", "im2col",
           "sgd_step", "adam_step", "rmsprop_step", "ngd_step", "BACKEND_DTYPES"]
