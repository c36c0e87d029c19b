"""`kiln experiment NAME`: the experiments of notes 11, 14 and 15 on scikit-learn's 8x8 digits,
each writing a markdown table and a PNG plot.

* ``regularizers``: the digits MLP (64-256-256-10, ReLU, Adam) with each regularizer of
  kiln.train.regularizers on and off: test accuracy and the train - test gap, mean and spread
  (sample standard deviation) over the seeds.
* ``lottery-ticket``: iterative magnitude pruning (notes 15): after each round of training the
  smallest weights of each layer are pruned, and the surviving subnetwork is retrained from (a) the
  original initialization (the rewound ticket) and (b) a fresh random initialization with the
  same masks. Test accuracy against sparsity.
* ``init``: activation and gradient second moments per layer of a 20-layer ReLU network of width
  256 on the digits, for the initializations of notes 11 (averaged over the seeds).
* ``charlm-equal-time``: the four charlm models (Transformer, LSTM, GRU, basic RNN; ~0.56-0.61M
  parameters each) trained one after the other for the same seconds each (``time_limit``,
  default 240) with their LR schedule on the clock (`kiln train --time-limit`); validation
  bits/char against training seconds and against tokens seen, probed every tenth of the budget
  off the clock. Run it with one thread (``OMP_NUM_THREADS=1``) so that the runs are alike.

``quick=True`` shrinks every budget to seconds (the test's mode); its files are named ``*-quick``
and say so in their title.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import kiln
from kiln.train import data
from kiln.train import regularizers as R

EXPERIMENTS: dict[str, str] = {
    "regularizers": "digits MLP, each regularizer on and off: test accuracy and train-test gap over seeds",
    "lottery-ticket": "test accuracy against sparsity, rewound tickets vs the same masks randomly re-initialized",
    "init": "activation and gradient second moment per layer of a 20-layer ReLU net per initialization",
    "charlm-equal-time": "charlm Transformer, LSTM, GRU and RNN for the same seconds each: val bits/char curves",
}


def _digits():
    splits = data.digits(seed=0)
    return tuple(ds.tensors for ds in splits)   # ((x, y) train, val, test)


def _mlp(hidden=(256, 256), dropout: float = 0.0) -> nn.Module:
    """The digits MLP: kiln's fused Linear + ReLU, torch's Dropout after each hidden layer."""
    layers: list[nn.Module] = []
    sizes = [64, *hidden, 10]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(kiln.nn.Linear(a, b, activation=None if last else "relu"))
        if not last and dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    out = model(x)
    model.train()
    return (out.argmax(-1) == y).double().mean().item()


@torch.no_grad()
def _loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    out = model(x)
    model.train()
    return kiln.ops.cross_entropy(out, y).item()


# ------------------------------------------------------------------------------------------------
# regularizers


@dataclass
class Setting:
    name: str
    detail: str
    dropout: float = 0.0
    l2: float = 0.0               # coupled: lam/2 ||w||^2 added to the loss
    weight_decay: float = 0.0     # decoupled (AdamW), biases and norms excluded
    label_smoothing: float = 0.0
    mixup: float = 0.0            # Beta(alpha, alpha)
    augment: bool = False         # shifts up to 1 px, rotations up to 10 degrees
    grad_norm: float = 0.0        # lambda of L + lambda/4 ||g||^2
    grad_variance: float = 0.0    # alpha of the notes' variance term over `microbatches`
    microbatches: int = 1
    patience: int | None = None   # early stopping on the validation loss, best weights restored
    ensemble: int = 1


SETTINGS = [
    Setting("none", "Adam, no regularizer"),
    Setting("l2", "coupled L2, lam/2 sum W^2, lam = 1e-2", l2=1e-2),
    Setting("weight decay", "decoupled (AdamW), 1.0, biases excluded", weight_decay=1.0),
    Setting("dropout", "p = 0.3 after each hidden layer", dropout=0.3),
    Setting("label smoothing", "eps = 0.1", label_smoothing=0.1),
    Setting("mixup", "alpha = 0.2", mixup=0.2),
    Setting("augmentation", "shifts <= 1 px, rotations <= 10 deg", augment=True),
    Setting("grad-norm penalty", "lambda = 0.1, exact double backward", grad_norm=0.1),
    Setting("grad-variance penalty", "alpha = 0.5 over 4 microbatches", grad_variance=0.5, microbatches=4),
    Setting("early stopping", "patience 5 epochs on val loss", patience=5),
    Setting("ensemble", "3 independent models, mean softmax", ensemble=3),
]


def _train_one(setting: Setting, seed: int, splits, epochs: int, batch_size: int = 64, lr: float = 1e-3,
               hidden=(256, 256)) -> nn.Module:
    (x, y), (xv, yv), _ = splits
    torch.manual_seed(seed)                       # weights and dropout
    gen = torch.Generator().manual_seed(seed)     # data order, MixUp, augmentation
    model = _mlp(hidden, dropout=setting.dropout)
    if setting.weight_decay:
        opt = kiln.optim.AdamW(R.decay_groups(model, setting.weight_decay), lr=lr)
    else:
        opt = kiln.optim.Adam(model.parameters(), lr=lr)
    best, best_loss, bad = None, math.inf, 0
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb, target = x[idx], y[idx]
            if setting.augment:
                xb = R.augment_images(xb, gen)
            if setting.mixup:
                xb, target = R.mixup(xb, target, setting.mixup, gen, num_classes=10)

            def loss_of(xm, tm):
                loss = kiln.ops.cross_entropy(model(xm), tm, label_smoothing=setting.label_smoothing)
                return loss + R.l2_penalty(model, setting.l2) if setting.l2 else loss

            opt.zero_grad(set_to_none=True)
            if setting.grad_norm or setting.grad_variance:
                chunks = list(zip(xb.chunk(setting.microbatches), target.chunk(setting.microbatches)))
                closures = [lambda xm=xm, tm=tm: loss_of(xm, tm) for xm, tm in chunks]
                R.penalized_backward(closures, model.parameters(), grad_norm=setting.grad_norm,
                                     grad_variance=setting.grad_variance,
                                     weights=[len(tm) / len(target) for _, tm in chunks])
            else:
                loss_of(xb, target).backward()
            opt.step()
        if setting.patience is not None:
            val = _loss(model, xv, yv)
            if val < best_loss:
                best, best_loss, bad = copy.deepcopy(model.state_dict()), val, 0
            else:
                bad += 1
                if bad >= setting.patience:
                    break
    if best is not None:
        model.load_state_dict(best)
    return model


def run_regularizers(out: Path, quick: bool = False, seeds: int | None = None, epochs: int | None = None,
                     log: Callable[[str], None] = print) -> list[dict]:
    splits = _digits()
    hidden = (256, 256)
    if quick:   # a smoke test: a smaller net on the first 320 training examples
        hidden = (64, 64)
        splits = ((splits[0][0][:320], splits[0][1][:320]), *splits[1:])
    (x, y), _, (xt, yt) = splits
    seeds = seeds or (2 if quick else 3)
    epochs = epochs or (4 if quick else 15)
    settings = SETTINGS
    rows = []
    for setting in settings:
        t0 = time.perf_counter()
        tests, trains = [], []
        for seed in range(seeds):
            models = [_train_one(setting, seed * 100 + k, splits, epochs, hidden=hidden)
                      for k in range(setting.ensemble)]
            model = R.Ensemble(models) if setting.ensemble > 1 else models[0]
            tests.append(_accuracy(model, xt, yt))
            trains.append(_accuracy(model, x, y))
        gaps = [a - b for a, b in zip(trains, tests)]
        row = {"name": setting.name, "detail": setting.detail, "test": statistics.mean(tests),
               "test_sd": statistics.stdev(tests) if seeds > 1 else 0.0, "train": statistics.mean(trains),
               "gap": statistics.mean(gaps), "gap_sd": statistics.stdev(gaps) if seeds > 1 else 0.0,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"{setting.name:<22} test {row['test']:.4f} +- {row['test_sd']:.4f}  gap {row['gap']:+.4f}  "
            f"({row['seconds']:.0f} s)")
    header = (f"digits MLP 64-{'-'.join(map(str, hidden))}-10 (ReLU, Adam lr 1e-3, batch 64, {epochs} epochs), "
              f"{seeds} seeds; train {len(y)} / val 270 / test 270 (fixed split). mean +- sample std over seeds; "
              "gap = train - test accuracy.")
    lines = ["| regularizer | setting | test accuracy | train accuracy | train - test gap | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['detail']} | {r['test']:.4f} +- {r['test_sd']:.4f} | {r['train']:.4f} | "
                     f"{r['gap']:+.4f} +- {r['gap_sd']:.4f} | {r['seconds']:.0f} |")
    _write(out, "experiment_regularizers", quick, header, lines, lambda fig: _plot_regularizers(fig, rows))
    return rows


def _plot_regularizers(fig, rows):
    acc_ax, gap_ax = fig.subplots(1, 2)
    names = [r["name"] for r in rows]
    pos = range(len(rows))
    acc_ax.barh(pos, [r["test"] for r in rows], xerr=[r["test_sd"] for r in rows], color="C0")
    acc_ax.set(yticks=list(pos), yticklabels=names, xlabel="test accuracy", title="test accuracy")
    lo = min(r["test"] - r["test_sd"] for r in rows)
    acc_ax.set_xlim(max(0.0, lo - 0.02), 1.0)
    acc_ax.invert_yaxis()
    gap_ax.barh(pos, [r["gap"] for r in rows], xerr=[r["gap_sd"] for r in rows], color="C1")
    gap_ax.set(yticks=list(pos), yticklabels=[], xlabel="train - test accuracy", title="generalization gap")
    gap_ax.invert_yaxis()


# ------------------------------------------------------------------------------------------------
# lottery ticket


def _train_masked(model: nn.Module, masks, splits, epochs: int, seed: int, lr: float = 1e-3,
                  batch_size: int = 64) -> None:
    (x, y), _, _ = splits
    gen = torch.Generator().manual_seed(seed)
    opt = kiln.optim.Adam(model.parameters(), lr=lr)
    handle = R.keep_masks_applied(opt, model, masks) if masks else None
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            kiln.ops.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if handle is not None:
        handle.remove()


def run_lottery_ticket(out: Path, quick: bool = False, seeds: int | None = None, epochs: int | None = None,
                       log: Callable[[str], None] = print) -> list[dict]:
    splits = _digits()
    _, _, (xt, yt) = splits
    seeds = seeds or (1 if quick else 2)
    epochs = epochs or (1 if quick else 15)
    sparsities = [0.0, 0.5, 0.9] if quick else [0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    hidden = (64, 64) if quick else (256, 256)
    results = {s: {"ticket": [], "random": []} for s in sparsities}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = _mlp(hidden)
        initial = copy.deepcopy(model.state_dict())
        masks = None
        for sparsity in sparsities:
            # one round of iterative pruning: prune the trained weights of the previous ticket
            if sparsity > 0:
                masks = R.prune_masks(model, sparsity, masks)
            R.rewind(model, initial, masks or {})
            _train_masked(model, masks, splits, epochs, seed)
            results[sparsity]["ticket"].append(_accuracy(model, xt, yt))
            torch.manual_seed(10_000 + seed)
            control = _mlp(hidden)     # same masks, a fresh random initialization
            R.apply_masks(control, masks or {})
            _train_masked(control, masks, splits, epochs, seed)
            results[sparsity]["random"].append(_accuracy(control, xt, yt))
            log(f"seed {seed} sparsity {sparsity:.2f}: ticket {results[sparsity]['ticket'][-1]:.4f}  "
                f"random re-init {results[sparsity]['random'][-1]:.4f}  (measured {R.sparsity_of(model):.3f})")
    rows = []
    for s in sparsities:
        t, r = results[s]["ticket"], results[s]["random"]
        spread = (lambda v: statistics.stdev(v)) if seeds > 1 else (lambda v: 0.0)
        rows.append({"sparsity": s, "ticket": statistics.mean(t), "ticket_sd": spread(t),
                     "random": statistics.mean(r), "random_sd": spread(r)})
    header = (f"digits MLP 64-{'-'.join(map(str, hidden))}-10 (ReLU, Adam lr 1e-3, batch 64, {epochs} epochs per "
              f"round), layer-wise magnitude pruning of every weight matrix, iterative (each round prunes the "
              f"previous ticket's trained weights), {seeds} seed(s): mean +- sample std of test accuracy.")
    lines = ["| sparsity | rewound ticket | same masks, random re-init |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']:.2f} | {r['ticket']:.4f} +- {r['ticket_sd']:.4f} | "
                     f"{r['random']:.4f} +- {r['random_sd']:.4f} |")

    def plot(fig):
        ax = fig.subplots()
        xs = [r["sparsity"] for r in rows]
        ax.errorbar(xs, [r["ticket"] for r in rows], yerr=[r["ticket_sd"] for r in rows], marker="o",
                    label="rewound to the initial weights (ticket)", capsize=3)
        ax.errorbar(xs, [r["random"] for r in rows], yerr=[r["random_sd"] for r in rows], marker="s",
                    label="same masks, random re-initialization", capsize=3)
        ax.set(xlabel="sparsity (fraction of weights pruned)", ylabel="test accuracy", title="lottery ticket")
        ax.legend()

    _write(out, "experiment_lottery_ticket", quick, header, lines, plot)
    return rows


# ------------------------------------------------------------------------------------------------
# initialization

INIT_SETTINGS = [("he_normal", None, "He normal, Var 2/fan_in (11.3)"),
                 ("he_uniform", None, "He uniform, U(+-sqrt(6/fan_in))"),
                 ("lecun_normal", None, "Var 1/fan_in (the notes' 11.2 variance)"),
                 ("xavier_normal", None, "torch's Glorot, Var 2/(fan_in+fan_out)"),
                 ("normal", 0.01, "N(0, 0.01^2), unscaled"),
                 ("normal", 0.1, "N(0, 0.1^2), unscaled")]


def run_init(out: Path, quick: bool = False, seeds: int | None = None, epochs: int | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    (x, y), _, _ = _digits()
    depth, width = (6, 64) if quick else (20, 256)
    seeds = seeds or (1 if quick else 4)
    x, y = x[:256], y[:256]
    rows = []
    for scheme, std, detail in INIT_SETTINGS:
        acts, grads = [0.0] * depth, [0.0] * depth
        for seed in range(seeds):
            torch.manual_seed(seed)
            sizes = [64] + [width] * depth
            hidden = [kiln.nn.Linear(a, b, activation="relu") for a, b in zip(sizes[:-1], sizes[1:])]
            head = kiln.nn.Linear(width, 10)
            model = nn.Sequential(*hidden, head)
            R.init_(model, scheme, std=std or 0.01, generator=torch.Generator().manual_seed(seed))
            h, outs = x, []
            for layer in hidden:
                h = layer(h)
                h.retain_grad()
                outs.append(h)
            kiln.ops.cross_entropy(head(h), y).backward()
            for i, o in enumerate(outs):
                acts[i] += o.detach().pow(2).mean().item() / seeds
                grads[i] += o.grad.pow(2).mean().item() / seeds
        name = scheme if std is None else f"{scheme} std {std}"
        rows.append({"name": name, "detail": detail, "acts": acts, "grads": grads})
        log(f"{name:<20} activation 2nd moment layer 1 {acts[0]:.3g} -> {depth} {acts[-1]:.3g};  "
            f"gradient {grads[0]:.3g} -> {grads[-1]:.3g}")
    header = (f"{depth}-layer ReLU MLP of width {width} (64 inputs: 256 standardized digits, 10-class cross-entropy "
              f"head), biases 0; per layer the mean square of the activations h_l and of dLoss/dh_l, averaged over "
              f"{seeds} initialization(s). Input mean square {x.pow(2).mean().item():.3f}.")
    show = sorted({0, 1, depth // 4, depth // 2, 3 * depth // 4, depth - 1})
    lines = ["| init | what | " + " | ".join(f"act L{i + 1}" for i in show) + " | " +
             " | ".join(f"grad L{i + 1}" for i in show) + " |",
             "|---|---|" + "---|" * (2 * len(show))]
    for r in rows:
        lines.append(f"| {r['name']} | {r['detail']} | " + " | ".join(f"{r['acts'][i]:.3g}" for i in show) + " | " +
                     " | ".join(f"{r['grads'][i]:.3g}" for i in show) + " |")

    def plot(fig):
        act_ax, grad_ax = fig.subplots(1, 2)
        layers = list(range(1, depth + 1))
        for r in rows:
            act_ax.plot(layers, [max(v, 1e-300) for v in r["acts"]], marker=".", label=r["name"])
            grad_ax.plot(layers, [max(v, 1e-300) for v in r["grads"]], marker=".", label=r["name"])
        act_ax.set(yscale="log", xlabel="layer", ylabel="mean square", title="activations h_l")
        grad_ax.set(yscale="log", xlabel="layer", ylabel="mean square", title="gradients dLoss/dh_l")
        act_ax.legend(fontsize=8)

    _write(out, "experiment_init", quick, header, lines, plot)
    return rows


# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# charlm: the four models for the same time


class _Probe:
    """Trainer callback: the validation bits/char every ``every`` seconds of training, measured
    off the clock (so the probes cost no model any training time)."""

    def __init__(self, every: float, tokens_per_step: int):
        self.every, self.tokens_per_step = every, tokens_per_step
        self.points: list[dict] = []

    def on_step_end(self, trainer) -> None:
        if trainer.clock() < self.every * (len(self.points) + 1):
            return
        with trainer.off_the_clock():
            bits = trainer.evaluate(trainer.val_data)["loss"] / math.log(2)
        self.points.append({"seconds": trainer.clock(), "step": trainer.step,
                            "tokens": trainer.step * self.tokens_per_step, "val_bits": bits})


def _probed_charlm(every: float, eval_windows: int | None):
    """The charlm task with a _Probe on every run (same name and models: its checkpoints load
    as charlm's); ``eval_windows`` cuts validation and test to their first windows (--quick)."""
    from torch.utils.data import Subset

    from kiln.train.tasks.charlm import CONTEXT, CharLM

    class ProbedCharLM(CharLM):
        def splits(self):
            splits = super().splits()
            if eval_windows is None:
                return splits
            return type(splits)(splits.train, *(Subset(s, range(min(eval_windows, len(s))))
                                                for s in (splits.val, splits.test)))

        def callbacks(self, out_dir):
            self.probe = _Probe(every, self.train["batch_size"] * CONTEXT)
            return [*super().callbacks(out_dir), self.probe]

    return ProbedCharLM()


def run_charlm_equal_time(out: Path, quick: bool = False, seeds: int | None = None, epochs: int | None = None,
                          log: Callable[[str], None] = print, time_limit: float | None = None,
                          runs: str | Path = "runs/charlm-equal-time") -> list[dict]:
    from kiln.train import run as train_run
    from kiln.train.tasks.charlm import CONTEXT

    if seeds is not None or epochs is not None:
        raise ValueError("charlm-equal-time trains each model once (seed 0) for a time, not for seeds or epochs; "
                         "give --time-limit")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
    seconds = time_limit or (2.0 if quick else 240.0)
    task = _probed_charlm(seconds / 10, 16 if quick else None)
    rows = []
    for model in task.models:
        entry = task.model_entry(model)
        log(f"charlm {model}: {sum(p.numel() for p in entry.build().parameters()):,} parameters, "
            f"{seconds:g} s of training ...")
        # epochs far beyond the budget: the clock ends every run, and its schedule with it
        result = train_run.train(task, model, epochs=10**4, time_limit=seconds, out=str(Path(runs) / model),
                                 progress=False)
        history = _read_history(Path(runs) / model)
        # the curve: the probes and every validated row (epoch ends and the stop at the limit)
        batch_tokens = task.train["batch_size"] * CONTEXT
        points = sorted([*task.probe.points,
                         *({"seconds": r["seconds"], "step": int(r["step"]), "tokens": int(r["step"]) * batch_tokens,
                            "val_bits": r["val_loss"] / math.log(2)} for r in history)], key=lambda p: p["seconds"])
        final = history[-1]
        rows.append({"model": model, "detail": entry.description, "parameters": result["parameters"],
                     "steps": result["steps"], "epochs": final["epoch"], "seconds": result["wall_s"],
                     "tokens_per_s": result["tokens_per_s"], "val_bits": final["val_loss"] / math.log(2),
                     "test_bits": result["test_bits_per_char"], "sample": result["sample_t0.8"],
                     "stop_reason": result["stop_reason"], "points": points})
        log(f"  {result['steps']} steps, {result['tokens_per_s']:,.0f} tokens/s, val bits/char at the limit "
            f"{rows[-1]['val_bits']:.3f} (stopped on {result['stop_reason']})")
    threads = torch.get_num_threads()
    header = (f"Each model trained for {seconds:g} s of training time (`kiln train charlm --model M --time-limit "
              f"{seconds:g} --epochs 10000`: the one-cycle LR schedule runs on the clock and ends at the limit), "
              f"one after the other, torch threads {threads}; batch 32 of 96-character windows, AdamW, the task's "
              f"learning rates. Validation bits/char probed every {seconds / 10:g} s off the clock (and at "
              f"each epoch end and the limit; the epoch-end validations, ~1 s each, are on the clock as in any "
              f"`kiln train` run). Val bits/char is that of the weights at the limit.")
    lines = ["| model | what | parameters | steps | epochs | tokens/s | val bits/char at the limit | test bits/char |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['detail']} | {r['parameters']:,} | {r['steps']} | {r['epochs']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['val_bits']:.3f} | {r['test_bits']:.3f} |")
    lines += ["", "Sampled continuations of `def __init__(self, ` (temperature 0.8, seed 0):", ""]
    lines += [f"* {r['model']}: `{' / '.join(x for x in r['sample'].splitlines() if x.strip())}`" for r in rows]

    def plot(fig):
        by_time, by_tokens = fig.subplots(1, 2, sharey=True)
        for r in rows:
            label = f"{r['model']} ({r['parameters'] / 1e3:.0f}k)"
            by_time.plot([p["seconds"] for p in r["points"]], [p["val_bits"] for p in r["points"]], marker=".",
                         label=label)
            by_tokens.plot([p["tokens"] / 1e6 for p in r["points"]], [p["val_bits"] for p in r["points"]],
                           marker=".", label=label)
        top = min(4.5, max(p["val_bits"] for r in rows for p in r["points"]) + 0.1)
        by_time.set(xlabel="training seconds (one thread)", ylabel="validation bits/char", ylim=(None, top),
                    title=f"equal time: {seconds:g} s each")
        by_tokens.set(xlabel="training tokens (millions)", title="the same runs against tokens seen")
        by_time.legend()

    _write(out, "charlm_equal_time", quick, header, lines, plot,
           command=f"kiln experiment charlm-equal-time --time-limit {seconds:g}")
    return rows


def _read_history(folder: Path) -> list[dict]:
    from kiln.train.run import read_metrics

    return read_metrics(str(folder / "metrics.csv"))


def _write(out: Path, stem: str, quick: bool, header: str, lines: list[str], draw, command: str | None = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{stem}-quick" if quick else stem
    title = stem.replace("experiment_", "kiln experiment ").replace("_", "-")
    label = " (--quick: a smoke-test budget, not a result)" if quick else ""
    command = command or f"kiln experiment {stem.split('experiment_')[1].split('-quick')[0].replace('_', '-')}"
    command += " --quick" if quick else ""
    text = [f"# {title}{label}", "", f"Command: `OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 {command}`", "", header, "",
            *lines, "", f"Plot: {stem}.png", ""]
    (out / f"{stem}.md").write_text("\n".join(text))
    fig = Figure(figsize=(11, 5), layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig)
    fig.suptitle(title + label)
    fig.savefig(out / f"{stem}.png", dpi=100)


RUNNERS = {"regularizers": run_regularizers, "lottery-ticket": run_lottery_ticket, "init": run_init,
           "charlm-equal-time": run_charlm_equal_time}


def run(name: str, out: str | Path = "bench/results", quick: bool = False, seeds: int | None = None,
        epochs: int | None = None, log: Callable[[str], None] = print, **options) -> list[dict]:
    """Run experiment ``name`` (one of EXPERIMENTS) into ``out``; returns its table's rows.
    ``options``: charlm-equal-time's ``time_limit`` (seconds per model) and ``runs`` (the
    folder of its run folders)."""
    if name not in RUNNERS:
        raise ValueError(f"experiment {name!r} is not one of {', '.join(RUNNERS)}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if options and name != "charlm-equal-time":
        raise ValueError(f"experiment {name!r} takes no {', '.join(options)}")
    return RUNNERS[name](Path(out), quick=quick, seeds=seeds, epochs=epochs, log=log, **options)
