"""What the benchmarks share: the torch baselines and the table writer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ops.linear_act import TORCH_ACTIVATIONS


def torch_linear_act(x, weight, bias, activation):
    """PyTorch eager: one addmm (bias folded into the GEMM), then the activation pass."""
    return TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def copy_bandwidth() -> float:
    """Device-to-device copy of 256 MiB, bytes read + written per second, in GB/s: the
    roof a memory-bound kernel is measured against."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def interleaved_ms(steps: dict, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each of ``steps`` (name -> callable), measured in rounds that
    run every step in turn, so a load that comes and goes hits each side alike: ``repeats``
    samples each, of enough calls (after one warm call each) to make ~40 ms a sample."""
    import time

    start = time.perf_counter()
    for step in steps.values():
        step()
    inner = max(1, int(0.04 / max(time.perf_counter() - start, 1e-6)))
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                step()
            times[name].append((time.perf_counter() - start) / inner * 1e3)
    return times
