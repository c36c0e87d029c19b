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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, the CUDA extension, the GPU and each op's backend")
    train = sub.add_parser("train", help="run an end-to-end training job")
    train.add_argument("job", choices=["digits"], help="digits: an MLP on scikit-learn's digits")
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--hidden", type=int, default=256)
    train.add_argument("--activation", default="relu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu")
    train.add_argument("--backend", default=None, help="kiln backend (default: by device)")
    args = parser.parse_args(argv)

    if args.command == "info":
        info()
        return 0
    import kiln
    from kiln.train import digits

    with kiln.backend.use(args.backend):
        result = digits.train(epochs=args.epochs, hidden=args.hidden, activation=args.activation,
                              seed=args.seed, device=args.device)
    print(f"backend: {result['backend']}  test accuracy: {result['test_accuracy']:.4f}  "
          f"(train {result['train_accuracy']:.4f}, {result['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
