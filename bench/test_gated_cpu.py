"""CPU benchmark of swiglu and geglu (tanh): kiln cpu vs torch eager (F.silu(g) * u,
F.gelu(g, approximate="tanh") * u) vs torch.compile, fp32, same inputs in one process, at
LLaMA-7B's MLP width (4096 tokens x 11008).

    pytest bench/test_gated_cpu.py --benchmark-json=bench/results/gated_cpu.json
    python bench/report.py bench/results/gated_cpu.json

Bytes counted (each (M, N) tensor touched once): forward reads gate and up and writes y
(3); forward + backward adds reading dy, gate, up and writing dgate, dup (8).
"""

import pytest
import torch
import torch.nn.functional as F

import kiln
from llm_ops_common import on_kiln_cpu, time_case

SHAPES = [(4096, 11008)]
IMPLS = ["kiln", "torch", "torch.compile"]
OPS = {
    "swiglu": (lambda g, u: kiln.ops.swiglu(g, u), lambda g, u: F.silu(g) * u),
    "geglu_tanh": (lambda g, u: kiln.ops.geglu(g, u, "tanh"), lambda g, u: F.gelu(g, approximate="tanh") * u),
}
_compiled = {}


def _fn(op, impl):
    ours, eager = OPS[op]
    if impl == "kiln":
        return on_kiln_cpu(ours)
    return eager if impl == "torch" else _compiled.setdefault(op, torch.compile(eager))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("op", list(OPS))
def test_gated(benchmark, op, mode, shape, impl):
    g = torch.Generator().manual_seed(0)
    grad = mode != "forward"
    gate = torch.randn(shape, generator=g).requires_grad_(grad)
    up = torch.randn(shape, generator=g).requires_grad_(grad)
    benchmark.group = f"{op} {mode} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(impl=impl, bytes=gate.numel() * 4 * (3 if mode == "forward" else 8))
    time_case(benchmark, _fn(op, impl), (gate, up), mode)
