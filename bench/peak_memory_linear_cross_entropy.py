"""Peak extra memory of kiln.ops.linear_cross_entropy vs torch's linear + cross_entropy and
torch's chunked F.linear_cross_entropy (torch >= 2.13; skipped where torch lacks it), CPU.

    python bench/peak_memory_linear_cross_entropy.py [--rows 4096 --hidden 2048 --vocab 128256]

Each case runs forward+backward in a fresh process and reports the growth of peak RSS
(with a fixed glibc mmap threshold, so freed blocks leave RSS and the peak is what lived).
"""

import argparse
import os
import subprocess
import sys

CASE = """
import resource, sys, torch, torch.nn.functional as F
import kiln
which, N, H, V = sys.argv[1], *map(int, sys.argv[2:5])
g = torch.Generator().manual_seed(0)
h = torch.randn(N, H, generator=g).requires_grad_()
w = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
t = torch.randint(0, V, (N,), generator=g)


def run(h, w, t):
    if which == "kiln":
        return kiln.ops.linear_cross_entropy(h, w, t)
    if which == "torch.chunked":
        return F.linear_cross_entropy(h, w, t, options=torch.nn.LinearCrossEntropyOptions())
    return F.cross_entropy(F.linear(h, w), t)


# Warm up the measured implementation itself (numba compiles here) on 4 rows, so the
# baseline holds what any call holds (the (V, H) weight gradient), not another form's peak.
run(h[:4], w, t[:4]).backward()
w.grad = h.grad = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(h, w, t).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    a = parser.parse_args()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    logits = a.rows * a.vocab * 4
    print(f"N={a.rows} H={a.hidden} V={a.vocab}: full fp32 logits {logits / 2**20:.0f} MiB")
    import torch.nn.functional as F

    cases = ["kiln", "torch"] + (["torch.chunked"] if hasattr(F, "linear_cross_entropy") else [])
    for which in cases:
        out = subprocess.run([sys.executable, "-c", CASE, which, str(a.rows), str(a.hidden), str(a.vocab)],
                             capture_output=True, text=True, check=True, env=env)
        peak = int(out.stdout.split()[-1])
        print(f"{which:>13}: peak extra {peak / 2**20:.0f} MiB ({peak / logits:.2f}x the logits)")


if __name__ == "__main__":
    main()
