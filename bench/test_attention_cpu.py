"""CPU benchmark of attention: kiln cpu vs torch SDPA (math and the CPU flash backend),
fp32, same inputs in one process.

    pytest bench/test_attention_cpu.py --benchmark-json=bench/results/attention_cpu.json
    python bench/report.py bench/results/attention_cpu.json --out bench/results/attention_cpu.md

On a shared machine, the interleaved form (kiln and SDPA flash alternating in one process,
medians and minima of many repeats) is the one to trust:

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/test_attention_cpu.py [--repeats 15] [--issue14]
    OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/test_attention_cpu.py --issue14

Baselines: "sdpa math" and "sdpa flash" (torch's CPU flash-attention kernel). FLOPs: 4 B H T^2 D forward, 2.5x that
for backward, halved with causal.
"""

import argparse
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kiln
from common import interleaved_ms

SHAPES = [(8, 8, 512, 64), (4, 8, 1024, 64), (1, 8, 4096, 64)]  # (B, H, T, D); the first is issue 14's
IMPLS = {"kiln": None, "sdpa math": SDPBackend.MATH, "sdpa flash": SDPBackend.FLASH_ATTENTION}


def _fn(impl, causal):
    if impl == "kiln":
        def run(q, k, v):
            with kiln.backend.use("cpu"):
                return kiln.ops.attention(q, k, v, causal=causal)
        return run

    def run(q, k, v):
        with sdpa_kernel(IMPLS[impl]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_attention(benchmark, mode, shape, causal, impl):
    B, H, T, D = shape
    g = torch.Generator().manual_seed(0)
    grad = mode != "forward"
    q, k, v = (torch.randn(shape, generator=g).requires_grad_(grad) for _ in range(3))
    fn = _fn(impl, causal)
    flop = 4 * B * H * T * T * D * (1 if mode == "forward" else 3.5) / (2 if causal else 1)
    benchmark.group = f"attention {mode} {'causal' if causal else 'full'} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(impl=impl, flop=flop)
    if mode == "forward":
        with torch.no_grad():
            fn(q, k, v)
            benchmark.pedantic(fn, args=(q, k, v), rounds=3, warmup_rounds=1)
    else:
        do = torch.randn_like(q)
        step = lambda: fn(q, k, v).backward(do)
        step()
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def _interleaved(repeats, shapes):
    """kiln and SDPA's flash backend alternating, each timed ``repeats`` times per case (the
    inner count keeps one timing above ~20 ms); prints a markdown table."""
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, medians of {repeats} interleaved "
          "repeats\n")
    print("| case | kiln ms | sdpa flash ms | flash/kiln | flash/kiln of the minima |\n|---|---|---|---|---|")
    for mode in ("forward", "forward+backward"):
        for causal in (True, False):
            for shape in shapes:
                g = torch.Generator().manual_seed(0)
                grad = mode != "forward"
                q, k, v = (torch.randn(shape, generator=g).requires_grad_(grad) for _ in range(3))
                do = torch.randn(shape, generator=g)
                steps = {}
                for impl in ("kiln", "sdpa flash"):
                    fn = _fn(impl, causal)
                    if mode == "forward":
                        steps[impl] = lambda fn=fn: _no_grad(fn, q, k, v)
                    else:
                        steps[impl] = lambda fn=fn: fn(q, k, v).backward(do)
                times = interleaved_ms(steps, repeats)
                ours, theirs = statistics.median(times["kiln"]), statistics.median(times["sdpa flash"])
                best = min(times["sdpa flash"]) / min(times["kiln"])
                name = f"attention {mode} {'causal' if causal else 'full'} {'x'.join(map(str, shape))}"
                print(f"| {name} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f} | {best:.2f} |", flush=True)


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--issue14", action="store_true", help="only kiln issue 14's shape (8, 8, 512, 64)")
    args = parser.parse_args()
    _interleaved(args.repeats, SHAPES[:1] if args.issue14 else SHAPES)
