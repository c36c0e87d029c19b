"""CPU benchmark of kiln.nn.LSTM / GRU vs torch.nn.LSTM / GRU, fp32, same weights and inputs in
one process. No torch.compile column: Dynamo does not trace nn.LSTM / GRU (it graph-breaks
to eager unless torch._dynamo.config.allow_rnn), so it would time eager again.

    pytest bench/test_rnn_cpu.py --benchmark-json=bench/results/rnn_cpu.json
    python bench/report.py bench/results/rnn_cpu.json --out bench/results/rnn_cpu.md

FLOPs: 2 T B G H (I + H) per layer forward (G = 4 gates LSTM, 3 GRU), 3x that forward+backward.
"""

import pytest
import torch

import kiln

SHAPES = [(128, 32, 256, 512), (512, 8, 128, 256)]  # (T, B, input, hidden)


def _modules(kind, I, H):
    theirs = getattr(torch.nn, kind)(I, H)
    ours = getattr(kiln.nn, kind)(I, H)
    ours.load_state_dict(theirs.state_dict())
    return {"kiln": ours, "torch": theirs}


@pytest.mark.parametrize("impl", ["kiln", "torch"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_rnn(benchmark, mode, shape, kind, impl):
    T, B, I, H = shape
    torch.manual_seed(0)
    module = _modules(kind, I, H)[impl]
    x = torch.randn(T, B, I, requires_grad=mode != "forward")
    G = 4 if kind == "LSTM" else 3
    benchmark.group = f"{kind} {mode} T{T} B{B} in{I} h{H}"
    benchmark.extra_info.update(impl=impl, flop=2 * T * B * G * H * (I + H) * (1 if mode == "forward" else 3))

    def run():
        with kiln.backend.use("cpu"):
            return module(x)[0]

    if mode == "forward":
        with torch.no_grad():
            run()
            benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    else:
        step = lambda: run().sum().backward()
        step()
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
