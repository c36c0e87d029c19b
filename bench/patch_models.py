"""CPU step time and peak memory of third-party models before and after kiln.patch.

    python bench/patch_models.py [--steps 5] [--cases gpt2,bert,...] [--out bench/results/patch_cpu.md]

Models are built from configs with random weights (nothing downloaded): GPT-2, BERT, ViT and a
LLaMA-style decoder with a 32k vocabulary (transformers), ResNet-18 and ViT-Tiny (timm). Memory: each
(model, variant) in a fresh process: build, one small warm-up step (numba compiles), then one
full forward+backward step whose peak RSS growth over the warm state is the "peak extra" memory
(glibc's mmap threshold fixed so that freed blocks leave RSS, as
bench/peak_memory_linear_cross_entropy.py). Time: all variants of a model in one process, their
forward+backward steps interleaved for ``--steps`` rounds (so a shared machine's load falls on
each alike), the median per variant.
Variants: ``torch`` (unpatched), ``kiln`` (kiln.patch(model)), and for the LLaMA model also
``kiln-no-lce`` (every kind but lm_head_loss: what the fused linear cross-entropy saves).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name: (library, what is measured)
CASES = {
    "gpt2": ("transformers", "GPT2LMHeadModel n_embd 256, 4 layers, 4 heads, vocab 50257; 4 x 128 tokens, labels"),
    "bert": ("transformers", "BertModel hidden 256, 4 layers, 4 heads, FFN 1024; 4 x 128 tokens, padding mask"),
    "vit": ("transformers", "ViTModel hidden 192, 6 layers, 3 heads, FFN 768; 8 images 224 x 224, patch 16"),
    "llama": ("transformers", "LlamaForCausalLM hidden 256, FFN 688, 4 layers, 4 heads (2 KV), vocab 32000; "
                              "4 x 256 tokens, labels"),
    "timm_resnet18": ("timm", "timm resnet18, 10 classes; 8 images 112 x 112"),
    "timm_vit_tiny": ("timm", "timm vit_tiny_patch16_224, 10 classes; 8 images 224 x 224"),
}


def _timm():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - pip's torchvision does not import beside a CUDA torch build
        sys.path.insert(0, str(REPO))
        from tests.test_patch import install_torchvision_stand_in

        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        install_torchvision_stand_in()
    import timm

    return timm


def build_model(case: str):
    """The case's model, from its config with random weights (seeded)."""
    import torch

    torch.manual_seed(0)
    if case == "timm_resnet18":
        return _timm().create_model("resnet18", pretrained=False, num_classes=10)
    if case == "timm_vit_tiny":
        return _timm().create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    import transformers

    transformers.logging.set_verbosity_error()
    if case == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=256, n_layer=4, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if case == "bert":
        return transformers.BertModel(transformers.BertConfig(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if case == "vit":
        return transformers.ViTModel(transformers.ViTConfig(
            image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
            intermediate_size=768, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if case == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512))
    raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")


def build_loss(case: str, model, warm: bool):
    """loss_fn(model) on the case's batch (CASES says which), or on a small warm-up batch."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    if case.startswith("timm") or case == "vit":
        size = 112 if case == "timm_resnet18" else 224
        B = 2 if warm else 8
        x = torch.randn(B, 3, size, size, generator=g)
        if case == "vit":
            return lambda m: m(x).last_hidden_state.square().mean()
        y = torch.randint(0, 10, (B,), generator=g)
        return lambda m: F.cross_entropy(m(x), y)
    B, T = (1, 16) if warm else (4, 256 if case == "llama" else 128)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    if case == "bert":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, T // 2:] = 0
        return lambda m: m(ids, attention_mask=mask).last_hidden_state.square().mean()
    return lambda m: m(ids, labels=ids).loss


def _variants(case: str) -> list:
    return ["torch", "kiln"] + (["kiln-no-lce"] if case == "llama" else [])


def _prepared(case: str, variant: str):
    """The model (train mode, patched per variant) after a small warm-up step, and the full-batch loss."""
    import kiln

    model = build_model(case)
    model.train()
    replaced = 0
    if variant != "torch":
        ops = [k for k in kiln.patch.KINDS if k != "lm_head_loss"] if variant == "kiln-no-lce" else None
        replaced = len(kiln.patch(model, ops=ops).replaced)
    _step(model, build_loss(case, model, warm=True))  # numba compiles here
    loss_fn = build_loss(case, model, warm=False)
    model.zero_grad(set_to_none=True)
    return model, loss_fn, replaced


def _step(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()


def measure_memory(case: str, variant: str) -> dict:
    """In this fresh process: peak RSS growth of one full forward+backward step over the warm state."""
    import resource

    model, loss_fn, replaced = _prepared(case, variant)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(model, loss_fn)
    return {"peak_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, "replaced": replaced}


def measure_time(case: str, steps: int) -> dict:
    """Every variant's model in this one process, their steps interleaved round by round, so that
    the load of a shared machine falls on all of them alike; the median step per variant."""
    import torch

    prepared = {v: _prepared(case, v) for v in _variants(case)}
    times: dict = {v: [] for v in prepared}
    for _ in range(steps):
        for variant, (model, loss_fn, _) in prepared.items():
            start = time.perf_counter()
            _step(model, loss_fn)
            times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()} | {"threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="write a markdown table here")
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--time", metavar="CASE", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.memory:
        print(json.dumps(measure_memory(*a.memory)))
        return
    if a.time:
        print(json.dumps(measure_time(a.time, a.steps)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "python"), os.environ.get("PYTHONPATH", "")) if p)}

    def child(*args):
        done = subprocess.run([sys.executable, __file__, *args, "--steps", str(a.steps)], capture_output=True,
                              text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{' '.join(args)} failed")
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = []
    for case in a.cases.split(","):
        library = CASES[case][0]
        if library == "transformers":
            try:
                __import__(library)
            except Exception as e:  # noqa: BLE001
                print(f"{case}: skipped, {library} does not import ({e})")
                continue
        results = {v: child("--memory", case, v) for v in _variants(case)}
        timed = child("--time", case)
        for variant, r in results.items():
            r["step_s"], r["threads"] = timed[variant], timed["threads"]
            print(f"{case:>14} {variant:>12}: step {r['step_s'] * 1e3:8.1f} ms, peak extra "
                  f"{r['peak_bytes'] / 2**20:7.1f} MiB, {r['replaced']} replaced", flush=True)
        rows.append((case, results))
    if a.out:
        write_markdown(Path(a.out), rows, a)


def write_markdown(path: Path, rows, a):
    import torch

    lines = [
        "# kiln.patch on third-party models: CPU step time and peak memory",
        "",
        f"Command: `python bench/patch_models.py --steps {a.steps} --out {path.as_posix()}`"
        + (f" (cases {a.cases})" if a.cases != ",".join(CASES) else ""),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores **shared with other "
        f"agents' jobs while this ran** (timings vary up to 2x run to run; compare within a row), torch "
        f"{torch.__version__}, {rows[0][1]['torch']['threads'] if rows else '?'} torch threads, float32, "
        f"training mode (forward + backward, dropout 0).",
        "",
        "Step: median forward+backward step, the variants of a model timed in one process with their steps "
        "interleaved round by round. Peak extra: growth of the process's peak RSS during one full step over "
        "its state after building the model and a small warm-up step (a fresh process per row, glibc mmap "
        "threshold 1 MiB). `kiln-no-lce`: kiln.patch with every kind but lm_head_loss, to separate the fused "
        "linear cross-entropy's share.",
        "",
        "| model | setup | variant | replaced | step (ms) | vs torch | peak extra (MiB) | vs torch |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, results in rows:
        torch_r = results["torch"]
        for variant, r in results.items():
            speed = torch_r["step_s"] / r["step_s"]
            mem = r["peak_bytes"] / torch_r["peak_bytes"] if torch_r["peak_bytes"] else float("nan")
            lines.append(f"| {case} | {CASES[case][1]} | {variant} | {r['replaced']} | {r['step_s'] * 1e3:.0f} | "
                         f"{speed:.2f}x | {r['peak_bytes'] / 2**20:.0f} | {mem:.2f}x |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
