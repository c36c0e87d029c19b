"""Peak resident memory of one step, measured in a fresh process.

The script given to `extra_peak_bytes` calls `reset_peak()` once its warm-up (imports, numba
compilation) is done and prints `peak_growth()` after the step. Reading ru_maxrss before and
after is not enough: the warm-up's own high-water mark can sit above the resident set the step
starts from, which hides the step's allocations (on CI it hid torch's full 4096 x 32000 logits).
"""

import os
import subprocess
import sys
import textwrap

import pytest

_HELPERS = textwrap.dedent("""
    def _vm_hwm_bytes():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

    def reset_peak():
        global _base
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        _base = _vm_hwm_bytes()

    def peak_growth():
        return _vm_hwm_bytes() - _base
""")

needs_peak_reset = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                      reason="resets the peak RSS through Linux's /proc/self/clear_refs")


def extra_peak_bytes(script: str, *args) -> int:
    """Run `script` (which may call reset_peak / peak_growth) and return the last integer it prints.

    glibc's malloc otherwise raises its mmap threshold after the first large free and then
    keeps freed blocks on the heap, which blurs peak RSS by a few chunks at random; with
    a fixed threshold every large block is mapped and unmapped, and RSS tracks what lives.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", _HELPERS + textwrap.dedent(script), *map(str, args)],
                         capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])
