"""Drop-in nn.Modules built only on kiln.ops."""

from .attention import LearnedPositionalEmbedding, MultiheadAttention, SinusoidalPositionalEncoding
from .linear import MLP, Linear
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .norm import BatchNorm1d, BatchNorm2d, LayerNorm
from .rnn import GRU, LSTM, RNN, CellRNN, GRUCell, HighwayRNNCell, LSTMCell, ResidualRNNCell, RNNCell

__all__ = ["Linear", "MLP", "CrossEntropyLoss", "LinearCrossEntropyLoss", "LayerNorm",
           "BatchNorm1d", "BatchNorm2d", "MultiheadAttention",
           "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "LSTM", "GRU",
           "LSTMCell", "GRUCell", "RNNCell", "ResidualRNNCell", "HighwayRNNCell", "RNN", "CellRNN"]
