"""What `kiln bench` times: for each op, a sweep of sizes, kiln's function and PyTorch's on the
same inputs, and the floor (bytes that must move, FLOPs that must run) each is measured against.

A case's ``build(device, dtype, grad)`` returns a ``Workload``: the inputs, kiln's function, the
torch eager function (torch.compile of it is the third column), and the bytes and FLOPs of one
forward and of one forward+backward. Bytes count each tensor touched once (the floor of a
memory-bound op), FLOPs count multiply-adds twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class Workload:
    args: tuple
    kiln: Callable
    torch: Callable
    bytes: tuple[float, float] = (0.0, 0.0)     # forward, forward+backward
    flop: tuple[float, float] = (0.0, 0.0)
    compile: bool = True                       # False where torch.compile would only time eager again


@dataclass
class Case:
    op: str
    label: str                                 # the size, as the tables print it
    size: float                                # the x axis of the plots (elements or FLOPs)
    build: Callable[[torch.device, torch.dtype, bool], Workload]
    quick: bool = False                        # in the --quick sweep
    tags: tuple[str, ...] = field(default_factory=tuple)


def _randn(*shape, device, dtype, grad=False, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_(grad)


def _size(nbytes_per: int, *dims) -> float:
    n = 1
    for d in dims:
        n *= d
    return float(n * nbytes_per)


# ------------------------------------------------------------------------------------------------
# ops


def linear_act_case(M, K, N, activation="gelu", quick=False):
    def build(device, dtype, grad):
        import kiln
        from kiln.ops.linear_act import TORCH_ACTIVATIONS

        x = _randn(M, K, device=device, dtype=dtype, grad=grad)
        w = _randn(N, K, device=device, dtype=dtype, grad=grad, scale=K ** -0.5)
        b = _randn(N, device=device, dtype=dtype, grad=grad)
        flop = 2.0 * M * K * N
        return Workload((x, w, b), lambda x, w, b: kiln.ops.linear_act(x, w, b, activation),
                        lambda x, w, b: TORCH_ACTIVATIONS[activation](F.linear(x, w, b)),
                        flop=(flop, 3 * flop))
    return Case("linear_act", f"{M}x{K}x{N} {activation}", 2.0 * M * K * N, build, quick)


def cross_entropy_case(N, V, quick=False):
    def build(device, dtype, grad):
        import kiln

        logits = _randn(N, V, device=device, dtype=dtype, grad=grad)
        target = torch.randint(0, V, (N,), device=device)
        e = logits.element_size()
        return Workload((logits, target), kiln.ops.cross_entropy, F.cross_entropy,
                        bytes=(N * V * e, 3 * N * V * e))
    return Case("cross_entropy", f"{N}x{V}", float(N * V), build, quick)


def softmax_case(N, V, quick=False):
    def build(device, dtype, grad):
        import kiln

        x = _randn(N, V, device=device, dtype=dtype, grad=grad)
        e = x.element_size()
        return Workload((x,), lambda x: kiln.ops.softmax(x, -1), lambda x: torch.softmax(x, -1),
                        bytes=(2 * N * V * e, 5 * N * V * e))
    return Case("softmax", f"{N}x{V}", float(N * V), build, quick)


def linear_cross_entropy_case(N, H, V, quick=False):
    def build(device, dtype, grad):
        import kiln

        h = _randn(N, H, device=device, dtype=dtype, grad=grad)
        w = _randn(V, H, device=device, dtype=dtype, grad=grad, scale=H ** -0.5)
        t = torch.randint(0, V, (N,), device=device)
        flop = 2.0 * N * H * V
        return Workload((h, w, t), kiln.ops.linear_cross_entropy,
                        lambda h, w, t: F.cross_entropy(F.linear(h, w), t), flop=(flop, 3 * flop))
    return Case("linear_cross_entropy", f"{N}x{H}x{V}", 2.0 * N * H * V, build, quick)


def layer_norm_case(N, D, quick=False):
    def build(device, dtype, grad):
        import kiln

        x = _randn(N, D, device=device, dtype=dtype, grad=grad)
        w, b = _randn(D, device=device, dtype=dtype, grad=grad), _randn(D, device=device, dtype=dtype, grad=grad)
        e = x.element_size()
        return Workload((x, w, b), lambda x, w, b: kiln.ops.layer_norm(x, (D,), w, b),
                        lambda x, w, b: F.layer_norm(x, (D,), w, b), bytes=(2 * N * D * e, 5 * N * D * e))
    return Case("layer_norm", f"{N}x{D}", float(N * D), build, quick)


def batch_norm_case(N, C, H, W, quick=False):
    def build(device, dtype, grad):
        import kiln

        x = _randn(N, C, H, W, device=device, dtype=dtype, grad=grad)
        w, b = _randn(C, device=device, dtype=dtype, grad=grad), _randn(C, device=device, dtype=dtype, grad=grad)
        rm, rv = torch.zeros(C, device=device, dtype=dtype), torch.ones(C, device=device, dtype=dtype)
        n = x.numel() * x.element_size()
        return Workload((x, w, b, rm, rv), lambda x, w, b, rm, rv: kiln.ops.batch_norm(x, rm, rv, w, b, True),
                        lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True), bytes=(2 * n, 5 * n))
    return Case("batch_norm", f"{N}x{C}x{H}x{W}", float(N * C * H * W), build, quick)


def attention_case(B, H, T, D, causal=True, quick=False):
    def build(device, dtype, grad):
        import kiln

        q, k, v = (_randn(B, H, T, D, device=device, dtype=dtype, grad=grad) for _ in range(3))
        flop = 4.0 * B * H * T * T * D / (2 if causal else 1)
        return Workload((q, k, v), lambda q, k, v: kiln.ops.attention(q, k, v, causal=causal),
                        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                        flop=(flop, 3.5 * flop))
    return Case("attention", f"B{B} H{H} T{T} d{D} {'causal' if causal else 'full'}",
                4.0 * B * H * T * T * D, build, quick)


def recurrent_case(kind, T, B, I, H, layers=1, quick=False):
    def build(device, dtype, grad):
        import kiln

        torch.manual_seed(0)
        theirs = getattr(torch.nn, kind)(I, H, num_layers=layers, device=device, dtype=dtype)
        ours = getattr(kiln.nn, kind)(I, H, num_layers=layers, device=device, dtype=dtype)
        ours.load_state_dict(theirs.state_dict())
        if not grad:
            for p in (*theirs.parameters(), *ours.parameters()):
                p.requires_grad_(False)
        x = _randn(T, B, I, device=device, dtype=dtype, grad=grad)
        G = 4 if kind == "LSTM" else 3
        flop = 2.0 * T * B * G * H * (I + H) * layers
        return Workload((x,), lambda x: ours(x)[0], lambda x: theirs(x)[0], flop=(flop, 3 * flop),
                        compile=False)
    return Case(kind.lower(), f"T{T} B{B} in{I} h{H}" + (f" x{layers}" if layers > 1 else ""),
                2.0 * T * B * H * (I + H) * layers, build, quick)


def rms_norm_case(N, D, quick=False):
    def build(device, dtype, grad):
        import kiln

        x, w = _randn(N, D, device=device, dtype=dtype, grad=grad), _randn(D, device=device, dtype=dtype, grad=grad)
        e = x.element_size()
        return Workload((x, w), lambda x, w: kiln.ops.rms_norm(x, w),
                        lambda x, w: F.rms_norm(x, (D,), w), bytes=(2 * N * D * e, 5 * N * D * e))
    return Case("rms_norm", f"{N}x{D}", float(N * D), build, quick)


def gated_case(N, D, activation="swiglu", quick=False):
    def build(device, dtype, grad):
        import kiln

        gate, up = (_randn(N, D, device=device, dtype=dtype, grad=grad) for _ in range(2))
        e = gate.element_size()
        theirs = (lambda g, u: F.silu(g) * u) if activation == "swiglu" else (lambda g, u: F.gelu(g) * u)
        # forward reads gate and up and writes the product; backward also reads the gradient and
        # writes both input gradients
        return Workload((gate, up), getattr(kiln.ops, activation), theirs, bytes=(3 * N * D * e, 8 * N * D * e))
    return Case(activation, f"{N}x{D}", float(N * D), build, quick)


def rotary_case(B, H, T, D, quick=False):
    def build(device, dtype, grad):
        import kiln

        q, k = (_randn(B, H, T, D, device=device, dtype=dtype, grad=grad) for _ in range(2))
        angle = torch.arange(T, device=device, dtype=dtype)[:, None] * torch.logspace(
            0, -4, D // 2, device=device, dtype=dtype)[None]
        cos, sin = torch.cat([angle.cos()] * 2, -1)[None], torch.cat([angle.sin()] * 2, -1)[None]

        def rotate_half(x):  # Hugging Face's apply_rotary_pos_emb is the torch form
            return torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)

        def theirs(q, k):
            c, s = cos[:, None], sin[:, None]
            return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        n = 2 * B * H * T * D * q.element_size()
        return Workload((q, k), lambda q, k: kiln.ops.rotary_embedding(q, k, cos, sin), theirs,
                        bytes=(2 * n, 4 * n))
    return Case("rotary_embedding", f"B{B} H{H} T{T} D{D}", float(2 * B * H * T * D), build, quick)


def dropout_case(N, D, p=0.1, quick=False):
    def build(device, dtype, grad):
        import kiln

        x = _randn(N, D, device=device, dtype=dtype, grad=grad)
        n = x.numel() * x.element_size()
        # kiln regenerates the mask from its counter in backward; torch saves it
        return Workload((x,), lambda x: kiln.ops.dropout(x, p), lambda x: F.dropout(x, p), bytes=(2 * n, 4 * n))
    return Case("dropout", f"{N}x{D} p={p}", float(N * D), build, quick)


def optimizer_step_case(kind, tensors, total, quick=False):
    """One step of kiln.optim.<kind> against torch.optim.<kind> in its fastest CPU or GPU form
    (fused where torch has it, else foreach) over ``tensors`` parameters of ``total`` elements."""
    def build(device, dtype, grad):
        import kiln

        torch.manual_seed(0)
        sizes = [total // tensors + (1 if i < total % tensors else 0) for i in range(tensors)]
        ours_params = [torch.randn(n, device=device, dtype=dtype) for n in sizes]
        for p in ours_params:
            p.grad = torch.randn_like(p)
        params = [ours_params, [p.clone() for p in ours_params]]
        for p, q in zip(*params):
            q.grad = p.grad.clone()
        kwargs = {"Adam": {"lr": 1e-3}, "AdamW": {"lr": 1e-3}, "SGD": {"lr": 1e-2, "momentum": 0.9}}[kind]
        ours = getattr(kiln.optim, kind)(params[0], **kwargs)
        try:
            theirs = getattr(torch.optim, kind)(params[1], fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused form of this optimizer on this device
            theirs = getattr(torch.optim, kind)(params[1], foreach=True, **kwargs)
        e = torch.tensor([], dtype=dtype).element_size()
        # params and grads read, params and each state buffer read and written
        moved = {"Adam": 7, "AdamW": 7, "SGD": 5}[kind] * total * e
        return Workload((), ours.step, theirs.step, bytes=(moved, moved), compile=False)
    return Case(f"{kind.lower()}_step", f"{tensors} tensors, {total / 1e6:g}M", float(total), build, quick,
                tags=("step",))


def _model_step_case(name, label, make_model, make_batch, quick=False):
    """One training step (forward, loss, backward) of a kiln model against the same model built from
    torch.nn (kiln.nn.torch_twin: the same weights on torch's modules and ops), eager and compiled."""
    def build(device, dtype, grad):
        import kiln

        torch.manual_seed(0)
        model = make_model().to(device=device, dtype=dtype)
        twin = kiln.nn.torch_twin(model)
        batch = make_batch(device, dtype)

        def loss(*batch):
            return model(*batch)

        def torch_loss(*batch):
            return twin(*batch)
        return Workload(batch, loss, torch_loss)
    return Case(name, label, 0.0, build, quick, tags=("model",))


class _Classifier(torch.nn.Module):
    """A classifier's training loss: cross-entropy of its logits."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


class _LanguageModel(torch.nn.Module):
    """A language model's training loss, which it computes itself (without the logits on kiln)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, idx, targets):
        return self.lm(idx, targets)[1]


def _mlp_model():
    import kiln

    return _Classifier(kiln.nn.MLP([64, 256, 256, 10]))


def _cnn_model():
    from kiln.models.cnn import CNN, CNNConfig

    return _Classifier(CNN(CNNConfig()))


def _vit_model():
    from kiln.models.vit import ViT, ViTConfig

    return _Classifier(ViT(ViTConfig(conv_stem=32)))


def _transformer_model():
    from kiln.models.transformer import TransformerConfig, TransformerLM

    return _LanguageModel(TransformerLM(TransformerConfig(vocab_size=128, block_size=128, dim=128, depth=4, heads=4,
                                                          dropout=0.0)))


def _lstm_lm_model():
    from kiln.models.rnn_lm import RNNLM, RNNLMConfig

    return _LanguageModel(RNNLM(RNNLMConfig(cell="lstm", embed_dim=128, hidden_size=192, num_layers=2)))


def _digits_batch(device, dtype):
    return torch.randn(64, 64, device=device, dtype=dtype), torch.randint(0, 10, (64,), device=device)


def _tokens_batch(batch, length):
    return lambda device, dtype: (torch.randint(0, 128, (batch, length), device=device),
                                  torch.randint(0, 128, (batch, length), device=device))


CASES: list[Case] = [
    linear_act_case(1024, 256, 1024, quick=True),
    linear_act_case(4096, 1024, 4096),
    linear_act_case(8192, 4096, 1024),
    softmax_case(1024, 4096, quick=True),
    softmax_case(8192, 32000),
    cross_entropy_case(1024, 4096, quick=True),
    cross_entropy_case(8192, 32000),
    linear_cross_entropy_case(512, 256, 8192, quick=True),
    linear_cross_entropy_case(4096, 1024, 32000),
    layer_norm_case(1024, 1024, quick=True),
    layer_norm_case(8192, 1024),
    layer_norm_case(4096, 4096),
    batch_norm_case(16, 64, 28, 28, quick=True),
    batch_norm_case(64, 256, 28, 28),
    attention_case(2, 4, 256, 64, quick=True),
    attention_case(8, 8, 512, 64),
    attention_case(4, 8, 1024, 64, causal=False),
    recurrent_case("LSTM", 32, 8, 64, 64, layers=2, quick=True),
    recurrent_case("LSTM", 20, 8, 64, 64, layers=2),
    recurrent_case("LSTM", 64, 32, 256, 256),
    recurrent_case("GRU", 32, 8, 64, 64, quick=True),
    recurrent_case("GRU", 64, 32, 256, 256),
    recurrent_case("RNN", 32, 8, 64, 64, quick=True),
    recurrent_case("RNN", 64, 32, 256, 256),
    rms_norm_case(1024, 1024, quick=True),
    rms_norm_case(4096, 4096),
    gated_case(1024, 1024, quick=True),
    gated_case(4096, 11008),
    gated_case(4096, 4096, activation="geglu"),
    rotary_case(1, 8, 256, 64, quick=True),
    rotary_case(2, 32, 2048, 128),
    dropout_case(1024, 1024, quick=True),
    dropout_case(8192, 4096),
    optimizer_step_case("Adam", 20, 1_000_000, quick=True),
    optimizer_step_case("Adam", 200, 20_000_000),
    optimizer_step_case("AdamW", 200, 20_000_000),
    optimizer_step_case("SGD", 200, 20_000_000),
    _model_step_case("mlp", "digits MLP 64-256-256-10, B64", _mlp_model, _digits_batch, quick=True),
    _model_step_case("cnn", "digits CNN 32-64 channels, BN, B64", _cnn_model, _digits_batch),
    _model_step_case("vit", "digits ViT conv stem 32, dim64 depth4, B64", _vit_model, _digits_batch),
    _model_step_case("transformer", "LM dim128 depth4, B16 T128", _transformer_model, _tokens_batch(16, 128)),
    _model_step_case("lstm_lm", "LSTM LM 2 x 192, B32 T96", _lstm_lm_model, _tokens_batch(32, 96)),
]


def names() -> list[str]:
    return list(dict.fromkeys(case.op for case in CASES))


def select(requested: Optional[list[str]], quick: bool) -> list[Case]:
    """The cases of the requested ops and models (all when none), the quick sweep if asked."""
    known = names()
    unknown = [n for n in requested or () if n not in known]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
    wanted = set(requested or known)
    return [c for c in CASES if c.op in wanted and (c.quick or not quick)]
