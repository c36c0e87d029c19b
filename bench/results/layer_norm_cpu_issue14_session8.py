"""kiln.ops.layer_norm against F.layer_norm on CPU, float32, kiln and torch alternating in one
process: per case 7 blocks of (kiln round, torch round), each round the mean over ~10 ms
of calls; prints the median and the min over the blocks and torch/kiln of each.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/results/layer_norm_cpu_issue14_session8.py
    OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/results/layer_norm_cpu_issue14_session8.py
    ... --thread-time   (CPU time of the calling thread: at one thread, less noise on a loaded machine)
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kiln

clock = time.thread_time if "--thread-time" in sys.argv else time.perf_counter


def rounds(f, n):
    s = clock()
    for _ in range(n):
        f()
    return (clock() - s) / n


def pair(name, kf, tf, blocks=7):
    for f in (kf, tf, kf, tf):
        f()
    n = max(1, int(0.01 / max(rounds(kf, 3), 1e-7)))
    ks, ts = [], []
    for _ in range(blocks):
        ks.append(rounds(kf, n))
        ts.append(rounds(tf, n))
    km, tm = statistics.median(ks) * 1e6, statistics.median(ts) * 1e6
    kn, tn = min(ks) * 1e6, min(ts) * 1e6
    print(f"{name:28s} median kiln {km:8.1f} torch {tm:8.1f} us {tm / km:5.2f}x | "
          f"min kiln {kn:8.1f} torch {tn:8.1f} us {tn / kn:5.2f}x", flush=True)


torch.manual_seed(0)
for M, N in [(1024, 1024), (3072, 128)]:
    x, w, b = torch.randn(M, N), torch.randn(N), torch.randn(N)
    pair(f"{M}x{N} forward", lambda: kiln.ops.layer_norm(x, (N,), w, b), lambda: F.layer_norm(x, (N,), w, b))
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    dy = torch.randn(M, N)
    pair(f"{M}x{N} forward+backward", lambda: kiln.ops.layer_norm(xg, (N,), wg, bg).backward(dy),
         lambda: F.layer_norm(xg, (N,), wg, bg).backward(dy))
