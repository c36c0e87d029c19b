"""The training loop. It knows nothing about any task: a model, an optimizer, a loss and data.

    trainer = Trainer(model, optimizer, loss_fn, train_data, val_data, epochs=10)
    trainer.fit()                       # stops at the budget, or when patience runs out
    trainer.restore_best_weights()      # the weights of the best validation loss
    trainer.evaluate(test_data)         # {"loss": ..., metric_name: ...}

``loss_fn(model, batch)`` returns the mean loss of a mini-batch (a scalar tensor) and
``metric_fn(model, batch)`` a float, the batch mean of the task's metric; both see the batch
as the DataLoader yields it, moved to ``device``.

Exact resume: ``state_dict()`` holds everything the run depends on (weights, optimizer,
scheduler, the step and the position in the epoch, every RNG, the data order's generator as
of the start of the epoch, the early-stopping state and the metrics history), and a Trainer
that loads it takes the same steps on the same batches with the same dropout masks as the
run that wrote it would have. Evaluation saves and restores the RNGs around itself, so
validating (at epoch ends, or at a stop mid-epoch) never shifts the training stream.

Data parallel (``world``, a kiln.train.distributed.World; one process by default): ``model``
is what ``world.wrap`` returned (a DistributedDataParallel, or the model sharded in place by
FSDP), built before the optimizer; ``batch_size`` is the global batch of a step, every rank
takes its stride of it (data.ShardedBatches); training losses, evaluation sums and the best
epoch are the same on every rank, and ``state_dict`` is the plain model's, as one process
writes it (the caller saves it on rank 0 only). Every rank must call ``fit``, ``evaluate``,
``state_dict`` and ``restore_best_weights`` together: they meet in collectives.

Time limit (``time_limit``, seconds): after the step that reaches it the run stops as at
``max_steps`` (the part epoch is validated and written as a row; ``stop_reason`` is
"time_limit"). It counts ``elapsed``, the training seconds of every run that led here, so a
resumed run stops at the same total; time spent inside ``off_the_clock()`` does not count (an
experiment's extra validation probes). Under data parallel rank 0's clock decides (one
all-reduce a step), so that every rank stops after the same step. That row, the last, is also a
candidate for the best weights (nothing trains after it), unlike a part epoch cut by ``max_steps``.
``TimedSchedule`` stretches a task's step schedule over the limit, so that it ends at the stop.

Callbacks are objects with any of ``on_step_end(trainer)``, ``on_epoch_end(trainer)``
(``trainer.history[-1]`` is the new row, ``trainer.improved`` says whether it is the best
so far) and ``on_train_end(trainer)``.
"""

from __future__ import annotations

import contextlib
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
from kiln.train.data import ShardedBatches, shard_count
from kiln.train.distributed import SINGLE, World


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class TimedSchedule:
    """A step-based LR schedule driven by the clock: ``make(n)`` builds the task's schedule over
    ``n`` steps (e.g. a one-cycle), and after each optimizer step it is advanced to the run's
    progress, ``max(step / total_steps, trainer.clock() / time_limit)`` of its length. So the
    schedule ends at the time limit, or at ``total_steps`` if that comes first, whatever the
    speed of the machine. (Should the limit pass during an epoch end's validation, the run stops
    there and its last step was that validation's time short of the end.) ``clock`` (a callable,
    seconds) is set to the Trainer's ``clock``."""

    RESOLUTION = 10_000   # schedule steps over the whole run

    def __init__(self, make: Callable[[int], torch.optim.lr_scheduler.LRScheduler | None], total_steps: int,
                 time_limit: float):
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
        self.inner = make(self.RESOLUTION)   # None: the task has no schedule (the caller drops it)
        self.total_steps, self.time_limit = max(total_steps, 1), time_limit
        self.steps = 0
        self.clock: Callable[[], float] = lambda: 0.0

    def progress(self) -> float:
        return min(max(self.steps / self.total_steps, self.clock() / self.time_limit), 1.0)

    def step(self) -> None:
        self.steps += 1
        # a one-cycle refuses steps past its length: the last position is RESOLUTION - 1
        target = min(int(self.progress() * self.RESOLUTION), self.RESOLUTION - 1)
        while self.inner.last_epoch < target:
            self.inner.step()

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "steps": self.steps, "timed": True}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("timed"):
            raise ValueError("the checkpoint's schedule runs by steps, not by a time limit")
        self.inner.load_state_dict(state["inner"])
        self.steps = state["steps"]


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[nn.Module, object], torch.Tensor],
                 train_data: Dataset, val_data: Dataset | None = None, *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 scheduler_interval: str = "step",
                 metric_fn: Callable[[nn.Module, object], float] | None = None,
                 metric_name: str = "metric",
                 batch_size: int = 64, eval_batch_size: int = 1024,
                 epochs: int = 1, max_steps: int | None = None, time_limit: float | None = None,
                 clip_grad_norm: float | None = None,
                 patience: int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu",
                 progress: bool = True, description: str = "train",
                 callbacks: Sequence[object] = (), world: World = SINGLE):
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        if len(train_data) == 0:
            raise ValueError("train_data is empty")
        if time_limit is not None and not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
        self.world = world
        world.local_batch_size(batch_size)  # a global batch the ranks cannot split is refused
        # train_model is what the loss sees in training (DDP syncs gradients in its forward);
        # model is the module itself, for evaluation and state dicts
        self.train_model = model
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.optimizer, self.loss_fn = optimizer, loss_fn
        self.train_data, self.val_data = train_data, val_data
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.metric_fn, self.metric_name = metric_fn, metric_name
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.epochs, self.max_steps, self.time_limit = epochs, max_steps, time_limit
        self.clip_grad_norm = clip_grad_norm
        self.patience = patience
        self.device = torch.device(device)
        self.progress, self.description = progress and world.is_main, description
        self.seed = seed
        self.callbacks = list(callbacks)

        # The data order: one generator draws each epoch's permutation (and the DataLoader's
        # base seed); its state as of the start of the epoch is what a checkpoint keeps.
        # Every rank draws the same permutation and takes its stride of each global batch.
        self.data_generator = torch.Generator().manual_seed(seed)
        self.sampler = ShardedBatches(len(train_data), batch_size, self.data_generator, world.rank, world.size)
        self.train_loader = DataLoader(train_data, batch_sampler=self.sampler, generator=self.data_generator)
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
        self._started: float | None = None  # perf_counter() at which elapsed was 0 (during fit)
        self.now = 0.0              # clock(): training seconds as of the last step
        self.stop_reason: str | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def _out_of_steps(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def _local_clock(self) -> float:
        """Seconds of training so far on this process (``elapsed``, live during ``fit``)."""
        return self.elapsed if self._started is None else time.perf_counter() - self._started

    def clock(self) -> float:
        """Seconds of training as of the last step, the same on every rank (rank 0's clock):
        what ``time_limit`` and a TimedSchedule go by, so that the ranks stop after the same
        step and take the same learning rates."""
        return self.now

    def _tick(self) -> None:
        now = self._local_clock()
        if self.time_limit is not None and self.world.distributed:
            now = self.world.all_reduce_sum([now if self.world.rank == 0 else 0.0], self.device)[0]
        self.now = now

    def _out_of_time(self) -> bool:
        return self.time_limit is not None and self.now >= self.time_limit

    @contextlib.contextmanager
    def off_the_clock(self):
        """Time spent in this block is not training time: not in ``elapsed``, not against
        ``time_limit`` (e.g. a callback's extra validation)."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            if self._started is not None:
                self._started += time.perf_counter() - begin

    # -- the loop ------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train until ``epochs`` are done, ``max_steps`` are taken or patience runs out.

        Returns the metrics rows. The model ends in eval mode with the weights of the last
        step (what ``state_dict`` saves); ``restore_best_weights`` swaps in the best ones.
        """
        self._started = time.perf_counter() - self.elapsed
        self.now = self.elapsed    # the same on every rank (a checkpoint's)
        total = self.epochs * self.steps_per_epoch
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        bar = tqdm(total=total, initial=min(self.step, total), desc=self.description, leave=False,
                   disable=not (self.progress and sys.stderr.isatty()))
        self.stop_reason = None
        self.train_model.train()
        while self.stop_reason is None:
            self._tick()  # (the last epoch's validation took time too)
            if self.epoch >= self.epochs:
                self.stop_reason = "epochs"
            elif self._out_of_steps():
                self.stop_reason = "max_steps"
            elif self._out_of_time():
                self.stop_reason = "time_limit"
            else:
                completed = self._run_epoch(bar)
                self.elapsed = self._local_clock()
                self._end_epoch(completed)
                row = self.history[-1]
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("train_loss", "val_loss") if k in row})
        bar.close()
        self.elapsed = self._local_clock()
        self._started = None
        for callback in self.callbacks:
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(self)
        self.train_model.eval()
        return self.history

    def restore_best_weights(self) -> bool:
        """Load the weights of the epoch with the best validation loss; False if none was
        validated. (Do it after the last checkpoint: training goes on from the last step.)"""
        if self.best_model is None:
            return False
        self.world.load_model_state_dict(self.model, self.best_model)
        return True

    def _epoch_batches(self) -> Iterator:
        """The rest of the current epoch's batches, in the order of an uninterrupted run."""
        self.data_generator.set_state(self._epoch_data_state)
        self.sampler.skip = self.batches_done * self.batch_size
        yield from self.train_loader

    def _run_epoch(self, bar) -> bool:
        """Train on the rest of the epoch; False when ``max_steps`` or ``time_limit`` stopped it
        part way."""
        for batch in self._epoch_batches():
            self.train_step(batch)
            bar.update()
            for callback in self.callbacks:
                if hasattr(callback, "on_step_end"):
                    callback.on_step_end(self)
            if (self._out_of_steps() or self._out_of_time()) and self.batches_done < self.steps_per_epoch:
                return False
        return True

    def train_step(self, batch) -> float:
        """One optimizer step on one mini-batch (this rank's part of it); returns the loss of
        the global batch."""
        batch = _to_device(batch, self.device)
        loss = self.loss_fn(self.train_model, batch)
        value = loss.item()
        n = min(self.batch_size, len(self.train_data) - self.batches_done * self.batch_size)  # global
        if self.world.distributed:
            mine = shard_count(n, self.world.rank, self.world.size)
            value = self.world.all_reduce_sum([value * mine, mine], self.device)[0] / n
            if mine * self.world.size != n:
                # an unevenly split short batch: weigh this rank's mean by its share, so that
                # DDP's average over ranks is the gradient of the global batch's mean
                loss = loss * (mine * self.world.size / n)
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss is {value} at step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self._tick()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        self.step += 1
        self.batches_done += 1
        self._loss_sum += value * n
        self._samples += n
        return value

    def _end_epoch(self, completed: bool) -> None:
        """Write the metrics row of a completed epoch (or of a stop part way through one)."""
        last = not completed and not self._out_of_steps() and self._out_of_time()  # the fit stops on time
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
        # resumed cannot change when it stops; the part epoch at a time limit is the end of
        # training and may hold the best weights (its epoch is fractional), but patience
        # ignores it.
        self.improved = (completed or last) and "val_loss" in row and row["val_loss"] < self.best_val_loss
        if self.improved:
            self.best_val_loss, self.best_epoch = row["val_loss"], (self.epoch if completed else epoch)
            self.bad_epochs = 0 if completed else self.bad_epochs
            self.best_model = {k: v.detach().to("cpu", copy=True)
                               for k, v in self.world.model_state_dict(self.model).items()}
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
        """Mean loss (and metric) over ``data`` in eval mode; leaves every RNG as it found it.

        Sharded: each rank evaluates its stride of every batch and the sums are all-reduced,
        so every rank returns the means over the whole of ``data``."""
        rng = checkpoint.rng_state()
        was_training = self.model.training
        self.model.eval()
        world, size = self.world, len(data)
        batches = ShardedBatches(size, self.eval_batch_size, None, world.rank, world.size)
        loader = DataLoader(data, batch_sampler=batches,
                            generator=torch.Generator())  # not the global RNG's base seed
        sums = [0.0, 0.0, 0]  # loss, metric, count
        for start, batch in zip(range(0, size, self.eval_batch_size), loader):
            batch = _to_device(batch, self.device)
            n = shard_count(min(self.eval_batch_size, size - start), world.rank, world.size)
            loss = self.loss_fn(self.model, batch).item()
            metric = float(self.metric_fn(self.model, batch)) if self.metric_fn is not None else 0.0
            if n:  # (a rank's placeholder of a short last batch counts nothing)
                sums[0] += loss * n
                sums[1] += metric * n
                sums[2] += n
        sums = world.all_reduce_sum(sums, self.device)
        self.model.train(was_training)
        checkpoint.set_rng_state(rng)
        out = {"loss": sums[0] / max(sums[2], 1)}
        if self.metric_fn is not None:
            out[self.metric_name] = sums[1] / max(sums[2], 1)
        return out

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this run exactly (see the module docstring).

        ``rng`` is this rank's (rank 0's is the one-process stream); a distributed run adds
        ``rng_ranks``, every rank's, so that a resume at the same world size is exact."""
        rng = checkpoint.rng_state()
        rng["data"] = self._epoch_data_state.clone()
        extra = {}
        if self.world.distributed:
            extra["rng_ranks"] = self.world.all_gather_object(rng)
        return {
            "model": self.world.model_state_dict(self.model),
            "optimizer": self.world.optimizer_state_dict(self.model, self.optimizer),
            **extra,
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
                "world_size": self.world.size,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``, written at this or any other world size (every rank loads it)."""
        self.world.load_model_state_dict(self.model, state["model"])
        self.world.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        if (self.scheduler is None) != (state["scheduler"] is None):
            raise ValueError("the checkpoint's scheduler state does not match this Trainer's scheduler "
                             f"({'none' if state['scheduler'] is None else 'one'} saved)")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world.size:
            checkpoint.set_rng_state(ranks[self.world.rank])
        else:
            # another world size: rank 0 goes on with the saved stream, the others draw new ones
            checkpoint.set_rng_state(state["rng"])
            self.world.seed_rank_streams(self.seed, salt=self.step)
        self._epoch_data_state = state["rng"]["data"].clone()
        own = state["trainer"]
        self.batches_done = own["batches_done"]
        self._loss_sum, self._samples = own["loss_sum"], own["samples"]
        self.best_val_loss, self.best_epoch = own["best_val_loss"], own["best_epoch"]
        self.best_model, self.bad_epochs = own["best_model"], own["bad_epochs"]
        self.history = copy.deepcopy(own["history"])
        self.elapsed = own["elapsed"]
