"""A VAE on scikit-learn's 8x8 digits (pixels / 16 in [0, 1]); headline the test ELBO.

results.json: ``test_elbo`` (the plain ELBO, nats per image, one draw of z per test image, not
importance-weighted), ``recon_classifier_accuracy`` (the digits CNN of kiln.metrics on the decoder's
mean image at z = mu of each test image) and the Frechet distance of 1000 prior samples.
PNGs: reconstructions.png (test images over their reconstructions), samples.png (prior samples)
and, for a 2-D latent, latent_traversal.png (the decoder over a grid of the latent plane).
"""

from __future__ import annotations

import os

import torch

from kiln import metrics
from kiln.models.vae import VAE, VAEConfig
from kiln.train.data import Splits
from kiln.train.tasks import ModelEntry, Task


class VAETask(Task):
    name = "vae"
    description = "variational autoencoder on 8x8 digits, Bernoulli decoder"
    models = {
        "mlp": ModelEntry(VAE, VAEConfig(), "MLP encoder / decoder 64-512-256, 16-D latent"),
        "mlp2d": ModelEntry(VAE, VAEConfig(latent_dim=2), "MLP encoder / decoder 64-512-256, 2-D latent "
                            "(latent traversal plot)"),
    }
    default_model = "mlp"
    metric = "elbo"
    headline = "test_elbo"
    train = {"epochs": 200, "batch_size": 64, "lr": 1e-3, "optimizer": "adam",
             "optimizer_kwargs": {}, "clip_grad_norm": None, "patience": None}
    num_samples = 1000

    def splits(self) -> Splits:
        return metrics.digits_pixels()

    def loss(self, model, batch) -> torch.Tensor:
        return -model.elbo(batch[0]).mean()      # the negative ELBO, nats per image

    def metric_value(self, model, batch) -> float:
        return model.elbo(batch[0]).mean().item()

    def results(self, model, splits, device, trainer) -> dict:
        x, y = splits.test.tensors
        recon = model.reconstruct(x.to(device)).cpu()
        with torch.random.fork_rng(devices=[]):
            samples = model.sample(self.num_samples, torch.Generator(device).manual_seed(0)).cpu()
        scores = metrics.quality(samples)
        return {"elbo_estimator": "plain ELBO, one sample of z per image, nats per image",
                "recon_classifier_accuracy": metrics.sample_classifier_accuracy(recon, y),
                **{f"prior_sample_{k}" if k == "frechet_distance" else k: v for k, v in scores.items()}}

    def plots(self, out_dir, model, splits) -> list[str]:
        device = next(model.parameters()).device
        x = splits.test.tensors[0][:50].to(device)
        paths = [os.path.join(out_dir, name) for name in ("reconstructions.png", "samples.png")]
        # rows of 10: test images, their reconstructions, alternately
        recon = model.reconstruct(x)
        pairs = torch.stack([x.reshape(5, 10, -1), recon.reshape(5, 10, -1)], dim=1).reshape(100, -1)
        metrics.save_grid(paths[0], pairs, 10)
        metrics.save_grid(paths[1], model.sample(100, torch.Generator(device).manual_seed(0)), 10)
        if model.config.latent_dim == 2:
            # the latent plane through the prior's quantiles 5% .. 95%, so each cell has equal mass
            q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 15))
            grid = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij"), dim=-1).reshape(-1, 2)
            paths.append(os.path.join(out_dir, "latent_traversal.png"))
            with torch.no_grad():
                metrics.save_grid(paths[-1], model.decode(grid.to(device)), 15)
        return paths


TASK = VAETask()
