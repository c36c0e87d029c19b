"""The Vision Transformer of notes 18: patches, linear patch embedding, learned positions, a [CLS]
token, a pre-LN Transformer encoder, the [CLS] output through an MLP head. Sized for 8 x 8
digits; stochastic depth and dropout are the regularizers 18.3 asks for without pretraining."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kiln import nn as knn
from kiln.train.regularizers import drop_path  # stochastic depth, shared with the other regularizers


@dataclass
class ViTConfig:
    image_size: int = 8
    patch_size: int = 2
    in_channels: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    drop_path: float = 0.1     # stochastic depth: the last block's drop rate (linear from 0)
    conv_stem: int = 0         # > 0: a 3x3 conv-BN-ReLU stem of this many channels before the patches (18.2)


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)); GELU fused into the first MLP GEMM."""

    def __init__(self, config: ViTConfig, drop_path_rate: float):
        super().__init__()
        hidden = int(config.dim * config.mlp_ratio)
        self.ln_1 = knn.LayerNorm(config.dim)
        self.attn = knn.MultiheadAttention(config.dim, config.heads, batch_first=True)
        self.ln_2 = knn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(knn.Linear(config.dim, hidden, activation="gelu"),
                                 knn.Linear(hidden, config.dim), nn.Dropout(config.dropout))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + drop_path(self.attn(h, h, h, need_weights=False)[0], self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.ln_2(x)), self.drop_path_rate, self.training)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"ViT: patch_size {config.patch_size} does not divide image_size {config.image_size}")
        if config.dim % config.heads:
            raise ValueError(f"ViT: heads {config.heads} does not divide dim {config.dim}")
        self.config = config
        num_patches = (config.image_size // config.patch_size) ** 2
        channels = config.in_channels
        self.stem = None
        if config.conv_stem:
            # the hybrid of notes 18.2: convolutions extract local features, the Transformer mixes them
            self.stem = nn.Sequential(knn.Conv2d(channels, config.conv_stem, 3, padding=1, bias=False),
                                      knn.BatchNorm2d(config.conv_stem), nn.ReLU())
            channels = config.conv_stem
        # a stride-p convolution with a p x p kernel is the linear embedding of each flattened patch
        self.patch_embed = knn.Conv2d(channels, config.dim, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = knn.LearnedPositionalEmbedding(num_patches + 1, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(config, r) for r in rates)
        self.ln_f = knn.LayerNorm(config.dim)
        self.head = knn.Linear(config.dim, config.num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) images, or (N, H*W) flattened single-channel ones; returns logits."""
        if x.dim() == 2:
            x = x.reshape(x.shape[0], self.config.in_channels, self.config.image_size, self.config.image_size)
        if self.stem is not None:
            x = self.stem(x)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)                # (N, P, dim)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        h = self.dropout(self.pos_embed(tokens))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h[:, 0]))
