"""Which backend runs an op.

Backends: ``triton`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``),
``cuda`` (the compiled extension ``kiln._cuda``), ``cpu`` (numba) and ``reference``
(pure PyTorch, any device).

The choice, most specific first:

1. a per-op choice: ``use("cuda", ops=["linear_act"])``;
2. the global choice: ``use("cpu")`` (a setter, and a context manager that restores
   the previous choice on exit);
3. the ``KILN_BACKEND`` environment variable;
4. the default for the tensors' device: ``triton`` for CUDA tensors, ``cpu`` for CPU tensors.

A backend the user asked for (1-3) that cannot run these tensors is an error naming
what is missing. Only the default (4) may step aside: when it does not cover a dtype
(say bfloat16 on CPU) the op runs on ``reference`` and says so once in the log.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Iterable

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")

# The dtypes each backend covers for an op that has nothing special: the GPU forms store
# float32 / float16 / bfloat16, the numba forms float32 / float64, the reference anything.
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STANDARD_DTYPES = {
    "triton": _GPU_DTYPES,
    "cuda": _GPU_DTYPES,
    "cpu": (torch.float32, torch.float64),
    "reference": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}

log = logging.getLogger("kiln")

_global_choice: str | None = None
_op_choice: dict[str, str] = {}
_logged_defaults: set[tuple] = set()


def _environ_dict():
    """os.environ's own dict and its key encoder, or (None, None) where it has none (not CPython).

    os.environ.get encodes the key and decodes the value on each call (~1.5 us; every op call
    asks for two variables, in its forward and again in its backward), where a lookup in this
    dict costs ~0.1. It is the very dict os.environ.get reads, so every change made through
    os.environ (monkeypatch.setenv included) is seen at once."""
    data, encode, decode = (getattr(os.environ, a, None) for a in ("_data", "encodekey", "decodevalue"))
    if not isinstance(data, dict) or not callable(encode) or not callable(decode):
        return None, None
    return data, encode


_ENVIRON, _encode_key = _environ_dict()
# the two variables' keys in _ENVIRON, encoded once
_KILN_BACKEND_KEY, _TRITON_INTERPRET_KEY = (("KILN_BACKEND", "TRITON_INTERPRET") if _ENVIRON is None
                                            else (_encode_key("KILN_BACKEND"), _encode_key("TRITON_INTERPRET")))


_ENV_KEYS = {"KILN_BACKEND": _KILN_BACKEND_KEY, "TRITON_INTERPRET": _TRITON_INTERPRET_KEY}


def _getenv(name: str) -> str | None:
    """os.environ.get(name), read from os.environ's own dict where it has one."""
    if _ENVIRON is None:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = _encode_key(name)
    value = _ENVIRON.get(key)
    return None if value is None else os.environ.decodevalue(value)


class BackendError(RuntimeError):
    """A backend was asked for that cannot run the given tensors."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kiln backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def op_names() -> tuple[str, ...]:
    """The op names a per-op choice takes (``use(..., ops=[...])``)."""
    from kiln.ops import BACKEND_DTYPES  # kiln.ops imports this module: import on use

    return tuple(BACKEND_DTYPES)


def _check_op_names(ops: Iterable[str]) -> list[str]:
    if isinstance(ops, str):
        raise TypeError(f"ops must be a list of op names, not the string {ops!r}; "
                        f"write ops=[{ops!r}]")
    ops = list(ops)
    valid = op_names()
    unknown = [op for op in ops if op not in valid]
    if unknown:
        raise ValueError(f"unknown kiln op name(s) {', '.join(map(repr, unknown))}; "
                         f"expected some of {', '.join(valid)}")
    return ops


class use:
    """Choose the backend, globally or for some ops; usable as a context manager.

    ``kiln.backend.use("cpu")`` sets it until changed; ``with kiln.backend.use("cpu"):``
    sets it for the block. ``ops=["linear_act"]`` limits the choice to those ops.
    ``use(None)`` clears the choice (back to ``KILN_BACKEND`` or the device default).
    """

    def __init__(self, name: str | None, ops: Iterable[str] | None = None):
        global _global_choice
        if name is not None:
            _check_name(name)
        self._ops = None if ops is None else _check_op_names(ops)
        if self._ops is None:
            self._previous = _global_choice
            _global_choice = name
        else:
            self._previous = {op: _op_choice.get(op) for op in self._ops}
            for op in self._ops:
                if name is None:
                    _op_choice.pop(op, None)
                else:
                    _op_choice[op] = name

    def __enter__(self) -> use:
        return self

    def __exit__(self, *exc) -> None:
        global _global_choice
        if self._ops is None:
            _global_choice = self._previous
            return
        for op, previous in self._previous.items():
            if previous is None:
                _op_choice.pop(op, None)
            else:
                _op_choice[op] = previous


def requested(op: str) -> str | None:
    """The backend the user asked for this op (None: the device default applies)."""
    if op in _op_choice:
        return _op_choice[op]
    if _global_choice is not None:
        return _global_choice
    env = _getenv("KILN_BACKEND")
    if env:
        try:
            return _check_name(env)
        except ValueError as e:
            raise ValueError(f"KILN_BACKEND={env!r}: {e}") from None
    return None


def triton_interpreted() -> bool:
    return _getenv("TRITON_INTERPRET") == "1"


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # an import can fail with more than ImportError (e.g. a bad driver)
        return f"{type(e).__name__}: {e}"
    return None


def cuda_extension():
    """The compiled module ``kiln._cuda``; raises BackendError when it is not built."""
    error = _import_error("kiln._cuda")
    if error is not None:
        raise BackendError(
            "the cuda backend needs the extension kiln._cuda, which is not built "
            f"({error}); reinstall kiln on a machine with nvcc (KILN_CUDA=ON pip install .)"
        )
    return importlib.import_module("kiln._cuda")


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, dtypes) -> str | None:
    """Why backend ``name`` cannot run tensors of this device and dtype; None if it can."""
    if dtype not in dtypes:
        supported = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"it supports dtypes {supported}, not {str(dtype).removeprefix('torch.')}"
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors, not {device.type} tensors"
        error = _import_error("numba")
        return None if error is None else f"numba cannot be imported ({error})"
    if name == "triton":
        error = _import_error("triton")
        if error is not None:
            return f"triton cannot be imported ({error})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (
            f"it runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"not {device.type} tensors"
        )
    if name == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors, not {device.type} tensors"
        error = _import_error("kiln._cuda")
        return None if error is None else f"the extension kiln._cuda is not built ({error})"
    raise AssertionError(name)


def default_for(device: torch.device) -> str:
    return {"cuda": "triton", "cpu": "cpu"}.get(device.type, "reference")


# select's answers that did not raise or fall back, by everything they depend on: every op call asks
# (twice in a training step), and the checks below cost ~4 us where the lookup costs 0.3. The key
# holds the backend asked for itself (not a version of the choices), so a `with use(...)` per step
# adds no entries.
_selected: dict[tuple, str] = {}


def select(op: str, device: torch.device, dtype: torch.dtype, supported: dict) -> str:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype``.

    ``supported`` maps each backend of the op to the dtypes it covers.
    """
    # requested(op) and triton_interpreted() inlined where they need no more (~0.3 us a call)
    name = _op_choice.get(op) or _global_choice
    if name is None:
        name = requested(op)
    # the device itself, not device.type: that builds a new string per call (~1.5 us in a training
    # step); an index of its own is one more entry with the same answer
    key = (op, name, device, dtype, id(supported), _getenv("TRITON_INTERPRET") == "1")
    chosen = _selected.get(key)
    if chosen is None:
        chosen = _select(op, name, device, dtype, supported)
        # a default stepping aside to reference is not cached: _select logs it (once per process,
        # or again after _logged_defaults is cleared)
        if not (name is None and chosen == "reference" and default_for(device) != "reference"):
            _selected[key] = chosen
    return chosen


def _select(op: str, name: str | None, device: torch.device, dtype: torch.dtype, supported: dict) -> str:
    if name is not None:
        reason = (
            f"op {op!r} has no {name} implementation"
            if name not in supported
            else unavailable_reason(name, device, dtype, supported[name])
        )
        if reason is not None:
            raise BackendError(f"kiln backend {name!r} cannot run {op}: {reason}")
        return name
    name = default_for(device)
    reason = (
        "no implementation" if name not in supported
        else unavailable_reason(name, device, dtype, supported[name])
    )
    if reason is None:
        return name
    key = (op, name, device.type, dtype)
    if key not in _logged_defaults:
        _logged_defaults.add(key)
        log.warning("kiln: %s on %s %s runs on the reference backend: %s backend: %s",
                    op, device.type, dtype, name, reason)
    reason_ref = unavailable_reason("reference", device, dtype, supported["reference"])
    if reason_ref is not None:
        raise BackendError(f"no kiln backend can run {op} on {device.type} {dtype}: {reason_ref}")
    return "reference"


def kernels(name: str, modules: dict[str, str], reference, cuda=None):
    """The kernels of backend ``name`` for one op: the op's ``reference`` or ``cuda``
    namespace, or its kernel module (``modules[name]``), imported on first use. Every
    form of an op offers the same function names."""
    if name == "reference":
        return reference
    if name == "cuda":
        return cuda
    module = sys.modules.get(modules[name])  # imported already: skip import_module's ~3 us a call
    return module if module is not None else importlib.import_module(modules[name])


def implementation(op: str, t: torch.Tensor, supported: dict, modules: dict[str, str], reference, cuda=None):
    """The kernels that run ``op`` on tensors like ``t``: ``select`` then ``kernels``."""
    return kernels(select(op, t.device, t.dtype, supported), modules, reference, cuda)


def selector(op: str, supported: dict, modules: dict[str, str], reference, cuda=None):
    """``implementation`` bound to one op: a function of the tensor alone, for the op's hot path.

    Each backend chosen is kept by what the choice depends on (the backend asked for, the tensor's device and
    dtype, TRITON_INTERPRET), so a call is a few lookups in one frame: ``implementation``'s
    three frames and wider key cost ~3-7 us a call in a training step of a small model, where
    the cache and the Python around each GEMM evict each other. Every call still reads the
    choices and the environment, so ``use`` and ``KILN_BACKEND`` apply at once, and a default
    that steps aside to reference is not kept (``select`` logs it)."""
    answers: dict[tuple, str] = {}

    def implementation_of(t: torch.Tensor):
        # both variables as stored (undecoded): a key needs no more, and a bad KILN_BACKEND is
        # never kept (requested raises on it each call)
        environ = _ENVIRON if _ENVIRON is not None else os.environ
        device, dtype = t.device, t.dtype
        key = (_op_choice.get(op) or _global_choice, environ.get(_KILN_BACKEND_KEY), device, dtype,
               environ.get(_TRITON_INTERPRET_KEY))
        chosen = answers.get(key)
        if chosen is None:
            asked = requested(op)
            chosen = select(op, device, dtype, supported)
            if not (asked is None and chosen == "reference" and default_for(device) != "reference"):
                answers[key] = chosen
        return kernels(chosen, modules, reference, cuda)
    return implementation_of


def report(op: str, supported: dict, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """For ``kiln info``: which backend ``op`` would use on each device kind present."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    out = {}
    for device in devices:
        try:
            out[device.type] = select(op, device, dtype, supported)
        except BackendError as e:
            out[device.type] = f"error: {e}"
    return out
