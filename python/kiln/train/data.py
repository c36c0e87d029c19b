"""Data: the datasets that ship with a package (nothing is downloaded at run time), and the
resumable shuffling that makes a resumed run see the same batches as an uninterrupted one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, Sampler, TensorDataset


class Splits(NamedTuple):
    train: Dataset
    val: Dataset
    test: Dataset


class EpochShuffler(Sampler[int]):
    """A fresh permutation of ``range(num_samples)`` per epoch, drawn from ``generator``.

    Resuming mid-epoch: restore ``generator`` to its state at the start of the epoch and set
    ``skip`` to the number of samples already seen; the next iteration draws the same
    permutation and starts after them. ``skip`` applies to one iteration only.
    """

    def __init__(self, num_samples: int, generator: torch.Generator):
        self.num_samples = num_samples
        self.generator = generator
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_samples, generator=self.generator)
        skip, self.skip = self.skip, 0
        yield from order[skip:].tolist()

    def __len__(self) -> int:
        return self.num_samples


def shard_count(num_global: int, rank: int, world_size: int) -> int:
    """How many of a global batch of ``num_global`` samples rank ``rank`` takes (its stride)."""
    return len(range(rank, num_global, world_size))


class ShardedBatches(Sampler[list[int]]):
    """The batches of one rank of a data-parallel run: a batch sampler (DataLoader(batch_sampler=)).

    Every rank draws the same order (``EpochShuffler``'s permutation from the same generator,
    or ``range`` when ``generator`` is None), cuts it into global batches of ``batch_size``
    and takes every ``world_size``-th sample of each from ``rank`` on: one process yields
    exactly the batches of a DataLoader(batch_size=batch_size) over an EpochShuffler, and the
    union of the ranks' batches of a step is that global batch. Every rank yields the same
    number of batches; a rank whose stride of a short last batch is empty gets that batch's
    first sample as a placeholder, which counts zero (``shard_count`` is 0). ``skip`` counts
    global samples, as EpochShuffler's: the same resume position at any world size.
    """

    def __init__(self, num_samples: int, batch_size: int, generator: torch.Generator | None = None,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        if self.generator is None:
            order = torch.arange(self.num_samples)
        else:
            order = torch.randperm(self.num_samples, generator=self.generator)
        skip, self.skip = self.skip, 0
        order = order[skip:].tolist()
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield batch[self.rank::self.world_size] or batch[:1]

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)


def digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
           dtype: torch.dtype = torch.float32) -> Splits:
    """scikit-learn's 8x8 digits (1797 images, 10 classes) in stratified train / val / test splits.

    Each split is a TensorDataset of (x, y): x is (n, 64), standardized with the mean and std
    of the training split only (std floored at 1); y holds class indices. ``seed`` fixes the split, so every
    model of a task is compared on the same examples.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the digits data ships with scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    index = torch.arange(len(data.target)).numpy()
    rest, test = train_test_split(index, test_size=test_fraction, stratify=data.target, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  stratify=data.target[rest], random_state=seed)
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.long)
    # std floored at one grey level: a pixel (nearly) constant in training must not blow up
    # on a test image where it is not (a corner pixel lit once gives |x| ~ 1e4 otherwise).
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1.0)
    x = ((x - mean) / std).to(dtype)
    return Splits(*(TensorDataset(x[split], y[split]) for split in (train, val, test)))
