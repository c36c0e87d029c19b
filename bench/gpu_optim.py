"""GPU benchmark of one optimizer step: kiln triton and cuda vs torch's fused and foreach
forms, achieved GB/s against the device's copy bandwidth.

    python bench/gpu_optim.py [--out bench/results/optim_gpu_<gpu>.md]

200 tensors totalling 20M elements (as bench/test_optim_cpu.py), float32 and bfloat16.
Bytes counted once per tensor touched: Adam / AdamW 7 tensors, SGD with momentum and
RMSprop 5. Medians of do_bench.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, markdown_table  # noqa: E402

import kiln  # noqa: E402

TOTAL = 20_000_000
TENSORS = 200
CASES = {
    "Adam": (dict(lr=1e-3), 7),
    "AdamW": (dict(lr=1e-3), 7),
    "SGD momentum": (dict(lr=1e-3, momentum=0.9), 5),
    "RMSprop": (dict(lr=1e-3), 5),
}


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    weights = torch.exp(torch.rand(TENSORS, generator=g) * 7)
    sizes = (weights / weights.sum() * TOTAL).long().clamp_min(1)
    sizes[0] += TOTAL - sizes.sum()
    params = [torch.randn(int(s), device="cuda", dtype=dtype).requires_grad_() for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _steps(name, dtype):
    import kiln.optim

    kw, _ = CASES[name]
    cls = name.split()[0]
    out = {}
    for backend in ("triton", "cuda"):
        opt = getattr(kiln.optim, cls)(_params(dtype), **kw)

        def step(opt=opt, backend=backend):
            with kiln.backend.use(backend):
                opt.step()
        out[f"kiln {backend}"] = step
    has_fused = cls != "RMSprop"
    if has_fused:
        out["torch fused"] = getattr(torch.optim, cls)(_params(dtype), **kw, fused=True).step
    out["torch foreach"] = getattr(torch.optim, cls)(_params(dtype), **kw, foreach=True).step
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_optim.py needs a CUDA GPU")
    from triton.testing import do_bench

    roof = copy_bandwidth()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (_, touched) in CASES.items():
            nbytes = touched * TOTAL * torch.empty((), dtype=dtype).element_size()
            for impl, step in _steps(name, dtype).items():
                try:
                    ms = do_bench(step, return_mode="median")
                except Exception as e:  # a form torch lacks for a dtype: say so in the table
                    rows.append([name, str(dtype).removeprefix("torch."), impl, f"error: {type(e).__name__}"])
                    continue
                rate = nbytes / (ms * 1e-3) / 1e9
                rows.append([name, str(dtype).removeprefix("torch."), impl,
                             f"{ms:.3f} ms, {rate:.0f} GB/s = {100 * rate / roof:.0f}% of copy"])
    text = (f"{torch.cuda.get_device_name()}: copy bandwidth {roof:.0f} GB/s, {TENSORS} tensors, "
            f"{TOTAL // 10**6}M elements\n\n" + markdown_table(["optimizer", "dtype", "impl", "step"], rows) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
