"""The GPU benchmark scripts cannot run here; they must at least parse, import and refuse
a machine without a GPU with a clear message (not a traceback)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
GPU_SCRIPTS = sorted(BENCH.glob("gpu_*.py"))


def test_there_are_gpu_scripts():
    assert {p.name for p in GPU_SCRIPTS} >= {"gpu_linear_act.py", "gpu_rnn.py", "gpu_attention.py"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the scripts run for real")
@pytest.mark.parametrize("script", GPU_SCRIPTS, ids=lambda p: p.name)
def test_gpu_script_refuses_a_machine_without_gpu(script):
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "needs a CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr


def test_gpu_validate_script_parses_and_stops_at_its_budget(tmp_path):
    script = BENCH / "gpu_validate.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "KILN_VALIDATE_SECONDS": "0"})
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for step in ("build", "pytest_gpu", "gpu_linear_act", "kiln_bench"):
        assert f"{step}: skipped, out of time" in summary, summary
    assert (tmp_path / "out" / "gpu.txt").exists()
