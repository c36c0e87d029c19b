"""CPU benchmark of fused dropout: kiln.nn.Linear(activation="relu", dropout=p) against
torch's Linear + ReLU + Dropout (eager and torch.compile), and the standalone
kiln.nn.Dropout against torch.nn.Dropout; float32, forward and forward+backward.

    pytest bench/test_dropout_cpu.py --benchmark-json=bench/results/dropout_cpu.json
    python bench/report.py bench/results/dropout_cpu.json --out bench/results/dropout_cpu.md

Every case times the same inputs in one process, modules in training mode. kiln's masks
are regenerated from (seed, offset) by Philox in the epilogue / the dz pass; torch draws a
Bernoulli mask tensor, stores it, and multiplies in separate passes.
"""

import pytest
import torch
from torch import nn

import kiln

P = 0.1
LINEAR_SHAPES = [(4096, 1024, 4096)]  # (M, K, N): x (M, K), W (N, K)
DROPOUT_SHAPES = [(4096, 4096)]
IMPLS = ["kiln", "torch", "torch.compile"]



def _time(benchmark, mode, module, x, make_dy):
    """Times module(x) (no grad) or module(x).backward(dy), after one untimed warm-up call
    in which numba and inductor compile."""
    with kiln.backend.use("cpu"):
        if mode == "forward":
            with torch.no_grad():
                module(x)
                benchmark.pedantic(module, args=(x,), rounds=5, warmup_rounds=1)
            return
        x.requires_grad_()
        dy = make_dy()

        def step():
            module(x).backward(dy)

        step()
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)


def _linear_module(impl, K, N):
    torch.manual_seed(0)
    if impl == "kiln":
        return kiln.nn.Linear(K, N, activation="relu", dropout=P)
    module = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Dropout(P))
    return module if impl == "torch" else torch.compile(module)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_linear_relu_dropout(benchmark, mode, shape, impl):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    module = _linear_module(impl, K, N).train()
    benchmark.group = f"{mode} Linear+ReLU+Dropout({P}) {M}x{K}->{N}"
    benchmark.extra_info.update(impl=impl, mode=mode, shape=shape,
                                flop=2 * M * K * N * (1 if mode == "forward" else 3))
    _time(benchmark, mode, module, x, lambda: torch.randn(M, N, generator=g))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_dropout(benchmark, mode, shape, impl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    module = (kiln.nn.Dropout(P) if impl == "kiln" else nn.Dropout(P)).train()
    if impl == "torch.compile":
        module = torch.compile(module)
    numel = x.numel()
    benchmark.group = f"{mode} Dropout({P}) {'x'.join(map(str, shape))}"
    # bytes moved once: read x, write y (forward); read dy, write dx (backward)
    benchmark.extra_info.update(impl=impl, mode=mode, shape=shape,
                                bytes=numel * 4 * (2 if mode == "forward" else 4))
    _time(benchmark, mode, module, x, lambda: torch.randn(*shape, generator=g))
