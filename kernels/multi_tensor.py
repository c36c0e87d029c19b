"""The multi-tensor table every fused optimizer form reads (numba, Triton, CUDA C++).

A group of tensors is cut into chunks of ``chunk`` elements; each chunk is one unit of
parallel work (a numba prange iteration, a Triton program, a CUDA block), as in apex's
multi_tensor_apply. One int64 tensor holds, in this order:

    addresses  (K, n)   data pointer of tensor i of list k (param, grad, state...)
    sizes      (n,)     elements of tensor i
    chunk_of   (C,)     the tensor chunk c belongs to
    chunk_at   (C,)     its first element
    scalars    (S, n)   per-tensor float64 values (bias corrections, scales), bit-cast
    constants  (m,)     float64 hyperparameters, bit-cast (Triton takes Python floats
                        as float32; its float64 math reads them from here)

so a GPU form moves it to the device in one copy. Only torch and numpy here: every form
(and kiln.ops.optim's cuda form) imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MultiTensorTable:
    data: torch.Tensor  # int64, 1-D, on the device the kernel reads it from
    lists: int
    tensors: int
    chunks: int
    chunk: int
    scalar_rows: int
    constant_count: int = 0

    def _section(self, start: int, length: int) -> torch.Tensor:
        return self.data[start:start + length]

    @property
    def addresses(self) -> torch.Tensor:
        return self._section(0, self.lists * self.tensors).view(self.lists, self.tensors)

    @property
    def sizes(self) -> torch.Tensor:
        return self._section(self.lists * self.tensors, self.tensors)

    @property
    def chunk_of(self) -> torch.Tensor:
        return self._section((self.lists + 1) * self.tensors, self.chunks)

    @property
    def chunk_at(self) -> torch.Tensor:
        return self._section((self.lists + 1) * self.tensors + self.chunks, self.chunks)

    @property
    def scalars(self) -> torch.Tensor:
        start = (self.lists + 1) * self.tensors + 2 * self.chunks
        return self._section(start, self.scalar_rows * self.tensors).view(torch.float64).view(
            self.scalar_rows, self.tensors)

    @property
    def constants(self) -> torch.Tensor:
        return self._section(self.offsets()[5], self.constant_count).view(torch.float64)

    def offsets(self) -> tuple[int, int, int, int, int, int]:
        """Element offsets of the six sections in data (what the GPU forms pass)."""
        k, n, c = self.lists, self.tensors, self.chunks
        scalars_at = (k + 1) * n + 2 * c
        return 0, k * n, (k + 1) * n, (k + 1) * n + c, scalars_at, scalars_at + self.scalar_rows * n

    def to(self, device) -> MultiTensorTable:
        data = self.data if self.data.device == torch.device(device) else self.data.to(device)
        return MultiTensorTable(data, self.lists, self.tensors, self.chunks, self.chunk, self.scalar_rows,
                                self.constant_count)


def build(lists: list[list[torch.Tensor]], chunk: int, scalars=(), constants=()) -> MultiTensorTable:
    """The table of ``lists`` (each a list of n contiguous tensors, list k's tensor i of the
    same size for every k), cut in chunks of ``chunk`` elements; ``scalars``: rows of n
    float64 values each; ``constants``: float64 values. Zero-size tensors get no chunk."""
    k, n = len(lists), len(lists[0])
    sizes = np.fromiter((t.numel() for t in lists[0]), dtype=np.int64, count=n)
    counts = -(-sizes // chunk)
    chunks = int(counts.sum())
    scalar_rows = len(scalars)
    scalars_at = (k + 1) * n + 2 * chunks
    data = np.empty(scalars_at + scalar_rows * n + len(constants), dtype=np.int64)
    data[:k * n] = np.fromiter((t.data_ptr() for ts in lists for t in ts), dtype=np.int64, count=k * n)
    data[k * n:(k + 1) * n] = sizes
    chunk_of = np.repeat(np.arange(n, dtype=np.int64), counts)
    first_chunk = np.cumsum(counts) - counts
    data[(k + 1) * n:(k + 1) * n + chunks] = chunk_of
    data[(k + 1) * n + chunks:(k + 1) * n + 2 * chunks] = (
        np.arange(chunks, dtype=np.int64) - first_chunk[chunk_of]) * chunk
    if scalar_rows:
        data[scalars_at:scalars_at + scalar_rows * n] = np.asarray(scalars, dtype=np.float64).reshape(-1).view(
            np.int64)
    data[scalars_at + scalar_rows * n:] = np.asarray(constants, dtype=np.float64).view(np.int64)
    return MultiTensorTable(torch.from_numpy(data), k, n, chunks, chunk, scalar_rows, len(constants))


def device_ngd_scales(sums_of_squares: torch.Tensor, lr: float, per_tensor: bool, maximize: bool) -> torch.Tensor:
    """NGD's lr / ||g|| per tensor from float64 sums of squares, on their device (no copy
    to the host): each tensor's norm (per_tensor) or the norm of all; 0 where the norm is 0."""
    norms = sums_of_squares.sqrt() if per_tensor else sums_of_squares.sum().sqrt().expand_as(sums_of_squares)
    scales = torch.where(norms > 0, lr / norms, torch.zeros_like(norms))
    return -scales if maximize else scales
