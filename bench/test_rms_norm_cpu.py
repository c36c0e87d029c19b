"""CPU benchmark of rms_norm: kiln cpu vs torch eager (F.rms_norm) vs torch.compile, fp32,
same inputs in one process, at LLaMA-7B's hidden size.

    pytest bench/test_rms_norm_cpu.py --benchmark-json=bench/results/rms_norm_cpu.json
    python bench/report.py bench/results/rms_norm_cpu.json

Bytes counted (each (M, N) tensor touched once): forward reads x and writes y (2);
forward + backward adds reading x and dy and writing dx (5).
"""

import pytest
import torch
import torch.nn.functional as F

import kiln
from llm_ops_common import on_kiln_cpu, time_case

SHAPES = [(4096, 4096)]
IMPLS = ["kiln", "torch", "torch.compile"]
_compiled = {}


def _rms_norm(impl):
    if impl == "kiln":
        return on_kiln_cpu(lambda x, w: kiln.ops.rms_norm(x, w, 1e-6))
    eager = lambda x, w: F.rms_norm(x, x.shape[-1:], w, 1e-6)
    return eager if impl == "torch" else _compiled.setdefault("rms", torch.compile(eager))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_rms_norm(benchmark, mode, shape, impl):
    g = torch.Generator().manual_seed(0)
    grad = mode != "forward"
    x = torch.randn(shape, generator=g).requires_grad_(grad)
    w = torch.randn(shape[-1], generator=g).requires_grad_(grad)
    benchmark.group = f"rms_norm {mode} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(impl=impl, bytes=x.numel() * 4 * (2 if mode == "forward" else 5))
    time_case(benchmark, _rms_norm(impl), (x, w), mode)
