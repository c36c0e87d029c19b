"""CPU benchmark of linear_act: kiln's cpu backend vs torch eager vs torch.compile, fp32.

    pytest bench/test_linear_act_cpu.py --benchmark-json=bench/results/linear_act_cpu.json
    python bench/report.py bench/results/linear_act_cpu.json

Every case times the same inputs in one process; report.py prints medians and the
ratio of each torch variant's median to kiln's (above 1: kiln is faster).
"""

import pytest
import torch

import kiln
from common import torch_linear_act

# (M, K, N): x (M, K) @ W^T (K, N). The first two are GEMM-bound MLP layers; the third,
# with a short K, is bound by the passes over the (M, N) output that fusion saves.
SHAPES = [(4096, 1024, 4096), (8192, 4096, 1024), (16384, 128, 2048)]
ACTIVATIONS = ["relu", "gelu"]
IMPLS = ["kiln", "torch", "torch.compile"]

_compiled = {}


def _function(impl, activation):
    if impl == "kiln":
        def run(x, w, b):
            with kiln.backend.use("cpu"):
                return kiln.ops.linear_act(x, w, b, activation)
        return run
    eager = lambda x, w, b: torch_linear_act(x, w, b, activation)
    if impl == "torch":
        return eager
    if activation not in _compiled:
        _compiled[activation] = torch.compile(eager)
    return _compiled[activation]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_linear_act(benchmark, mode, shape, activation, impl):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = (torch.randn(N, K, generator=g) / K**0.5).requires_grad_(mode != "forward")
    b = torch.randn(N, generator=g).requires_grad_(mode != "forward")
    fn = _function(impl, activation)
    benchmark.group = f"{mode} {M}x{K}->{N} {activation}"
    benchmark.extra_info.update(impl=impl, mode=mode, shape=shape, activation=activation,
                                flop=2 * M * K * N * (1 if mode == "forward" else 2))
    if mode == "forward":
        with torch.no_grad():
            fn(x, w, b)  # warm-up: numba and inductor compile here, not in the timing
            benchmark.pedantic(fn, args=(x, w, b), rounds=5, warmup_rounds=1)
    else:
        dy = torch.randn(M, N, generator=g)

        def step():
            fn(x, w, b).backward(dy)

        step()
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)
