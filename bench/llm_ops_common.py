"""What the LLM-op benchmarks (test_rms_norm_cpu.py, test_gated_cpu.py, test_rotary_cpu.py,
gpu_llm_ops.py) share: the kiln cpu wrapper, the timing of one CPU case, HF's RoPE."""

import torch

import kiln

ROUNDS, WARMUP = 5, 1


def hf_rope(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb (unsqueeze_dim=1): the torch baseline."""
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def on_kiln_cpu(fn):
    def run(*args):
        with kiln.backend.use("cpu"):
            return fn(*args)
    return run


def time_case(benchmark, fn, args, mode):
    """forward under no_grad, or forward + backward with a dense random gradient for each
    output (as bench/test_norm_cpu.py: a .sum() would hand backward a broadcast scalar
    that torch's own backward uses without materializing it, unlike a real upstream grad)."""
    if mode == "forward":
        with torch.no_grad():
            fn(*args)
            benchmark.pedantic(fn, args=args, rounds=ROUNDS, warmup_rounds=WARMUP)
    else:
        with torch.no_grad():
            outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]
        step = lambda: torch.autograd.backward(fn(*args), grads)
        step()
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
