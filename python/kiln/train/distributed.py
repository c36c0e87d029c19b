"""Data-parallel training on torch.distributed: the process group, the model wrapper (DDP, or
FSDP2 with ``--fsdp``) and the few collectives the Trainer needs. No communication of kiln's own.

``kiln train`` runs as one process, or as N under torchrun, which sets RANK, WORLD_SIZE and
LOCAL_RANK; ``World.from_env`` joins the process group (gloo on CPU, nccl on GPU, device
cuda:LOCAL_RANK). The Trainer holds a World and calls it at the few places where processes
meet; ``SINGLE`` (one process) makes every call the identity, so one-process runs take exactly
the path they took before distribution existed.

Conventions (docs/distributed.md):

- ``--batch-size`` is the global batch, the examples of one optimizer step over all ranks;
  each rank takes batch_size / world_size of them. A run is then the same run at any number
  of processes: one process with batch 2B and two with B each see the same samples per step,
  and a checkpoint continues at another world size.
- Each step's global batch is cut into per-rank strides (``data.ShardedBatches``); DDP
  averages gradients over ranks, and a rank's loss is scaled by n_rank * world / n_global when
  a short last batch splits unevenly, so the gradient is that of the global batch's mean.
- Evaluation is sharded the same way: every rank evaluates its stride of each batch and the
  loss and metric sums are all-reduced, so every rank gets the whole set's means.
- Checkpoints hold the plain model's state dict (the same keys as a one-process run; FSDP
  gathers the full tensors to rank 0) and only rank 0 writes them.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

import kiln


class DistributedError(ValueError):
    """A torchrun environment or a parallelism flag that cannot run."""


def _dist():
    import torch.distributed as dist

    return dist


class World:
    """One process of a data-parallel run: rank, size, device, and the collectives."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, fsdp: bool = False,
                 owns_group: bool = False):
        self.rank, self.size, self.local_rank, self.fsdp = rank, size, local_rank, fsdp
        self.owns_group = owns_group  # joined by from_env, so left by close

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, fsdp={self.fsdp})"

    # -- set-up ---------------------------------------------------------------------------

    @staticmethod
    def from_env(device: str | torch.device, fsdp: bool = False) -> tuple[World, torch.device]:
        """The World of this process and its device. Under torchrun (WORLD_SIZE > 1) it joins
        the default process group: gloo for ``cpu``, nccl for ``cuda`` with the device
        cuda:LOCAL_RANK (an explicit cuda:N is refused: torchrun picks each rank's GPU)."""
        device = torch.device(device)
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            if fsdp:
                raise DistributedError("--fsdp shards the model over the processes of a torchrun run; start it with "
                                       "torchrun --nproc_per_node=N (one process trains without --fsdp)")
            return World(), device
        try:
            rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError) as e:
            raise DistributedError(f"WORLD_SIZE={size} but RANK is missing or not a number ({e}); "
                                   "start distributed runs with torchrun") from None
        if fsdp:
            _require_fully_shard()
        dist = _dist()
        if device.type == "cuda":
            if device.index is not None:
                raise DistributedError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; "
                                       "pass --device cuda")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            backend = "gloo"
        owns_group = not dist.is_initialized()  # a caller's own process group is left to it
        if owns_group:
            dist.init_process_group(backend=backend, rank=rank, world_size=size,
                                    **({"device_id": device} if backend == "nccl" else {}))
        return World(rank, size, local_rank, fsdp, owns_group), device

    def close(self) -> None:
        """Leave the process group that from_env joined (every rank, also after an error)."""
        if self.owns_group:
            dist = _dist()
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False

    def seed_rank_streams(self, seed: int, salt: int = 0) -> None:
        """Give ranks other than 0 their own torch, numpy and python random streams (dropout,
        augmentation), drawn from (seed, rank, salt); rank 0 keeps the one-process stream."""
        if self.rank == 0:
            return
        value = (seed * 1_000_003 + self.rank * 7919 + salt) % (2**63)
        kiln.ops.random.manual_seed(value)   # torch and kiln's dropout generator
        np.random.seed(value % (2**32))
        random.seed(value)

    def local_batch_size(self, batch_size: int) -> int:
        if batch_size % self.size:
            raise DistributedError(f"--batch-size {batch_size} is the global batch (examples per optimizer step "
                                   f"over all {self.size} processes) and must be a multiple of {self.size}")
        return batch_size // self.size

    # -- the model ------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module training calls: ``model`` itself on one process, a DistributedDataParallel
        around it, or with fsdp ``model`` itself sharded in place by ``fully_shard`` (every
        block of its ModuleLists, then the root)."""
        if self.fsdp:
            fully_shard = _require_fully_shard()
            for block in transformer_blocks(model):
                fully_shard(block)
            fully_shard(model)
            return model
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def _options(self, rank0_only: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # cpu_offload keeps the gathered copy on rank 0 only (the others get an empty dict)
        return StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)

    def model_state_dict(self, model: nn.Module, rank0_only: bool = True) -> dict:
        """The plain model's state dict: the keys of a one-process run. With fsdp the full
        tensors gathered on CPU, on rank 0 only (or on every rank with ``rank0_only=False``)."""
        if not self.fsdp:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=self._options(rank0_only))
        return {k: v.detach().cpu() for k, v in state.items()}

    def load_model_state_dict(self, model: nn.Module, state: dict) -> None:
        """Load a full state dict (a one-process run's or a gathered one); with fsdp rank 0's
        copy is scattered to the shards (the other ranks' ``state`` may be empty)."""
        if not self.fsdp:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=self.distributed))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """torch's optimizer state_dict layout (parameters by index); with fsdp gathered to rank 0."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        by_name = get_optimizer_state_dict(model, optimizer, options=self._options(True))
        if not by_name:
            return {}
        index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
        return {"state": {index[name]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                          for name, s in by_name["state"].items()},
                "param_groups": [{**g, "params": [index[name] for name in g["params"]]}
                                 for g in by_name["param_groups"]]}

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _param_names(model, optimizer)
        by_name = {"state": {names[i]: s for i, s in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        # every rank read the checkpoint itself: each keeps its own shard of the full tensors
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    # -- collectives ----------------------------------------------------------------------

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Elementwise sums over ranks (float64); the values themselves on one process."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        _dist().all_reduce(t)
        return t.tolist()

    def all_gather_object(self, value) -> list:
        if not self.distributed:
            return [value]
        out = [None] * self.size
        _dist().all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.distributed:
            _dist().barrier()


SINGLE = World()


def _require_fully_shard():
    """torch's FSDP2 ``fully_shard`` (torch >= 2.6 exports it from torch.distributed.fsdp)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise DistributedError(f"--fsdp needs FSDP2's fully_shard, which torch {torch.__version__} does not "
                                   "have; run without --fsdp (DistributedDataParallel)") from None
    return fully_shard


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: the elements of the model's ModuleLists (a
    Transformer's ``blocks``, ``encoder``, ``decoder``); empty for other models."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (what its state_dict's indices stand for)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]

