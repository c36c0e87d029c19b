"""CPU benchmark of attention: kiln cpu vs torch SDPA (math and the CPU flash backend),
fp32, same inputs in one process.

    pytest bench/test_attention_cpu.py --benchmark-json=bench/results/attention_cpu.json
    python bench/report.py bench/results/attention_cpu.json --out bench/results/attention_cpu.md

Baselines: "sdpa math" and "sdpa flash" (torch's CPU flash-attention kernel). FLOPs: 4 B H T^2 D forward, 2.5x that
for backward, halved with causal.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kiln

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
