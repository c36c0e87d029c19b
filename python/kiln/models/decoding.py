"""Decoding for every sequence model (notes 17.9): greedy, temperature sampling, top-k, top-p
(nucleus) and beam search with length normalisation, with or without a cache.

A model decodes through two methods:
- ``decode_logits(tokens, cache)``: the next-token logits (B, V) after ``tokens`` (B, T_new).
  With ``cache=None`` tokens is the whole sequence so far (the prefix is recomputed); with a
  cache, tokens are only the new ones and the cache (KV tensors or an RNN state) grows.
- ``new_cache(batch_size)``: an empty cache with ``reorder(index)`` (beam search keeps the rows
  of the beams it continues).
- optionally ``max_context``: the most tokens the model can see at once.
Arguments follow Hugging Face's ``generate``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _check(name: str, ok: bool, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"generate: {name} must be {expected}, got {got!r}")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> Tensor:
    """logits / temperature, with -inf outside the top k and outside the smallest set of tokens
    whose probability reaches top_p (the most likely token always stays)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class _Stepper:
    """Feeds the model either the new tokens (cache) or the whole sequence (no cache). A model
    with a ``max_context`` (learned or tabled positions) sees at most that many tokens: past it,
    decoding continues on the last max_context tokens, recomputed each step (cached keys carry
    their absolute positions, so the cache cannot slide)."""

    def __init__(self, model, batch_size: int, use_cache: bool):
        self.model = model
        self.cache = model.new_cache(batch_size) if use_cache else None
        self.limit = getattr(model, "max_context", None)
        self.fed = 0

    def logits(self, sequence: Tensor) -> Tensor:
        if self.limit is not None and sequence.shape[1] > self.limit:
            self.cache = None
            sequence = sequence[:, -self.limit:]
        if self.cache is None:
            return self.model.decode_logits(sequence, None).float()
        new = sequence[:, self.fed:]
        self.fed = sequence.shape[1]
        return self.model.decode_logits(new, self.cache).float()

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


@torch.no_grad()
def generate(model, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, do_sample: bool = False, num_beams: int = 1,
             length_penalty: float = 1.0, eos_token_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Continue each row of ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + n).

    Rows that produce ``eos_token_id`` are padded with it afterwards. Beam search
    (``num_beams > 1``, no sampling) returns the best beam by sum of log-probabilities divided by
    length ** length_penalty, as Hugging Face's.
    """
    _check("idx", isinstance(idx, Tensor) and idx.dim() == 2 and not idx.is_floating_point(),
           "a (batch, length) tensor of token ids", getattr(idx, "shape", idx))
    _check("max_new_tokens", isinstance(max_new_tokens, int) and max_new_tokens >= 0, "an int >= 0", max_new_tokens)
    _check("temperature", temperature > 0, "> 0", temperature)
    _check("top_k", top_k is None or top_k >= 1, "None or >= 1", top_k)
    _check("top_p", top_p is None or 0 < top_p <= 1, "None or in (0, 1]", top_p)
    _check("num_beams", isinstance(num_beams, int) and num_beams >= 1, "an int >= 1", num_beams)
    if num_beams > 1 and do_sample:
        raise ValueError("generate: beam sampling is not implemented; use num_beams=1 with do_sample=True, "
                         "or do_sample=False with num_beams > 1")
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            return _beam_search(model, idx, max_new_tokens, num_beams, length_penalty, eos_token_id, use_cache)
        return _sample(model, idx, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id,
                       use_cache, generator)
    finally:
        model.train(was_training)


def _sample(model, idx, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id, use_cache,
            generator):
    stepper = _Stepper(model, idx.shape[0], use_cache)
    sequence = idx
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = stepper.logits(sequence)
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator)
        else:
            token = logits.argmax(-1, keepdim=True)
        if eos_token_id is not None:
            token = token.masked_fill(done[:, None], eos_token_id)
            done |= token[:, 0] == eos_token_id
        sequence = torch.cat([sequence, token], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return sequence


def _beam_search(model, idx, max_new_tokens, num_beams, length_penalty, eos_token_id, use_cache):
    B, T = idx.shape
    device = idx.device
    stepper = _Stepper(model, B * num_beams, use_cache)
    beams = idx.repeat_interleave(num_beams, dim=0)                       # (B k, T)
    scores = torch.zeros(B, num_beams, device=device)
    scores[:, 1:] = float("-inf")                                         # identical beams at the start
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]

    def normalised(score: float, length: int) -> float:
        return score / (length ** length_penalty)

    for step in range(max_new_tokens):
        logprobs = stepper.logits(beams).log_softmax(-1)                  # (B k, V)
        V = logprobs.shape[-1]
        candidates = (scores.reshape(-1, 1) + logprobs).reshape(B, num_beams * V)
        top_scores, top_index = candidates.topk(2 * num_beams, dim=-1)    # room for beams ending in eos
        next_scores = torch.full((B, num_beams), float("-inf"), device=device)
        next_rows = torch.zeros(B, num_beams, dtype=torch.long, device=device)
        next_tokens = torch.zeros(B, num_beams, dtype=torch.long, device=device)
        for b in range(B):
            kept = 0
            for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                if score == float("-inf"):
                    break
                beam, token = divmod(index, V)
                row = b * num_beams + beam
                if eos_token_id is not None and token == eos_token_id:
                    hypothesis = torch.cat([beams[row], beams.new_tensor([token])])
                    finished[b].append((normalised(score, step + 1), hypothesis))
                    continue
                next_scores[b, kept], next_rows[b, kept], next_tokens[b, kept] = score, row, token
                kept += 1
                if kept == num_beams:
                    break
        rows = next_rows.reshape(-1)
        beams = torch.cat([beams[rows], next_tokens.reshape(-1, 1)], dim=1)
        scores = next_scores
        stepper.reorder(rows)
        # a batch entry is done when it has num_beams finished hypotheses and the best of them beats
        # every live beam at its present length (Hugging Face's early_stopping=False heuristic)
        if eos_token_id is not None and all(
                len(f) >= num_beams and max(s for s, _ in f) >= normalised(scores[b].max().item(), step + 1)
                for b, f in enumerate(finished)):
            break
    out = []
    for b in range(B):
        for beam in range(num_beams):
            score = scores[b, beam].item()
            if score > float("-inf"):
                finished[b].append((normalised(score, beams.shape[1] - T), beams[b * num_beams + beam]))
        best = max(finished[b], key=lambda item: item[0])[1]
        out.append(best)
    width = max(len(s) for s in out)
    pad = eos_token_id if eos_token_id is not None else 0
    return torch.stack([torch.cat([s, s.new_full((width - len(s),), pad)]) for s in out])
