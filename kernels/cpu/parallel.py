"""A numba kernel in two builds, chosen per call by the size of the work.

Entering a numba parallel region wakes the OpenMP team and joins it again: ~5-15 us on the
idle 2-core machine and 0.05-2 ms when other processes hold the cores (measured: a 4x4
column sum, 0.3 us serial, 57-1937 us parallel at load 5), more than the whole kernel
below a few ten thousand elements. torch runs its CPU loops on one thread below
``at::internal::GRAIN_SIZE`` (32768 elements) for the same reason; ``SizedKernel`` does
the same with a second, serial build of the kernel (``prange`` runs as ``range`` there):
the same code, so the same results bit for bit.
"""

from __future__ import annotations

import types

from numba import njit

from .fastmath import KERNEL_OPTIONS

# Elements of work below which one thread runs the kernel (torch's GRAIN_SIZE).
GRAIN = 32768


def _renamed(fn: types.FunctionType, suffix: str) -> types.FunctionType:
    """A copy of ``fn`` under another name: numba's on-disk cache is indexed by the qualified
    name, so the serial build must not share the parallel build's entries."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__doc__ = fn.__doc__
    return copy


class SizedKernel:
    """``kernel(work, *args)``: the parallel build when ``work`` (elements) reaches GRAIN,
    else the serial one. Both build lazily, on their first call."""

    def __init__(self, fn: types.FunctionType, options: dict):
        options = {**KERNEL_OPTIONS, **options, "parallel": True}
        self.parallel = njit(**options)(fn)
        self.serial = njit(**{**options, "parallel": False})(_renamed(fn, "_serial"))
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __call__(self, work: int, *args):
        return (self.parallel if work >= GRAIN else self.serial)(*args)


def sized_kernel(fn: types.FunctionType = None, **options):
    """Decorator: ``fn`` (a kernel written with prange) as a SizedKernel; ``@sized_kernel(**options)``
    adds numba options to KERNEL_OPTIONS."""
    if fn is None:
        return lambda f: SizedKernel(f, options)
    return SizedKernel(fn, options)
