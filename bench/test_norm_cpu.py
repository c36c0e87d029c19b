"""CPU benchmark of layer_norm and batch_norm (2d, training): kiln cpu vs torch eager vs
torch.compile, fp32, same inputs in one process.

    pytest bench/test_norm_cpu.py --benchmark-json=bench/results/norm_cpu.json
    python bench/report.py bench/results/norm_cpu.json --out bench/results/norm_cpu.md

Bytes counted (the floor: each tensor touched once): forward reads x and writes y;
forward+backward adds reading x and dy and writing dx (parameters are negligible).
"""

import pytest
import torch
import torch.nn.functional as F

import kiln

LN_SHAPES = [(8192, 1024), (4096, 4096)]
BN_SHAPES = [(64, 256, 28, 28)]
IMPLS = ["kiln", "torch", "torch.compile"]
_compiled = {}


def _kiln(fn):
    def run(*args):
        with kiln.backend.use("cpu"):
            return fn(*args)
    return run


def _layer_norm(impl):
    if impl == "kiln":
        return _kiln(lambda x, w, b: kiln.ops.layer_norm(x, x.shape[-1:], w, b))
    eager = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)
    return eager if impl == "torch" else _compiled.setdefault("ln", torch.compile(eager))


def _batch_norm(impl):
    if impl == "kiln":
        return _kiln(lambda x, w, b, rm, rv: kiln.ops.batch_norm(x, rm, rv, w, b, True))
    eager = lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True)
    return eager if impl == "torch" else _compiled.setdefault("bn", torch.compile(eager))


def _time(benchmark, fn, args, mode):
    if mode == "forward":
        with torch.no_grad():
            fn(*args)
            benchmark.pedantic(fn, args=args, rounds=10, warmup_rounds=2)
    else:
        dy = torch.randn_like(args[0])
        step = lambda: fn(*args).backward(dy)
        step()
        benchmark.pedantic(step, rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_layer_norm(benchmark, mode, shape, impl):
    g = torch.Generator().manual_seed(0)
    grad = mode != "forward"
    x = torch.randn(shape, generator=g).requires_grad_(grad)
    w, b = torch.randn(shape[-1], generator=g).requires_grad_(grad), torch.randn(shape[-1], generator=g).requires_grad_(grad)
    benchmark.group = f"layer_norm {mode} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(impl=impl, bytes=x.numel() * 4 * (2 if mode == "forward" else 5))
    _time(benchmark, _layer_norm(impl), (x, w, b), mode)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_batch_norm2d_training(benchmark, mode, shape, impl):
    g = torch.Generator().manual_seed(0)
    grad = mode != "forward"
    C = shape[1]
    x = torch.randn(shape, generator=g).requires_grad_(grad)
    w, b = torch.randn(C, generator=g).requires_grad_(grad), torch.randn(C, generator=g).requires_grad_(grad)
    rm, rv = torch.zeros(C), torch.ones(C)
    benchmark.group = f"batch_norm2d train {mode} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(impl=impl, bytes=x.numel() * 4 * (2 if mode == "forward" else 5))
    _time(benchmark, _batch_norm(impl), (x, w, b, rm, rv), mode)
