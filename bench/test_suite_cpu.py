"""`kiln bench`'s cases under pytest-benchmark: the same workloads (python/kiln/bench/cases.py),
timed by pytest-benchmark's engine, kiln cpu vs torch eager vs torch.compile.

    pytest bench/test_suite_cpu.py --benchmark-json=bench/results/suite_cpu.json
    python bench/report.py bench/results/suite_cpu.json --out bench/results/suite_cpu.md

`-k quick` keeps the --quick sweep.
"""

import pytest
import torch

import kiln
from kiln.bench.cases import CASES
from kiln.bench.runner import _call

IMPLS = ["kiln", "torch", "torch.compile"]
_compiled = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op} {c.label}{' quick' if c.quick else ''}")
def test_case(benchmark, case, mode, impl):
    if "model" in case.tags and mode == "forward":
        pytest.skip("model cases time a training step only")
    workload = case.build(torch.device("cpu"), torch.float32, mode != "forward")
    if impl == "torch.compile" and not workload.compile:
        pytest.skip("torch.compile would time eager again (Dynamo does not trace this module)")
    if impl == "kiln":
        def fn(*args):
            with kiln.backend.use("cpu"):
                return workload.kiln(*args)
    elif impl == "torch":
        fn = workload.torch
    else:
        fn = torch.compile(workload.torch)
    index = 0 if mode == "forward" else 1
    benchmark.group = f"{case.op} {case.label} {mode}"
    info = {"impl": impl}
    if workload.flop[index]:
        info["flop"] = workload.flop[index]
    elif workload.bytes[index]:
        info["bytes"] = workload.bytes[index]
    benchmark.extra_info.update(info)
    call = _call(fn, workload.args, mode)
    benchmark.pedantic(call, rounds=5, warmup_rounds=1)
