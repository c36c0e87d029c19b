"""Character language model on the Python standard library's own source (notes 16-17): the
running interpreter's files (kiln.train.text_data.STDLIB_FILES), byte-level vocabulary of 128.

Models of about equal size (~0.55-0.6M parameters): a pre-LN Transformer (17.7) and RNN LMs over
the notes' basic cell, GRU and LSTM (16). Trained on non-overlapping windows of 96 characters
(a fresh order each epoch). results.json: ``val_bits_per_char`` (mean cross-entropy over the
validation split in bits), ``test_bits_per_char``, ``tokens_per_s`` (training throughput) and a
greedy and a sampled continuation of a fixed prompt.

`kiln experiment charlm-equal-time` trains the four for the same seconds each (``kiln train
charlm --model M --time-limit S``: the one-cycle schedule then runs on the clock and ends at
the limit) and plots their validation bits/char against time and tokens.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from kiln.models.rnn_lm import RNNLM, RNNLMConfig
from kiln.models.transformer import TransformerConfig, TransformerLM
from kiln.train import text_data
from kiln.train.data import Splits
from kiln.train.tasks import ModelEntry, Task, TaskError

CONTEXT = 96
PROMPT = "def __init__(self, "


def windows(ids: torch.Tensor, context: int = CONTEXT) -> TensorDataset:
    """Non-overlapping (context + 1)-character windows: inputs are [:-1], targets [1:]."""
    n = (len(ids) - 1) // context
    starts = torch.arange(n) * context
    return TensorDataset(ids[starts[:, None] + torch.arange(context + 1)])


class CharLM(Task):
    name = "charlm"
    description = "character LM on the Python standard library's source"
    models = {
        "transformer": ModelEntry(TransformerLM, TransformerConfig(vocab_size=128, block_size=CONTEXT, dim=128,
                                                                   depth=3, heads=4, dropout=0.1),
                                  "pre-LN Transformer, dim 128, depth 3, 4 heads, sinusoidal positions",
                                  train={"lr": 2e-3}),
        "lstm": ModelEntry(RNNLM, RNNLMConfig(cell="lstm", embed_dim=128, hidden_size=192, num_layers=2),
                           "LSTM, 2 layers of 192"),
        "gru": ModelEntry(RNNLM, RNNLMConfig(cell="gru", embed_dim=128, hidden_size=224, num_layers=2),
                          "GRU, 2 layers of 224"),
        "rnn": ModelEntry(RNNLM, RNNLMConfig(cell="rnn", embed_dim=128, hidden_size=384, num_layers=2),
                          "the notes' basic tanh cell, 2 layers of 384"),
    }
    default_model = "transformer"
    metric = "accuracy"
    headline = "test_char_accuracy"
    train = {"epochs": 10, "batch_size": 32, "lr": 3e-3, "optimizer": "adamw",
             "optimizer_kwargs": {"weight_decay": 0.01}, "clip_grad_norm": 1.0, "patience": None}

    def splits(self) -> Splits:
        corpus = text_data.stdlib_corpus()
        return Splits(windows(corpus["train"]), windows(corpus["val"]), windows(corpus["test"]))

    def loss(self, model, batch) -> torch.Tensor:
        (chunk,) = batch
        return model(chunk[:, :-1], chunk[:, 1:])[1]

    def metric_value(self, model, batch) -> float:
        (chunk,) = batch
        logits, _ = model(chunk[:, :-1])
        return (logits.argmax(-1) == chunk[:, 1:]).double().mean().item()

    def scheduler(self, optimizer, total_steps):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"],
                                                   total_steps=max(total_steps, 2), pct_start=0.05)

    def generate_text(self, model, prompt: str, max_new_tokens: int = 200, **decoding) -> str:
        bad = sorted({c for c in prompt if ord(c) >= text_data.ASCII_VOCAB})
        if bad:
            raise TaskError(f"--prompt has characters outside the model's ASCII vocabulary: {''.join(bad)!r}")
        if not prompt:
            raise TaskError("--prompt is empty; give the text to continue")
        device = next(model.parameters()).device
        ids = text_data.encode_ascii(prompt)[None].to(device)
        return text_data.decode_ascii(model.generate(ids, max_new_tokens, **decoding)[0].tolist())

    def results(self, model, splits, device, trainer) -> dict:
        bits = {}
        for name, split in (("val", splits.val), ("test", splits.test)):
            bits[f"{name}_bits_per_char"] = trainer.evaluate(split)["loss"] / math.log(2)
        prompt = text_data.encode_ascii(PROMPT)[None].to(device)
        greedy = model.generate(prompt, 120)
        sample = model.generate(prompt, 120, do_sample=True, temperature=0.8,
                                generator=torch.Generator(device=device).manual_seed(0))
        tokens = trainer.step * trainer.batch_size * CONTEXT
        return {**bits, "tokens_per_s": tokens / max(trainer.elapsed, 1e-9),
                "greedy_sample": text_data.decode_ascii(greedy[0].tolist()),
                "sample_t0.8": text_data.decode_ascii(sample[0].tolist())}


TASK = CharLM()
