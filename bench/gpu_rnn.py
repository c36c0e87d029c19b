"""GPU benchmark of kiln.nn.LSTM / GRU / RNN (triton and cuda) vs torch.nn.LSTM / GRU / RNN (cuDNN),
fp32 and bf16.

    python bench/gpu_rnn.py [--out bench/results/rnn_gpu_<gpu>.md]

Shapes of issue 6 and a batch sweep 1..256 at T 128, in 256, hidden 512. The triton form
is one launch per step; the cuda form's forward and backward are the persistent kernels (W_hh
in shared memory, one launch for all T steps) where kiln._cuda.rnn_sequence_fits says so
(column "cuda fwd"), else step loops over the cuda step kernels. The Elman RNN (tanh) has no
persistent kernel: both forms are one launch per step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table  # noqa: E402

import kiln  # noqa: E402

SHAPES = [(128, 32, 256, 512), (512, 8, 128, 256)] + [(128, b, 256, 512) for b in (1, 4, 16, 64, 256)]


def _cuda_forward_kind(kind, B, H, dtype) -> str:
    """Which forward the cuda form runs for this shape: persistent or the step loop."""
    if kind == "RNN":
        return "step loop"
    try:
        from kiln.ops import rnn

        w_hh = torch.empty(0, device="cuda", dtype=dtype)
        fits = rnn.cuda_sequence_fits(4 if kind == "LSTM" else 3, B, H, w_hh)
    except Exception as e:  # extension not built
        return f"- ({e.__class__.__name__})"
    return "persistent" if fits else "step loop"


def main() -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_rnn.py needs a CUDA GPU")
    rows = []
    for kind in ("LSTM", "GRU", "RNN"):
        for dtype in (torch.float32, torch.bfloat16):
            for T, B, I, H in SHAPES:
                theirs = getattr(torch.nn, kind)(I, H).cuda().to(dtype)
                ours = getattr(kiln.nn, kind)(I, H).cuda().to(dtype)
                ours.load_state_dict(theirs.state_dict())
                x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
                for mode in ("forward", "forward+backward"):
                    times = []
                    for name, module, form in (("kiln triton", ours, "triton"), ("kiln cuda", ours, "cuda"),
                                               ("cuDNN", theirs, None)):
                        def run():
                            if form is None:
                                return module(x)[0]
                            with kiln.backend.use(form):
                                return module(x)[0]
                        try:
                            if mode == "forward":
                                with torch.no_grad():
                                    ms = do_bench(run, return_mode="median")
                            else:
                                ms = do_bench(lambda: run().sum().backward(), grad_to_none=[x],
                                              return_mode="median")
                            times.append(ms)
                        except Exception as e:  # one failing form must not hide the other
                            print(f"{kind} {name} failed: {e}", file=sys.stderr)
                            times.append(None)
                    cells = [f"{ms:.2f} ms" if ms else "-" for ms in times]
                    ratios = [f"{times[2] / ms:.2f}" if ms and times[2] else "-" for ms in times[:2]]
                    rows.append([f"{kind} {mode}", str(dtype).removeprefix("torch."), f"T{T} B{B} in{I} h{H}",
                                 _cuda_forward_kind(kind, B, H, dtype), *cells, *ratios])
                    print(rows[-1], flush=True)
    header = ["case", "dtype", "shape", "cuda fwd", "kiln triton", "kiln cuda", "cuDNN", "cuDNN/triton",
              "cuDNN/cuda"]
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, medians of do_bench\n\n"
            f"{markdown_table(header, rows)}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
