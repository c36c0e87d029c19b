"""Autocast rules for kiln's custom ops, as torch's autocast policy has them for the op each
replaces: "lower" ops (GEMM-like: linear_act, attention, the recurrent layers) run in the
region's autocast dtype, "fp32" ops (softmax, cross-entropy, norms) in float32.

torch.library.register_autocast casts to one dtype fixed at registration; torch's own policy
for a GEMM follows the dtype the region was opened with (``torch.autocast("cpu",
dtype=torch.bfloat16)``), so the "lower" rule reads it at call time. Otherwise this is
register_autocast's mechanism: a kernel on the Autocast<device> dispatch key (and the same
function as its Python-dispatcher form, so torch.compile traces it) that casts the floating
tensors and calls the op again with autocast excluded.
"""

from __future__ import annotations

import torch

_LIBRARIES: list = []

POLICIES = ("lower", "fp32")


def _cast(value, dtype):
    # As torch's autocast: float64 tensors are never cast (only float32 / float16 / bfloat16).
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def register(qualname: str, policy: str, device_types=("cpu", "cuda")) -> None:
    """Give the custom op ``qualname`` (``"kiln::linear_act"``) the autocast ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"autocast policy {policy!r}; expected one of {POLICIES}")
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    library = torch.library.Library(namespace, "FRAGMENT")
    _LIBRARIES.append(library)
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_kernel(*args, _device_type=device_type, _key=key):
            dtype = (torch.get_autocast_dtype(_device_type) if policy == "lower"
                     else torch.float32)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*_cast(args, dtype))

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key)
        op.py_impl(key)(autocast_kernel)
        library.impl(name, lambda _keyset, *args, _k=autocast_kernel: _k(*args), key_name,
                     with_keyset=True)
