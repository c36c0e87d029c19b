"""torch / kiln time ratios of issue 14's linear_act, linear_cross_entropy and digits-MLP rows,
kiln and torch interleaved in one process, medians of CPU time (time.process_time: on a
shared machine it counts this process's own work, not the other agents' load).

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/results/linear_act_cpu_issue14_session7_ratio.py

Run it against another tree with KILN_WORKTREE=<tree> PYTHONPATH=/work/wtenv (the worktree
setup of /work/wtenv/sitecustomize.py).
"""

import statistics
import time

import torch
import torch.nn.functional as F

import kiln
from kiln.bench import cases
from kiln.bench.runner import _call, _with_backend
from kiln.ops.linear_act import TORCH_ACTIVATIONS


def _medians(fns: dict, rounds: int, calls: int = 1) -> dict:
    samples = {k: [] for k in fns}
    for f in fns.values():
        f(), f()
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.process_time()
            for _ in range(calls):
                f()
            samples[k].append((time.process_time() - start) / calls)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def linear_act_row(M=1024, K=256, N=1024, activation="gelu"):
    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    w = (torch.randn(N, K) / K ** 0.5).requires_grad_()
    b = torch.randn(N, requires_grad=True)
    g = torch.randn(M, N)
    act = TORCH_ACTIVATIONS[activation]

    def fk():
        with torch.no_grad():
            kiln.ops.linear_act(x, w, b, activation)

    def ft():
        with torch.no_grad():
            act(F.linear(x, w, b))
    m = _medians({"fk": fk, "ft": ft,
                  "fbk": lambda: torch.autograd.backward(kiln.ops.linear_act(x, w, b, activation), g),
                  "fbt": lambda: torch.autograd.backward(act(F.linear(x, w, b)), g)}, rounds=15, calls=5)
    print(f"linear_act {M}x{K}x{N} {activation}: forward {m['ft'] / m['fk']:.2f}x "
          f"({m['fk']:.2f} vs {m['ft']:.2f} ms), forward+backward {m['fbt'] / m['fbk']:.2f}x "
          f"({m['fbk']:.2f} vs {m['fbt']:.2f} ms)")


def linear_cross_entropy_row(N=512, H=256, V=8192):
    torch.manual_seed(0)
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) * H ** -0.5).requires_grad_()
    t = torch.randint(0, V, (N,))

    def fk():
        with torch.no_grad():
            kiln.ops.linear_cross_entropy(h, w, t)

    def ft():
        with torch.no_grad():
            F.cross_entropy(F.linear(h, w), t)
    m = _medians({"fk": fk, "ft": ft,
                  "fbk": lambda: kiln.ops.linear_cross_entropy(h, w, t).backward(),
                  "fbt": lambda: F.cross_entropy(F.linear(h, w), t).backward()}, rounds=9)
    print(f"linear_cross_entropy {N}x{H}x{V}: forward {m['ft'] / m['fk']:.2f}x "
          f"({m['fk']:.2f} vs {m['ft']:.2f} ms), forward+backward {m['fbt'] / m['fbk']:.2f}x "
          f"({m['fbk']:.2f} vs {m['fbt']:.2f} ms)")


def mlp_row():
    torch.manual_seed(0)
    case = next(c for c in cases.CASES if c.op == "mlp")
    work = case.build(torch.device("cpu"), torch.float32, True)
    m = _medians({"k": _call(_with_backend(work.kiln, "cpu"), work.args, "forward+backward"),
                  "t": _call(work.torch, work.args, "forward+backward")}, rounds=15, calls=50)
    print(f"mlp {case.label}: forward+backward {m['t'] / m['k']:.2f}x "
          f"({m['k'] * 1e3:.0f} vs {m['t'] * 1e3:.0f} us)")


if __name__ == "__main__":
    linear_act_row()
    linear_cross_entropy_row()
    mlp_row()
