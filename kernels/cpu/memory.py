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
                    _START.pop(id(old), None)
                    _pool.remove(old)
        return buf


def release() -> None:
    """Unmap the pooled mappings no tensor uses."""
    with _pool_lock:
        kept = [buf for buf in _pool if not _is_free(buf)]
        for key in {id(buf) for buf in _pool} - {id(buf) for buf in kept}:
            _START.pop(key, None)
        _pool[:] = kept


_ITEMSIZE: dict = {}  # dtype -> bytes per element (torch.dtype.itemsize is torch >= 2.1)
_START: dict = {}  # id(mapping) -> byte offset of its first 2 MiB boundary (a pooled mapping's is fixed)


def _itemsize(dtype: torch.dtype) -> int:
    size = _ITEMSIZE.get(dtype)
    if size is None:
        size = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return size


def _aligned_offset(buf) -> int:
    return -np.frombuffer(buf, np.uint8, count=1).ctypes.data % HUGE_PAGE


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor; large ones on 2 MiB pages."""
    count = math.prod(shape)
    if not _HAS_HUGE_PAGES or count * _itemsize(dtype) < HUGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    # Whole huge pages and one spare to align the start; the tensor keeps the mapping alive
    # and munmap runs when the last view of it is freed (and the pool lets go of it).
    size = -(-count * _itemsize(dtype) // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE
    buf = _mapping(size)
    if size > POOL_MAX_BYTES:
        offset = _aligned_offset(buf)
    else:  # pooled, so alive while _START holds its id (ids of freed mappings are removed)
        offset = _START.get(id(buf))
        if offset is None:
            offset = _START[id(buf)] = _aligned_offset(buf)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, t.dtype)
