"""Tasks: the unit `kiln train` knows. A task builds its data splits, its models from their
configs, the loss and the headline metric, and its plots; the Trainer does the rest.

A task lives in ``tasks/<name>.py`` as a module-level ``TASK`` (a ``Task`` subclass instance)
and is listed in ``TASK_MODULES`` (imported on first use, so one task's dependencies never
load for another). Adding a model to a task is one entry in its ``models`` table:

    models = {"mlp": ModelEntry(MLP, MLPConfig(hidden=[256, 256]), "an MLP of kiln.nn layers")}
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from kiln.train.data import Splits

TASK_MODULES = {
    "digits": "kiln.train.tasks.digits",
    "curve": "kiln.train.tasks.curve",
    "charlm": "kiln.train.tasks.charlm",
    "translate": "kiln.train.tasks.translate",
    "textclass": "kiln.train.tasks.textclass",
    "vae": "kiln.train.tasks.vae",
    "gan": "kiln.train.tasks.gan",
    "ddpm": "kiln.train.tasks.ddpm",
}


class TaskError(ValueError):
    """An unknown task or model name."""


@dataclass
class ModelEntry:
    """A model a task can train: its class, its default config (a dataclass instance whose
    fields are plain values), a line for ``--list``, and the training settings it changes."""

    cls: type[nn.Module]
    config: Any
    description: str
    train: dict = field(default_factory=dict)  # e.g. {"lr": 1e-2}: overrides Task.train

    def config_dict(self) -> dict:
        return asdict(self.config)

    def build(self, config: dict | None = None) -> nn.Module:
        """The model from a config dict (a checkpoint's), or from the default config."""
        if config is None:
            return self.cls(self.config)
        try:
            return self.cls(type(self.config)(**config))
        except TypeError as e:  # a field this version of the config does not have
            raise TaskError(f"{self.cls.__name__}: the model config {config} does not fit "
                            f"{type(self.config).__name__} ({e})") from None


class Task:
    name: str = ""
    description: str = ""
    models: dict[str, ModelEntry] = {}
    default_model: str = ""
    metric: str = ""          # the metric of a batch, a batch mean (higher is better)
    headline: str = ""        # the key results.json reports, e.g. "test_accuracy"
    # Training settings; a model entry may override some, the command line any.
    train: dict = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "optimizer": "adam",
                   "optimizer_kwargs": {}, "clip_grad_norm": None, "patience": None}

    def model_entry(self, model: str) -> ModelEntry:
        if model not in self.models:
            raise TaskError(f"task {self.name!r} has no model {model!r}; its models: {', '.join(self.models)}")
        return self.models[model]

    def train_settings(self, model: str) -> dict:
        return {**self.train, **self.model_entry(model).train}

    def splits(self) -> Splits:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def metric_value(self, model: nn.Module, batch) -> float:
        raise NotImplementedError

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        """The LR schedule over ``total_steps`` (epochs x steps per epoch), stepped every step;
        None for a constant rate."""
        return None

    def results(self, model: nn.Module, splits: Splits, device: torch.device, trainer) -> dict:
        """Task-specific entries for results.json beyond the headline (e.g. decoding metrics,
        throughput), computed after training with the best weights restored."""
        return {}

    def generate_text(self, model: nn.Module, prompt: str, **decoding) -> str:
        """The model's continuation of ``prompt`` (``kiln generate``); ``decoding`` holds
        generate()'s arguments. Tasks whose models do not generate text refuse."""
        raise TaskError(f"task {self.name!r} does not generate text; the tasks that do: charlm, translate")

    def callbacks(self, out_dir: str) -> list:
        """Trainer callbacks of this task beside the run folder's (e.g. a sample grid per epoch)."""
        return []

    def plots(self, out_dir: str, model: nn.Module, splits: Splits) -> list[str]:
        """Extra PNGs of this task written into ``out_dir`` (curves.png is written for all)."""
        return []


def get_task(name: str) -> Task:
    if name not in TASK_MODULES:
        raise TaskError(f"unknown task {name!r}; tasks: {', '.join(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK


def all_tasks() -> dict[str, Task]:
    return {name: get_task(name) for name in TASK_MODULES}
