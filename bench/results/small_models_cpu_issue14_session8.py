"""The training steps of `kiln bench`'s model cases, kiln and torch alternating step by step, and the
floors of a Python autograd.Function (issue 14, session 8; results in small_models_cpu_issue14_session8.md).

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/results/small_models_cpu_issue14_session8.py [--models mlp vit] [--reps 300]

For the mlp it also times the step with each kiln Linear replaced by a minimal autograd.Function
(addmm + relu_ forward; threshold_backward, mm, mm, sum backward): the floor of any op written as a
Python Function. Last, the cost of a Function node itself: chains of 20 `a * 1.0` as an empty
Function against torch's C++ mul node, forward and backward.
"""
import argparse
import statistics
import time

import torch

import kiln
from kiln.bench import cases, runner


def interleaved(fns: dict, reps: int, inner: int) -> None:
    """Each function `inner` times in turn, `reps` rounds; min and median microseconds per call."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter_ns()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter_ns() - start) / inner / 1e3)
    for name, ts in times.items():
        print(f"  {name:44s} min {min(ts):9.1f} us  median {statistics.median(ts):9.1f} us")


class _MinimalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        y = torch.addmm(bias, x, weight.t())
        if relu:
            torch.relu_(y)
        ctx.save_for_backward(x, weight, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        dz = torch.ops.aten.threshold_backward(grad, y, 0) if y is not None else grad
        return (torch.mm(dz, weight) if ctx.needs_input_grad[0] else None, torch.mm(dz.t(), x), dz.sum(0), None)


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mlp", "vit"])
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for case in cases.select(args.models, False):
        workload = case.build(torch.device("cpu"), torch.float32, True)
        ours = runner._call(runner._with_backend(workload.kiln, "cpu"), workload.args, "forward_backward")
        theirs = runner._call(workload.torch, workload.args, "forward_backward")
        fns = {"kiln": ours, "torch": theirs}
        if case.op == "mlp":
            def minimal(self, x):
                return _MinimalLinear.apply(x, self.weight, self.bias, self.activation == "relu")

            def with_minimal():
                real, kiln.nn.Linear.forward = kiln.nn.Linear.forward, minimal
                try:
                    ours()
                finally:
                    kiln.nn.Linear.forward = real
            fns["kiln Linear as a minimal autograd.Function"] = with_minimal
        for fn in fns.values():  # numba compiles on first use
            for _ in range(5):
                fn()
        print(f"{case.op}: {case.label}, training step")
        reps = args.reps if case.op == "mlp" else max(10, args.reps // 10)
        interleaved(fns, reps, 3 if case.op == "mlp" else 1)

    x = torch.randn(1, requires_grad=True)

    def chain(step):
        def run():
            y = x
            for _ in range(20):
                y = step(y)
            y.backward()
        return run
    print("20 autograd nodes, forward and backward")
    interleaved({"torch's C++ mul": chain(lambda y: y * 1.0), "an empty Python Function": chain(_Empty.apply)},
                args.reps, 3)


if __name__ == "__main__":
    main()
