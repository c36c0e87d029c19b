"""Regression of a generated 1-D function with the notes' simple families and basis expansions
(notes 3-5): linear, polynomial, Fourier, Gaussian RBF (fixed centres), and the shallow ReLU and
sigmoid networks whose units are learned basis functions.

Data: y = sin(2x) + 0.3 x + 0.1 noise for x uniform in [-3, 3], 400 train / 100 val / 200 test
points from a fixed seed. results.json: ``test_mse``, and for the families linear in their
parameters ``closed_form_mse`` (the least-squares fit of the same basis on the training points,
evaluated on the test points), which gradient descent must approach. ``fit.png`` shows the data,
the fit, the closed form and, for the ReLU net, its kinks x = -b_k / a_k.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import TensorDataset

from kiln.models.basis import BasisConfig, BasisRegression
from kiln.train.data import Splits
from kiln.train.tasks import ModelEntry, Task


def curve_data(n_train: int = 400, n_val: int = 100, n_test: int = 200, seed: int = 0) -> Splits:
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val + n_test
    x = torch.rand(n, 1, generator=g) * 6 - 3
    y = torch.sin(2 * x) + 0.3 * x + 0.1 * torch.randn(n, 1, generator=g)
    parts = torch.split(torch.arange(n), [n_train, n_val, n_test])
    return Splits(*(TensorDataset(x[p], y[p]) for p in parts))


def _entry(family: str, num_basis: int, description: str, **train) -> ModelEntry:
    return ModelEntry(BasisRegression, BasisConfig(family, num_basis=num_basis), description, train=train)


class Curve(Task):
    name = "curve"
    description = "1-D regression: the notes' families and basis expansions"
    models = {
        "linear": _entry("linear", 1, "f = a + b x (notes 3.1)"),
        # monomials up to x^7 are nearly collinear: gradient descent needs a larger rate and longer
        "poly": _entry("poly", 7, "polynomial of degree 7 (notes 4.2)", lr=0.2, epochs=1000),
        "fourier": _entry("fourier", 6, "sines and cosines of 6 frequencies (notes 4.2)"),
        "rbf": _entry("rbf", 16, "16 Gaussian RBFs, fixed centres and widths (notes 4.2)"),
        "relu": _entry("relu", 32, "shallow ReLU network, 32 units: kinks at -b_k/a_k (notes 5.1-5.2)",
                       lr=1e-2),
        "sigmoid": _entry("sigmoid", 32, "shallow sigmoid network, 32 units (notes 4.2, 5.1)", lr=1e-2),
    }
    default_model = "relu"
    metric = "neg_mse"       # higher is better for the Trainer's best-epoch choice
    headline = "test_neg_mse"
    train = {"epochs": 300, "batch_size": 50, "lr": 5e-2, "optimizer": "adam", "optimizer_kwargs": {},
             "clip_grad_norm": None, "patience": None}

    def splits(self) -> Splits:
        return curve_data()

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def metric_value(self, model, batch) -> float:
        x, y = batch
        return -torch.nn.functional.mse_loss(model(x), y).item()

    def scheduler(self, optimizer, total_steps):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    def _closed_form(self, model, splits):
        if not model.linear_in_parameters:
            return None
        fit = BasisRegression(model.config).double()
        fit.load_state_dict(model.state_dict())
        fit.fit_least_squares(*(t.double() for t in splits.train.tensors))
        return fit

    def results(self, model, splits, device, trainer) -> dict:
        x, y = splits.test.tensors
        with torch.no_grad():
            out = {"test_mse": torch.nn.functional.mse_loss(model(x.to(device)).cpu(), y).item()}
            fit = self._closed_form(model.cpu(), splits)
            if fit is not None:
                out["closed_form_mse"] = torch.nn.functional.mse_loss(fit(x.double()), y.double()).item()
        model.to(device)
        return out

    def plots(self, out_dir: str, model, splits) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        model = model.cpu().eval()
        grid = torch.linspace(-3, 3, 400)[:, None]
        fig, ax = plt.subplots(figsize=(6, 4))
        x, y = splits.train.tensors
        ax.scatter(x[:, 0], y[:, 0], s=6, alpha=0.4, label="training data")
        with torch.no_grad():
            ax.plot(grid[:, 0], model(grid)[:, 0], label=f"{model.config.family} (gradient descent)")
            fit = self._closed_form(model, splits)
            if fit is not None:
                ax.plot(grid[:, 0], fit(grid.double())[:, 0], "--", label="least squares")
            if model.config.family == "relu":
                kinks = model.kinks()
                kinks = kinks[(kinks > -3) & (kinks < 3)]
                ax.plot(kinks, model(kinks[:, None])[:, 0], "kx", label="kinks -b_k/a_k")
        ax.set(xlabel="x", ylabel="y", title="kiln train curve")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "fit.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]


TASK = Curve()
