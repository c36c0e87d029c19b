"""Data that ships with a package: nothing is downloaded at run time."""

from __future__ import annotations

import torch


def digits(test_fraction: float = 0.2, seed: int = 0, dtype=torch.float32):
    """scikit-learn's 8x8 digits (1797 images, 10 classes), standardized, split in two.

    Returns ((x_train, y_train), (x_test, y_test)); x is (n, 64), y holds class indices.
    Mean and std come from the training split only.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data ships with scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = ((x - mean) / std).to(dtype)
    return (x[train], y[train]), (x[test], y[test])
