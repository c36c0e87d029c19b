"""Output buffers for the CPU kernels: large ones on transparent huge pages.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh mmap
and unmaps it on free, so every large output of every call starts as untouched 4 KiB
pages: the kernel writing it takes one page fault per 4 KiB, each zeroing its page.
On this 2-core VM that costs more than the computation itself: a 32 MiB float32 output
took 18 ms of faults against 3.4 ms for copying into an existing buffer (torch's own
``clone`` pays the same, 22 ms). An anonymous private mapping advised MADV_HUGEPAGE
faults in 2 MiB pages, 512 times fewer faults: allocating and filling it took 4.6 ms.

Below ``HUGE_MIN_BYTES`` (and where the kernel has no huge pages, or the dtype is not one
torch.frombuffer takes) ``empty`` is ``torch.empty``: malloc's own free lists serve small
sizes without faults, and tests that poison ``torch.empty`` still see those buffers.

Mappings up to ``POOL_MAX_BYTES`` are kept after their last tensor is freed and handed out
again to the next request of the same size: a step that allocates and frees the same
outputs every iteration then touches no fresh page at all. malloc does not manage that
for 4-32 MiB blocks: its threshold rises to the size of a freed mmapped block, but two of
them freed together at the top of the heap pass its trim threshold and go back to the
system, so a layer_norm forward+backward at 1024 x 1024 faulted in 8 MiB per step (2.8 ms
at best, 12 ms median on this loaded VM, for 0.3 + 1.2 ms of kernels). A mapping is free
when nothing but the pool refers to it: the storage of every tensor made from it holds a
reference to the mmap object (the buffer it exported) until the last view and numpy array
of it are gone. At most ``POOL_IDLE_BYTES`` of free mappings are kept (the oldest beyond
that are unmapped); ``release()`` unmaps them all.
"""

import math
import mmap
import sys
import threading

import numpy as np
import torch

HUGE_PAGE = 1 << 21
HUGE_MIN_BYTES = 4 << 20
POOL_MAX_BYTES = 256 << 20
POOL_IDLE_BYTES = 512 << 20
_HAS_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")

_pool: list = []  # pooled mmaps, oldest first, in use or free
_pool_lock = threading.Lock()


def _refs(buf) -> int:
    return sys.getrefcount(buf)


def _refs_through_a_call(buf) -> int:
    return _refs(buf)  # the same depth of calls as _is_free's


def _refs_when_free() -> int:
    """What _is_free sees for an object that only a list refers to, called on the loop
    variable of a loop over that list as the pool calls it (measured, not assumed: the
    count of the references calls and loops hold depends on the Python version)."""
    for probe in [object()]:
        return _refs_through_a_call(probe)


_FREE_REFS = _refs_when_free()


def _is_free(buf) -> bool:
    """Called on the loop variable of a loop over _pool: no tensor uses the mapping."""
    return _refs(buf) <= _FREE_REFS


def _new_mapping(size: int):
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: 4 KiB pages, still correct
        pass
    return buf


def _mapping(size: int):
    """A mapping of size bytes: a free pooled one if there is one, else a new one (pooled
    when size <= POOL_MAX_BYTES)."""
    if size > POOL_MAX_BYTES:
        return _new_mapping(size)
    with _pool_lock:
        for buf in _pool:
            if len(buf) == size and _is_free(buf):
                return buf
        buf = _new_mapping(size)
        _pool.append(buf)
        idle = 0
        for old in reversed(_pool):  # newest first: the oldest free ones go beyond the limit
            if old is not buf and _is_free(old):
                idle += len(old)
                if idle > POOL_IDLE_BYTES:
                    _pool.remove(old)
        return buf


def release() -> None:
    """Unmap the pooled mappings no tensor uses."""
    with _pool_lock:
        _pool[:] = [buf for buf in _pool if not _is_free(buf)]


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor; large ones on 2 MiB pages."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not _HAS_HUGE_PAGES or nbytes < HUGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    # Whole huge pages and one spare to align the start; the tensor keeps the mapping alive
    # and munmap runs when the last view of it is freed (and the pool lets go of it).
    buf = _mapping(-(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE)
    offset = -np.frombuffer(buf, np.uint8, count=1).ctypes.data % HUGE_PAGE
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, t.dtype)
