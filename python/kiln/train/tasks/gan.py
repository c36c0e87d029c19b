"""A conditional DCGAN on scikit-learn's 8x8 digits (pixels / 16 in [0, 1]).

Training: the Trainer's one optimizer (Adam, betas 0.5 / 0.999 as DCGAN) steps on the sum of the
discriminator's and the generator's non-saturating losses, each player's gradient in its own
parameters only (kiln.models.gan: a simultaneous update of both; Adam is per parameter, so this
is two Adams). train_loss in metrics.csv is that sum.

Validation: a GAN's losses say little about its samples, so in eval mode the task's loss is the
digits CNN's (kiln.metrics) cross-entropy on samples of the batch's classes, and its metric the
fraction classified as their class; best.pt and the restored weights are the epoch whose samples
the CNN recognizes best. results.json: ``sample_classifier_accuracy`` and ``frechet_distance`` of
1000 samples (100 per class). PNGs: samples/epoch_NNN.png every epoch and samples.png at the end,
a row per class.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kiln import metrics
from kiln.models.gan import ConditionalGAN, GANConfig
from kiln.train.data import Splits
from kiln.train.tasks import ModelEntry, Task


class EpochSamples:
    """Trainer callback: a grid of samples from fixed noise (a row per class) after every epoch."""

    def __init__(self, out_dir: str):
        self.dir = os.path.join(out_dir, "samples")

    def on_epoch_end(self, trainer) -> None:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"epoch_{trainer.epoch:03d}.png")
        metrics.save_grid(path, sample_grid(trainer.model), 10)


def sample_grid(model: ConditionalGAN, per_class: int = 10) -> torch.Tensor:
    device = next(model.parameters()).device
    labels = metrics.balanced_labels(10 * per_class).to(device)
    return model.sample(labels, torch.Generator(device).manual_seed(0))


class GANTask(Task):
    name = "gan"
    description = "conditional DCGAN on 8x8 digits, non-saturating loss"
    models = {
        "dcgan": ModelEntry(ConditionalGAN, GANConfig(), "DCGAN: transposed-conv generator, strided-conv "
                            "discriminator with class projection and per-class minibatch std, mode seeking 0.2, "
                            "64 / 128 channels"),
    }
    default_model = "dcgan"
    metric = "sample_accuracy"
    headline = "test_sample_accuracy"   # samples of the test split's labels
    train = {"epochs": 40, "batch_size": 64, "lr": 2e-4, "optimizer": "adam",
             "optimizer_kwargs": {"betas": (0.5, 0.999)}, "clip_grad_norm": None, "patience": None}
    num_samples = 1000

    def splits(self) -> Splits:
        return metrics.digits_pixels()

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        if model.training:
            d_loss, g_loss = model.losses(x.reshape(-1, 1, 8, 8), y)
            return d_loss + g_loss
        judge = metrics.judge(device=x.device)
        return F.cross_entropy(judge.cnn(judge.inputs(model.sample(y))), y)

    def metric_value(self, model, batch) -> float:
        x, y = batch
        return metrics.sample_classifier_accuracy(model.sample(y), y, metrics.judge(device=x.device))

    def callbacks(self, out_dir: str) -> list:
        return [EpochSamples(out_dir)]

    def results(self, model, splits, device, trainer) -> dict:
        labels = metrics.balanced_labels(self.num_samples).to(device)
        samples = model.sample(labels, torch.Generator(device).manual_seed(1)).cpu()
        return metrics.quality(samples, labels.cpu())

    def plots(self, out_dir, model, splits) -> list[str]:
        path = os.path.join(out_dir, "samples.png")
        metrics.save_grid(path, sample_grid(model), 10)
        return [path]


TASK = GANTask()
