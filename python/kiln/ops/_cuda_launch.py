"""What every op's cuda backend passes to kiln._cuda: dtype codes, pointers, the stream."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def ptr(t: Optional[Tensor]) -> int:
    """The tensor's device address; 0 stands for None (an absent optional operand)."""
    return 0 if t is None else t.data_ptr()


def stream(t: Tensor) -> int:
    """The current CUDA stream of t's device, as the integer kiln._cuda takes."""
    return torch.cuda.current_stream(t.device).cuda_stream
