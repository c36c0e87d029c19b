"""scikit-learn's 8x8 digits: classify 1797 images into 10 classes; headline test accuracy.

One fixed stratified split (70 / 15 / 15, the same for every model and seed); cross-entropy
is kiln's fused op.
"""

from __future__ import annotations

import torch

import kiln
from kiln.models.mlp import MLP, MLPConfig
from kiln.train import data
from kiln.train.tasks import ModelEntry, Task


class Digits(Task):
    name = "digits"
    description = "scikit-learn's 8x8 digits, 10 classes"
    models = {
        "logistic": ModelEntry(MLP, MLPConfig(hidden=[]), "multinomial logistic regression",
                               train={"lr": 1e-2}),
        "mlp": ModelEntry(MLP, MLPConfig(hidden=[256, 256], dropout=0.1), "MLP 64-256-256-10, ReLU, dropout 0.1"),
    }
    default_model = "mlp"
    metric = "accuracy"
    headline = "test_accuracy"
    train = {"epochs": 40, "batch_size": 64, "lr": 1e-3, "optimizer": "adam",
             "optimizer_kwargs": {}, "clip_grad_norm": 1.0, "patience": 10}

    def splits(self) -> data.Splits:
        return data.digits(seed=0)

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return kiln.ops.cross_entropy(model(x), y)

    def metric_value(self, model, batch) -> float:
        x, y = batch
        return (model(x).argmax(-1) == y).double().mean().item()

    def scheduler(self, optimizer, total_steps):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


TASK = Digits()
