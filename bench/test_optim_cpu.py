"""CPU benchmark of one optimizer step: kiln's fused numba step vs torch's fastest CPU form
(fused=True for Adam, AdamW and SGD, foreach=True for RMSprop, which has no fused form)
and a torch copy moving the same number of bytes (the memory roof), fp32, one process.

    pytest bench/test_optim_cpu.py --benchmark-json=bench/results/optim_cpu.json
    python bench/report.py bench/results/optim_cpu.json --out bench/results/optim_cpu.md

200 float32 tensors totalling 20M elements (sizes spread over three orders of magnitude,
as a model's weights and biases). Bytes counted once per tensor touched: Adam / AdamW read
p, g, m, v and write p, m, v (7 x 4 bytes per element); SGD with momentum reads p, g, buf
and writes p, buf (5); RMSprop reads p, g, square_avg and writes p, square_avg (5).
"""

import pytest
import torch

import kiln
import kiln.optim

TOTAL = 20_000_000
TENSORS = 200
CASES = {
    "Adam": (dict(lr=1e-3), dict(fused=True), 7),
    "AdamW": (dict(lr=1e-3), dict(fused=True), 7),
    "SGD momentum": (dict(lr=1e-3, momentum=0.9), dict(fused=True), 5),
    "RMSprop": (dict(lr=1e-3), dict(foreach=True), 5),
}
IMPLS = ["kiln", "torch", "copy (same bytes)"]


def _sizes():
    g = torch.Generator().manual_seed(0)
    weights = torch.exp(torch.rand(TENSORS, generator=g) * 7)  # sizes from ~1 to ~1100 (relative)
    sizes = (weights / weights.sum() * TOTAL).long().clamp_min(1)
    sizes[0] += TOTAL - sizes.sum()
    return sizes.tolist()


def _params():
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g).requires_grad_() for s in _sizes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_step(benchmark, name, impl):
    kw, torch_flags, tensors_touched = CASES[name]
    cls = name.split()[0]
    nbytes = tensors_touched * 4 * TOTAL
    benchmark.group = f"{name} step, {TENSORS} tensors, {TOTAL // 10**6}M fp32"
    benchmark.extra_info.update(impl=impl, bytes=nbytes)
    if impl == "copy (same bytes)":
        src = torch.randn(nbytes // 8)  # read + write of this copy: nbytes
        dst = torch.empty_like(src)
        benchmark.pedantic(lambda: dst.copy_(src), rounds=10, warmup_rounds=2)
        return
    params = _params()
    if impl == "kiln":
        opt = getattr(kiln.optim, cls)(params, **kw)
        with kiln.backend.use("cpu"):
            benchmark.pedantic(opt.step, rounds=10, warmup_rounds=2)
    else:
        opt = getattr(torch.optim, cls)(params, **kw, **torch_flags)
        benchmark.pedantic(opt.step, rounds=10, warmup_rounds=2)


def interleaved(repeats: int = 15) -> None:
    """kiln bench's optimizer cases (python/kiln/bench/cases.py) timed in interleaved rounds
    (bench/common.py): kiln, torch fused and a copy of the same bytes take turns, so a
    shared machine's load hits each alike. Prints median ms, kiln's speed relative to
    torch (> 1: kiln faster) and GB/s of each against the copy.

        OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/test_optim_cpu.py
    """
    import statistics
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import interleaved_ms

    from kiln.bench.cases import CASES

    print(f"{torch.get_num_threads()} threads, median of {repeats} interleaved rounds")
    print("| case | kiln ms | torch ms | torch / kiln | kiln GB/s | torch GB/s | copy GB/s |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        if "step" not in case.tags:
            continue
        work = case.build(torch.device("cpu"), torch.float32, False)
        nbytes = work.bytes[0]
        src = torch.empty(int(nbytes) // 8)  # a copy reads and writes: nbytes in all
        dst = torch.empty_like(src)
        with kiln.backend.use("cpu"):
            ms = interleaved_ms({"kiln": work.kiln, "torch": work.torch, "copy": lambda: dst.copy_(src)}, repeats)
        med = {k: statistics.median(v) for k, v in ms.items()}
        rate = {k: nbytes / (v * 1e-3) / 1e9 for k, v in med.items()}
        print(f"| {case.op} {case.label} | {med['kiln']:.3f} | {med['torch']:.3f} | "
              f"{med['torch'] / med['kiln']:.2f}x | {rate['kiln']:.1f} | {rate['torch']:.1f} | {rate['copy']:.1f} |")


if __name__ == "__main__":
    interleaved()
