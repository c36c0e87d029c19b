"""Atomics and a spin barrier for numba kernels whose parallel parts meet every step.

numba has no CPU atomics; these intrinsics emit LLVM's (atomicrmw, cmpxchg, atomic load
and store) on a 1-d int64 array's elements, for the rnn layer kernels' per-step barrier
between the workers of one prange (kernels/cpu/rnn.py). A waiter spins with the CPU's
pause hint and, past _SPINS_BEFORE_YIELD, calls sched_yield on every turn: under
oversubscription (more runnable threads than cores) a worker that only spun would hold
the core the one it waits for needs.

A team of parties that spin-wait for one another deadlocks if the OpenMP runtime runs
two of them on one thread (a nested parallel region gets one thread; a pool with fewer
threads than parts runs them one after the other), so a team is formed first
(join_team): each part checks in, and a part that has waited _JOIN_TURNS turns for the
others closes the team and does all of the work alone; parts that arrive later find it
closed and do nothing. Nothing waits unboundedly for a thread that may never come.

The libc sched_yield is registered with LLVM under a kiln_ name at import (as blas.py
does for MKL), so a kernel cached on disk links against it by name in a new process.
"""

from __future__ import annotations

import ctypes
import platform

import llvmlite.binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_YIELD_SYMBOL = "kiln_sched_yield"


def _register_sched_yield() -> bool:
    try:
        address = ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value
    except (OSError, AttributeError, TypeError):
        return False
    if not address:
        return False
    llvm.add_symbol(_YIELD_SYMBOL, address)
    return True


# Whether the barrier can run (libc's sched_yield reachable: Linux, macOS).
SPIN_BARRIER = _register_sched_yield()
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _element_pointer(context, builder, signature, args):
    array_type, index_type = signature.args[0], signature.args[1]
    array = context.make_array(array_type)(context, builder, args[0])
    index = context.cast(builder, args[1], index_type, types.intp)
    return cgutils.get_item_pointer(context, builder, array_type, array, [index], wraparound=False)


def _int64_vector(array):
    return isinstance(array, types.Array) and array.ndim == 1 and array.dtype == types.int64


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value as one atomic read-modify-write (sequentially consistent)
    -> the value before."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature, args)
        addend = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, addend, "seq_cst")

    return types.int64(array, index, value), codegen


@intrinsic
def atomic_compare_exchange(typingctx, array, index, expected, desired):
    """array[index] = desired if it holds expected, atomically (sequentially consistent)
    -> the value before (== expected when the exchange happened)."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature, args)
        old = context.cast(builder, args[2], signature.args[2], types.int64)
        new = context.cast(builder, args[3], signature.args[3], types.int64)
        return builder.extract_value(builder.cmpxchg(pointer, old, new, "seq_cst", "seq_cst"), 0)

    return types.int64(array, index, expected, desired), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index], an acquire load (what other threads wrote before their release of it
    is visible after)."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element_pointer(context, builder, signature, args), "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def atomic_store(typingctx, array, index, value):
    """array[index] = value, a release store."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature, args)
        builder.store_atomic(context.cast(builder, args[2], signature.args[2], types.int64), pointer, "release", 8)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint (x86 pause: the core's other work and the memory order machine
    get the cycles); nothing elsewhere."""

    def codegen(context, builder, signature, args):
        if _X86:
            pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                   "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def sched_yield(typingctx):
    """libc's sched_yield: the core to another runnable thread, if any. Only when
    SPIN_BARRIER."""

    def codegen(context, builder, signature, args):
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), _YIELD_SYMBOL)
        builder.call(function, [])
        return context.get_dummy_value()

    return types.void(), codegen


# Turns a waiter spins (pause, ~10-40 ns each) before it yields on every turn: a few
# microseconds, about the spread of two workers' arrival at a step's end on an idle
# machine; longer and an oversubscribed core spins while its partner waits to run.
_SPINS_BEFORE_YIELD = 1000
# Turns (mostly sched_yield calls) a part waits for the rest of its team before it closes
# the team and works alone: ~2-10 ms (a yield with nothing else runnable is ~1 us; with
# other threads runnable, a slice of theirs).
_JOIN_TURNS = 3000

# The state array's slots, each on its own 64-byte line: team check-ins, barrier arrivals,
# barrier generation. A state array holds STATE_SIZE int64 zeros to start.
_JOINED, _ARRIVED, _GENERATION = 0, 8, 16
STATE_SIZE = 24
# Added to the check-in count when a part closes the team.
_CLOSED = 1 << 40


@njit(inline="always")
def _pause(turn):
    if turn < _SPINS_BEFORE_YIELD:
        cpu_relax()
    else:
        sched_yield()


@njit(inline="always")
def join_team(state, part, parties):
    """Called once by each of `parties` parts (prange iterations) with a fresh state array
    -> 1: the team formed, run part `part` of the split work (and meet at barrier());
    2: the team was closed, run all of the work alone, without barriers; 0: do nothing
    (the team was closed, another part does all of the work)."""
    arrived = atomic_add(state, _JOINED, 1)
    if arrived >= _CLOSED:
        return 0
    turn = 0
    while True:
        joined = atomic_load(state, _JOINED)
        if joined >= _CLOSED:  # another part gave up on the team; the first to check in works
            return 2 if arrived == 0 else 0
        if joined == parties:
            return 1
        if turn >= _JOIN_TURNS and atomic_compare_exchange(state, _JOINED, joined, joined + _CLOSED) == joined:
            return 2 if arrived == 0 else 0
        _pause(turn)
        turn += 1


@njit(inline="always")
def barrier(state, parties):
    """Every part of a formed team waits here until all `parties` have arrived; what each
    wrote before is visible to all after."""
    generation = atomic_load(state, _GENERATION)
    if atomic_add(state, _ARRIVED, 1) == parties - 1:  # the last to arrive opens it
        atomic_store(state, _ARRIVED, 0)
        atomic_add(state, _GENERATION, 1)
    else:
        turn = 0
        while atomic_load(state, _GENERATION) == generation:
            _pause(turn)
            turn += 1
