"""GPU benchmark of cross_entropy (GB/s vs copy bandwidth) and linear_cross_entropy (time, peak memory).

    python bench/gpu_cross_entropy.py [--out bench/results/cross_entropy_gpu_<gpu>.md]

cross_entropy bytes = logits read once (forward) + logits read and grad written (backward);
the roof is the measured device-to-device copy bandwidth. Medians of triton.testing.do_bench.
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

CE_SHAPES = [(8192, 32000), (4096, 128256), (16384, 50257)]
LCE_SHAPES = [(8192, 2048, 32000), (4096, 2048, 128256)]


def _kiln(name, fn):
    def run(*args):
        with kiln.backend.use(name):
            return fn(*args)
    return run


def main() -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_cross_entropy.py needs a CUDA GPU")
    roof = copy_bandwidth()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for N, V in CE_SHAPES:
            x = torch.randn(N, V, device="cuda", dtype=dtype, requires_grad=True)
            t = torch.randint(0, V, (N,), device="cuda")
            impls = {"triton": _kiln("triton", kiln.ops.cross_entropy),
                     "cuda": _kiln("cuda", kiln.ops.cross_entropy), "torch": F.cross_entropy,
                     "torch.compile": torch.compile(F.cross_entropy)}
            for mode, nbytes in (("forward", x.numel() * x.element_size()),
                                 ("forward+backward", 3 * x.numel() * x.element_size())):
                cells = []
                for name, fn in impls.items():
                    try:
                        if mode == "forward":
                            with torch.no_grad():
                                ms = do_bench(lambda: fn(x, t), return_mode="median")
                        else:
                            ms = do_bench(lambda: fn(x, t).backward(), grad_to_none=[x], return_mode="median")
                        cells.append(f"{nbytes / (ms * 1e-3) / 1e9:.0f} GB/s ({ms:.2f} ms)")
                    except Exception as e:
                        print(f"{name} failed: {e}", file=sys.stderr)
                        cells.append("-")
                rows.append([f"cross_entropy {mode}", str(dtype).removeprefix("torch."), f"{N}x{V}", *cells])
                print(rows[-1], flush=True)
    for N, H, V in LCE_SHAPES:
        h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H**0.5).requires_grad_()
        t = torch.randint(0, V, (N,), device="cuda")
        impls = {"triton": _kiln("triton", kiln.ops.linear_cross_entropy),
                 "cuda": _kiln("cuda", kiln.ops.linear_cross_entropy),
                 "torch": lambda h, w, t: F.cross_entropy(F.linear(h, w), t)}
        impls["torch.compile"] = torch.compile(impls["torch"])
        if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13: its own chunked form
            options = torch.nn.LinearCrossEntropyOptions()
            impls["torch.chunked"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options)
        cells = []
        for name, fn in impls.items():
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(h, w, t).backward()
                peak = torch.cuda.max_memory_allocated() - base
                ms = do_bench(lambda: fn(h, w, t).backward(), grad_to_none=[h, w], return_mode="median")
                cells.append(f"{ms:.1f} ms, peak +{peak / 2**20:.0f} MiB")
            except Exception as e:
                print(f"{name} failed: {e}", file=sys.stderr)
                cells.append("-")
        rows.append(["linear_cross_entropy fwd+bwd", "bfloat16", f"{N}x{H}->{V}", *cells])
        print(rows[-1], flush=True)
    header = ["case", "dtype", "shape", "kiln triton", "kiln cuda", "torch", "torch.compile"]
    if hasattr(F, "linear_cross_entropy"):
        header.append("torch.chunked (linear_cross_entropy only)")
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
            f"{roof:.0f} GB/s, medians of triton.testing.do_bench\n\n{markdown_table(header, rows)}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
