"""The `kiln train` contract: the run folder, exact resume through the command line, bad input."""

import csv
import json
import os

import pytest
import torch

import kiln
from kiln import cli
from kiln.train import checkpoint

# ceil(1257 / 256) = 5 steps per epoch: a few steps, every file of the folder
FAST = ["--batch-size", "256", "--no-progress"]


def _train(capsys, out, *flags):
    code = cli.main(["train", "digits", "--out", str(out), *FAST, *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_list_prints_tasks_and_their_models(capsys):
    assert cli.main(["train", "--list"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "--model logistic" in out and "--model mlp" in out and "[default]" in out


def test_the_run_folder_holds_checkpoints_metrics_results_and_curves(capsys, tmp_path):
    out = tmp_path / "run"
    printed = _train(capsys, out, "--epochs", "2", "--model", "logistic")
    assert "test_accuracy" in printed and str(out) in printed
    assert sorted(os.listdir(out)) == ["best.pt", "confusion.png", "curves.png", "last.pt", "metrics.csv",
                                       "misclassified.png", "results.json"]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "step", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"]
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "5"), ("2", "10")]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    results = json.loads((out / "results.json").read_text())
    for key in ("task", "model", "seed", "steps", "parameters", "wall_s", "backend", "test_accuracy"):
        assert key in results, key
    assert (results["task"], results["model"], results["seed"], results["steps"]) == ("digits", "logistic", 0, 10)
    assert results["parameters"] == 64 * 10 + 10 and results["backend"] == "cpu"
    assert 0.5 < results["test_accuracy"] <= 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = checkpoint.load(out / "last.pt")
    assert last["config"]["task"] == "digits" and last["config"]["model"] == "logistic"
    assert last["kiln_version"] == kiln.__version__ and last["step"] == 10 and last["epoch"] == 2
    assert {"torch", "cuda", "numpy", "python", "data", "extra"} <= set(last["rng"])


def test_kiln_train_load_rebuilds_the_model_without_flags(capsys, tmp_path):
    out = tmp_path / "run"
    _train(capsys, out, "--max-steps", "2")
    model = kiln.train.load(out / "last.pt")
    state = checkpoint.load(out / "last.pt")["model"]
    assert not model.training and state.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_resume_through_the_command_line_is_bit_exact_mid_epoch(capsys, tmp_path):
    # the default mlp has dropout: the masks must come out the same too
    _train(capsys, tmp_path / "whole", "--epochs", "3", "--max-steps", "8")
    _train(capsys, tmp_path / "cut", "--epochs", "3", "--max-steps", "4")
    _train(capsys, tmp_path / "cut", "--epochs", "3", "--max-steps", "8", "--resume", str(tmp_path / "cut" / "last.pt"))
    whole, resumed = (checkpoint.load(tmp_path / name / "last.pt") for name in ("whole", "cut"))
    assert whole["step"] == resumed["step"] == 8 and whole["trainer"]["batches_done"] == 3
    assert whole["model"].keys() == resumed["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for index, state in whole["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][index][key]), (index, key)
    assert whole["scheduler"] == resumed["scheduler"]
    assert torch.equal(whole["rng"]["torch"], resumed["rng"]["torch"])


def _snapshot(folder):
    return {name: ((folder / name).read_bytes(), os.stat(folder / name).st_mtime_ns) for name in os.listdir(folder)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A logistic run of 2 steps, and its folder's bytes."""
    out = tmp_path_factory.mktemp("runs") / "logistic"
    assert cli.main(["train", "digits", "--model", "logistic", "--out", str(out), "--max-steps", "2", *FAST]) == 0
    return out


def _refused(capsys, out, argv, needle):
    before = _snapshot(out)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and needle in err, err
    assert _snapshot(out) == before  # nothing in the folder written


def test_bad_input_is_one_line_status_2_and_writes_nothing(capsys, tmp_path, finished_run):
    out = finished_run
    train = ["train", "digits", "--out", str(out), *FAST]
    last = str(out / "last.pt")
    _refused(capsys, out, [*train, "--resume", str(out / "nope.pt")], "no such file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    _refused(capsys, out, [*train, "--resume", str(junk)], "corrupt")
    cut = tmp_path / "cut.pt"
    data = (out / "last.pt").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    _refused(capsys, out, [*train, "--resume", str(cut)], "corrupt")
    _refused(capsys, out, [*train, "--model", "mlp", "--resume", last], "model 'logistic', not task 'digits' model 'mlp'")
    other = checkpoint.load(last)
    other["config"]["task"] = "curve"
    checkpoint.save(other, tmp_path / "other_task.pt")
    _refused(capsys, out, [*train, "--model", "logistic", "--resume", str(tmp_path / "other_task.pt")],
             "of task 'curve'")
    _refused(capsys, out, [*train, "--model", "logistic", "--resume", last, "--batch-size", "32"],
             "--batch-size 32 differs from the checkpoint's 256")
    _refused(capsys, out, ["train", "nosuchtask", "--out", str(out)], "unknown task 'nosuchtask'; tasks: digits")
    _refused(capsys, out, [*train, "--model", "resnet"], "no model 'resnet'; its models: logistic, mlp")
    _refused(capsys, out, ["train", "--out", str(out)], "name a TASK")


@pytest.mark.gpu
def test_a_cuda_run_saves_cuda_rng_and_loads_on_cpu(capsys, tmp_path):
    out = tmp_path / "cuda"
    _train(capsys, out, "--device", "cuda", "--max-steps", "3")
    state = checkpoint.load(out / "last.pt")
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    assert all(v.device.type == "cpu" for v in state["model"].values())
    model = kiln.train.load(out / "last.pt")
    assert next(model.parameters()).device.type == "cpu"
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "cuda" and results["backend"] == "triton" and results["steps"] == 3


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_the_vision_models_train_two_steps_and_reload(capsys, tmp_path, model):
    out = tmp_path / model
    _train(capsys, out, "--model", model, "--max-steps", "2")
    rebuilt = kiln.train.load(out / "last.pt")
    assert type(rebuilt).__name__.lower() == model
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == model and results["steps"] == 2


@pytest.mark.parametrize("task,model,keys", [
    ("charlm", "transformer", ("val_bits_per_char", "test_bits_per_char", "tokens_per_s", "greedy_sample")),
    ("charlm", "lstm", ("val_bits_per_char",)),
    ("translate", "transformer", ("exact_match", "greedy_exact_match")),
    ("textclass", "lstm", ("test_accuracy",)),
])
def test_the_sequence_tasks_train_two_steps_and_report(capsys, tmp_path, task, model, keys):
    out = tmp_path / f"{task}-{model}"
    code = cli.main(["train", task, "--model", model, "--out", str(out), "--max-steps", "2", "--batch-size", "8",
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task and results["steps"] == 2
    for key in keys:
        assert key in results, key
    assert isinstance(kiln.train.load(out / "last.pt"), torch.nn.Module)


def test_kiln_generate_continues_a_prompt_and_refuses_bad_ones(capsys, tmp_path):
    out = tmp_path / "charlm"
    assert cli.main(["train", "charlm", "--model", "lstm", "--out", str(out), "--max-steps", "1", "--batch-size", "4",
                     "--no-progress"]) == 0
    capsys.readouterr()
    ckpt = str(out / "last.pt")
    assert cli.main(["generate", ckpt, "--prompt", "def f(", "--max-new-tokens", "12"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("def f(") and len(greedy.rstrip("\n")) == 18
    assert cli.main(["generate", ckpt, "--prompt", "def f(", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == greedy
    sampled = [cli.main(["generate", ckpt, "--prompt", "x", "--seed", "3", "--max-new-tokens", "30"]) or
               capsys.readouterr().out for _ in range(2)]
    assert sampled[0] == sampled[1]
    for argv, needle in [(["--prompt", "caf\u00e9"], "outside the model's ASCII vocabulary"),
                         (["--prompt", "x", "--temperature", "0"], "temperature"),
                         (["--prompt", "x", "--max-new-tokens", "0"], "must be >= 1")]:
        assert cli.main(["generate", ckpt, *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
    digits = tmp_path / "digits"
    _train(capsys, digits, "--model", "logistic", "--max-steps", "1")
    assert cli.main(["generate", str(digits / "last.pt"), "--prompt", "x"]) == 2
    assert "does not generate text" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["poly", "relu"])
def test_curve_reports_the_closed_form_and_draws_the_fit(capsys, tmp_path, model):
    out = tmp_path / model
    assert cli.main(["train", "curve", "--model", model, "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_mse"] > 0
    assert ("closed_form_mse" in results) == (model == "poly")
    assert (out / "fit.png").read_bytes()[:4] == b"\x89PNG"
