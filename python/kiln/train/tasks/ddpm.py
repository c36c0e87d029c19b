"""A class-conditional DDPM with a small U-Net on scikit-learn's 8x8 digits (pixels / 16).

The loss is the epsilon-prediction MSE at a uniform step (kiln.models.diffusion); the metric
reported per epoch is that MSE (lower is better: it is the loss itself). results.json:
``sample_classifier_accuracy`` and ``frechet_distance`` of 1000 DDIM samples (``ddim_steps``
steps, 100 per class, classifier-free guidance ``guidance``: 1000 ancestral samples of all T steps
take minutes on a CPU), and for 100 ancestral samples ``sample_seconds_per_100`` (the time to draw
them) and ``ancestral_sample_classifier_accuracy``. PNGs: samples.png (ancestral, a row per class)
and samples_ddim.png.
"""

from __future__ import annotations

import os
import time

import torch

from kiln import metrics
from kiln.models.diffusion import Diffusion, DiffusionConfig
from kiln.train.data import Splits
from kiln.train.tasks import ModelEntry, Task


class DDPMTask(Task):
    name = "ddpm"
    description = "class-conditional DDPM, U-Net with bottleneck self-attention, on 8x8 digits"
    models = {
        "unet": ModelEntry(Diffusion, DiffusionConfig(), "U-Net 32 / 64 channels, attention at 2x2, "
                           "cosine schedule, 100 steps"),
        "unet-linear": ModelEntry(Diffusion, DiffusionConfig(schedule="linear"), "the same, linear schedule"),
    }
    default_model = "unet"
    metric = "eps_mse"
    headline = "test_eps_mse"
    train = {"epochs": 40, "batch_size": 64, "lr": 1e-3, "optimizer": "adamw",
             "optimizer_kwargs": {"weight_decay": 0.0}, "clip_grad_norm": 1.0, "patience": None}
    num_samples = 1000
    guidance = 1.0
    ddim_steps = 20

    def splits(self) -> Splits:
        return metrics.digits_pixels()

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return model.loss(x.reshape(-1, 1, 8, 8), y)

    def metric_value(self, model, batch) -> float:
        return self.loss(model, batch).item()

    def scheduler(self, optimizer, total_steps):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    def _samples(self, model, n, device, seed, **how):
        labels = metrics.balanced_labels(n).to(device)
        return model.sample(labels, guidance=self.guidance, generator=torch.Generator(device).manual_seed(seed),
                            **how).cpu(), labels.cpu()

    def results(self, model, splits, device, trainer) -> dict:
        with torch.random.fork_rng(devices=[]):
            started = time.perf_counter()
            ancestral, labels_100 = self._samples(model, 100, device, 2)
            seconds = time.perf_counter() - started
            samples, labels = self._samples(model, self.num_samples, device, 1, ddim_steps=self.ddim_steps)
        return {"sampler": f"DDIM, {self.ddim_steps} of {model.config.timesteps} steps, eta 0, "
                           f"guidance {self.guidance}",
                **metrics.quality(samples, labels),
                "sample_seconds_per_100": round(seconds, 3),
                "ancestral_sample_classifier_accuracy": metrics.sample_classifier_accuracy(ancestral, labels_100)}

    def plots(self, out_dir, model, splits) -> list[str]:
        device = next(model.parameters()).device
        paths = [os.path.join(out_dir, name) for name in ("samples.png", "samples_ddim.png")]
        metrics.save_grid(paths[0], self._samples(model, 100, device, 0)[0], 10)
        metrics.save_grid(paths[1], self._samples(model, 100, device, 0, ddim_steps=self.ddim_steps)[0], 10)
        return paths


TASK = DDPMTask()
