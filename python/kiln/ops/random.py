"""kiln's dropout RNG: a counter-based generator owned by kiln, and its pure-PyTorch form.

The keep mask of a dropout call is a pure function of (seed, offset, element index): the
random word of element ``i`` is the first 32-bit output of Philox 4x32-10 with counter
(lo32(offset + i), hi32(offset + i), 0, 0) and key (lo32(seed), hi32(seed)), which is
exactly Triton's ``tl.randint(seed, offset + i)`` (triton/language/random.py) and what
the numba (kernels/cpu/philox.py) and CUDA (csrc/include/kiln/philox.cuh) forms compute.
Element ``i`` is kept when ``(word >> 1) >= threshold`` with ``threshold =
round(p * 2**31)``: a comparison of non-negative 31-bit integers, the same in every form
and every language (a float comparison ``rand() >= p`` would depend on how each form
rounds the conversion). The keep probability is 1 - threshold / 2**31, within 2**-32 of
1 - p; kept elements are scaled by 1 / (1 - p) as torch does.

Because the mask can be regenerated from two integers, nothing else is saved for backward:
forward and backward (and double backward, in PyTorch ops) recompute the same mask.

Where seed and offset come from: one state, (seed, offset), like torch's CUDA Philox
generator. Each call takes the current pair and advances offset by the number of
elements it consumes, so consecutive calls draw disjoint counters. The seed is drawn from
torch's default CPU generator the first time it is needed and again whenever torch is
reseeded: ``torch.manual_seed(s)`` therefore makes kiln's dropout reproducible. Reseeding
is noticed without hooking torch: either ``torch.initial_seed()`` changed, or torch's
generator is back in the exact state ``manual_seed(initial_seed)`` leaves it in (the draw
of kiln's own seed moves it out of that state, so a second ``manual_seed`` with the same
seed is seen too). ``get_rng_state`` / ``set_rng_state`` save and restore the pair (and
which torch seed it belongs to) for an exact resume.

The state is one int64 CPU tensor advanced by the custom op ``kiln::rng_advance``, which
``torch.compile`` sees as a mutation of a graph input: the counter advances at run time,
never baked into a compiled graph.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

# Philox 4x32-10 constants (Salmon et al. 2011; Triton's and curand's).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
THRESHOLD_BITS = 31  # the mask compares the word's top 31 bits with round(p * 2**31)

# [seed, offset]; the tensor object never changes (compiled graphs hold it), only its values.
_STATE = torch.zeros(2, dtype=torch.int64)
_lock = threading.Lock()
# The torch seed the state belongs to (None: never seeded), and torch's generator state
# right after manual_seed(that seed), to notice a second manual_seed with the same seed.
_synced_torch_seed: int | None = None
_fresh_torch_state: Tensor | None = None


def _torch_state_after_manual_seed(seed: int) -> Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def _draw_seed() -> int:
    # 62 bits: non-negative in int64 and in every kernel's integer types.
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _reseed_if_torch_was_reseeded() -> None:
    global _synced_torch_seed, _fresh_torch_state
    torch_seed = torch.initial_seed()
    if torch_seed != _synced_torch_seed:
        _fresh_torch_state = _torch_state_after_manual_seed(torch_seed)
    elif not torch.equal(torch.default_generator.get_state(), _fresh_torch_state):
        return  # the same torch seed, and torch was not reseeded since kiln drew its seed
    _STATE[0] = _draw_seed()
    _STATE[1] = 0
    _synced_torch_seed = torch_seed


def manual_seed(seed: int) -> None:
    """Seed torch (``torch.manual_seed``) and kiln's dropout generator together. Use it where
    torch draws random numbers between seeding and the first dropout call (weight init does):
    a ``torch.manual_seed`` with the seed torch already had is then invisible to kiln, which
    would carry on from its old offset. The result is exactly that of ``torch.manual_seed(seed)``
    followed at once by a dropout call."""
    global _synced_torch_seed, _fresh_torch_state
    with _lock:
        torch.manual_seed(seed)
        _synced_torch_seed = torch.initial_seed()
        _fresh_torch_state = torch.default_generator.get_state()
        _STATE[0] = _draw_seed()
        _STATE[1] = 0


def get_rng_state() -> dict:
    """kiln's dropout RNG state: {"seed", "offset", "torch_seed"} (plain ints; torch_seed
    is the torch.initial_seed() the pair belongs to, None before the first draw)."""
    with _lock:
        return {"seed": int(_STATE[0]), "offset": int(_STATE[1]), "torch_seed": _synced_torch_seed}


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state returned: the next dropout call continues exactly there,
    provided torch's own RNG state is restored too (torch.set_rng_state), in either order."""
    global _synced_torch_seed, _fresh_torch_state
    missing = {"seed", "offset", "torch_seed"} - set(state)
    if missing:
        raise ValueError(f"set_rng_state: state lacks {', '.join(sorted(missing))}; "
                         "expected what kiln.ops.random.get_rng_state() returns")
    with _lock:
        _STATE[0], _STATE[1] = int(state["seed"]), int(state["offset"])
        _synced_torch_seed = state["torch_seed"]
        # torch's restored state is past kiln's seed draw, so never the fresh one; a
        # manual_seed after this restore is noticed again.
        _fresh_torch_state = (None if _synced_torch_seed is None
                              else _torch_state_after_manual_seed(_synced_torch_seed))


@torch.library.custom_op("kiln::rng_advance", mutates_args=("state",))
def _rng_advance(state: Tensor, numel: int) -> Tensor:
    """Returns [seed, offset] for a call consuming ``numel`` counters; advances state's offset."""
    with _lock:
        if state is _STATE:
            _reseed_if_torch_was_reseeded()
        used = state.clone()
        state[1] += numel
    return used


@_rng_advance.register_fake
def _(state, numel):
    return torch.empty_like(state)


def next_seed_offset(numel: int) -> Tensor:
    """The (seed, offset) pair for a call that consumes ``numel`` counters, as an int64
    CPU tensor [seed, offset]; the state moves on by ``numel``."""
    return _rng_advance(_STATE, numel)


# ---------------------------------------------------------------------------------------
# The pure-PyTorch Philox: int64 tensors holding 32-bit words, every product split so that
# nothing overflows int64 (what the kernels do with 32-bit unsigned arithmetic).


def _mul_hi_lo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(hi32, lo32) of the 64-bit product of 32-bit words a (tensor) and b (constant)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_part = a * b_lo                    # < 2**48
    mid = a * b_hi + (lo_part >> 16)      # < 2**49: bits 16.. of the product
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)
    return hi, lo


def philox_word(seed: int, counter: Tensor) -> Tensor:
    """First output word of Philox 4x32-10, key = seed (64 bits), counter = (lo32, hi32, 0, 0)
    of each int64 element of ``counter``; int64 tensor of values in [0, 2**32)."""
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _MASK32, (k1 + PHILOX_KEY_B) & _MASK32
    return c0


def keep_threshold(p: float) -> int:
    """The integer the top 31 bits of a word must reach for the element to be kept."""
    return min(int(round(p * 2**THRESHOLD_BITS)), 2**THRESHOLD_BITS - 1)


def keep_mask(seed: int, offset: int, shape, p: float, device=None) -> Tensor:
    """The bool keep mask of a dropout call on a contiguous tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    index = torch.arange(numel, dtype=torch.int64, device=device) + offset
    return ((philox_word(seed, index) >> 1) >= keep_threshold(p)).reshape(shape)


def seed_offset(pair: Tensor) -> tuple[int, int]:
    seed, offset = pair.tolist()
    return int(seed), int(offset)
