"""CPU benchmark of kiln.nn.LSTM / GRU vs torch.nn.LSTM / GRU, fp32, same weights and inputs in
one process. No torch.compile column: Dynamo does not trace nn.LSTM / GRU (it graph-breaks
to eager unless torch._dynamo.config.allow_rnn), so it would time eager again.

    pytest bench/test_rnn_cpu.py --benchmark-json=bench/results/rnn_cpu.json
    python bench/report.py bench/results/rnn_cpu.json --out bench/results/rnn_cpu.md

FLOPs: 2 T B G H (I + H) per layer forward (G = 4 gates LSTM, 3 GRU), 3x that forward+backward.

On a shared machine, the interleaved form (kiln and torch alternating in one process, the
median of many repeats of each, and their ratio) is the one to trust:

    python bench/test_rnn_cpu.py [--repeats 15] [--issue14]
    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/test_rnn_cpu.py
"""

import argparse
import statistics

import pytest
import torch

import kiln
from common import interleaved_ms

# (T, B, input, hidden, layers); the last two are kiln issue 14's shapes.
SHAPES = [(128, 32, 256, 512, 1), (512, 8, 128, 256, 1), (64, 32, 256, 256, 1), (20, 8, 64, 64, 2)]


def _modules(kind, I, H, layers=1):
    theirs = getattr(torch.nn, kind)(I, H, layers)
    ours = getattr(kiln.nn, kind)(I, H, layers)
    ours.load_state_dict(theirs.state_dict())
    return {"kiln": ours, "torch": theirs}


@pytest.mark.parametrize("impl", ["kiln", "torch"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_rnn(benchmark, mode, shape, kind, impl):
    T, B, I, H, layers = shape
    torch.manual_seed(0)
    module = _modules(kind, I, H, layers)[impl]
    x = torch.randn(T, B, I, requires_grad=mode != "forward")
    benchmark.group = f"{kind} {mode} {_name(shape)}"
    benchmark.extra_info.update(impl=impl, flop=_flop(kind, shape, mode))
    step = _step(module, x, mode)
    step()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def _name(shape):
    T, B, I, H, layers = shape
    return f"T{T} B{B} in{I} h{H}" + (f" {layers} layers" if layers > 1 else "")


def _flop(kind, shape, mode):
    T, B, I, H, layers = shape
    G = 4 if kind == "LSTM" else 3
    per_layer = [2 * T * B * G * H * ((I if i == 0 else H) + H) for i in range(layers)]
    return sum(per_layer) * (1 if mode == "forward" else 3)


def _step(module, x, mode):
    def run():
        with kiln.backend.use("cpu"):
            return module(x)[0]

    if mode == "forward":
        def forward():
            with torch.no_grad():
                run()
        return forward
    return lambda: run().sum().backward()


def _interleaved(repeats, shapes):
    """kiln and torch alternating, each timed ``repeats`` times per shape and mode (the
    inner count keeps one timing above ~20 ms); prints a markdown table of medians and
    the ratio of the minima."""
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, medians of {repeats} interleaved "
          "repeats\n")
    print("| case | kiln ms | torch ms | torch/kiln | torch/kiln of the minima |\n|---|---|---|---|---|")
    for mode in ("forward", "forward+backward"):
        for kind in ("LSTM", "GRU"):
            for shape in shapes:
                T, B, I, H, layers = shape
                torch.manual_seed(0)
                modules = _modules(kind, I, H, layers)
                x = torch.randn(T, B, I, requires_grad=mode != "forward")
                steps = {impl: _step(m, x, mode) for impl, m in modules.items()}
                times = interleaved_ms(steps, repeats)
                ours, theirs = statistics.median(times["kiln"]), statistics.median(times["torch"])
                # On a loaded machine the minima (each side's least disturbed repeat) scatter
                # less than the medians.
                best = min(times["torch"]) / min(times["kiln"])
                print(f"| {kind} {mode} {_name(shape)} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f} "
                      f"| {best:.2f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--issue14", action="store_true", help="only kiln issue 14's two shapes")
    args = parser.parse_args()
    _interleaved(args.repeats, SHAPES[2:] if args.issue14 else SHAPES)
