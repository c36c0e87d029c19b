"""The `kiln` command: `kiln info`, `kiln train TASK` (`kiln train --list` shows the tasks),
`kiln experiment NAME`."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as e:
        return f"not available ({type(e).__name__}: {e})"


def info() -> None:
    import torch

    import kiln
    from kiln import backend

    print(f"kiln    {kiln.__version__}")
    print(f"python  {platform.python_version()}")
    for module in ("torch", "triton", "numba"):
        print(f"{module:<7} {_version(module)}")
    try:
        ext = backend.cuda_extension()
        print(f"kiln._cuda  built for sm {ext.archs()}, sees {ext.device_count()} device(s)")
    except backend.BackendError as e:
        print(f"kiln._cuda  not built: {e}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"GPU {i}   {torch.cuda.get_device_name(i)}")
    else:
        print("GPU     none")
    print(f"TRITON_INTERPRET={'1' if backend.triton_interpreted() else 'unset'}"
          f"  KILN_BACKEND={backend.requested('*') or 'unset'}")
    print("op backends (float32):")
    for op, dtypes in kiln.ops.BACKEND_DTYPES.items():
        choice = backend.report(op, dtypes)
        print(f"  {op:<18} " + "  ".join(f"{dev}: {name}" for dev, name in choice.items()))


class UsageError(Exception):
    """A bad command line or environment: reported as one line, exit status 2."""

    def __init__(self, message: str, prog: str = "kiln"):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage first
        raise UsageError(message, self.prog)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_positive_int.__name__ = "integer"  # argparse names the type in its message


def _check_device(device: str) -> str:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise UsageError(f"--device {device!r}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible to torch on this machine")
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: kiln runs on cpu or cuda, not {kind}")
    return device


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


_positive_float.__name__ = "number"


def build_parser() -> argparse.ArgumentParser:
    from kiln.backend import BACKENDS

    parser = _Parser(prog="kiln", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, the CUDA extension, the GPU and each op's backend",
                   description="Print versions, whether kiln._cuda is built, the GPU and the "
                               "backend each op would use.")
    train = sub.add_parser("train", help="train a task's model end to end into a run folder",
                           description="Train a model of a task end to end. The run folder receives "
                                       "last.pt, best.pt, metrics.csv, results.json and curves.png.")
    train.add_argument("task", nargs="?", help="the task to train (kiln train --list shows them)")
    train.add_argument("--list", action="store_true", help="print the tasks and their models, then exit")
    train.add_argument("--model", default=None, help="the task's model (default: the task's first choice)")
    train.add_argument("--epochs", type=_positive_int, default=None,
                       help="passes over the training set (default: the task's)")
    train.add_argument("--max-steps", type=_positive_int, default=None,
                       help="stop after this many optimizer steps in all, even mid-epoch")
    train.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                       help="stop after the step that reaches SECONDS of training (counted from the start of "
                            "the first run when resuming), validating and writing the folder as at a normal end; "
                            "the LR schedule runs on the clock and ends at the limit (or at the last epoch if "
                            "that comes first)")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help="examples per optimizer step, over all processes of a torchrun run "
                            "(default: the task's)")
    train.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: the task's)")
    train.add_argument("--seed", type=int, default=None,
                       help="seed of the weights, dropout and the data order (default 0)")
    train.add_argument("--out", default=None, help="the run folder (default runs/TASK-MODEL)")
    train.add_argument("--resume", default=None, metavar="CKPT",
                       help="continue the run saved in this checkpoint, exactly where it stopped")
    train.add_argument("--teacher", default=None, metavar="CKPT",
                       help="knowledge distillation (digits): a checkpoint of the same task (e.g. "
                            "runs/digits-cnn/best.pt) whose softened predictions the model also learns, or a "
                            "model name (cnn: runs/digits-cnn/best.pt, trained first when absent), or none; "
                            "the training settings distill_temperature and distill_weight mix the losses")
    train.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    train.add_argument("--backend", default=None, choices=BACKENDS,
                       help="kiln backend for every op (default: by device)")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun, shard a Transformer model with FullyShardedDataParallel (FSDP2) "
                            "instead of replicating it with DistributedDataParallel")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (none when not a tty)")
    generate = sub.add_parser("generate", help="continue a prompt with a trained sequence model",
                              description="Rebuild a trained charlm or translate model from its checkpoint and "
                                          "print its continuation (or translation) of --prompt. Greedy unless a "
                                          "temperature, top-k, top-p or seed asks for sampling.")
    generate.add_argument("checkpoint", help="a last.pt or best.pt written by kiln train")
    generate.add_argument("--prompt", required=True, help="the text to continue (charlm) or translate")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=200, help="tokens to add at most")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    generate.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k likeliest tokens")
    generate.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens whose "
                                                                     "probability reaches p")
    generate.add_argument("--num-beams", type=_positive_int, default=1, help="beam search with this many beams")
    generate.add_argument("--seed", type=int, default=None, help="seed of the sampler (sampling on)")
    generate.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    from kiln.train.experiments import EXPERIMENTS

    experiment = sub.add_parser("experiment", help="run a regularization / initialization experiment on the digits, "
                                                   "or the charlm models for equal time",
                                description="Run one of the experiments of notes 11, 14 and 15 on scikit-learn's "
                                            "digits, or the charlm models for equal time; write its markdown table "
                                            "and PNG plot to --out. "
                                            + "; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()) + ".")
    experiment.add_argument("name", choices=list(EXPERIMENTS), help="the experiment to run")
    experiment.add_argument("--out", default="bench/results", help="folder for the table and the plot "
                                                                   "(default bench/results)")
    experiment.add_argument("--quick", action="store_true",
                            help="a budget of seconds (smoke test); files named *-quick")
    experiment.add_argument("--seeds", type=_positive_int, default=None,
                            help="seeds to average over (default: the experiment's)")
    experiment.add_argument("--epochs", type=_positive_int, default=None,
                            help="training epochs per model (default: the experiment's)")
    experiment.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                            help="charlm-equal-time: seconds of training per model (default 240)")
    from kiln import bench

    bench.add_parser(sub)
    return parser


def list_tasks() -> None:
    from kiln.train.tasks import all_tasks

    for name, task in all_tasks().items():
        print(f"{name}: {task.description} (metric: {task.headline})")
        for model, entry in task.models.items():
            default = "  [default]" if model == task.default_model else ""
            print(f"  --model {model:<12} {entry.description}{default}")


def train(args) -> None:
    import kiln
    from kiln.train import run
    from kiln.train.tasks import get_task

    if args.task is None:
        raise UsageError("train: name a TASK (kiln train --list shows them)", "kiln train")
    task = get_task(args.task)
    task.model_entry(args.model or task.default_model)  # an unknown model fails before any work
    device = _check_device(args.device)
    with kiln.backend.use(args.backend):
        result = run.train(task, args.model, epochs=args.epochs, max_steps=args.max_steps,
                           time_limit=args.time_limit,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=args.out,
                           resume=args.resume, device=device, progress=not args.no_progress, fsdp=args.fsdp,
                           teacher=args.teacher)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone reports
        return
    out = args.out or f"runs/{task.name}-{result['model']}"
    print(f"{task.name} {result['model']}: {task.headline} {result[task.headline]:.4f}  "
          f"(backend {result['backend']}, {result['steps']} steps, {result['wall_s']:.1f} s) -> {out}")


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    import kiln

    try:
        kiln.backend.requested("*")  # a bad KILN_BACKEND is a usage error, before any work
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.command == "info":
        info()
        return 0
    if args.command == "generate":
        from kiln.train.generate import generate_from_checkpoint

        try:
            text = generate_from_checkpoint(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                                            args.top_k, args.top_p, args.num_beams, args.seed,
                                            _check_device(args.device))
        except ValueError as e:   # generate()'s own argument checks (temperature <= 0, ...)
            raise UsageError(str(e), "kiln generate") from None
        print(text)
        return 0
    if args.command == "experiment":
        from kiln.train.experiments import run as run_experiment

        timed = args.name == "charlm-equal-time"
        if timed and (args.seeds is not None or args.epochs is not None):
            raise UsageError("charlm-equal-time trains each model once for a time: give --time-limit, "
                             "not --seeds or --epochs", "kiln experiment")
        if not timed and args.time_limit is not None:
            raise UsageError(f"--time-limit is charlm-equal-time's; {args.name} takes --seeds and --epochs",
                             "kiln experiment")
        options = {"time_limit": args.time_limit} if timed else {}
        run_experiment(args.name, args.out, quick=args.quick, seeds=args.seeds, epochs=args.epochs, **options)
        print(f"wrote {args.out}")
        return 0
    if args.command == "bench":
        from kiln import bench
        from kiln.bench.cases import select

        _check_device(args.device)
        try:
            select(args.names or None, args.quick)
        except ValueError as e:
            raise UsageError(str(e), "kiln bench") from None
        return bench.run_from_args(args)
    if args.list:
        list_tasks()
    else:
        train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: a usage error or a backend that cannot run is one line on stderr, status 2."""
    from kiln.backend import BackendError
    from kiln.train.checkpoint import CheckpointError
    from kiln.train.run import RunError
    from kiln.train.tasks import TaskError

    try:
        return _run(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    except (BackendError, CheckpointError, TaskError, RunError) as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
