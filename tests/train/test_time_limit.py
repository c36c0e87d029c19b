"""`kiln train --time-limit SECONDS`: the Trainer stops after the step that reaches the limit,
validates the part epoch and the run folder is written as at a normal end; TimedSchedule runs
the task's LR schedule on the clock so that it ends at the limit."""

import json
import math
import os
import time

import pytest
import torch

import kiln
from kiln import cli
from kiln.train import checkpoint
from kiln.train.tasks.digits import Digits
from kiln.train.trainer import TimedSchedule
from tests.train.test_trainer import _trainer


class _Sleep:
    """A callback that makes every step take at least ``seconds``, on or off the clock."""

    def __init__(self, seconds, off_the_clock=False):
        self.seconds, self.off = seconds, off_the_clock

    def on_step_end(self, trainer):
        if self.off:
            with trainer.off_the_clock():
                time.sleep(self.seconds)
        else:
            time.sleep(self.seconds)


def test_the_trainer_stops_after_the_step_that_reaches_the_limit():
    # 150 examples of batch 32: 5 steps an epoch. The clock is read at the end of a step's update,
    # before its callbacks: step k reads at least the (k - 1) x 0.1 s slept before it, so 0.25 s
    # is reached by step 4, inside the first epoch (a loaded machine gets there sooner)
    trainer = _trainer(epochs=1000, time_limit=0.25, callbacks=[_Sleep(0.1)])
    history = trainer.fit()
    assert trainer.stop_reason == "time_limit"
    assert 1 <= trainer.step <= 4 and trainer.epoch == 0
    assert trainer.elapsed >= 0.25
    last = history[-1]
    assert last["step"] == trainer.step and 0 < last["epoch"] < 1 and math.isfinite(last["val_loss"])
    # the part epoch at the stop is the end of training: it is the best so far (the only row)
    assert trainer.best_epoch == last["epoch"] and trainer.best_val_loss == last["val_loss"]
    assert trainer.restore_best_weights()


def test_time_off_the_clock_does_not_count():
    trainer = _trainer(epochs=1000, max_steps=5, time_limit=0.3, callbacks=[_Sleep(0.1, off_the_clock=True)])
    started = time.perf_counter()
    trainer.fit()
    assert time.perf_counter() - started >= 0.5   # it slept 5 x 0.1 s ...
    assert trainer.stop_reason == "max_steps" and trainer.step == 5
    assert trainer.elapsed < 0.3                  # ... none of it training time


def test_a_bad_time_limit_is_refused():
    with pytest.raises(ValueError, match="time_limit"):
        _trainer(time_limit=0.0)
    with pytest.raises(ValueError, match="time_limit"):
        TimedSchedule(lambda n: None, 10, -1.0)


def _one_cycle(optimizer):
    return lambda n: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=n, pct_start=0.05)


def test_the_timed_schedule_follows_the_clock_and_ends_at_the_limit():
    params = [torch.zeros(1, requires_grad=True)]
    optimizer = torch.optim.SGD(params, lr=1.0)
    timed = TimedSchedule(_one_cycle(optimizer), total_steps=10**6, time_limit=100.0)
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = _one_cycle(reference_opt)(TimedSchedule.RESOLUTION)
    now = [0.0]
    timed.clock = lambda: now[0]
    for seconds in (1.0, 5.0, 30.0, 50.0, 99.0):
        now[0] = seconds
        optimizer.step()
        timed.step()
        while reference.last_epoch < int(seconds / 100 * TimedSchedule.RESOLUTION):
            reference_opt.step()
            reference.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"], rel=1e-12)
    peak = 1.0
    assert optimizer.param_groups[0]["lr"] < 1e-3 * peak        # near the end: annealed
    now[0] = 250.0                                                # past the limit: the last position, no error
    for _ in range(3):
        timed.step()
    assert timed.inner.last_epoch == TimedSchedule.RESOLUTION - 1
    assert optimizer.param_groups[0]["lr"] < 1e-4 * peak


def test_the_timed_schedule_ends_at_the_last_step_if_that_comes_first():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    timed = TimedSchedule(_one_cycle(optimizer), total_steps=4, time_limit=1e9)
    for _ in range(2):
        optimizer.step()
        timed.step()
    assert timed.inner.last_epoch == TimedSchedule.RESOLUTION // 2
    state = timed.state_dict()
    again = TimedSchedule(_one_cycle(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)), 4, 1e9)
    again.load_state_dict(state)
    assert again.steps == 2 and again.inner.last_epoch == timed.inner.last_epoch
    plain = _one_cycle(optimizer)(10)
    with pytest.raises(ValueError, match="runs by steps"):
        again.load_state_dict(plain.state_dict())


def test_kiln_train_time_limit_writes_the_folder_as_at_a_normal_end(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # digits logistic: 5 steps of 256 an epoch, milliseconds each: the clock ends the 1000 epochs.
    # Early stopping off: on a fast enough machine the task's patience of 10 epochs would end the
    # run first (it did once here, at tens of epochs a second)
    monkeypatch.setitem(Digits.train, "patience", None)
    code = cli.main(["train", "digits", "--model", "logistic", "--out", str(out), "--batch-size", "256",
                     "--epochs", "1000", "--time-limit", "1.5", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(os.listdir(out)) == ["best.pt", "confusion.png", "curves.png", "last.pt", "metrics.csv",
                                       "misclassified.png", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["stop_reason"] == "time_limit" and results["time_limit_s"] == 1.5
    assert results["wall_s"] >= 1.5 and 0 < results["epochs"] < 1000
    last = checkpoint.load(out / "last.pt")
    assert last["step"] == results["steps"] and last["config"]["train"]["time_limit"] == 1.5
    assert last["scheduler"]["timed"] and last["trainer"]["elapsed"] >= 1.5
    best = checkpoint.load(out / "best.pt")
    assert best["trainer"]["best_val_loss"] == min(row["val_loss"] for row in last["trainer"]["history"])
    model = kiln.train.load(out / "best.pt")
    # (the first steps' warm-up takes much of so short a budget: the accuracy is no measure here)
    assert not model.training and 0 <= results["test_accuracy"] <= 1
    # the schedule ran on the clock: by steps it would be at 1/1000 of its length at most (the
    # limit may also pass during an epoch end's validation, after the last step)
    assert last["scheduler"]["inner"]["last_epoch"] > TimedSchedule.RESOLUTION // 2


def test_resume_keeps_the_limit_and_a_step_schedule_cannot_take_one(capsys, tmp_path):
    out = tmp_path / "run"
    base = ["train", "digits", "--model", "logistic", "--batch-size", "256", "--no-progress"]
    assert cli.main([*base, "--out", str(out), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "again"), "--resume", str(out / "last.pt"),
                     "--time-limit", "5"]) == 2
    assert "--time-limit" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(out), "--time-limit", "0"]) == 2
    assert "--time-limit" in capsys.readouterr().err


def test_charlm_equal_time_experiment_trains_the_four_models_for_the_same_time(tmp_path):
    from kiln.train import experiments as E

    rows = E.run("charlm-equal-time", tmp_path, quick=True, log=lambda s: None, time_limit=0.5,
                 runs=tmp_path / "runs")
    assert [r["model"] for r in rows] == ["transformer", "lstm", "gru", "rnn"]
    sizes = [r["parameters"] for r in rows]
    assert max(sizes) < 1.15 * min(sizes)          # about equal parameter counts
    for r in rows:
        assert r["stop_reason"] == "time_limit" and r["seconds"] >= 0.5 and r["steps"] >= 1
        assert r["points"] and all(math.isfinite(p["val_bits"]) for p in r["points"])
        assert r["points"][-1]["val_bits"] == pytest.approx(r["val_bits"])
        assert kiln.train.load(tmp_path / "runs" / r["model"] / "last.pt") is not None
    md = (tmp_path / "charlm_equal_time-quick.md").read_text()
    assert "--time-limit 0.5 --quick" in md and "| rnn |" in md
    assert (tmp_path / "charlm_equal_time-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_options_belong_to_their_experiment(capsys, tmp_path):
    assert cli.main(["experiment", "init", "--time-limit", "5", "--out", str(tmp_path)]) == 2
    assert "--time-limit" in capsys.readouterr().err
    assert cli.main(["experiment", "charlm-equal-time", "--epochs", "2", "--out", str(tmp_path)]) == 2
    assert "--time-limit" in capsys.readouterr().err


def test_a_timed_one_cycle_peaks_at_the_tasks_rate(capsys, tmp_path, monkeypatch):
    # a one-cycle sets the optimizer's rate to max / 25 when made: made twice, the second
    # would peak at lr / 25 (it did)
    from kiln.train.tasks.digits import TASK

    def one_cycle(optimizer, total_steps):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"],
                                                   total_steps=max(total_steps, 2), pct_start=0.05)

    monkeypatch.setattr(TASK, "scheduler", one_cycle)
    out = tmp_path / "run"
    assert cli.main(["train", "digits", "--model", "logistic", "--out", str(out), "--batch-size", "256",
                     "--epochs", "1000", "--time-limit", "0.5", "--lr", "0.01", "--no-progress"]) == 0
    group = checkpoint.load(out / "last.pt")["optimizer"]["param_groups"][0]
    assert group["max_lr"] == 0.01 and group["initial_lr"] == pytest.approx(0.01 / 25)
    assert checkpoint.load(out / "last.pt")["scheduler"]["inner"]["last_epoch"] > TimedSchedule.RESOLUTION // 2
