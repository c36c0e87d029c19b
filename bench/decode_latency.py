"""Per-token decoding latency of the Transformer LM with and without the KV cache (notes 17.9):
with the cache each new token costs one position's work; without it the whole prefix is
recomputed, so the cost grows with the position.

    python bench/decode_latency.py --out bench/results/decode_latency

Writes decode_latency.md (a table) and decode_latency.png (ms per token against position).
Random weights: latency does not depend on what the model learned.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kiln.models.decoding import _Stepper
from kiln.models.transformer import TransformerConfig, TransformerLM


def per_token_ms(model, length: int, use_cache: bool, repeats: int) -> list[float]:
    """Median over ``repeats`` of the time to produce token t, for t = 1..length."""
    times = [[] for _ in range(length)]
    for _ in range(repeats):
        stepper = _Stepper(model, 1, use_cache)
        sequence = torch.zeros(1, 1, dtype=torch.long)
        for t in range(length):
            start = time.perf_counter()
            token = stepper.logits(sequence).argmax(-1, keepdim=True)
            times[t].append((time.perf_counter() - start) * 1e3)
            sequence = torch.cat([sequence, token], dim=1)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/decode_latency", help="output path without extension")
    parser.add_argument("--length", type=int, default=256, help="tokens to generate")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (the median is reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=128, block_size=args.length + 1, dim=128, depth=3, heads=4, dropout=0.0)
    model = TransformerLM(config).eval()
    with torch.no_grad():
        cached = per_token_ms(model, args.length, True, args.repeats)
        recomputed = per_token_ms(model, args.length, False, args.repeats)
    rows = [(t, cached[t - 1], recomputed[t - 1]) for t in (1, 16, 64, 128, 192, args.length) if t <= args.length]
    lines = [f"Per-token latency, Transformer LM (dim 128, depth 3, 4 heads; the charlm model), batch 1, CPU,",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs:",
             f"`python bench/decode_latency.py --length {args.length}`. Load average while measuring: "
             f"{__import__('os').getloadavg()[0]:.1f} on {__import__('os').cpu_count()} cores (a shared machine "
             "inflates every time; read the trend along a column).", "",
             "| position | with KV cache, ms | recomputing the prefix, ms |", "|---|---|---|"]
    lines += [f"| {t} | {c:.2f} | {r:.2f} |" for t, c, r in rows]
    lines += ["", f"Tokens per second over the whole {args.length}: with the cache "
                  f"{args.length / sum(cached) * 1e3:.0f}, recomputing {args.length / sum(recomputed) * 1e3:.0f}."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    positions = range(1, args.length + 1)
    ax.plot(positions, cached, label="with KV cache")
    ax.plot(positions, recomputed, label="recomputing the prefix")
    ax.set(xlabel="position of the generated token", ylabel="ms per token", title="Decoding latency per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
