"""`--time-limit` under torchrun: rank 0's clock decides, so both ranks stop after the same step
and take the same learning rates (were each rank to read its own clock, one could stop a step
before the other and the run would hang or mix collectives)."""

import json

from kiln.train import checkpoint
from tests.train.test_distributed import LOGISTIC, _torchrun


def test_two_ranks_stop_on_time_after_the_same_step(tmp_path):
    out = tmp_path / "timed"
    _torchrun(tmp_path, [{**LOGISTIC, "out": str(out), "epochs": 10**4, "time_limit": 2.0}], timeout=300)
    results = json.loads((out / "results.json").read_text())
    assert results["stop_reason"] == "time_limit" and results["world_size"] == 2
    last = checkpoint.load(out / "last.pt")
    assert last["step"] == results["steps"] and last["scheduler"]["timed"]
    assert last["trainer"]["history"][-1]["step"] == results["steps"]
