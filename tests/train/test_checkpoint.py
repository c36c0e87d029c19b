import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from kiln.train import checkpoint
from kiln.train.checkpoint import CheckpointError


def _minimal(**extra):
    return {"model": {"w": torch.randn(3)}, "optimizer": {}, "scheduler": None, "step": 1, "epoch": 0,
            "rng": checkpoint.rng_state(), "config": {"task": "t", "model": "m"}, "kiln_version": "0", **extra}


def test_save_then_load_round_trips_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    state = _minimal()
    checkpoint.save(state, path)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 1
    assert os.listdir(path.parent) == ["last.pt"]


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(_minimal(step=7), path)
    with pytest.raises(Exception):
        checkpoint.save(_minimal(bad=lambda: 0), path)  # a lambda cannot be pickled
    assert checkpoint.load(path)["step"] == 7
    assert os.listdir(tmp_path) == ["last.pt"]


def test_rng_state_restores_torch_numpy_python_and_registered_states():
    counter = {"value": 0}
    checkpoint.register_rng_state("test_counter", lambda: counter["value"],
                                  lambda v: counter.update(value=v))
    try:
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        counter["value"] = 5
        state = checkpoint.rng_state()
        first = (torch.rand(3), np.random.rand(3), random.random())
        counter["value"] = 9
        checkpoint.set_rng_state(state)
        again = (torch.rand(3), np.random.rand(3), random.random())
        assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
        assert counter["value"] == 5
    finally:
        checkpoint._EXTRA_RNG.pop("test_counter")


def test_rng_state_survives_a_weights_only_file(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    checkpoint.save(_minimal(), tmp_path / "c.pt")
    first = (torch.rand(2), np.random.rand(2), random.random())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"])
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_missing_corrupt_and_foreign_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "junk.pt")
    checkpoint.save(_minimal(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "cut.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a kiln checkpoint"):
        checkpoint.load(tmp_path / "list.pt")
    torch.save({"model": {}}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="missing optimizer"):
        checkpoint.load(tmp_path / "dict.pt")


def test_check_matches_refuses_another_task_or_model():
    state = _minimal()
    checkpoint.check_matches(state, "c.pt", "t", "m")
    with pytest.raises(CheckpointError, match="of task 't' model 'm', not task 't' model 'x'"):
        checkpoint.check_matches(state, "c.pt", "t", "x")
    with pytest.raises(CheckpointError, match="not task 'u'"):
        checkpoint.check_matches(state, "c.pt", "u", "m")


_SAVER = textwrap.dedent("""
    import os, sys, torch
    from kiln.train import checkpoint
    path = sys.argv[1]
    i = checkpoint.load(path)["step"] + 1 if os.path.exists(path) else 0  # go on from the last run
    while True:
        # 8 MB per save, so that a kill lands inside a write often
        state = {"model": {"w": torch.full((2048, 1024), float(i))}, "optimizer": {}, "scheduler": None,
                 "step": i, "epoch": 0, "rng": {}, "config": {}, "kiln_version": "0"}
        checkpoint.save(state, path)
        print(i, flush=True)
        i += 1
""")


def test_sigkill_at_any_moment_leaves_a_checkpoint_that_loads(tmp_path):
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    last_seen = -1
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert int(proc.stdout.readline()) >= 0  # at least one save finished
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        state = checkpoint.load(path)
        w = state["model"]["w"]
        assert w.shape == (2048, 1024) and bool((w == state["step"]).all())
        assert state["step"] >= last_seen
        last_seen = state["step"]
    assert last_seen >= 3  # every run saved at least once on top of the previous one
