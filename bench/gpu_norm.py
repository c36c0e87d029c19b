"""GPU benchmark of layer_norm and batch_norm: achieved GB/s vs the device's copy bandwidth.

    python bench/gpu_norm.py [--out bench/results/norm_gpu_<gpu>.md]

Bytes = each (M, N) tensor touched once: forward reads x, writes y (2 tensors);
forward+backward adds reading x and dy and writing dx (5). Target (issue 4): layer_norm
forward at (16384, 4096) bf16 reaches 85% of copy bandwidth. Medians of do_bench.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, markdown_table  # noqa: E402

import kiln  # noqa: E402

LN_SHAPES = [(16384, 4096), (8192, 1024), (4096, 8192), (32768, 768)]
BN_SHAPES = [(64, 256, 28, 28), (256, 64, 56, 56)]


def _impls(kiln_fn, torch_fn):
    def on(name):
        def run(*args):
            with kiln.backend.use(name):
                return kiln_fn(*args)
        return run
    return {"triton": on("triton"), "cuda": on("cuda"), "torch": torch_fn,
            "torch.compile": torch.compile(torch_fn)}


def _measure(fn, args, mode, nbytes, roof):
    from triton.testing import do_bench

    if mode == "forward":
        with torch.no_grad():
            ms = do_bench(lambda: fn(*args), return_mode="median")
    else:
        dy = torch.randn_like(args[0])
        grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        ms = do_bench(lambda: fn(*args).backward(dy), grad_to_none=grads, return_mode="median")
    rate = nbytes / (ms * 1e-3) / 1e9
    return f"{rate:.0f} GB/s = {100 * rate / roof:.0f}% ({ms:.3f} ms)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_norm.py needs a CUDA GPU")
    roof = copy_bandwidth()
    rows = []
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for M, N in LN_SHAPES:
            x = torch.randn(M, N, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(N, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(N, device="cuda", dtype=dtype, requires_grad=True)
            impls = _impls(lambda x, w, b: kiln.ops.layer_norm(x, x.shape[-1:], w, b),
                           lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b))
            cases.append(("layer_norm", dtype, f"{M}x{N}", impls, (x, w, b), x.numel() * x.element_size()))
        for shape in BN_SHAPES:
            C = shape[1]
            x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
            rm, rv = torch.zeros(C, device="cuda", dtype=dtype), torch.ones(C, device="cuda", dtype=dtype)
            impls = _impls(lambda x, w, b, rm, rv: kiln.ops.batch_norm(x, rm, rv, w, b, True),
                           lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True))
            cases.append(("batch_norm2d train", dtype, "x".join(map(str, shape)), impls, (x, w, b, rm, rv),
                          x.numel() * x.element_size()))
    for op, dtype, shape, impls, tensors, size in cases:
        for mode, nbytes in (("forward", 2 * size), ("forward+backward", 5 * size)):
            cells = []
            for name, fn in impls.items():
                try:
                    cells.append(_measure(fn, tensors, mode, nbytes, roof))
                except Exception as e:  # one failing implementation must not hide the others
                    print(f"{op} {name} failed: {e}", file=sys.stderr)
                    cells.append("-")
            rows.append([f"{op} {mode}", str(dtype).removeprefix("torch."), shape, *cells])
            print(rows[-1], flush=True)
    header = ["case", "dtype", "shape", "kiln triton", "kiln cuda", "torch", "torch.compile"]
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
            f"{roof:.0f} GB/s (100%), medians of triton.testing.do_bench\n\n"
            f"{markdown_table(header, rows)}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
