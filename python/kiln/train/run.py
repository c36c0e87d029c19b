"""One `kiln train` run: a task's model trained by the Trainer into a run folder.

The folder (default ``runs/TASK-MODEL``) receives ``last.pt`` after every epoch and at the
end, ``best.pt`` at each new best validation loss, ``metrics.csv`` (a row per epoch),
``results.json`` and ``curves.png``. Every check of the input (task, model, checkpoint,
flags that a resumed run cannot change) happens before anything in the folder is written.

Under torchrun every rank runs ``train`` (kiln.train.distributed: DDP, or FSDP with ``fsdp``);
rank 0 alone writes the folder, and the checkpoints load at any world size.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random

import numpy as np
import torch

import kiln
from kiln.train import checkpoint, plots
from kiln.train.checkpoint import CheckpointError
from kiln.train.distributed import SINGLE, DistributedError, World, transformer_blocks
from kiln.train.optimizers import make_optimizer
from kiln.train.tasks import Task, TaskError, get_task
from kiln.train.trainer import TimedSchedule, Trainer


class RunError(ValueError):
    """Settings that cannot run, e.g. a resumed run asked to change its batch size."""


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_metrics(history: list[dict], path: str) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    lines = [",".join(columns)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in columns))
    _write_atomic(path, "\n".join(lines) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


class RunFolder:
    """Trainer callback: checkpoints and metrics.csv into ``out``. Every rank calls it (the
    state dict is gathered in collectives); rank 0 alone writes."""

    def __init__(self, out: str, config: dict, world: World = SINGLE):
        self.out, self.config, self.world = out, config, world

    def _checkpoint(self, trainer: Trainer) -> dict:
        return {**trainer.state_dict(), "config": self.config, "kiln_version": kiln.__version__}

    def on_epoch_end(self, trainer: Trainer) -> None:
        state = self._checkpoint(trainer)
        if not self.world.is_main:
            return
        checkpoint.save(state, os.path.join(self.out, "last.pt"))
        if trainer.improved:
            checkpoint.save(state, os.path.join(self.out, "best.pt"))
        write_metrics(trainer.history, os.path.join(self.out, "metrics.csv"))

    def on_train_end(self, trainer: Trainer) -> None:
        state = self._checkpoint(trainer)
        if not self.world.is_main:
            return
        checkpoint.save(state, os.path.join(self.out, "last.pt"))
        if trainer.improved:  # the part epoch at a time limit was the best (no on_epoch_end for it)
            checkpoint.save(state, os.path.join(self.out, "best.pt"))
        write_metrics(trainer.history, os.path.join(self.out, "metrics.csv"))


def _checkpoint_config(ckpt: dict, path: str) -> dict:
    config = ckpt["config"]
    if not isinstance(config, dict) or not {"task", "model", "model_config", "train"} <= set(config):
        raise CheckpointError(f"checkpoint {path!r} has no task/model/model_config/train config")
    return config


def load(path: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of a checkpoint, rebuilt from the task and model config it holds, in eval mode."""
    ckpt = checkpoint.load(path, map_location=map_location)
    config = _checkpoint_config(ckpt, path)
    entry = get_task(config["task"]).model_entry(config["model"])
    model = entry.build(config["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval()


def _teacher_checkpoint(world: World, task: Task, teacher: str, device: torch.device, progress: bool) -> str:
    """--teacher's checkpoint: a path, or a model name of the task, which stands for that
    model's default run, runs/TASK-MODEL/best.pt, trained first (default settings) when absent."""
    if teacher not in task.models:
        return teacher
    path = os.path.join("runs", f"{task.name}-{teacher}", "best.pt")
    if not os.path.isfile(path):
        if world.distributed:
            raise RunError(f"--teacher {teacher}: {path} does not exist; train it first "
                           f"(kiln train {task.name} --model {teacher}), then distill under torchrun")
        logging.getLogger("kiln").warning("--teacher %s: %s does not exist, training it first", teacher, path)
        _train(world, task, teacher, epochs=None, max_steps=None, time_limit=None, batch_size=None, lr=None, seed=None,
               out=os.path.dirname(path), resume=None, device=device, progress=progress)
    return path


def _distillation_loss(world: World, task: Task, settings: dict, device: torch.device, progress: bool):
    """The task's training loss with the teacher of ``settings["teacher"]`` (--teacher), a
    checkpoint of the same task (or a model name: _teacher_checkpoint); its model runs in eval
    mode, without gradients."""
    if not hasattr(task, "distillation_loss"):
        raise RunError(f"--teacher: task {task.name!r} has no distillation loss (the digits task has)")
    path = _teacher_checkpoint(world, task, settings["teacher"], device, progress)
    ckpt = checkpoint.load(path, map_location="cpu")
    config = _checkpoint_config(ckpt, path)
    if config["task"] != task.name:
        raise RunError(f"--teacher {path!r} is a {config['task']!r} checkpoint, not one of task {task.name!r}")
    try:
        teacher = load(path, map_location=device)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"--teacher {path!r} does not load ({checkpoint.error_line(e)})") from None
    try:
        return task.distillation_loss(teacher, settings["distill_temperature"], settings["distill_weight"])
    except (KeyError, ValueError) as e:
        raise RunError(f"--teacher: {e}") from None


def backend_of(device: torch.device) -> str:
    """The kiln backend that runs linear_act (every kiln model's workhorse) on ``device``."""
    return kiln.backend.select("linear_act", device, torch.float32, kiln.ops.BACKEND_DTYPES["linear_act"])


def train(task: str | Task, model: str | None = None, *, epochs: int | None = None,
          max_steps: int | None = None, time_limit: float | None = None, batch_size: int | None = None,
          lr: float | None = None, seed: int | None = None, out: str | None = None, resume: str | None = None,
          device: str = "cpu", progress: bool = True, fsdp: bool = False,
          teacher: str | None = None) -> dict:
    """Train ``model`` of ``task`` into the folder ``out`` and return results.json's dict.

    Settings left None come from the task (and model entry), or from the checkpoint when
    resuming; a resumed run may change ``epochs``, ``max_steps`` and ``time_limit`` only (both
    limits count from the start of the first run). ``time_limit`` (seconds of training) stops
    the run after the step that reaches it and runs the task's LR schedule on the clock, so that
    it ends at the limit (or at the last epoch if that comes first: trainer.TimedSchedule).
    ``batch_size`` is the global batch of a step, split over the ranks of a torchrun run;
    ``fsdp`` shards a Transformer with FSDP2.
    ``teacher``: a checkpoint of the same task whose model the student distills (tasks with a
    ``distillation_loss``, e.g. digits); kept in the checkpoint, so a resumed run goes on distilling.
    """
    try:
        world, device = World.from_env(device, fsdp)
    except DistributedError as e:
        raise RunError(str(e)) from None
    try:
        with _fsdp_backend(world, device):
            return _train(world, task, model, epochs=epochs, max_steps=max_steps, time_limit=time_limit,
                          batch_size=batch_size, lr=lr, seed=seed, out=out, resume=resume, device=device,
                          progress=progress, teacher=teacher)
    finally:
        world.close()  # also on an error: no rank is left waiting in a collective


def _fsdp_backend(world: World, device: torch.device) -> kiln.backend.use:
    """The backend choice of an FSDP run. kiln's numba CPU kernels read tensors through
    ``.numpy()``, which makes torch mark their storage non-resizable, and FSDP frees each
    block's gathered parameters by resizing their storage to 0: on CPU the ops that run on
    the numba default step aside to ``reference`` (pure PyTorch), as a default may; asking
    for ``cpu`` explicitly is refused."""
    ops = list(kiln.ops.BACKEND_DTYPES)
    if not (world.fsdp and device.type == "cpu"):
        return kiln.backend.use(None, ops=[])
    asked = {op: kiln.backend.requested(op) for op in ops}
    if "cpu" in asked.values():
        raise RunError("--fsdp on CPU cannot run kiln's numba kernels (--backend cpu): they pin the parameters' "
                       "storage, which FSDP frees after each block; use --backend reference or --device cuda")
    default = [op for op, name in asked.items() if name is None]
    if default and world.is_main:
        logging.getLogger("kiln").warning("--fsdp on CPU: %s run on the reference backend (kiln's numba kernels "
                                          "pin the storage that FSDP frees)", ", ".join(default))
    return kiln.backend.use("reference", ops=default)


def _train(world: World, task: str | Task, model: str | None, *, epochs, max_steps, time_limit, batch_size, lr, seed,
           out, resume, device: torch.device, progress: bool, teacher: str | None = None) -> dict:
    task = get_task(task) if isinstance(task, str) else task
    model = model or task.default_model
    entry = task.model_entry(model)
    if time_limit is not None and not time_limit > 0:
        raise RunError(f"--time-limit must be > 0 seconds, got {time_limit}")
    settings = {**task.train_settings(model), "seed": 0, "time_limit": None}
    given = {key: value for key, value in
             {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "time_limit": time_limit}.items() if value is not None}
    if teacher is not None:
        given["teacher"] = None if teacher == "none" else os.fspath(teacher)
    model_config, ckpt = entry.config_dict(), None
    if resume is not None:
        ckpt = checkpoint.load(resume, map_location="cpu")
        checkpoint.check_matches(ckpt, resume, task.name, model)
        saved = _checkpoint_config(ckpt, resume)
        for key in ("batch_size", "lr", "seed", "teacher"):
            if key in given and given[key] != saved["train"].get(key):
                raise RunError(f"--{key.replace('_', '-')} {given[key]} differs from the checkpoint's "
                               f"{saved['train'].get(key)}; a resumed run keeps it")
        if time_limit is not None and saved["train"].get("time_limit") is None:
            raise RunError("--time-limit: the checkpoint's run has no time limit, its LR schedule runs by steps; "
                           "resume it without --time-limit")
        settings.update(saved["train"])
        model_config = saved["model_config"]
    settings.update(given)
    settings["max_steps"] = max_steps
    out = out or os.path.join("runs", f"{task.name}-{model}")
    try:
        world.local_batch_size(settings["batch_size"])
    except DistributedError as e:
        raise RunError(str(e)) from None
    if world.fsdp and settings["optimizer"] == "ngd":
        raise RunError("--fsdp: the ngd optimizer normalizes by the whole gradient's norm, which a shard does "
                       "not hold; train this model without --fsdp")

    loss_fn = (task.loss if settings.get("teacher") is None
               else _distillation_loss(world, task, settings, device, progress))

    splits = task.splits()
    random.seed(settings["seed"])
    np.random.seed(settings["seed"])
    kiln.ops.random.manual_seed(settings["seed"])   # torch and kiln's dropout generator
    net = entry.build(model_config).to(device)  # the same weights on every rank
    if world.fsdp and not transformer_blocks(net):
        raise RunError(f"--fsdp shards the Transformer models block by block; {task.name} {model} "
                       f"({type(net).__name__}) has no blocks: train it without --fsdp (DDP)")
    world.seed_rank_streams(settings["seed"])
    train_net = world.wrap(net)  # before the optimizer: FSDP replaces the parameters by shards
    optimizer = make_optimizer(settings["optimizer"], net.parameters(), settings["lr"],
                               **settings["optimizer_kwargs"])
    steps_per_epoch = math.ceil(len(splits.train) / settings["batch_size"])
    total_steps = settings["epochs"] * steps_per_epoch
    if settings["time_limit"] is None:
        scheduler = task.scheduler(optimizer, total_steps)
    else:
        # built once: a schedule may set the optimizer's rate when made (a one-cycle starts at max / 25)
        scheduler = TimedSchedule(lambda n: task.scheduler(optimizer, n), total_steps, settings["time_limit"])
        if scheduler.inner is None:
            scheduler = None
    config = {"task": task.name, "model": model, "model_config": model_config, "train": settings}
    backend = backend_of(device)
    trainer = Trainer(train_net, optimizer, loss_fn, splits.train, splits.val, scheduler=scheduler,
                      metric_fn=task.metric_value, metric_name=task.metric,
                      batch_size=settings["batch_size"], epochs=settings["epochs"], max_steps=max_steps,
                      time_limit=settings["time_limit"],
                      clip_grad_norm=settings["clip_grad_norm"], patience=settings["patience"],
                      seed=settings["seed"], device=device, progress=progress,
                      description=f"{task.name} {model} [{backend}]",
                      callbacks=[RunFolder(out, config, world), *task.callbacks(out)], world=world)
    if isinstance(scheduler, TimedSchedule):
        scheduler.clock = trainer.clock
    if ckpt is not None:
        try:
            trainer.load_state_dict(ckpt)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {resume!r} does not fit {task.name} {model} "
                                  f"({checkpoint.error_line(e)})") from None

    if world.is_main:
        os.makedirs(out, exist_ok=True)
    trainer.fit()
    # the best validation epoch's weights (after fit's last checkpoint, which keeps the last
    # step's), unless the task's settings say the last epoch's (restore_best False)
    if settings.get("restore_best", True):
        trainer.restore_best_weights()
    if world.fsdp:
        # the results (decoding calls blocks outside the root's forward) on a plain copy of
        # the full model on every rank; evaluation stays sharded over the ranks
        net = entry.build(model_config).to(device)
        net.load_state_dict(world.model_state_dict(trainer.model, rank0_only=False))
        trainer.model = net
    test = trainer.evaluate(splits.test)
    results = {
        "task": task.name, "model": model, "seed": settings["seed"],
        "steps": trainer.step, "epochs": trainer.epoch, "stop_reason": trainer.stop_reason,
        "time_limit_s": settings["time_limit"],
        "parameters": sum(p.numel() for p in net.parameters()),
        "wall_s": round(trainer.elapsed, 3), "backend": backend, "device": str(device),
        "world_size": world.size, "fsdp": world.fsdp,
        "best_epoch": trainer.best_epoch, "test_weights": "best" if settings.get("restore_best", True) else "last",
        "test_loss": test["loss"],
        task.headline: test[task.metric],
    }
    if settings.get("teacher") is not None:
        results["teacher"] = settings["teacher"]
    net.eval()
    results.update(task.results(net, splits, device, trainer))  # every rank: it may evaluate
    if world.is_main:
        _write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=2) + "\n")
        if trainer.history:
            plots.curves(trainer.history, f"val_{task.metric}", os.path.join(out, "curves.png"))
        task.plots(out, net, splits)
    return results


__all__ = ["train", "load", "RunError", "TaskError", "CheckpointError", "RunFolder"]
