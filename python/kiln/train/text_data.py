"""Text data that ships with Python or is generated: nothing is downloaded.

- ``stdlib_corpus``: the character-LM corpus, a fixed list of the running interpreter's own
  standard-library source files, in a fixed order, split 90 / 5 / 5 into train / val / test.
- ``number_words``: the translation task, English number words to digits
  ("three hundred and forty two" -> "342"), split by number so test numbers are never seen.
- ``brackets``: the sequence-classification task, whether a string of ()[]{} is balanced;
  the unbalanced half are near misses (one bracket changed), so the whole string matters.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

# Present in every CPython from 3.10 to 3.13; their text differs slightly between versions,
# so results name the Python version they were measured on.
STDLIB_FILES = (
    "argparse.py", "bisect.py", "calendar.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py",
    "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py", "pprint.py",
    "random.py", "shlex.py", "statistics.py", "string.py", "textwrap.py", "tokenize.py", "typing.py",
    "json/decoder.py", "json/encoder.py", "collections/__init__.py", "logging/__init__.py",
)

ASCII_VOCAB = 128   # byte-level: the corpus is ASCII, anything else maps to "?"


def encode_ascii(text: str) -> torch.Tensor:
    data = text.encode("ascii", errors="replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode_ascii(ids) -> str:
    return bytes(int(i) for i in ids).decode("ascii", errors="replace")


def stdlib_corpus(splits=(0.9, 0.05, 0.05)) -> dict[str, torch.Tensor]:
    """{"train", "val", "test"}: 1-D tensors of character ids (0..127)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in STDLIB_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"stdlib_corpus: {root} lacks {', '.join(missing)} (a trimmed Python install?)")
    text = "\n".join((root / name).read_text(encoding="utf-8", errors="replace") for name in STDLIB_FILES)
    ids = encode_ascii(text)
    n_train, n_val = int(len(ids) * splits[0]), int(len(ids) * splits[1])
    return {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}


# ---------------------------------------------------------------------------------------------
# number words -> digits

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
        if n:
            words.append("and")
    if n >= 20:
        words.append(_TENS[n // 10])
        if n % 10:
            words.append(_ONES[n % 10])
    elif n or not words:
        words.append(_ONES[n])
    return words


def number_to_words(n: int) -> str:
    """British English words for 0 <= n < 10**6: 342 -> "three hundred and forty two"."""
    if not 0 <= n < 10**6:
        raise ValueError(f"number_to_words: n must be in [0, 10**6), got {n}")
    if n < 1000:
        return " ".join(_below_thousand(n))
    words = _below_thousand(n // 1000) + ["thousand"]
    if n % 1000:
        if n % 1000 < 100:
            words.append("and")
        words += _below_thousand(n % 1000)
    return " ".join(words)


SOURCE_WORDS = ("<pad>", "<unk>", *_ONES, *[t for t in _TENS if t], "hundred", "thousand", "and")
TARGET_TOKENS = ("<pad>", "<bos>", "<eos>", *"0123456789")   # pad, bos, eos ids 0, 1, 2 (Seq2SeqConfig)


@dataclass
class TranslationSplit:
    src: torch.Tensor      # (N, S) word ids, 0-padded
    tgt: torch.Tensor      # (N, T) bos + digit ids + eos, 0-padded
    numbers: list[int]


def _encode_source(text: str, width: int) -> list[int]:
    index = {w: i for i, w in enumerate(SOURCE_WORDS)}
    ids = [index.get(w, 1) for w in text.split()]
    if len(ids) > width:
        raise ValueError(f"source {text!r} has {len(ids)} words, more than {width}")
    return ids + [0] * (width - len(ids))


def encode_digits(n: int, width: int) -> list[int]:
    ids = [1] + [TARGET_TOKENS.index(c) for c in str(n)] + [2]
    return ids + [0] * (width - len(ids))


def decode_digits(ids) -> str:
    out = []
    for i in ids:
        i = int(i)
        if i == 2:
            break
        if i >= 3:
            out.append(TARGET_TOKENS[i])
    return "".join(out)


def number_words(n_train: int = 20000, n_val: int = 1000, n_test: int = 1000, seed: int = 0,
                 max_number: int = 10**6) -> dict[str, TranslationSplit]:
    """Disjoint sets of numbers for train / val / test, drawn with a fixed seed."""
    rng = random.Random(seed)
    numbers = rng.sample(range(max_number), n_train + n_val + n_test)
    parts = {"train": numbers[:n_train], "val": numbers[n_train:n_train + n_val],
             "test": numbers[n_train + n_val:]}
    src_width, tgt_width = 16, len(str(max_number - 1)) + 2
    return {name: TranslationSplit(torch.tensor([_encode_source(number_to_words(n), src_width) for n in nums]),
                                   torch.tensor([encode_digits(n, tgt_width) for n in nums]), nums)
            for name, nums in parts.items()}


# ---------------------------------------------------------------------------------------------
# balanced brackets

BRACKET_TOKENS = ("<pad>", "<cls>", *"()[]{}")
_PAIRS = {"(": ")", "[": "]", "{": "}"}


def is_balanced(text: str) -> bool:
    stack = []
    for c in text:
        if c in _PAIRS:
            stack.append(_PAIRS[c])
        elif not stack or stack.pop() != c:
            return False
    return not stack


def _balanced(rng: random.Random, pairs: int) -> str:
    out, stack = [], []
    opened = 0
    while opened < pairs or stack:
        if opened < pairs and (not stack or rng.random() < 0.5):
            c = rng.choice("([{")
            out.append(c)
            stack.append(_PAIRS[c])
            opened += 1
        else:
            out.append(stack.pop())
    return "".join(out)


def brackets(n_train: int = 20000, n_val: int = 2000, n_test: int = 2000, max_pairs: int = 20,
             seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "val", "test"}: (tokens (N, 2 max_pairs) 0-padded, labels (N,) 1 = balanced);
    half balanced, half a balanced string with one bracket replaced (checked unbalanced)."""
    rng = random.Random(seed)
    width = 2 * max_pairs
    index = {c: i for i, c in enumerate(BRACKET_TOKENS)}

    def example():
        text = _balanced(rng, rng.randint(1, max_pairs))
        if rng.random() < 0.5:
            return text, 1
        while True:
            i = rng.randrange(len(text))
            broken = text[:i] + rng.choice("()[]{}".replace(text[i], "")) + text[i + 1:]
            if not is_balanced(broken):
                return broken, 0

    out = {}
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = [example() for _ in range(n)]
        tokens = torch.tensor([[index[c] for c in t] + [0] * (width - len(t)) for t, _ in rows])
        out[name] = (tokens, torch.tensor([label for _, label in rows]))
    return out
