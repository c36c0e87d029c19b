"""The `kiln` command: `kiln info`, `kiln train digits`."""

from __future__ import annotations

import argparse
import importlib
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
        print(f"  {op:<14} " + "  ".join(f"{dev}: {name}" for dev, name in choice.items()))


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


def build_parser() -> argparse.ArgumentParser:
    from kiln.backend import BACKENDS
    from kiln.kernels.activations import ACTIVATIONS

    parser = _Parser(prog="kiln", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, the CUDA extension, the GPU and each op's backend",
                   description="Print versions, whether kiln._cuda is built, the GPU and the "
                               "backend each op would use.")
    train = sub.add_parser("train", help="run an end-to-end training job",
                           description="Train a model end to end and print its test metric.")
    train.add_argument("job", choices=["digits"], help="digits: an MLP on scikit-learn's digits")
    train.add_argument("--epochs", type=_positive_int, default=40, help="passes over the training set")
    train.add_argument("--hidden", type=_positive_int, default=256, help="width of the hidden layers")
    train.add_argument("--activation", default="relu", choices=ACTIVATIONS,
                       help="activation of the hidden layers")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the data order")
    train.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    train.add_argument("--backend", default=None, choices=BACKENDS,
                       help="kiln backend for every op (default: by device)")
    from kiln import bench

    bench.add_parser(sub)
    return parser


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
    if args.command == "bench":
        from kiln import bench
        from kiln.bench.cases import select

        _check_device(args.device)
        try:
            select(args.names or None, args.quick)
        except ValueError as e:
            raise UsageError(str(e), "kiln bench") from None
        return bench.run_from_args(args)
    from kiln.train import digits

    device = _check_device(args.device)
    with kiln.backend.use(args.backend):
        result = digits.train(epochs=args.epochs, hidden=args.hidden, activation=args.activation,
                              seed=args.seed, device=device)
    print(f"backend: {result['backend']}  test accuracy: {result['test_accuracy']:.4f}  "
          f"(train {result['train_accuracy']:.4f}, {result['seconds']:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: a usage error or a backend that cannot run is one line on stderr, status 2."""
    from kiln.backend import BackendError

    try:
        return _run(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    except BackendError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
