"""GPU benchmark of the LLM ops (rms_norm, swiglu, geglu, rotary_embedding): achieved GB/s
vs the device's copy bandwidth, kiln triton and cuda vs torch eager and torch.compile.

    python bench/gpu_llm_ops.py [--out bench/results/llm_ops_gpu_<gpu>.md]

Bytes = each large tensor touched once: rms_norm 2 (M, N) tensors forward, 5 forward +
backward; swiglu / geglu 3 and 8; rotary 2 (q + k) and 4 (q + k). Medians of do_bench.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, markdown_table  # noqa: E402
from llm_ops_common import hf_rope  # noqa: E402

import kiln  # noqa: E402

RMS_SHAPES = [(4096, 4096), (16384, 4096), (8192, 8192)]
GATED_SHAPES = [(4096, 11008), (16384, 14336)]
ROPE_CASES = [(2, 32, 32, 2048, 128), (4, 32, 8, 4096, 128)]  # B, Hq, Hk, T, D


def _impls(kiln_fn, torch_fn):
    def on(name):
        def run(*args):
            with kiln.backend.use(name):
                return kiln_fn(*args)
        return run
    return {"triton": on("triton"), "cuda": on("cuda"), "torch": torch_fn, "torch.compile": torch.compile(torch_fn)}


def _measure(fn, args, mode, nbytes, roof):
    from triton.testing import do_bench

    if mode == "forward":
        with torch.no_grad():
            ms = do_bench(lambda: fn(*args), return_mode="median")
    else:
        with torch.no_grad():
            outs = fn(*args)
        dys = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
        grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        ms = do_bench(lambda: torch.autograd.backward(fn(*args), dys), grad_to_none=grads, return_mode="median")
    rate = nbytes / (ms * 1e-3) / 1e9
    return f"{rate:.0f} GB/s = {100 * rate / roof:.0f}% ({ms:.3f} ms)"


def _cases(dtype):
    dev = dict(device="cuda", dtype=dtype)
    for M, N in RMS_SHAPES:
        x, w = torch.randn(M, N, **dev, requires_grad=True), torch.randn(N, **dev, requires_grad=True)
        size = x.numel() * x.element_size()
        yield ("rms_norm", f"{M}x{N}", _impls(lambda x, w: kiln.ops.rms_norm(x, w, 1e-6),
                                             lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
               (x, w), (2 * size, 5 * size))
    for M, N in GATED_SHAPES:
        g, u = torch.randn(M, N, **dev, requires_grad=True), torch.randn(M, N, **dev, requires_grad=True)
        size = g.numel() * g.element_size()
        yield ("swiglu", f"{M}x{N}", _impls(kiln.ops.swiglu, lambda g, u: F.silu(g) * u), (g, u),
               (3 * size, 8 * size))
        yield ("geglu tanh", f"{M}x{N}", _impls(lambda g, u: kiln.ops.geglu(g, u, "tanh"),
                                               lambda g, u: F.gelu(g, approximate="tanh") * u), (g, u),
               (3 * size, 8 * size))
    for B, Hq, Hk, T, D in ROPE_CASES:
        q = torch.randn(B, Hq, T, D, **dev, requires_grad=True)
        k = torch.randn(B, Hk, T, D, **dev, requires_grad=True)
        f = torch.arange(T, device="cuda")[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda") / D))
        emb = torch.cat((f, f), -1)[None]
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        size = (q.numel() + k.numel()) * q.element_size()
        yield ("rotary", f"B{B} Hq{Hq} Hk{Hk} T{T} D{D}",
               _impls(lambda q, k, c, s: kiln.ops.rotary_embedding(q, k, c, s), hf_rope), (q, k, cos, sin),
               (2 * size, 4 * size))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_llm_ops.py needs a CUDA GPU")
    roof = copy_bandwidth()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for op, shape, impls, tensors, (fwd_bytes, bwd_bytes) in _cases(dtype):
            for mode, nbytes in (("forward", fwd_bytes), ("forward+backward", bwd_bytes)):
                cells = []
                for name, fn in impls.items():
                    try:
                        cells.append(_measure(fn, tensors, mode, nbytes, roof))
                    except Exception as e:  # one failing implementation must not hide the others
                        print(f"{op} {name} failed: {e}", file=sys.stderr)
                        cells.append("-")
                rows.append([f"{op} {mode}", str(dtype).removeprefix("torch."), shape, *cells])
                print(rows[-1], flush=True)
            del tensors
            torch.cuda.empty_cache()
    header = ["case", "dtype", "shape", "kiln triton", "kiln cuda", "torch", "torch.compile"]
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
            f"{roof:.0f} GB/s (100%), medians of triton.testing.do_bench\n\n"
            f"{markdown_table(header, rows)}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
