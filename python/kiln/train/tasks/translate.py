"""Translation with the encoder-decoder Transformer (notes 17.10): English number words to
digits ("three hundred and forty two" -> "342"), numbers below one million, train / val / test on
disjoint numbers. results.json: ``exact_match`` (beam search, 4 beams) on the test split and
``greedy_exact_match`` beside it."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from kiln.models.transformer import Seq2SeqConfig, Seq2SeqTransformer
from kiln.train import text_data
from kiln.train.data import Splits
from kiln.train.tasks import ModelEntry, Task, TaskError


class Translate(Task):
    name = "translate"
    description = "English number words -> digits, encoder-decoder Transformer"
    models = {
        "transformer": ModelEntry(Seq2SeqTransformer,
                                  Seq2SeqConfig(vocab_size=len(text_data.TARGET_TOKENS),
                                                src_vocab_size=len(text_data.SOURCE_WORDS), block_size=16,
                                                dim=64, depth=2, encoder_depth=2, heads=4, dropout=0.1),
                                  "encoder-decoder Transformer, dim 64, 2 + 2 layers"),
    }
    default_model = "transformer"
    metric = "token_accuracy"
    headline = "exact_match"
    train = {"epochs": 12, "batch_size": 128, "lr": 2e-3, "optimizer": "adamw",
             "optimizer_kwargs": {"weight_decay": 0.01}, "clip_grad_norm": 1.0, "patience": None}
    num_beams = 4

    def splits(self) -> Splits:
        data = text_data.number_words()
        return Splits(*(TensorDataset(data[k].src, data[k].tgt) for k in ("train", "val", "test")))

    def loss(self, model, batch) -> torch.Tensor:
        src, tgt = batch
        return model(src, tgt[:, :-1], tgt[:, 1:])[1]

    def metric_value(self, model, batch) -> float:
        src, tgt = batch
        logits, _ = model(src, tgt[:, :-1])
        target = tgt[:, 1:]
        keep = target != 0
        return ((logits.argmax(-1) == target) & keep).sum().item() / max(keep.sum().item(), 1)

    def exact_match(self, model, split, num_beams: int, batch_size: int = 250) -> float:
        src, tgt = split.tensors
        hits = 0
        for i in range(0, len(src), batch_size):
            device = next(model.parameters()).device
            out = model.translate(src[i:i + batch_size].to(device), tgt.shape[1], num_beams=num_beams)
            for row, want in zip(out.tolist(), tgt[i:i + batch_size].tolist()):
                hits += text_data.decode_digits(row) == text_data.decode_digits(want[1:])
        return hits / len(src)

    def generate_text(self, model, prompt: str, max_new_tokens: int = 9, **decoding) -> str:
        words = prompt.lower().replace("-", " ").split()
        unknown = sorted({w for w in words if w not in text_data.SOURCE_WORDS[2:]})
        if unknown or not words:
            raise TaskError(f"--prompt must be English number words (e.g. 'three hundred and forty two'); "
                            f"not known: {', '.join(unknown) or 'nothing given'}")
        src = torch.tensor([text_data._encode_source(" ".join(words), max(16, len(words)))])
        decoding.pop("do_sample", None)
        out = model.translate(src.to(next(model.parameters()).device), max_new_tokens,
                              num_beams=decoding.get("num_beams", 1))
        return text_data.decode_digits(out[0].tolist())

    def results(self, model, splits, device, trainer) -> dict:
        return {"exact_match": self.exact_match(model, splits.test, self.num_beams), "num_beams": self.num_beams,
                "greedy_exact_match": self.exact_match(model, splits.test, 1)}


TASK = Translate()
