"""CPU benchmark of cross_entropy and linear_cross_entropy vs torch eager and torch.compile, fp32.

    pytest bench/test_cross_entropy_cpu.py --benchmark-json=bench/results/cross_entropy_cpu.json
    python bench/report.py bench/results/cross_entropy_cpu.json

Peak memory of linear_cross_entropy vs torch (linear + cross_entropy, and torch's chunked
F.linear_cross_entropy) is measured by bench/peak_memory_linear_cross_entropy.py (a fresh
process per case).

linear_cross_entropy is also compared with torch's own chunked F.linear_cross_entropy
(torch >= 2.13, ``options=LinearCrossEntropyOptions()``: its default chunking and
accumulation policy), impl "torch.chunked"; the case is skipped where torch lacks it:

    pytest bench/test_cross_entropy_cpu.py -k linear --benchmark-json=bench/results/linear_cross_entropy_vs_torch.json
"""

import pytest
import torch
import torch.nn.functional as F

import kiln

CE_SHAPES = [(8192, 32000), (4096, 128256)]  # (N, V)
LCE_SHAPES = [(4096, 1024, 32000)]  # (N, H, V)
IMPLS = ["kiln", "torch", "torch.compile"]
LCE_IMPLS = IMPLS + ["torch.chunked"]
_compiled = {}


def _ce(impl):
    if impl == "kiln":
        def run(x, t):
            with kiln.backend.use("cpu"):
                return kiln.ops.cross_entropy(x, t)
        return run
    if impl == "torch":
        return F.cross_entropy
    return _compiled.setdefault("ce", torch.compile(F.cross_entropy))


def _lce(impl):
    if impl == "kiln":
        def run(h, w, t):
            with kiln.backend.use("cpu"):
                return kiln.ops.linear_cross_entropy(h, w, t)
        return run
    if impl == "torch.chunked":
        if not hasattr(F, "linear_cross_entropy"):
            pytest.skip(f"torch {torch.__version__} has no F.linear_cross_entropy (added in 2.13)")
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options)
    eager = lambda h, w, t: F.cross_entropy(F.linear(h, w), t)
    return eager if impl == "torch" else _compiled.setdefault("lce", torch.compile(eager))


def _time(benchmark, fn, args, mode):
    if mode == "forward":
        with torch.no_grad():
            fn(*args)
            benchmark.pedantic(fn, args=args, rounds=5, warmup_rounds=1)
    else:
        step = lambda: fn(*args).backward()
        step()
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_cross_entropy(benchmark, mode, shape, impl):
    N, V = shape
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, V, generator=g) * 3).requires_grad_(mode != "forward")
    t = torch.randint(0, V, (N,), generator=g)
    benchmark.group = f"cross_entropy {mode} {N}x{V}"
    benchmark.extra_info.update(impl=impl, bytes=x.numel() * 4 * (1 if mode == "forward" else 3))
    _time(benchmark, _ce(impl), (x, t), mode)


@pytest.mark.parametrize("impl", LCE_IMPLS)
@pytest.mark.parametrize("shape", LCE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_linear_cross_entropy(benchmark, mode, shape, impl):
    N, H, V = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_(mode != "forward")
    w = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(mode != "forward")
    t = torch.randint(0, V, (N,), generator=g)
    benchmark.group = f"linear_cross_entropy {mode} {N}x{H}->{V}"
    benchmark.extra_info.update(impl=impl, flop=2 * N * H * V * (1 if mode == "forward" else 4))
    _time(benchmark, _lce(impl), (h, w, t), mode)
