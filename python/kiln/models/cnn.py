"""A small convolutional classifier (notes 14.5: convolutions, channels, pooling bottlenecks),
sized for 8 x 8 digits."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from kiln import nn as knn


@dataclass
class CNNConfig:
    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64)   # one block per entry: conv-BN-relu, conv-BN-relu, 2x2 max pool
    hidden: int = 128
    dropout: float = 0.25
    batch_norm: bool = True


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions (relu fused into the GEMM when there is no batch norm), then a 2x2 max
    pool: the bottleneck halves the resolution."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool):
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            if batch_norm:
                layers += [knn.Conv2d(c, c_out, 3, padding=1, bias=False), knn.BatchNorm2d(c_out), nn.ReLU()]
            else:
                layers.append(knn.Conv2d(c, c_out, 3, padding=1, activation="relu"))
        layers.append(knn.MaxPool2d(2))
        super().__init__(*layers)


class CNN(nn.Module):
    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        size, blocks, c = config.image_size, [], config.in_channels
        for c_out in config.channels:
            if size < 2:
                raise ValueError(f"CNN: {len(config.channels)} pooling blocks shrink a {config.image_size}-pixel "
                                 "image below 1 pixel; use fewer channels entries")
            blocks.append(ConvBlock(c, c_out, config.batch_norm))
            c, size = c_out, size // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(knn.Flatten(), knn.Linear(c * size * size, config.hidden, activation="relu"),
                                  nn.Dropout(config.dropout), knn.Linear(config.hidden, config.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) images, or (N, H*W) flattened single-channel ones."""
        if x.dim() == 2:
            x = x.reshape(x.shape[0], self.config.in_channels, self.config.image_size, self.config.image_size)
        return self.head(self.features(x))

    def penultimate(self, x: Tensor) -> Tensor:
        """The hidden features before the classifier (for Frechet distances of generated images)."""
        if x.dim() == 2:
            x = x.reshape(x.shape[0], self.config.in_channels, self.config.image_size, self.config.image_size)
        return self.head[:2](self.features(x))
