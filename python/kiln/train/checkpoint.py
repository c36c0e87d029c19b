"""Checkpoints: atomic save, checked load, and every RNG state a run uses.

A checkpoint is one ``torch.save``d dict:

    model, optimizer, scheduler   state_dicts
    step, epoch                   optimizer steps taken, epochs completed
    trainer                       the Trainer's own state (position in the epoch, best, history)
    rng                           torch CPU and CUDA, numpy, python ``random``, the data
                                  order's generator, and any state registered with
                                  ``register_rng_state`` (kiln's dropout counter goes there)
    config                        task, model, the model's config dict, the run's settings
    kiln_version

``save`` never leaves a half-written file under the final name: it writes a temporary file
in the same folder, flushes and fsyncs it, renames it over the target with ``os.replace``
(atomic on POSIX and Windows) and fsyncs the folder so that the rename itself survives a
power cut. A process killed at any instant leaves either the new file or the previous one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "rng", "config", "kiln_version")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not kiln's, or of another task or model."""


# name -> (get_state, set_state) of RNGs outside torch, numpy and random; kiln's dropout
# counter registers here when kiln has one, and is then saved and restored with the rest.
_EXTRA_RNG: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}


def register_rng_state(name: str, get_state: Callable[[], Any], set_state: Callable[[Any], None]) -> None:
    """Save ``get_state()`` in every checkpoint's ``rng[name]`` and restore it with ``set_state``.

    The state must be made of tensors, numbers, strings, lists, tuples and dicts
    (what ``torch.load(weights_only=True)`` accepts).
    """
    _EXTRA_RNG[name] = (get_state, set_state)


def rng_state() -> dict:
    """Every RNG state of this process as a checkpointable dict. (The Trainer adds ``data``,
    its data order's generator as of the start of the epoch.)"""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's key as a tensor, so that the checkpoint loads with weights_only=True
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
        "extra": {name: get() for name, (get, _) in _EXTRA_RNG.items()},
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved. CUDA states are restored when the same number of
    GPUs is visible (a CPU-only resume of a GPU run has no CUDA RNG to restore)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for name, value in state.get("extra", {}).items():
        if name in _EXTRA_RNG:
            _EXTRA_RNG[name][1](value)


def error_line(e: BaseException) -> str:
    """``Type: first line of the message``, for one-line reports."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _fsync_dir(folder: str) -> None:
    if os.name != "posix":  # Windows cannot open a directory; its rename is durable on its own
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` atomically: the new file or the old one, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A fixed temporary name in the same folder (os.replace cannot cross file systems):
    # a save killed half-way leaves it behind, and the next save overwrites it.
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a kiln checkpoint; a missing, unreadable or foreign file is a ``CheckpointError``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a torch checkpoint "
                              f"({error_line(e)})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a kiln checkpoint dict")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is not a kiln checkpoint: missing {', '.join(missing)}")
    return checkpoint


def check_matches(checkpoint: dict, path: str, task: str, model: str) -> None:
    """Refuse a checkpoint of another task or model than the one asked for."""
    config = checkpoint["config"]
    if (config.get("task"), config.get("model")) != (task, model):
        raise CheckpointError(f"checkpoint {path!r} is of task {config.get('task')!r} model "
                              f"{config.get('model')!r}, not task {task!r} model {model!r}")
