"""Train an MLP of kiln.nn layers on scikit-learn's digits and report test accuracy.

The loss is kiln's fused cross-entropy; the optimizer is torch's Adam until kiln.optim lands.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

import kiln
from kiln.train.data import digits


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).double().mean().item()


def train(epochs: int = 40, hidden: int = 256, batch_size: int = 64, lr: float = 1e-3,
          activation: str = "relu", seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = digits(seed=seed)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    model = kiln.nn.MLP([64, hidden, hidden, 10], activation=activation).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    backend_used = kiln.backend.select("linear_act", x_train.device, x_train.dtype,
                                       kiln.ops.BACKEND_DTYPES["linear_act"])
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"digits MLP [{backend_used}]", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(x_train), device=device)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = kiln.ops.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(order):.4f}")
    return {
        "backend": backend_used,
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, x_test, y_test),
        "seconds": time.perf_counter() - start,
    }
