"""The recurrent LMs and the bidirectional classifier (notes 16): every cell learns a few steps,
decoding with the carried state equals recomputing the prefix, the classifier ignores padding."""

import pytest
import torch
import torch.nn.functional as F

from kiln.models.rnn_lm import CELLS, RNNClassifier, RNNClassifierConfig, RNNLM, RNNLMConfig
from tests.numerics import BOUND, rel_err


def _lm(cell, **kw):
    torch.manual_seed(0)
    config = dict(vocab_size=17, cell=cell, embed_dim=16, hidden_size=24, num_layers=2, dropout=0.0)
    return RNNLM(RNNLMConfig(**{**config, **kw}))


@pytest.mark.parametrize("cell", CELLS)
def test_lm_loss_is_cross_entropy_of_its_logits_and_a_few_steps_lower_it(cell):
    model = _lm(cell, hidden_size=16 if cell == "highway" else 24).double()
    idx = torch.randint(0, 17, (4, 12))
    logits, _ = model(idx[:, :-1])
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert rel_err(loss, F.cross_entropy(logits.reshape(-1, 17), idx[:, 1:].reshape(-1))) < BOUND[torch.float64]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("cell", CELLS)
def test_decoding_with_the_carried_state_equals_recomputing(cell):
    model = _lm(cell).eval()
    idx = torch.randint(0, 17, (3, 4))
    greedy = model.generate(idx, 10)
    assert torch.equal(greedy, model.generate(idx, 10, use_cache=False))
    assert torch.equal(model.generate(idx, 6, num_beams=3), model.generate(idx, 6, num_beams=3, use_cache=False))


def test_unknown_cell_is_named():
    with pytest.raises(ValueError, match="cell must be one of"):
        RNNLM(RNNLMConfig(cell="transformer"))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_classifier_ignores_padding_after_the_sequence(cell):
    torch.manual_seed(0)
    model = RNNClassifier(RNNClassifierConfig(cell=cell, bidirectional=False)).double().eval()
    tokens = torch.randint(2, 8, (3, 9))
    padded = torch.cat([tokens, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    assert torch.allclose(model(tokens), model(padded), atol=1e-12)
    bidirectional = RNNClassifier(RNNClassifierConfig(cell=cell)).train()
    optimizer = torch.optim.Adam(bidirectional.parameters(), lr=1e-2)
    labels = torch.randint(0, 2, (3,))
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.cross_entropy(bidirectional(padded), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
