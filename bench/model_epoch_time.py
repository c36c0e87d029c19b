"""Seconds per training epoch of `kiln train` models on kiln's kernels against the same model built
from torch.nn (kiln.nn.torch_twin: the same weights, torch's modules and ops), in one process.

    OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/model_epoch_time.py --out bench/results/model_epoch_time.md

Each side trains as `kiln train` does (the task's real training split, default model config, batch
size, optimizer settings, learning-rate schedule and gradient clipping): kiln's model with
kiln.optim (train/optimizers.py) and the task's loss; the twin with torch.optim's class of the same
name and torch's loss (F.cross_entropy where the task calls kiln.ops.cross_entropy; the language
models compute theirs in forward, the twin with F.cross_entropy on F.linear's logits). A step is
forward + loss + backward + clipping + optimizer and scheduler step, on the same batches for
every side. The sides run interleaved: ``--repeats`` rounds of ``--steps`` steps each, the order
rotating every round, after ``--warmup`` steps each (numba compiles kiln's CPU kernels on first
use). Reported: the median step time over all timed steps, seconds per epoch (steps per epoch x
that median), the ratio torch / kiln (> 1: kiln is faster) and for charlm tokens/s.
``--compile`` adds a torch.compile'd twin (inductor; its compile time is not counted).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kiln
from kiln.nn import torch_twin
from kiln.nn.twin import KilnOpRecorder
from kiln.train.optimizers import make_optimizer
from kiln.train.tasks import get_task

MODELS = {"digits": ("mlp", "cnn", "vit"), "charlm": ("transformer", "lstm", "gru", "rnn")}
TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                    "rmsprop": torch.optim.RMSprop}


def parse_models(names: list[str]) -> list[tuple[str, str]]:
    """``task/model`` or a model name of one of MODELS' tasks (``mlp``, ``lstm``, ...)."""
    chosen = []
    for name in names:
        task, _, model = name.rpartition("/")
        found = [(t, model) for t, models in MODELS.items() if model in models and task in ("", t)]
        if not found:
            known = ", ".join(f"{t}/{m}" for t, ms in MODELS.items() for m in ms)
            raise SystemExit(f"--models: unknown model {name!r}; known: {known}")
        chosen += found
    return chosen


def torch_loss(task, model_name: str):
    """The task's loss with torch's ops, for the twin."""
    if task.name == "digits":
        from kiln.train.tasks.digits import random_shift

        def digits_loss(model, batch):
            x, y = batch
            if model.training and model_name == "cnn":   # the task's augmentation of the CNN
                x = random_shift(x, 1)
            return F.cross_entropy(model(x), y, label_smoothing=task.label_smoothing)
        return digits_loss
    return task.loss   # charlm: the twin's forward computes its loss with torch


class Side:
    """One model training as `kiln train` trains it: model, optimizer, schedule, loss."""

    def __init__(self, name, model, optimizer, loss, settings, scheduler):
        self.name, self.model, self.optimizer, self.loss = name, model, optimizer, loss
        self.clip, self.scheduler = settings["clip_grad_norm"], scheduler
        self.times: list[float] = []

    def step(self, batch) -> float:
        start = time.perf_counter()
        loss = self.loss(self.model, batch)
        value = loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        elapsed = time.perf_counter() - start
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.name}: the training loss is {value}")
        return elapsed


def build_sides(task, model_name: str, compile: bool, total_steps: int) -> tuple[list[Side], dict]:
    entry = task.model_entry(model_name)
    settings = task.train_settings(model_name)
    torch.manual_seed(0)
    kiln.ops.random.manual_seed(0)
    model = entry.build()
    twin = torch_twin(model)     # before any step: the same initial weights
    name = settings["optimizer"]
    if name not in TORCH_OPTIMIZERS:
        raise SystemExit(f"{task.name} {model_name}: optimizer {name!r} has no torch.optim equivalent here")

    def side(label, net, optimizer, loss):
        return Side(label, net, optimizer, loss, settings, task.scheduler(optimizer, total_steps))

    kiln_opt = make_optimizer(name, model.parameters(), settings["lr"], **settings["optimizer_kwargs"])
    sides = [side("kiln", model, kiln_opt, task.loss)]
    twin_loss = torch_loss(task, model_name)
    sides.append(side("torch", twin, TORCH_OPTIMIZERS[name](twin.parameters(), lr=settings["lr"],
                                                            **settings["optimizer_kwargs"]), twin_loss))
    if compile:
        other = torch_twin(model)
        compiled = torch.compile(other)
        sides.append(side("torch.compile", compiled,
                          TORCH_OPTIMIZERS[name](other.parameters(), lr=settings["lr"], **settings["optimizer_kwargs"]),
                          twin_loss))
    return sides, settings


def check_same_loss(task, sides: list[Side], batch) -> None:
    """In eval mode (no dropout) every side's loss on one batch is the kiln model's, and the twins
    run no kiln op: the sides train the same model on the same loss."""
    values = []
    for side in sides:
        side.model.eval()
        with torch.no_grad(), KilnOpRecorder() as spy:
            values.append(side.loss(side.model, batch).item())
        side.model.train()
        if side.name != "kiln" and spy.seen:
            raise SystemExit(f"{task.name}: the {side.name} twin ran kiln ops {sorted(spy.seen)}")
    for side, value in zip(sides[1:], values[1:]):
        if abs(value - values[0]) > 1e-4 * max(1.0, abs(values[0])):
            raise SystemExit(f"{task.name}: the {side.name} loss {value} differs from kiln's {values[0]}")


def batches(task, batch_size: int, count: int) -> tuple[list, int, int]:
    """The first ``count`` batches of one epoch's order (at most an epoch's), steps per epoch, samples."""
    data = task.splits().train
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    per_epoch = math.ceil(len(data) / batch_size)
    out = [data[order[i * batch_size:(i + 1) * batch_size]] for i in range(min(count, per_epoch))]
    return out, per_epoch, len(data)


def measure(task_name: str, model_name: str, args) -> dict:
    task = get_task(task_name)
    settings = task.train_settings(model_name)
    train_batches, per_epoch, samples = batches(task, settings["batch_size"], args.warmup + args.steps * args.repeats)
    sides, settings = build_sides(task, model_name, args.compile, settings["epochs"] * per_epoch)
    check_same_loss(task, sides, train_batches[0])
    for side in sides:                          # warm-up: kiln's JIT compile, torch.compile, caches
        for i in range(args.warmup):
            side.step(train_batches[i % len(train_batches)])
    position = args.warmup
    for r in range(args.repeats):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for side in order:
            for i in range(args.steps):
                side.times.append(side.step(train_batches[(position + i) % len(train_batches)]))
        position += args.steps
    first = train_batches[0][0]
    tokens = first.shape[0] * (first.shape[1] - 1) if task_name == "charlm" else None
    row = {"task": task_name, "model": model_name, "batch_size": settings["batch_size"], "samples": samples,
           "steps_per_epoch": per_epoch, "optimizer": settings["optimizer"], "tokens_per_step": tokens}
    for side in sides:
        median = statistics.median(side.times)
        row[side.name] = {"step_s": median, "epoch_s": median * per_epoch,
                          "tokens_per_s": tokens / median if tokens else None, "steps_timed": len(side.times)}
    return row


def environment() -> list[str]:
    import numba

    env = {name: os.environ.get(name, "unset") for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    return [f"- command: `{' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])}`",
            f"- torch {torch.__version__}, kiln {kiln.__version__}, numba {numba.__version__}, "
            f"python {platform.python_version()}",
            f"- threads: torch {torch.get_num_threads()} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), "
            f"numba {numba.get_num_threads()} (NUMBA_NUM_THREADS={env['NUMBA_NUM_THREADS']})",
            f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}"]


def markdown(rows: list[dict], args) -> str:
    impls = [i for i in ("kiln", "torch", "torch.compile") if i in rows[0]]
    header = ["task", "model", "batch", "steps/epoch"] + [f"{i} ms/step" for i in impls]
    header += [f"{i} s/epoch" for i in impls] + [f"{i} / kiln" for i in impls[1:]]
    charlm = any(r["tokens_per_step"] for r in rows)
    if charlm:
        header += [f"{i} tokens/s" for i in impls]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["task"], r["model"], str(r["batch_size"]), str(r["steps_per_epoch"])]
        cells += [f"{r[i]['step_s'] * 1e3:.2f}" for i in impls]
        cells += [f"{r[i]['epoch_s']:.2f}" for i in impls]
        cells += [f"{r[i]['step_s'] / r['kiln']['step_s']:.2f}x" for i in impls[1:]]
        if charlm:
            cells += [f"{r[i]['tokens_per_s']:.0f}" if r[i]["tokens_per_s"] else "-" for i in impls]
        lines.append("| " + " | ".join(cells) + " |")
    intro = (f"Training step time (forward + loss + backward + clip + optimizer step) of each model on kiln "
             f"against its torch.nn twin (kiln.nn.torch_twin), interleaved in one process: median of "
             f"{args.repeats} rounds x {args.steps} steps per side after {args.warmup} warm-up steps. "
             f"s/epoch = steps per epoch x median step time; ratios > 1: kiln is faster.")
    return "\n".join(["# Seconds per epoch: kiln vs the same model in torch.nn", "", intro, "", *lines, "",
                      *environment()]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = [f"{t}/{m}" for t, ms in MODELS.items() for m in ms]
    parser.add_argument("--models", nargs="+", default=default, metavar="MODEL",
                        help=f"task/model or model names (default: all of {', '.join(default)})")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side per round (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, the sides' order rotating (default 5)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side first (default 5)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd twin (inductor)")
    parser.add_argument("--out", help="write the markdown table (with the command line and threads) here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    rows = []
    for task, model in parse_models(args.models):
        print(f"{task} {model} ...", file=sys.stderr, flush=True)
        rows.append(measure(task, model, args))
    text = markdown(rows, args)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
