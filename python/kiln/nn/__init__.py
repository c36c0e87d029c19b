"""Drop-in nn.Modules built only on kiln.ops."""

# Layers with nothing to fuse are torch's own, named here so that a model is written against
# kiln.nn alone (and a future fused form replaces them without touching models).
from torch.nn import AvgPool2d, Embedding, Flatten, MaxPool2d, Upsample

from .attention import LearnedPositionalEmbedding, MultiheadAttention, SinusoidalPositionalEncoding
from .cached_attention import CausalSelfAttention, CrossAttention, KVCache, LayerCache
from .conv import Conv2d, ConvTranspose2d, MaxOverShifts
from .dropout import Dropout
from .linear import MLP, Linear
from .llm import GatedMLP, RMSNorm, RotaryEmbedding
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, LayerNorm
from .rnn import GRU, LSTM, RNN, CellRNN, GRUCell, HighwayRNNCell, LSTMCell, ResidualRNNCell, RNNCell
from .transformer import (TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)
from .twin import torch_twin

__all__ = ["Linear", "MLP", "Dropout", "Conv2d", "ConvTranspose2d", "MaxOverShifts", "MaxPool2d", "AvgPool2d",
           "Flatten", "Upsample", "Embedding", "CausalSelfAttention", "CrossAttention",
           "KVCache", "LayerCache", "CrossEntropyLoss", "LinearCrossEntropyLoss", "LayerNorm",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "MultiheadAttention",
           "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "LSTM", "GRU",
           "LSTMCell", "GRUCell", "RNNCell", "ResidualRNNCell", "HighwayRNNCell", "RNN", "CellRNN",
           "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
           "RMSNorm", "GatedMLP", "RotaryEmbedding", "torch_twin"]
