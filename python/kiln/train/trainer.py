"""The training loop. It knows nothing about any task: a model, an optimizer, a loss and data.

    trainer = Trainer(model, optimizer, loss_fn, train_data, val_data, epochs=10)
    trainer.fit()                       # stops at the budget, or when patience runs out
    trainer.restore_best_weights()      # the weights of the best validation loss
    trainer.evaluate(test_data)         # {"loss": ..., metric_name: ...}

``loss_fn(model, batch)`` returns the mean loss of a mini-batch (a scalar tensor) and
``metric_fn(model, batch)`` a float, the batch mean of the task's metric; both see the batch
as the DataLoader yields it, moved to ``device``. A batch's size is the length of its first
tensor.

Exact resume: ``state_dict()`` holds everything the run depends on (weights, optimizer,
scheduler, the step and the position in the epoch, every RNG, the data order's generator as
of the start of the epoch, the early-stopping state and the metrics history), and a Trainer
that loads it takes the same steps on the same batches with the same dropout masks as the
run that wrote it would have. Evaluation saves and restores the RNGs around itself, so
validating (at epoch ends, or at a stop mid-epoch) never shifts the training stream.

Callbacks are objects with any of ``on_step_end(trainer)``, ``on_epoch_end(trainer)``
(``trainer.history[-1]`` is the new row, ``trainer.improved`` says whether it is the best
so far) and ``on_train_end(trainer)``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kiln.train import checkpoint
from kiln.train.data import EpochShuffler


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_size(batch) -> int:
    while isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    return len(batch)


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[nn.Module, object], torch.Tensor],
                 train_data: Dataset, val_data: Dataset | None = None, *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 scheduler_interval: str = "step",
                 metric_fn: Callable[[nn.Module, object], float] | None = None,
                 metric_name: str = "metric",
                 batch_size: int = 64, eval_batch_size: int = 1024,
                 epochs: int = 1, max_steps: int | None = None,
                 clip_grad_norm: float | None = None,
                 patience: int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu",
                 progress: bool = True, description: str = "train",
                 callbacks: Sequence[object] = ()):
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        if len(train_data) == 0:
            raise ValueError("train_data is empty")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.train_data, self.val_data = train_data, val_data
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.metric_fn, self.metric_name = metric_fn, metric_name
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.epochs, self.max_steps = epochs, max_steps
        self.clip_grad_norm = clip_grad_norm
        self.patience = patience
        self.device = torch.device(device)
        self.progress, self.description = progress, description
        self.callbacks = list(callbacks)

        # The data order: one generator draws each epoch's permutation (and the DataLoader's
        # base seed); its state as of the start of the epoch is what a checkpoint keeps.
        self.data_generator = torch.Generator().manual_seed(seed)
        self.sampler = EpochShuffler(len(train_data), self.data_generator)
        self.train_loader = DataLoader(train_data, batch_size=batch_size, sampler=self.sampler,
                                       generator=self.data_generator)
        self._epoch_data_state = self.data_generator.get_state()

        self.step = 0               # optimizer steps taken
        self.epoch = 0              # epochs completed
        self.batches_done = 0       # steps taken in the current epoch
        self._loss_sum, self._samples = 0.0, 0  # the current epoch's training loss so far
        self.best_val_loss, self.best_epoch, self.best_model = math.inf, None, None
        self.bad_epochs = 0         # epochs since the best validation loss
        self.improved = False
        self.history: list[dict] = []
        self.elapsed = 0.0          # seconds of training, over every run that led here
        self.stop_reason: str | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def _out_of_steps(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    # -- the loop ------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train until ``epochs`` are done, ``max_steps`` are taken or patience runs out.

        Returns the metrics rows. The model ends in eval mode with the weights of the last
        step (what ``state_dict`` saves); ``restore_best_weights`` swaps in the best ones.
        """
        started = time.perf_counter() - self.elapsed
        total = self.epochs * self.steps_per_epoch
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        bar = tqdm(total=total, initial=min(self.step, total), desc=self.description, leave=False,
                   disable=not (self.progress and sys.stderr.isatty()))
        self.stop_reason = None
        self.model.train()
        while self.stop_reason is None:
            if self.epoch >= self.epochs:
                self.stop_reason = "epochs"
            elif self._out_of_steps():
                self.stop_reason = "max_steps"
            else:
                completed = self._run_epoch(bar)
                self.elapsed = time.perf_counter() - started
                self._end_epoch(completed)
                row = self.history[-1]
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("train_loss", "val_loss") if k in row})
        bar.close()
        self.elapsed = time.perf_counter() - started
        for callback in self.callbacks:
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(self)
        self.model.eval()
        return self.history

    def restore_best_weights(self) -> bool:
        """Load the weights of the epoch with the best validation loss; False if none was
        validated. (Do it after the last checkpoint: training goes on from the last step.)"""
        if self.best_model is None:
            return False
        self.model.load_state_dict(self.best_model)
        return True

    def _epoch_batches(self) -> Iterator:
        """The rest of the current epoch's batches, in the order of an uninterrupted run."""
        self.data_generator.set_state(self._epoch_data_state)
        self.sampler.skip = self.batches_done * self.batch_size
        yield from self.train_loader

    def _run_epoch(self, bar) -> bool:
        """Train on the rest of the epoch; False when ``max_steps`` stopped it part way."""
        for batch in self._epoch_batches():
            self.train_step(batch)
            bar.update()
            for callback in self.callbacks:
                if hasattr(callback, "on_step_end"):
                    callback.on_step_end(self)
            if self._out_of_steps() and self.batches_done < self.steps_per_epoch:
                return False
        return True

    def train_step(self, batch) -> float:
        """One optimizer step on one mini-batch; returns its loss."""
        batch = _to_device(batch, self.device)
        loss = self.loss_fn(self.model, batch)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss is {value} at step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        n = _batch_size(batch)
        self.step += 1
        self.batches_done += 1
        self._loss_sum += value * n
        self._samples += n
        return value

    def _end_epoch(self, completed: bool) -> None:
        """Write the metrics row of a completed epoch (or of a stop part way through one)."""
        train_loss = self._loss_sum / max(self._samples, 1)
        lr = self.optimizer.param_groups[0]["lr"]
        epoch = self.epoch + (1 if completed else self.batches_done / self.steps_per_epoch)
        if completed:
            self.epoch += 1
            self.batches_done = 0
            self._loss_sum, self._samples = 0.0, 0
            self._epoch_data_state = self.data_generator.get_state()
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
        row = {"epoch": epoch, "step": self.step, "train_loss": train_loss}
        if self.val_data is not None:
            val = self.evaluate(self.val_data)
            row["val_loss"] = val["loss"]
            if self.metric_fn is not None:
                row[f"val_{self.metric_name}"] = val[self.metric_name]
        row["lr"] = lr
        row["seconds"] = self.elapsed
        self.history.append(row)
        # Only whole epochs count for early stopping, so that where a run was cut and
        # resumed cannot change when it stops.
        self.improved = completed and "val_loss" in row and row["val_loss"] < self.best_val_loss
        if self.improved:
            self.best_val_loss, self.best_epoch, self.bad_epochs = row["val_loss"], self.epoch, 0
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        elif completed and "val_loss" in row:
            self.bad_epochs += 1
            if self.patience is not None and self.bad_epochs >= self.patience:
                self.stop_reason = "patience"
        if completed:
            for callback in self.callbacks:
                if hasattr(callback, "on_epoch_end"):
                    callback.on_epoch_end(self)

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> dict:
        """Mean loss (and metric) over ``data`` in eval mode; leaves every RNG as it found it."""
        rng = checkpoint.rng_state()
        was_training = self.model.training
        self.model.eval()
        loader = DataLoader(data, batch_size=self.eval_batch_size, shuffle=False,
                            generator=torch.Generator())  # not the global RNG's base seed
        sums, count = {"loss": 0.0, self.metric_name: 0.0}, 0
        for batch in loader:
            batch = _to_device(batch, self.device)
            n = _batch_size(batch)
            sums["loss"] += self.loss_fn(self.model, batch).item() * n
            if self.metric_fn is not None:
                sums[self.metric_name] += float(self.metric_fn(self.model, batch)) * n
            count += n
        self.model.train(was_training)
        checkpoint.set_rng_state(rng)
        out = {"loss": sums["loss"] / max(count, 1)}
        if self.metric_fn is not None:
            out[self.metric_name] = sums[self.metric_name] / max(count, 1)
        return out

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this run exactly (see the module docstring)."""
        rng = checkpoint.rng_state()
        rng["data"] = self._epoch_data_state.clone()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "rng": rng,
            "trainer": {
                "batches_done": self.batches_done,
                "loss_sum": self._loss_sum,
                "samples": self._samples,
                "best_val_loss": self.best_val_loss,
                "best_epoch": self.best_epoch,
                "best_model": self.best_model,
                "bad_epochs": self.bad_epochs,
                "history": copy.deepcopy(self.history),
                "elapsed": self.elapsed,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (self.scheduler is None) != (state["scheduler"] is None):
            raise ValueError("the checkpoint's scheduler state does not match this Trainer's scheduler "
                             f"({'none' if state['scheduler'] is None else 'one'} saved)")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        checkpoint.set_rng_state(state["rng"])
        self._epoch_data_state = state["rng"]["data"].clone()
        own = state["trainer"]
        self.batches_done = own["batches_done"]
        self._loss_sum, self._samples = own["loss_sum"], own["samples"]
        self.best_val_loss, self.best_epoch = own["best_val_loss"], own["best_epoch"]
        self.best_model, self.bad_epochs = own["best_model"], own["bad_epochs"]
        self.history = copy.deepcopy(own["history"])
        self.elapsed = own["elapsed"]
