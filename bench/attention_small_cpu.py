"""kiln.ops.attention vs torch SDPA on CPU at small (ViT-like) shapes: interleaved in one
process, time.thread_time minima, forward and forward+backward (issue 14, session 7).

OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/attention_small_cpu.py [--reps N] [--big]
"""
import argparse
import time

import torch
import torch.nn.functional as F

import kiln

SMALL = [((64, 4, 17, 16), False), ((64, 4, 65, 16), False), ((16, 8, 64, 32), False)]
BIG = [((2, 4, 256, 64), True), ((8, 8, 512, 64), True), ((4, 8, 1024, 64), False)]


def _min_time(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--big", action="store_true", help="also the bench sizes (few reps)")
    a = p.parse_args()
    cases = SMALL + (BIG if a.big else [])
    for shape, causal in cases:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(*shape, generator=g, requires_grad=True) for _ in range(3))
        do = torch.randn(*shape, generator=g)
        reps = a.reps if shape[2] < 256 else max(2, a.reps // 20)

        def fwd(f):
            with torch.no_grad():
                f(q, k, v, causal)

        def fwd_bwd(f):
            o = f(q, k, v, causal)
            torch.autograd.backward(o, do)
            q.grad = k.grad = v.grad = None

        def kiln_attn(q, k, v, causal):
            return kiln.ops.attention(q, k, v, causal=causal)

        def sdpa(q, k, v, causal):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        with kiln.backend.use("cpu"):
            for name, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                run(kiln_attn), run(sdpa)  # warm up (numba compile)
                tk = tt = float("inf")
                for _ in range(a.rounds):
                    tk = min(tk, _min_time(lambda: run(kiln_attn), reps))
                    tt = min(tt, _min_time(lambda: run(sdpa), reps))
                print(f"{str(shape):18s} {'causal' if causal else 'full':6s} {name:8s} kiln {tk * 1e3:8.3f} ms "
                      f"sdpa {tt * 1e3:8.3f} ms  sdpa/kiln {tt / tk:5.2f}", flush=True)


if __name__ == "__main__":
    main()
