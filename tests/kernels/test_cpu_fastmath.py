"""kiln.kernels.cpu.fastmath: float32 forms against float64 libm, float64 forms exact."""

import math

import numpy as np
import pytest
from numba import njit

from kiln.kernels.cpu import fastmath


def _vectorized(fn):
    @njit
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = fn(x[i])
        return out
    return apply


GRID = np.concatenate([np.linspace(-100, 100, 200_001), np.linspace(-1e-3, 1e-3, 2001),
                       np.array([0.0, -0.0, 1e-30, -1e-30, 88.0, -87.0])])


@pytest.mark.parametrize("name, bound, kind", [
    ("exp", 3e-7, "relative"),   # a few float32 ulps
    ("tanh", 6e-7, "relative"),
    ("erf", 3e-7, "absolute"),   # Abramowitz & Stegun 7.1.26 (1.5e-7) plus float32 rounding
    ("erf_small", 1e-6, "relative"),  # the series below 0.5: no cancellation
    ("one_plus_erf", 6e-7, "absolute"),  # A&S plus rounding of values in [1, 2) (ulp 2.4e-7)
])
def test_float32_forms(name, bound, kind):
    x64 = GRID[np.abs(GRID) <= 87] if name == "exp" else GRID
    if name == "erf_small":
        name, x64 = "erf", GRID[(np.abs(GRID) < 0.5) & (GRID != 0)]
    x32 = x64.astype(np.float32)
    got = _vectorized(getattr(fastmath, name))(x32)
    assert got.dtype == np.float32
    exact = (lambda v: 1.0 + math.erf(v)) if name == "one_plus_erf" else getattr(math, name)
    want = np.array([exact(float(v)) for v in x32])
    err = np.abs(got.astype(np.float64) - want)
    if kind == "relative":
        err = err / np.maximum(np.abs(want), np.finfo(np.float32).tiny)
    worst = int(np.argmax(err))
    assert err[worst] < bound, f"{name}({x32[worst]}) = {got[worst]}, want {want[worst]}"


def test_float32_exp_underflows_to_zero():
    x = np.array([-87.5, -100.0, -1e4, -np.inf], dtype=np.float32)
    assert (_vectorized(fastmath.exp)(x) == 0).all()


@pytest.mark.parametrize("name", ["exp", "tanh", "erf", "one_plus_erf"])
def test_float64_forms_are_libm(name):
    x = np.linspace(-30, 30, 10_001)
    got = _vectorized(getattr(fastmath, name))(x)
    exact = (lambda v: 1.0 + math.erf(v)) if name == "one_plus_erf" else getattr(math, name)
    want = np.array([exact(v) for v in x])
    np.testing.assert_array_max_ulp(got, want, maxulp=1)


def test_like_keeps_float32():
    @njit
    def half(x):
        return fastmath.like(x, 0.5) * x

    from numba import types

    half(np.float32(3.0))
    half(3.0)
    assert [sig.return_type for sig in half.nopython_signatures] == [types.float32, types.float64]


@njit
def _erf_and_gauss_parts(x, one_plus, gauss):
    for i in range(x.size):
        one_plus[i], gauss[i] = fastmath.one_plus_erf_and_gauss(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_plus_erf_and_gauss_share_one_exp_and_keep_each_bound(dtype):
    x = GRID.astype(dtype)
    one_plus, gauss = np.empty_like(x), np.empty_like(x)
    _erf_and_gauss_parts(x, one_plus, gauss)
    want_erf = np.array([1.0 + math.erf(float(v)) for v in x])
    # exp of the square as the kernel rounds it (x * x in x's dtype): the exp itself is what is checked
    want_gauss = np.array([math.exp(-float(v)) for v in x * x])
    if dtype == np.float64:
        np.testing.assert_array_max_ulp(one_plus, want_erf, maxulp=1)
        np.testing.assert_array_max_ulp(gauss, want_gauss, maxulp=1)
    else:  # one_plus_erf's absolute bound; exp's relative bound where e^{-x^2} is a normal float32
        assert np.abs(one_plus - want_erf).max() < 6e-7
        normal = want_gauss > np.finfo(np.float32).tiny
        assert (np.abs(gauss - want_gauss)[normal] / want_gauss[normal]).max() < 4e-7
        assert (gauss[~normal] < 2 * np.finfo(np.float32).tiny).all()
