"""GPU benchmark of attention: TFLOP/s of kiln's triton and cuda forms vs torch SDPA
(flash backend), bf16, causal and not, forward and forward+backward.

    python bench/gpu_attention.py [--out bench/results/attention_gpu_<gpu>.md]

FLOPs: 4 B H Tq Tk D forward, 2.5x that for backward (so 3.5x forward+backward), halved
with causal. Goal (issue 5): the Triton forward at or above SDPA's flash backend.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table  # noqa: E402

import kiln  # noqa: E402

SEQ_LENS = [512, 1024, 2048, 4096, 8192, 16384]
HEAD_DIMS = [64, 128]
TOKENS = 16384  # B * T held fixed, so every case moves about the same data


def _impls(causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def on(name):
        def run(q, k, v):
            with kiln.backend.use(name):
                return kiln.ops.attention(q, k, v, causal=causal)
        return run

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return {"triton": on("triton"), "cuda": on("cuda"), "sdpa flash": flash}


def main() -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_attention.py needs a CUDA GPU")
    rows = []
    for D in HEAD_DIMS:
        H = 2048 // D
        for T in SEQ_LENS:
            B = max(1, TOKENS // T)
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            for causal in (False, True):
                flop = 4 * B * H * T * T * D / (2 if causal else 1)
                for mode, factor in (("forward", 1.0), ("forward+backward", 3.5)):
                    cells = []
                    for name, fn in _impls(causal).items():
                        try:
                            if mode == "forward":
                                with torch.no_grad():
                                    ms = do_bench(lambda: fn(q, k, v), return_mode="median")
                            else:
                                ms = do_bench(lambda: fn(q, k, v).backward(do), grad_to_none=[q, k, v],
                                              return_mode="median")
                            cells.append(f"{flop * factor / (ms * 1e-3) / 1e12:.0f} TFLOP/s ({ms:.2f} ms)")
                        except Exception as e:  # one failing form must not hide the others
                            print(f"{name} failed: {e}", file=sys.stderr)
                            cells.append("-")
                    rows.append([f"{mode} {'causal' if causal else 'full'}", f"{B}x{H}x{T}x{D}", *cells])
                    print(rows[-1], flush=True)
    header = ["case", "BxHxTxD (bf16)", "kiln triton", "kiln cuda", "sdpa flash"]
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, medians of "
            f"triton.testing.do_bench\n\n{markdown_table(header, rows)}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
