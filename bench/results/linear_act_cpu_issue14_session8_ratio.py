"""Issue 14, session 8: linear_act 1024x256x1024 gelu on CPU, kiln's one-region forms ("after")
against its blocked forms ("base": the same code with the one-region gate shut, as before
this session) and torch eager (F.gelu(F.linear(x, w, b)), backward of sum(y * g)).

    OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/results/linear_act_cpu_issue14_session8_ratio.py
    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/results/linear_act_cpu_issue14_session8_ratio.py

Two orders: "interleaved" alternates the three calls one by one (each call after the
others' work, as in a model); "bursts" times 15 calls of one variant in a row, then the
next (as kiln bench does), 8 bursts each. Wall medians and minimums, and the median CPU
time of the process (all its threads, spinning ones included). Optional arguments:
MxKxN, activation.
"""

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kiln
from kiln.kernels.cpu import linear_act as cpu_kernel
from kiln.ops.linear_act import TORCH_ACTIVATIONS

threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
torch.set_num_threads(threads)
M, K, N = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1024x256x1024").split("x"))
activation = sys.argv[2] if len(sys.argv) > 2 else "gelu"
torch_act = TORCH_ACTIVATIONS[activation]
torch.manual_seed(0)
x = torch.randn(M, K, requires_grad=True)
w = (torch.randn(N, K) / K ** 0.5).requires_grad_()
b = torch.randn(N, requires_grad=True)
g = torch.randn(M, N)
team = cpu_kernel._team_size


def variant(name, mode):
    def call():
        cpu_kernel._team_size = (lambda: 1) if name == "base" else team  # 1: the gate shut
        try:
            if mode == "forward":
                with torch.no_grad():
                    (torch_act(F.linear(x, w, b)) if name == "torch" else kiln.ops.linear_act(x, w, b, activation))
            else:
                y = torch_act(F.linear(x, w, b)) if name == "torch" else kiln.ops.linear_act(x, w, b, activation)
                torch.autograd.backward(y, g)
        finally:
            cpu_kernel._team_size = team
    return call


def report(order, mode, wall, cpu):
    ms = lambda v: statistics.median(v) * 1e3
    t_med, t_min = ms(wall["torch"]), min(wall["torch"]) * 1e3
    cells = " | ".join(f"{k} med {ms(wall[k]):6.2f} ({t_med / ms(wall[k]):.2f}x) min {min(wall[k]) * 1e3:6.2f} "
                       f"({t_min / (min(wall[k]) * 1e3):.2f}x) cpu {ms(cpu[k]):6.2f}" for k in ("after", "base"))
    print(f"{threads}t {M}x{K}x{N} {activation} {mode:16s} {order:11s} | {cells} | torch med {t_med:6.2f} "
          f"min {t_min:6.2f} cpu {ms(cpu['torch']):6.2f}")


for mode in ("forward", "forward+backward"):
    calls = {k: variant(k, mode) for k in ("after", "base", "torch")}
    for f in calls.values():
        f(), f()
    for order in ("interleaved", "bursts"):
        wall = {k: [] for k in calls}
        cpu = {k: [] for k in calls}
        schedule = ([k for _ in range(40) for k in calls] if order == "interleaved"
                    else [k for _ in range(8) for k in calls for _ in range(15)])
        for k in schedule:
            c, s = time.process_time(), time.perf_counter()
            calls[k]()
            wall[k].append(time.perf_counter() - s)
            cpu[k].append(time.process_time() - c)
        report(order, mode, wall, cpu)
