"""GPU benchmark of linear_act: kiln triton and cuda vs torch (cuBLAS + activation) and torch.compile.

    python bench/gpu_linear_act.py [--out bench/results/linear_act_gpu_<gpu>.md]

Medians of triton.testing.do_bench; TFLOP/s counts 2*M*N*K per GEMM (x3 for forward+backward).
Needs a CUDA GPU and the extension kiln._cuda (for the cuda column).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, torch_linear_act  # noqa: E402

import kiln  # noqa: E402

SHAPES = [(4096, 1024, 4096), (8192, 4096, 1024), (16384, 4096, 4096), (8192, 8192, 8192)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ACTIVATIONS = ["relu", "gelu"]


def _kiln(name, activation):
    def run(x, w, b):
        with kiln.backend.use(name):
            return kiln.ops.linear_act(x, w, b, activation)
    return run


def measure(fn, x, w, b, dy, mode):
    from triton.testing import do_bench

    if mode == "forward":
        with torch.no_grad():
            return do_bench(lambda: fn(x, w, b), return_mode="median")
    return do_bench(lambda: fn(x, w, b).backward(dy), grad_to_none=[x, w, b], return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--modes", default="forward,forward+backward")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_linear_act.py needs a CUDA GPU")
    impls = {"triton": lambda a: _kiln("triton", a), "cuda": lambda a: _kiln("cuda", a),
             "torch": lambda a: (lambda x, w, b: torch_linear_act(x, w, b, a)),
             "torch.compile": lambda a: torch.compile(lambda x, w, b: torch_linear_act(x, w, b, a))}
    rows = []
    for mode in args.modes.split(","):
        for dtype in DTYPES:
            for (M, K, N) in SHAPES:
                for activation in ACTIVATIONS:
                    x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=mode != "forward")
                    w = (torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5).requires_grad_(mode != "forward")
                    b = torch.randn(N, device="cuda", dtype=dtype, requires_grad=mode != "forward")
                    dy = torch.randn(M, N, device="cuda", dtype=dtype)
                    flop = 2 * M * N * K * (1 if mode == "forward" else 3)
                    times = {}
                    for name, make in impls.items():
                        try:
                            times[name] = measure(make(activation), x, w, b, dy, mode)
                        except Exception as e:  # a missing backend is shown, not hidden
                            times[name] = None
                            print(f"{name} failed on {mode} {dtype} {M}x{K}->{N}: {e}", file=sys.stderr)
                    tflops = {k: (flop / (t * 1e-3) / 1e12 if t else None) for k, t in times.items()}
                    fmt = lambda v: "-" if v is None else f"{v:.1f}"
                    ratio = lambda k: ("-" if not (times[k] and times["torch"])
                                       else f"{times['torch'] / times[k]:.2f}")
                    rows.append([mode, str(dtype).removeprefix("torch."), f"{M}x{K}->{N}", activation,
                                 fmt(tflops["triton"]), fmt(tflops["cuda"]), fmt(tflops["torch"]),
                                 fmt(tflops["torch.compile"]), ratio("triton"), ratio("cuda")])
                    print(rows[-1], flush=True)
    header = ["mode", "dtype", "shape", "act", "triton TFLOP/s", "cuda TFLOP/s", "torch TFLOP/s",
              "compile TFLOP/s", "torch/triton", "torch/cuda"]
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, medians of "
            f"triton.testing.do_bench\n\n{markdown_table(header, rows)}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
