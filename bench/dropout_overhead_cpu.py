"""What fusing dropout costs and saves on CPU, measured interleaved in one process.

    python bench/dropout_overhead_cpu.py [--rounds 5] [--out bench/results/dropout_overhead_cpu.md]

Variants, each forward+backward of 4096x1024 -> 4096 float32 in training mode, timed in
turn (A B C D A B C D ...) so that a machine shared with other jobs slows all of them
alike: kiln.nn.Linear(relu) with dropout 0 and 0.1, torch Linear+ReLU, and torch
Linear+ReLU+Dropout(0.1). Medians; ratios inside the run are what to read.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import kiln


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shape", default="4096,1024,4096")
    parser.add_argument("--out")
    args = parser.parse_args()
    M, K, N = map(int, args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    dy = torch.randn(M, N, generator=g)
    torch.manual_seed(0)
    variants = {
        "kiln Linear(relu)": kiln.nn.Linear(K, N, activation="relu"),
        "kiln Linear(relu, dropout=0.1)": kiln.nn.Linear(K, N, activation="relu", dropout=0.1),
        "torch Linear+ReLU": nn.Sequential(nn.Linear(K, N), nn.ReLU()),
        "torch Linear+ReLU+Dropout(0.1)": nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Dropout(0.1)),
    }
    times = {name: [] for name in variants}
    with kiln.backend.use("cpu"):
        for module in variants.values():
            module(x).backward(dy)  # warm-up (numba compiles)
        for _ in range(args.rounds):
            for name, module in variants.items():
                start = time.perf_counter()
                module(x).backward(dy)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch Linear+ReLU+Dropout(0.1)"])
    lines = [f"forward+backward {M}x{K}->{N} float32, {args.rounds} interleaved rounds, medians",
             "", "| variant | ms | torch Linear+ReLU+Dropout / this |", "|---|---|---|"]
    for name, ts in times.items():
        median = statistics.median(ts)
        lines.append(f"| {name} | {median * 1e3:.1f} | {base / median:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
