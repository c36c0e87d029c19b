"""CPU benchmark of rotary_embedding (rotate-half): kiln cpu vs torch eager (HF's
apply_rotary_pos_emb: q * cos + rotate_half(q) * sin, for q and k) vs torch.compile, fp32,
same inputs in one process, at LLaMA-7B's attention shape (B 2, H 32, T 2048, D 128) and a
grouped-query one (8 kv heads).

    pytest bench/test_rotary_cpu.py --benchmark-json=bench/results/rotary_cpu.json
    python bench/report.py bench/results/rotary_cpu.json

Bytes counted (q and k touched once each; cos / sin are B T D, small): forward reads q, k
and writes q_rot, k_rot (2 (q + k)); forward + backward adds reading dq_rot, dk_rot and
writing dq, dk (4 (q + k)).
"""

import pytest
import torch

import kiln
from llm_ops_common import hf_rope, on_kiln_cpu, time_case

CASES = [(2, 32, 32, 2048, 128), (2, 32, 8, 2048, 128)]  # B, Hq, Hk, T, D
IMPLS = ["kiln", "torch", "torch.compile"]
_compiled = {}


def _fn(impl):
    if impl == "kiln":
        return on_kiln_cpu(lambda q, k, cos, sin: kiln.ops.rotary_embedding(q, k, cos, sin))
    return hf_rope if impl == "torch" else _compiled.setdefault("rope", torch.compile(hf_rope))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hq{}_Hk{}_T{}_D{}".format(*c))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_rotary(benchmark, mode, case, impl):
    B, Hq, Hk, T, D = case
    g = torch.Generator().manual_seed(0)
    grad = mode != "forward"
    q = torch.randn(B, Hq, T, D, generator=g).requires_grad_(grad)
    k = torch.randn(B, Hk, T, D, generator=g).requires_grad_(grad)
    f = torch.arange(T)[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    emb = torch.cat((f, f), -1)[None]
    cos, sin = emb.cos(), emb.sin()
    benchmark.group = f"rotary {mode} B{B} Hq{Hq} Hk{Hk} T{T} D{D}"
    elems = q.numel() + k.numel()
    benchmark.extra_info.update(impl=impl, bytes=elems * 4 * (2 if mode == "forward" else 4))
    time_case(benchmark, _fn(impl), (q, k, cos, sin), mode)
