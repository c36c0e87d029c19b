"""`kiln bench`: time each case's kiln forms against torch eager and torch.compile in one
process, on the same inputs, and write a JSON, a markdown table and plots.

Timing: on CPU the median of rounds of back-to-back calls (each round at least ``min_round_s``);
on CUDA ``triton.testing.do_bench`` (median). The roofs a rate is compared with are measured here
too: a copy of a large tensor (bytes read + written per second) and a large matmul.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

MODES = ("forward", "forward+backward")


def time_cpu(fn: Callable, rounds: int = 7, min_round_s: float = 0.05) -> float:
    """Median seconds per call."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, math.ceil(min_round_s / once))
    if once > 0.25:  # a slow case: three rounds of one call keep a full sweep within minutes
        rounds = min(rounds, 3)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def time_cuda(fn: Callable) -> float:
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median") * 1e-3


def measure_roofs(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """Copy bandwidth (GB/s, read + write) and matmul rate (GFLOP/s) measured on this machine."""
    timer = time_cuda if device.type == "cuda" else time_cpu
    n = (1 << 24) if quick or device.type == "cpu" else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src))
    m = 1024 if quick else (2048 if device.type == "cpu" else 8192)
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    mm_s = timer(lambda: a @ b)
    return {"copy_GBps": 2 * n / copy_s / 1e9, "matmul_GFLOPs": 2 * m ** 3 / mm_s / 1e9,
            "copy_bytes": 2 * n, "matmul_size": m}


def kiln_backends(device: torch.device) -> list[str]:
    if device.type == "cpu":
        return ["cpu"]
    from kiln import backend

    names = ["triton"]
    try:
        backend.cuda_extension()
        names.append("cuda")
    except backend.BackendError:
        pass
    return names


def _call(fn: Callable, args: tuple, mode: str) -> Callable:
    if mode == "forward":
        def forward():
            with torch.no_grad():
                fn(*args)
        return forward
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    # a dense random gradient per output: a .sum() would hand backward a broadcast scalar that
    # torch's own backward uses without materializing it, unlike a real upstream gradient
    seeds = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]

    def forward_backward():
        torch.autograd.backward(fn(*args), seeds)
    return forward_backward


def _with_backend(fn: Callable, name: str) -> Callable:
    import kiln

    def run(*args):
        with kiln.backend.use(name):
            return fn(*args)
    return run


def run(cases, device: torch.device, dtype: torch.dtype = torch.float32, modes=MODES, compile: bool = True,
        progress: bool = True, quick: bool = False) -> dict:
    """Time every case in every mode; returns {"machine": ..., "roofs": ..., "rows": [...]}."""
    from tqdm import tqdm

    timer = time_cuda if device.type == "cuda" else time_cpu
    rounds = {"rounds": 3, "min_round_s": 0.02} if quick and device.type == "cpu" else {}
    rows = []
    # a model case is a training step (forward+backward only); an optimizer step has no backward
    jobs = [(c, m) for c in cases for m in modes
            if not ("model" in c.tags and m == "forward") and not ("step" in c.tags and m != "forward")]
    bar = tqdm(jobs, disable=not progress, desc="kiln bench", unit="case")
    for case, mode in bar:
        bar.set_postfix_str(f"{case.op} {case.label} {mode}", refresh=False)
        grad = mode != "forward"
        workload = case.build(device, dtype, grad)
        impls = {f"kiln[{name}]": _with_backend(workload.kiln, name) for name in kiln_backends(device)}
        impls["torch"] = workload.torch
        if compile and workload.compile:
            impls["torch.compile"] = torch.compile(workload.torch)
        index = MODES.index(mode)
        for impl, fn in impls.items():
            row = {"op": case.op, "case": case.label, "size": case.size, "mode": mode, "impl": impl,
                   "bytes": workload.bytes[index], "flop": workload.flop[index], "model": "model" in case.tags}
            try:
                call = _call(fn, workload.args, mode)
                row["seconds"] = timer(call, **rounds) if device.type == "cpu" else timer(call)
            except Exception as e:  # one failing baseline (a compile error, say) must not end the run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            rows.append(row)
    return {"machine": machine_info(device), "dtype": str(dtype).removeprefix("torch."), "rows": rows}


def _cpu_name() -> str:
    try:  # Linux names the model; platform.processor() is often empty or just the architecture
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import kiln

    info = {"platform": platform.platform(), "processor": _cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "kiln": kiln.__version__,
            "device": device.type, "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------------
# reports


def _rate(row: dict, roofs: dict) -> tuple[str, str]:
    """kiln's achieved rate and its fraction of the machine's measured roof."""
    s = row.get("seconds")
    if s is None:
        return "-", "-"
    if row["flop"]:
        rate = row["flop"] / s / 1e9
        return f"{rate:.0f} GFLOP/s", f"{rate / roofs['matmul_GFLOPs']:.0%}"
    if row["bytes"]:
        rate = row["bytes"] / s / 1e9
        return f"{rate:.1f} GB/s", f"{rate / roofs['copy_GBps']:.0%}"
    return "-", "-"


def markdown(result: dict) -> str:
    rows, roofs = result["rows"], result["roofs"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    kiln_impls = [i for i in impls if i.startswith("kiln")]
    baselines = [i for i in impls if not i.startswith("kiln")]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["mode"]), {})[r["impl"]] = r
    header = ["op", "case", "mode"]
    for k in kiln_impls:
        header += [f"{k} ms", "rate", "of roof"]
    for b in baselines:
        header += [f"{b} ms", f"{b} / {kiln_impls[0]}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (op, case, mode), by_impl in groups.items():
        cells = [op, case, mode]
        for k in kiln_impls:
            r = by_impl.get(k, {})
            cells += [_ms(r), *_rate(r, roofs)] if r else ["-", "-", "-"]
        base = by_impl.get(kiln_impls[0], {}).get("seconds")
        for b in baselines:
            r = by_impl.get(b, {})
            s = r.get("seconds")
            cells += [_ms(r), f"{s / base:.2f}x" if s and base else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    where = m.get("gpu") or f"{m['processor']}, {m['threads']} threads"
    title = (f"kiln bench on {where}, torch {m['torch']}, {result['dtype']}, {m['date']}. "
             f"Roofs measured in the same run: copy {roofs['copy_GBps']:.1f} GB/s, "
             f"matmul {roofs['matmul_GFLOPs']:.0f} GFLOP/s. Ratios > 1: kiln is faster.")
    errors = [f"- {r['op']} {r['case']} {r['mode']} {r['impl']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([title, "", *lines, *([""] + ["Errors:"] + errors if errors else [])]) + "\n"


def summary(result: dict) -> str:
    """One row per case: kiln's time and torch eager's and torch.compile's over it, forward and
    forward+backward side by side (the README's "Benchmarks" table)."""
    rows = [r for r in result["rows"] if "seconds" in r]
    kiln_impl = next((r["impl"] for r in rows if r["impl"].startswith("kiln")), None)
    cases: dict[tuple, dict] = {}
    for r in rows:
        cases.setdefault((r["op"], r["case"]), {})[(r["mode"], r["impl"])] = r["seconds"]
    lines = ["| op | case | kiln fwd ms | eager / kiln | compile / kiln | kiln fwd+bwd ms | eager / kiln | compile / kiln |",
             "|---|---|---|---|---|---|---|---|"]
    for (op, case), t in cases.items():
        cells = [op, case]
        for mode in MODES:
            ours = t.get((mode, kiln_impl))
            cells.append(f"{ours * 1e3:.3f}" if ours else "-")
            for impl in ("torch", "torch.compile"):
                theirs = t.get((mode, impl))
                cells.append(f"{theirs / ours:.2f}x" if ours and theirs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    m, roofs = result["machine"], result["roofs"]
    where = m.get("gpu") or f"{m['processor']}, {m['threads']} threads"
    head = (f"{kiln_impl} on {where}, torch {m['torch']}, {result['dtype']}, {m['date']}; copy "
            f"{roofs['copy_GBps']:.1f} GB/s and matmul {roofs['matmul_GFLOPs']:.0f} GFLOP/s measured in the "
            f"same run. Ratios are torch's time over kiln's (> 1: kiln is faster); an optimizer step has "
            f"no backward, a model step no forward-only row.")
    return "\n".join([head, "", *lines]) + "\n"


def _ms(row: dict) -> str:
    if "seconds" in row:
        return f"{row['seconds'] * 1e3:.3f}"
    return "error" if "error" in row else "-"


def plot(result: dict, out_dir: Path) -> list[Path]:
    """time_vs_size.png (per op, per mode, every impl) and roofs.png (kiln's fraction of the roof)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "seconds" in r and not r["model"]]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    paths = []
    if ops:
        cols = min(3, len(ops))
        fig, axes = plt.subplots(math.ceil(len(ops) / cols), cols, figsize=(5 * cols, 3.6 * math.ceil(len(ops) / cols)),
                                 squeeze=False)
        for ax, op in zip(axes.flat, ops):
            for impl in dict.fromkeys(r["impl"] for r in rows):
                for mode, style in zip(MODES, ("-o", "--s")):
                    pts = sorted((r["size"], r["seconds"] * 1e3) for r in rows
                                 if r["op"] == op and r["impl"] == impl and r["mode"] == mode)
                    if pts:
                        ax.plot(*zip(*pts), style, label=f"{impl} {'fwd' if mode == 'forward' else 'fwd+bwd'}")
            ax.set(xscale="log", yscale="log", title=op, xlabel="size (elements or FLOPs)", ylabel="ms")
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(ops):]:
            ax.axis("off")
        fig.tight_layout()
        paths.append(out_dir / "time_vs_size.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    kiln_rows = [r for r in rows if r["impl"].startswith("kiln") and (r["flop"] or r["bytes"])]
    if kiln_rows:
        roofs = result["roofs"]
        fractions = [(r["flop"] / r["seconds"] / 1e9 / roofs["matmul_GFLOPs"]) if r["flop"]
                     else (r["bytes"] / r["seconds"] / 1e9 / roofs["copy_GBps"]) for r in kiln_rows]
        labels = [f"{r['op']} {r['case']} {'fwd' if r['mode'] == 'forward' else 'f+b'} {r['impl'][5:-1]}"
                  for r in kiln_rows]
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(labels) + 1.2))
        colors = ["tab:orange" if r["flop"] else "tab:blue" for r in kiln_rows]
        ax.barh(range(len(labels)), fractions, color=colors)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("kiln's rate / measured roof (blue: copy bandwidth, orange: matmul rate)")
        ax.invert_yaxis()
        fig.tight_layout()
        paths.append(out_dir / "roofs.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench.md").write_text(markdown(result))
    return [out_dir / "bench.json", out_dir / "bench.md", *plot(result, out_dir)]


def main(names: Optional[list[str]], device: str, quick: bool, out: str, compile: bool = True,
         progress: bool = True, modes=MODES, command: Optional[str] = None) -> dict:
    from . import cases as case_table

    selected = case_table.select(names, quick)
    device = torch.device(device)
    dtype = torch.float32
    roofs = measure_roofs(device, dtype, quick)
    result = run(selected, device, dtype, modes=modes, compile=compile, progress=progress, quick=quick)
    result["roofs"] = roofs
    if command:
        result["command"] = command
    paths = write(result, Path(out))
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return result
