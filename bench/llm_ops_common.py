"""What the LLM-op CPU benchmarks (test_rms_norm_cpu.py, test_gated_cpu.py,
test_rotary_cpu.py) share: the kiln cpu wrapper and the timing of one case."""

import torch

import kiln

ROUNDS, WARMUP = 5, 1


def on_kiln_cpu(fn):
    def run(*args):
        with kiln.backend.use("cpu"):
            return fn(*args)
    return run


def _loss(out):
    """A scalar whose gradient is 1 in every output element (one or several outputs)."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum(o.sum() for o in outs)


def time_case(benchmark, fn, args, mode):
    """forward under no_grad, or forward + backward of the sum of the outputs."""
    if mode == "forward":
        with torch.no_grad():
            fn(*args)
            benchmark.pedantic(fn, args=args, rounds=ROUNDS, warmup_rounds=WARMUP)
    else:
        step = lambda: _loss(fn(*args)).backward()
        step()
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
