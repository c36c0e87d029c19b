"""Transcendentals for numba kernels that stay vectorizable in float32.

numba from pip has no SVML, so ``math.exp``/``erf``/``tanh`` in a loop are scalar libm
calls, and a float literal in float32 code promotes it to float64 (DESIGN.md). These
functions dispatch on the argument's type at compile time (numba ``overload``):

* float64: ``math.*`` itself, accurate to an ulp (the float64 bounds are 1e-10);
* float32: plain float32 arithmetic LLVM can vectorize, each within a few float32 ulps
  of the true value in relative terms (erf: 3e-7 absolute), well inside the 1e-5
  float32 bound.

``like(x, c)`` is the constant ``c`` in ``x``'s float type: write ``like(z, 0.5) * z``,
never ``0.5 * z``, in code that must stay float32.
"""

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# The options of every top-level numba kernel. error_model="numpy": a float division by zero
# gives inf / nan as IEEE says instead of raising ZeroDivisionError, in the whole kernel.
# numba already lowers prange bodies that way; elsewhere the check it emits around each
# division keeps LLVM from vectorizing the loop (a serial sigmoid over 16k float32: 124 us
# with the check, 15 us without; tanh 181 and 21 us).
KERNEL_OPTIONS = dict(parallel=True, cache=True, error_model="numpy")

_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693145751953125)  # ln 2 split so that n * _LN2_HI is exact
_LN2_LO = _F32(1.4286067653e-06)
_EXP_MAX = _F32(88.0)  # keeps 2^n finite: n + 127 <= 254
_EXP_MIN = _F32(-87.33654475)
# 1/k! for the Taylor polynomial of e^r on |r| <= ln2/2: truncation below 2e-7 relative.
_C2, _C3, _C4, _C5, _C6 = (_F32(1 / math.factorial(k)) for k in range(2, 7))
_C7 = _F32(1 / math.factorial(7))
# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ...)) e^{-x^2}, t = 1/(1 + p x).
_ERF_P = _F32(0.3275911)
_ERF_A = tuple(_F32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
# erf below 0.5: Maclaurin series (2/sqrt(pi)) sum (-1)^k x^(2k+1) / (k! (2k+1)), to k = 5,
# which keeps small arguments accurate in relative terms where 1 - (...) e^{-x^2} cancels.
_ERF_SMALL = _F32(0.5)
_E0, _E1, _E2, _E3, _E4, _E5 = (_F32(2 / math.sqrt(math.pi) * (-1) ** k / (math.factorial(k) * (2 * k + 1)))
                                for k in range(6))
# 1 + erf for gelu: Eigen's float erf (generic_fast_erf_float), x P(x^2) / Q(x^2) on x clamped
# to +-3.8325 (where erf rounds to +-1 in float32): 12 FMAs and one division, no exp.
# The A&S form above needs an exp besides its division, and gelu over 1M float32 ran at
# 1.0 ms with it against 0.52 ms with this one (torch's SLEEF-based gelu: 0.97 ms), with
# the same norm-wise error against float64 gelu (5e-8; largest absolute error 1e-6).
_ERF_CLAMP = _F32(3.832506856900711)
_ERF_NUM = tuple(_F32(c) for c in (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                                   -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                                   -1.60960333262415e-02))
_ERF_DEN = tuple(_F32(c) for c in (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                                   -7.37332916720468e-03, -1.42647390514189e-02))
# tanh: odd Taylor series below 0.3 (no cancellation), 1 - 2/(e^{2x}+1) above.
_TANH_SMALL = _F32(0.3)
_T3, _T5, _T7, _T9 = (_F32(c) for c in (-1 / 3, 2 / 15, -17 / 315, 62 / 2835))


@intrinsic
def _int_bits_as_f32(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (2^n from its exponent field)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def like(x, c):
    return c


def exp(x):
    return math.exp(x)


def erf(x):
    return math.erf(x)


def tanh(x):
    return math.tanh(x)


def one_plus_erf(x):
    """1 + erf(x), the form gelu needs (float32: accurate to 1e-7 absolute, as gelu's
    0.5 z (1 + erf) needs, not relative in the left tail)."""
    return 1.0 + math.erf(x)


def one_plus_erf_and_gauss(x):
    """(1 + erf(x), e^{-x^2}): gelu's derivative needs both, and A&S 7.1.26's erfc is a
    polynomial times that same e^{-x^2}, so in float32 one exp serves both."""
    return 1.0 + math.erf(x), math.exp(-x * x)


def _is_f32(x) -> bool:
    return isinstance(x, types.Float) and x.bitwidth == 32


@overload(like)
def _like(x, c):
    if _is_f32(x):
        return lambda x, c: np.float32(c)
    return lambda x, c: c


def _exp_f32(x):
    if x < _EXP_MIN:  # underflow: 0, as softmax of very negative logits needs
        return np.float32(0.0)
    x = min(x, _EXP_MAX)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _C6 + r * _C7
    p = _C5 + r * p
    p = _C4 + r * p
    p = _C3 + r * p
    p = _C2 + r * p
    p = np.float32(1.0) + r * (np.float32(1.0) + r * p)
    return p * _int_bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


def _erf_f32(x):
    a = abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + _ERF_P * a)
    a1, a2, a3, a4, a5 = _ERF_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    large = np.float32(1.0) - poly * exp(-a * a)
    a2 = a * a
    small = a * (_E0 + a2 * (_E1 + a2 * (_E2 + a2 * (_E3 + a2 * (_E4 + a2 * _E5)))))
    y = small if a < _ERF_SMALL else large
    return y if x >= 0 else -y


def _one_plus_erf_f32(x):
    # the rational erf (no exp; see _ERF_NUM): its absolute error, 1e-7, is what gelu's
    # 0.5 z (1 + erf) needs; the far left tail (z < -5.4, gelu above -1e-7) comes out 0
    x = min(max(x, -_ERF_CLAMP), _ERF_CLAMP)
    x2 = x * x
    n13, n11, n9, n7, n5, n3, n1 = _ERF_NUM
    d8, d6, d4, d2, d0 = _ERF_DEN
    num = x * (n1 + x2 * (n3 + x2 * (n5 + x2 * (n7 + x2 * (n9 + x2 * (n11 + x2 * n13))))))
    den = d0 + x2 * (d2 + x2 * (d4 + x2 * (d6 + x2 * d8)))
    return np.float32(1.0) + num / den


def _one_plus_erf_and_gauss_f32(x):
    a = abs(x)
    gauss = exp(-a * a)
    t = np.float32(1.0) / (np.float32(1.0) + _ERF_P * a)
    a1, a2, a3, a4, a5 = _ERF_A
    erfc = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * gauss
    return (np.float32(2.0) - erfc if x >= 0 else erfc), gauss


def _tanh_f32(x):
    a = abs(x)
    a2 = a * a
    small = a + a * a2 * (_T3 + a2 * (_T5 + a2 * (_T7 + a2 * _T9)))
    large = np.float32(1.0) - np.float32(2.0) / (exp(np.float32(2.0) * a) + np.float32(1.0))
    y = small if a < _TANH_SMALL else large
    return y if x >= 0 else -y


def _register(generic, f32_impl, f64_impl):
    @overload(generic)
    def _impl(x):
        return f32_impl if _is_f32(x) else f64_impl


_register(exp, _exp_f32, lambda x: math.exp(x))
_register(erf, _erf_f32, lambda x: math.erf(x))
_register(tanh, _tanh_f32, lambda x: math.tanh(x))
_register(one_plus_erf, _one_plus_erf_f32, lambda x: 1.0 + math.erf(x))
_register(one_plus_erf_and_gauss, _one_plus_erf_and_gauss_f32, lambda x: (1.0 + math.erf(x), math.exp(-x * x)))
