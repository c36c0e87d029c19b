"""The shipped and generated text data: fixed, split without overlap, correct labels."""

import pytest
import torch

from kiln.train import text_data as td


def test_stdlib_corpus_is_fixed_ascii_and_split_in_order():
    a, b = td.stdlib_corpus(), td.stdlib_corpus()
    assert all(torch.equal(a[k], b[k]) for k in ("train", "val", "test"))
    total = sum(len(v) for v in a.values())
    assert total > 500_000 and abs(len(a["train"]) / total - 0.9) < 1e-3
    assert int(a["train"].max()) < td.ASCII_VOCAB and int(a["train"].min()) >= 0
    assert "def " in td.decode_ascii(a["train"][:5000])


@pytest.mark.parametrize("n,words", [(0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"),
                                     (342, "three hundred and forty two"), (1000, "one thousand"),
                                     (1005, "one thousand and five"), (20500, "twenty thousand five hundred"),
                                     (999999, "nine hundred and ninety nine thousand nine hundred and ninety nine")])
def test_number_words(n, words):
    assert td.number_to_words(n) == words


def test_number_words_splits_are_disjoint_and_decode():
    data = td.number_words(n_train=300, n_val=50, n_test=50)
    assert not set(data["train"].numbers) & set(data["test"].numbers)
    split = data["test"]
    for row in range(5):
        assert td.decode_digits(split.tgt[row, 1:]) == str(split.numbers[row])
        words = [td.SOURCE_WORDS[i] for i in split.src[row] if i]
        assert " ".join(words) == td.number_to_words(split.numbers[row])
    with pytest.raises(ValueError, match="n must be in"):
        td.number_to_words(10**6)


def test_brackets_labels_are_right_and_balanced():
    data = td.brackets(n_train=500, n_val=10, n_test=10, max_pairs=8)
    tokens, labels = data["train"]
    assert 0.4 < labels.float().mean().item() < 0.6
    for row in range(100):
        text = "".join(td.BRACKET_TOKENS[i] for i in tokens[row] if i)
        assert td.is_balanced(text) == bool(labels[row])
    assert td.is_balanced("([]{})") and not td.is_balanced("([)]") and not td.is_balanced("((")
