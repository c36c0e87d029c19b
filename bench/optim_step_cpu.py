"""opt.step() of kiln.optim against torch.optim on CPU, interleaved in one process.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/optim_step_cpu.py [--numel 1 1000 100000]

200 parameters of --numel elements each (1: the host cost alone, the kernel ~4 us), every
parameter with a gradient; SGD (momentum 0.9), Adam, AdamW. The optimizers step in turn
(kiln, torch fused[, torch foreach], kiln, ...) so that a shared machine slows all alike;
minima over rounds, and torch's time over kiln's (> 1: kiln is faster).
"""

import argparse
import time

import torch

import kiln.optim

CASES = [("SGD", dict(lr=1e-3, momentum=0.9)), ("Adam", dict(lr=1e-3)), ("AdamW", dict(lr=1e-3))]


def _optimizer(kind, name, numel, tensors, kw):
    params = [torch.nn.Parameter(torch.randn(numel)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(numel) * 1e-3
    if kind == "kiln":
        return getattr(kiln.optim, name)(params, **kw)
    return getattr(torch.optim, name)(params, **kw, **{kind.removeprefix("torch-"): True})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, nargs="+", default=[1, 1000, 100_000])
    parser.add_argument("--tensors", type=int, default=200)
    args = parser.parse_args()
    for numel in args.numel:
        kinds = ["kiln", "torch-fused"] + (["torch-foreach"] if numel <= 10_000 else [])
        steps, rounds = (200, 15) if numel <= 10_000 else (3, 7)
        for name, kw in CASES:
            opts = {k: _optimizer(k, name, numel, args.tensors, kw) for k in kinds}
            for opt in opts.values():
                for _ in range(3):
                    opt.step()
            best = dict.fromkeys(kinds, float("inf"))
            for _ in range(rounds):
                for k, opt in opts.items():
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        opt.step()
                    best[k] = min(best[k], (time.perf_counter() - t0) / steps)
            unit, scale = ("us", 1e6) if numel <= 10_000 else ("ms", 1e3)
            print(f"{name:5s} {args.tensors}x{numel}: "
                  + "  ".join(f"{k} {best[k] * scale:.1f} {unit}" for k in kinds) + "  | "
                  + " ".join(f"{k}/kiln {best[k] / best['kiln']:.2f}x" for k in kinds[1:]), flush=True)


if __name__ == "__main__":
    main()
