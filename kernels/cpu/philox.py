"""Philox 4x32-10 in numba: the word kiln's dropout masks come from (ops/random.py).

``philox_word(k0, k1, counter)`` is the first output of Philox 4x32-10 with key (k0, k1)
and counter (lo32(counter), hi32(counter), 0, 0), bit for bit Triton's
``tl.randint(seed, counter)``. Everything is uint64 holding 32-bit words: a 32 x 32 -> 64
bit product gives the high and low halves at once, and every constant is a np.uint64
global so that numba never promotes a mixed signed/unsigned expression to float64.
``keeps(k0, k1, counter, threshold)`` is the dropout rule: (word >> 1) >= threshold.
"""

import numpy as np
from numba import njit

_U = np.uint64
_ROUND_A = _U(0xD2511F53)
_ROUND_B = _U(0xCD9E8D57)
_KEY_A = _U(0x9E3779B9)
_KEY_B = _U(0xBB67AE85)
_MASK32 = _U(0xFFFFFFFF)
_SHIFT32 = _U(32)
_ONE = _U(1)


@njit(inline="always")
def philox_word(k0, k1, counter):
    """k0, k1: uint64 holding the key's 32-bit halves; counter: uint64."""
    c0 = counter & _MASK32
    c1 = counter >> _SHIFT32
    c2 = _U(0)
    c3 = _U(0)
    for _ in range(10):
        pb = _ROUND_B * c2
        pa = _ROUND_A * c0
        c0 = (pb >> _SHIFT32) ^ c1 ^ k0
        c2 = (pa >> _SHIFT32) ^ c3 ^ k1
        c1 = pb & _MASK32
        c3 = pa & _MASK32
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


@njit(inline="always")
def keeps(k0, k1, counter, threshold):
    """Whether the element at ``counter`` is kept; threshold: uint64 in [0, 2**31)."""
    return (philox_word(k0, k1, counter) >> _ONE) >= threshold


def key_of(seed: int):
    """(k0, k1) of a seed, as the uint64 kernels take them."""
    return _U(seed & 0xFFFFFFFF), _U((seed >> 32) & 0xFFFFFFFF)
