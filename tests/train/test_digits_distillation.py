"""digits: the test-set figures every run writes, and knowledge distillation (--teacher, notes 18.4)."""

import os

import pytest
import torch
import torch.nn.functional as F

from kiln import cli
from kiln.train import checkpoint
from kiln.train.tasks import get_task
from tests.numerics import BOUND, rel_err

FAST = ["--batch-size", "256", "--no-progress"]  # 5 steps an epoch
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A digits checkpoint (a logistic run of one epoch) to distill from."""
    out = tmp_path_factory.mktemp("teacher") / "logistic"
    assert cli.main(["train", "digits", "--model", "logistic", "--epochs", "1", "--out", str(out), *FAST]) == 0
    return out / "best.pt"


def test_a_digits_run_writes_the_test_confusion_matrix_and_misclassified_images(capsys, tmp_path, teacher):
    from matplotlib.image import imread

    out = teacher.parent
    assert sorted(os.listdir(out)) == ["best.pt", "confusion.png", "curves.png", "last.pt", "metrics.csv",
                                       "misclassified.png", "results.json"]
    for name in ("confusion.png", "misclassified.png"):
        assert (out / name).read_bytes()[:8] == PNG
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05  # something is drawn


def _distillation_formula(student, teacher, x, y, temperature, weight, smoothing):
    soft = torch.softmax(teacher(x) / temperature, dim=-1)
    logits = student(x)
    hard = F.cross_entropy(logits, y, label_smoothing=smoothing)
    return (1 - weight) * hard + weight * temperature ** 2 * F.cross_entropy(logits / temperature, soft)


def test_the_distillation_loss_is_the_formula_in_float64():
    task = get_task("digits")
    torch.manual_seed(0)
    student = task.model_entry("logistic").build().double()
    teacher = task.model_entry("mlp").build().double()
    x, y = task.splits().val.tensors
    x = x.double()
    loss_fn = task.distillation_loss(teacher, temperature=3.0, weight=0.7)
    student.train()
    got = loss_fn(student, (x, y))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    want = _distillation_formula(student, teacher, x, y, 3.0, 0.7, task.label_smoothing)
    assert rel_err(got, want) <= BOUND[torch.float64]
    params = list(student.parameters())
    for grad, want_grad in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert rel_err(grad, want_grad) <= BOUND[torch.float64]
    # the soft term counts: the loss without a teacher is another number
    assert rel_err(task.loss(student, (x, y)), want) > 1e-3
    # validation and test see the label loss alone
    student.eval()
    with torch.no_grad():
        assert rel_err(loss_fn(student, (x, y)), F.cross_entropy(student(x), y, label_smoothing=0.1)) \
            <= BOUND[torch.float64]
    with pytest.raises(ValueError, match="distill_temperature"):
        task.distillation_loss(teacher, 0.0, 0.5)
    with pytest.raises(ValueError, match="distill_weight"):
        task.distillation_loss(teacher, 2.0, 1.5)


def _train(capsys, out, *flags):
    code = cli.main(["train", "digits", "--out", str(out), *FAST, *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err


def _weights(path):
    return checkpoint.load(path)["model"]


def test_resume_keeps_distilling_bit_exact(capsys, tmp_path, teacher):
    # the mlp student has dropout: the masks must come out the same too
    _train(capsys, tmp_path / "whole", "--epochs", "3", "--max-steps", "8", "--teacher", str(teacher))
    _train(capsys, tmp_path / "plain", "--epochs", "3", "--max-steps", "8")
    _train(capsys, tmp_path / "cut", "--epochs", "3", "--max-steps", "4", "--teacher", str(teacher))
    _train(capsys, tmp_path / "cut", "--epochs", "3", "--max-steps", "8", "--resume", str(tmp_path / "cut" / "last.pt"))
    whole, plain, resumed = (_weights(tmp_path / name / "last.pt") for name in ("whole", "plain", "cut"))
    assert checkpoint.load(tmp_path / "cut" / "last.pt")["config"]["train"]["teacher"] == str(teacher)
    assert all(torch.equal(value, resumed[key]) for key, value in whole.items())
    assert not all(torch.equal(value, plain[key]) for key, value in whole.items())  # the teacher counted


def _refused(capsys, argv, needle):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and needle in err, err


def test_a_bad_teacher_is_one_line_status_2(capsys, tmp_path, teacher):
    out = tmp_path / "run"
    train = ["train", "digits", "--out", str(out), *FAST, "--max-steps", "1"]
    _refused(capsys, [*train, "--teacher", str(tmp_path / "nope.pt")], "no such file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _refused(capsys, [*train, "--teacher", str(junk)], "corrupt")
    other = checkpoint.load(teacher)
    other["config"]["task"] = "curve"
    checkpoint.save(other, tmp_path / "curve.pt")
    _refused(capsys, [*train, "--teacher", str(tmp_path / "curve.pt")], "is a 'curve' checkpoint, not one of task 'digits'")
    _refused(capsys, ["train", "curve", "--out", str(out), "--no-progress", "--teacher", str(teacher)],
             "task 'curve' has no distillation loss")
    assert not out.exists()
    _train(capsys, out, "--teacher", str(teacher), "--epochs", "1")
    _refused(capsys, [*train, "--epochs", "1", "--resume", str(out / "last.pt"), "--teacher", str(tmp_path / "x.pt")],
             "differs from the checkpoint's")


def test_a_teacher_named_by_model_is_its_default_run_trained_first_when_absent(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train(capsys, "student", "--max-steps", "2", "--teacher", "logistic")
    assert (tmp_path / "runs" / "digits-logistic" / "best.pt").is_file()  # trained with its default settings
    teacher = checkpoint.load(tmp_path / "runs" / "digits-logistic" / "last.pt")
    assert teacher["config"]["model"] == "logistic"
    assert teacher["config"]["train"]["batch_size"] == 64 and teacher["config"]["train"]["max_steps"] is None
    assert checkpoint.load(tmp_path / "student" / "last.pt")["config"]["train"]["teacher"] == "logistic"
    _train(capsys, "none", "--max-steps", "2", "--teacher", "none")
    assert checkpoint.load(tmp_path / "none" / "last.pt")["config"]["train"]["teacher"] is None


def test_the_vit_is_tested_with_its_last_weights(capsys, tmp_path, monkeypatch):
    import json

    import kiln

    task = get_task("digits")
    settings = task.train_settings("vit")
    assert settings["teacher"] is None and settings["restore_best"] is False
    assert task.train_settings("cnn")["teacher"] is None and "restore_best" not in task.train_settings("cnn")
    # restore_best False: the test accuracy (and the figures) are of the last epoch's weights
    from kiln.train.trainer import Trainer

    monkeypatch.setitem(task.models["logistic"].train, "restore_best", False)
    monkeypatch.setattr(Trainer, "restore_best_weights", lambda self: pytest.fail("the best weights were restored"))
    _train(capsys, tmp_path / "last", "--model", "logistic", "--epochs", "2")
    results = json.loads((tmp_path / "last" / "results.json").read_text())
    model = kiln.train.load(tmp_path / "last" / "last.pt")
    x, y = task.splits().test.tensors
    with torch.no_grad():
        assert results["test_weights"] == "last"
        assert results["test_accuracy"] == pytest.approx((model(x).argmax(-1) == y).double().mean().item(), abs=1e-12)


def test_random_shift_moves_each_image_by_whole_pixels_with_a_zero_border():
    from kiln.train.regularizers import random_shift

    torch.manual_seed(0)
    x = torch.randn(200, 64, dtype=torch.float64)
    out = random_shift(x, 1).reshape(-1, 8, 8)
    images = F.pad(x.reshape(-1, 8, 8), (1, 1, 1, 1))
    seen = set()
    for image, moved in zip(images, out):
        shifts = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(image[dy:dy + 8, dx:dx + 8], moved)]
        assert len(shifts) == 1
        seen.add(shifts[0])
    assert len(seen) == 9  # every shift of up to one pixel each way occurs
