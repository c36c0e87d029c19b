"""The Transformer LM and encoder-decoder (notes 17.7-17.10) and decoding (17.9)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from kiln import nn as knn
from kiln.models.decoding import filter_logits, generate
from kiln.models.transformer import Seq2SeqConfig, Seq2SeqTransformer, TransformerConfig, TransformerLM
from tests.numerics import BOUND, rel_err


def _lm(**kw):
    torch.manual_seed(0)
    config = dict(vocab_size=23, block_size=40, dim=32, depth=2, heads=4, dropout=0.0)
    return TransformerLM(TransformerConfig(**{**config, **kw}))


def _seq2seq():
    torch.manual_seed(0)
    return Seq2SeqTransformer(Seq2SeqConfig(vocab_size=20, src_vocab_size=15, block_size=32, dim=32, depth=2,
                                            heads=4, encoder_depth=2, dropout=0.0))


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_loss_without_logits_equals_cross_entropy_of_the_logits(positions):
    model = _lm(positions=positions).double()
    idx, targets = torch.randint(0, 23, (3, 9)), torch.randint(0, 23, (3, 9))
    targets[0, :4] = -100
    logits, _ = model(idx)
    _, loss = model(idx, targets)
    assert rel_err(loss, F.cross_entropy(logits.reshape(-1, 23), targets.reshape(-1))) < BOUND[torch.float64]
    assert model.head.weight is model.embed.tokens.weight      # tied (17.8)


def test_a_position_never_sees_the_future():
    model = _lm().double().eval()
    idx = torch.randint(0, 23, (2, 10))
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 23
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])


def test_a_few_steps_lower_the_loss():
    model = _lm(dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 23, (8, 16))
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_greedy_with_the_cache_is_greedy_without_it():
    model = _lm()
    idx = torch.randint(0, 23, (3, 5))
    with_cache = model.generate(idx, 20)
    assert with_cache.shape == (3, 25) and torch.equal(with_cache[:, :5], idx)
    assert torch.equal(with_cache, model.generate(idx, 20, use_cache=False))
    assert torch.equal(with_cache, model.generate(idx, 20, num_beams=1))


def test_seeded_sampling_reproduces():
    model = _lm()
    idx = torch.randint(0, 23, (2, 4))
    sample = lambda seed, **kw: model.generate(idx, 15, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    assert torch.equal(sample(3, top_k=1), model.generate(idx, 15))       # top-1 sampling is greedy
    assert torch.equal(sample(3, use_cache=False, top_p=0.9), sample(3, top_p=0.9))


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)


class MarkovTable(torch.nn.Module):
    """A toy model: next-token logits depend on the last token only (a fixed random table)."""

    def __init__(self, vocab=4, seed=0):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2

    def decode_logits(self, tokens, cache):
        return self.table[tokens[:, -1]]

    def new_cache(self, batch_size):
        class Nothing:
            def reorder(self, index):
                pass
        return Nothing()


@pytest.mark.parametrize("seed", range(5))
def test_wide_beam_search_finds_the_most_probable_sequence(seed):
    model, start, length = MarkovTable(seed=seed), torch.tensor([[0], [3]]), 3
    out = generate(model, start, length, num_beams=16, length_penalty=0.0)
    logp = model.table.log_softmax(-1)
    for row in range(2):
        best = max(itertools.product(range(4), repeat=length),
                   key=lambda seq: sum(logp[a, b] for a, b in zip((start[row, 0].item(),) + seq[:-1], seq)))
        assert out[row, 1:].tolist() == list(best)


def test_beam_search_beats_greedy_when_greedy_is_short_sighted():
    model = MarkovTable()
    # from token 0: token 1 is likelier (0.6 vs 0.4), but after 1 everything is flat, after 2 eos (3) is sure
    model.table = torch.log(torch.tensor([[1e-9, 0.6, 0.4, 1e-9], [0.25, 0.25, 0.25, 0.25],
                                          [1e-9, 1e-9, 1e-9, 1.0], [1e-9, 1e-9, 1e-9, 1.0]]))
    start = torch.tensor([[0]])
    assert generate(model, start, 2).tolist() == [[0, 1, 0]]
    assert generate(model, start, 2, num_beams=2, eos_token_id=3, length_penalty=0.0).tolist() == [[0, 2, 3]]


def test_eos_pads_finished_rows():
    model = MarkovTable()
    model.table = torch.log(torch.tensor([[1e-9, 1e-9, 1e-9, 1.0]] * 4))
    assert generate(model, torch.tensor([[0], [1]]), 5, eos_token_id=3).tolist() == [[0, 3], [1, 3]]


def test_generate_bad_arguments_name_themselves():
    model = _lm()
    idx = torch.randint(0, 23, (1, 3))
    for kwargs, name in [({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
                         ({"num_beams": 0}, "num_beams"), ({"num_beams": 2, "do_sample": True}, "beam sampling")]:
        with pytest.raises(ValueError, match=name):
            model.generate(idx, 3, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, -1)
    long = model.generate(idx, 60)           # past block_size (40): a sliding window, cache or not
    assert long.shape == (1, 63) and torch.equal(long, model.generate(idx, 60, use_cache=False))


def test_seq2seq_decodes_the_same_with_and_without_the_cache_and_learns():
    model = _seq2seq()
    src = torch.randint(3, 15, (3, 7))
    src[0, 5:] = 0                                          # padding
    greedy = model.translate(src, 8)
    assert torch.equal(greedy, model.translate(src, 8, use_cache=False))
    beams = model.translate(src, 8, num_beams=3)
    assert torch.equal(beams, model.translate(src, 8, num_beams=3, use_cache=False))
    # padding in the source is invisible: extra padding changes nothing
    padded = torch.cat([src, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    assert torch.equal(model.translate(padded, 8), greedy)
    tgt = torch.cat([torch.ones(3, 1, dtype=torch.long), src + 3, torch.full((3, 1), 2)], dim=1)
    tgt[0, 6:8] = 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        _, loss = model(src, tgt[:, :-1], tgt[:, 1:])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_kv_cache_reorder_and_length():
    cache = knn.KVCache(2)
    k = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 2, 4, 5)
    cache.layers[0].append(k, k)
    cache.layers[1].append(k, k)
    cache.extra["memory"] = torch.arange(3.0)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.length == 4
    assert cache.layers[1].k[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert cache.extra["memory"].tolist() == [2.0, 2.0, 0.0]
