"""Interleaved kiln.nn.LSTM vs torch.nn.LSTM timing (issue 14, session 8): a round of
`calls` kiln calls, then a round of torch calls, repeated `rounds` times (every call timed);
reports the median and the min of each and their ratios. Rounds rather than single
alternating calls: kiln's parallel regions run on numba's OpenMP pool and torch's on its
own libgomp, and the first call after a switch pays for the other pool's spinning workers.
usage: python lstm_cpu_issue14_session8_ratio.py T B I H layers grad(0|1) [rounds [calls]]"""
import statistics as st
import sys
import time

import torch

import kiln

torch.manual_seed(0)
T, B, I, H, L = (int(a) for a in sys.argv[1:6])
grad = sys.argv[6] == "1"
rounds = int(sys.argv[7]) if len(sys.argv) > 7 else 40
per_round = int(sys.argv[8]) if len(sys.argv) > 8 else 5
theirs = torch.nn.LSTM(I, H, num_layers=L)
ours = kiln.nn.LSTM(I, H, num_layers=L)
ours.load_state_dict(theirs.state_dict())
x = torch.randn(T, B, I, requires_grad=grad)
if not grad:
    for p in (*theirs.parameters(), *ours.parameters()):
        p.requires_grad_(False)


def run(m):
    y = m(x)[0]
    if grad:
        y.sum().backward()


calls = {"kiln": lambda: run(ours), "torch": lambda: run(theirs)}
with torch.no_grad() if not grad else torch.enable_grad():
    for f in calls.values():
        for _ in range(10):
            f()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
med = {k: st.median(v) for k, v in times.items()}
low = {k: min(v) for k, v in times.items()}
print(f"T{T} B{B} in{I} h{H} x{L} {'fwd+bwd' if grad else 'fwd'}: "
      f"kiln med {med['kiln']:.3f} min {low['kiln']:.3f} | torch med {med['torch']:.3f} min {low['torch']:.3f} | "
      f"torch/kiln med {med['torch'] / med['kiln']:.3f} min {low['torch'] / low['kiln']:.3f}")
