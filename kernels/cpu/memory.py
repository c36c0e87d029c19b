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
That limit is glibc's largest mmap threshold, 32 MiB: below it the threshold rises to the
size of the first large block freed, so from the second call on malloc serves a block of
that size again from its heap, pages already faulted in (4 MiB + fill: 0.21 ms against
0.28 ms on fresh huge pages, 0.10 ms into an existing buffer; 16 MiB: 0.8 against 1.5
ms). From 32 MiB up every malloc is a fresh mmap (64 MiB + fill: 102 ms against 14.5).
"""

import math
import mmap

import numpy as np
import torch

HUGE_PAGE = 1 << 21
HUGE_MIN_BYTES = 32 << 20
_HAS_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor; large ones on 2 MiB pages."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not _HAS_HUGE_PAGES or nbytes < HUGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    # One spare huge page to align the start; the tensor keeps the mapping alive and
    # munmap runs when the last view of it is freed.
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: 4 KiB pages, still correct
        pass
    offset = -np.frombuffer(buf, np.uint8, count=1).ctypes.data % HUGE_PAGE
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, t.dtype)
