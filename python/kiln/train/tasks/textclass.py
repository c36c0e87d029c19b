"""Sequence classification with a bidirectional recurrent network (notes 16.6, many-to-one):
is a string of ()[]{} balanced? Negatives are balanced strings with one bracket changed, so the
answer depends on the whole sequence. results.json: ``test_accuracy``."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from kiln.models.rnn_lm import RNNClassifier, RNNClassifierConfig
from kiln.train import text_data
from kiln.train.data import Splits
from kiln.train.tasks import ModelEntry, Task

VOCAB = len(text_data.BRACKET_TOKENS)


class TextClass(Task):
    name = "textclass"
    description = "balanced brackets, bidirectional recurrent classifier"
    models = {
        "lstm": ModelEntry(RNNClassifier, RNNClassifierConfig(vocab_size=VOCAB, cell="lstm", hidden_size=64),
                           "bidirectional LSTM of 64, max-pooled over time"),
        "gru": ModelEntry(RNNClassifier, RNNClassifierConfig(vocab_size=VOCAB, cell="gru", hidden_size=64),
                          "bidirectional GRU of 64, max-pooled over time"),
    }
    default_model = "lstm"
    metric = "accuracy"
    headline = "test_accuracy"
    train = {"epochs": 15, "batch_size": 64, "lr": 3e-3, "optimizer": "adam", "optimizer_kwargs": {},
             "clip_grad_norm": 1.0, "patience": 5}

    def splits(self) -> Splits:
        data = text_data.brackets()
        return Splits(*(TensorDataset(*data[k]) for k in ("train", "val", "test")))

    def loss(self, model, batch) -> torch.Tensor:
        tokens, labels = batch
        return torch.nn.functional.cross_entropy(model(tokens), labels)

    def metric_value(self, model, batch) -> float:
        tokens, labels = batch
        return (model(tokens).argmax(-1) == labels).double().mean().item()


TASK = TextClass()
