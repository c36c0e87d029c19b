"""scikit-learn's 8x8 digits: classify 1797 images into 10 classes; headline test accuracy.

One fixed stratified split (70 / 15 / 15, the same for every model and seed); the loss is
kiln's fused cross-entropy with label smoothing 0.1 (with dropout 0.3 it took the MLP from
about 97% to 98% test accuracy on this split: bench/results/digits.md).

Knowledge distillation (notes 18.4, ``kiln train digits --teacher CKPT``): a trained digits
checkpoint (e.g. runs/digits-cnn/best.pt) runs in eval mode without gradients on the same
(augmented) batch, and the training loss is

    (1 - w) * CE(student logits, labels; label smoothing) + w * T^2 * CE(student logits / T, softmax(teacher logits / T))

with T the training setting ``distill_temperature`` (4) and w ``distill_weight`` (0.5) (the
T^2 keeps the soft term's gradient on the scale of the hard one's, as in Hinton et al.; the
training loss in metrics.csv holds w T^2 times the softened teacher's entropy, so the vit's
ends near 17.8, not near 0).
Validation and test losses are the label loss alone, so that runs with and without a teacher
pick their best epoch the same way. ``--teacher cnn`` names the default cnn run's
runs/digits-cnn/best.pt, trained first with the cnn's default settings when absent. Every run writes ``confusion.png`` and ``misclassified.png``
of the test set, from the weights the test accuracy is of (the best validation epoch's, the
vit's last epoch's).
"""

from __future__ import annotations

import os

import torch

import kiln
from kiln.models.cnn import CNN, CNNConfig
from kiln.models.mlp import MLP, MLPConfig
from kiln.models.vit import ViT, ViTConfig
from kiln.train import data, plots
from kiln.train.regularizers import random_shift
from kiln.train.tasks import ModelEntry, Task


class Digits(Task):
    name = "digits"
    description = "scikit-learn's 8x8 digits, 10 classes"
    models = {
        "logistic": ModelEntry(MLP, MLPConfig(hidden=[]), "multinomial logistic regression",
                               train={"lr": 1e-2}),
        "mlp": ModelEntry(MLP, MLPConfig(hidden=[256, 256], dropout=0.3), "MLP 64-256-256-10, ReLU, dropout 0.3"),
        "cnn": ModelEntry(CNN, CNNConfig(), "2 blocks of conv-BN-ReLU x2 + max pool (32, 64 channels), MLP head",
                          train={"epochs": 30}),
        # tested with the last epoch's weights: the cosine schedule ends at 0 and, on 270 validation
        # images, the best-validation-loss epoch is noise (0.957 -> 0.975 mean test accuracy over
        # 3 seeds; --teacher cnn adds 0.005 more). 100 epochs, not 60: lower validation loss on every
        # seed (bench/results/models_cpu.md), ~95 s on the idle 2-core machine.
        "vit": ModelEntry(ViT, ViTConfig(conv_stem=32), "ViT: conv stem, 2x2 patches, dim 64, depth 4, 4 heads, [CLS]",
                          train={"epochs": 100, "lr": 2e-3, "optimizer": "adamw", "patience": None,
                                 "optimizer_kwargs": {"weight_decay": 0.05}, "restore_best": False}),
    }
    default_model = "mlp"
    metric = "accuracy"
    headline = "test_accuracy"
    label_smoothing = 0.1
    num_classes = 10
    train = {"epochs": 40, "batch_size": 64, "lr": 1e-3, "optimizer": "adam",
             "optimizer_kwargs": {}, "clip_grad_norm": 1.0, "patience": 10,
             # knowledge distillation (--teacher): off unless a teacher checkpoint is given
             "teacher": None, "distill_temperature": 4.0, "distill_weight": 0.5}

    def splits(self) -> data.Splits:
        return data.digits(seed=0)

    @staticmethod
    def _augment(model, x: torch.Tensor) -> torch.Tensor:
        if model.training and isinstance(getattr(model, "module", model), CNN):  # (or a DDP of one)
            x = random_shift(x, 1)
        return x

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return kiln.ops.cross_entropy(model(self._augment(model, x)), y, label_smoothing=self.label_smoothing)

    def distillation_loss(self, teacher: torch.nn.Module, temperature: float, weight: float):
        """The training loss with ``teacher`` (the module docstring's formula), a ``loss(model, batch)``."""
        if not temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {temperature}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {weight}")
        teacher.eval().requires_grad_(False)

        def loss(model, batch) -> torch.Tensor:
            if not model.training:
                return self.loss(model, batch)
            x, y = batch
            x = self._augment(model, x)
            logits = model(x)
            with torch.no_grad():
                soft = torch.softmax(teacher(x).to(logits.dtype) / temperature, dim=-1)
            hard = kiln.ops.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            return ((1 - weight) * hard
                    + weight * temperature ** 2 * kiln.ops.cross_entropy(logits / temperature, soft))

        return loss

    def metric_value(self, model, batch) -> float:
        x, y = batch
        return (model(x).argmax(-1) == y).double().mean().item()

    def scheduler(self, optimizer, total_steps):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    def plots(self, out_dir, model, splits) -> list[str]:
        device = next(model.parameters()).device
        x, y = splits.test.tensors
        with torch.no_grad():
            predicted = torch.cat([model(x[i:i + 1024].to(device)).argmax(-1).cpu() for i in range(0, len(x), 1024)])
        paths = [os.path.join(out_dir, name) for name in ("confusion.png", "misclassified.png")]
        plots.confusion(y.numpy(), predicted.numpy(), self.num_classes, paths[0])
        wrong = predicted != y
        plots.misclassified(_raw_pixels(splits)[wrong].numpy(), y[wrong].numpy(),
                            predicted[wrong].numpy(), paths[1])
        return paths


def _raw_pixels(splits: data.Splits) -> torch.Tensor:
    """The test images in scikit-learn's grey levels (0-16), which a person can read: the
    standardization is an increasing affine map per pixel, so it takes each pixel's smallest
    and largest value over the 1797 images to the raw ones (a pixel constant in the data is
    that constant)."""
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().data, dtype=torch.float64)
    images = torch.cat([s.tensors[0] for s in splits]).double()
    low, high = images.min(0).values, images.max(0).values
    raw_low, raw_high = raw.min(0).values, raw.max(0).values
    x = splits.test.tensors[0].double()
    spread = (high - low).clamp_min(1e-12)
    return raw_low + (x - low) / spread * (raw_high - raw_low)


TASK = Digits()
