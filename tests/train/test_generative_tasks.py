"""`kiln train vae | gan | ddpm`: two steps through the command line write the run folder
(checkpoint, metrics, results with the quality scores, the PNG grids). Models are shrunk and the
judge CNN trained for one epoch so that each run takes seconds."""

import dataclasses
import json
import os

import pytest

from kiln import cli, metrics
from kiln.train.tasks import ModelEntry, get_task

TINY = {"vae": {"hidden": (16,)}, "gan": {"channels": 8},
        "ddpm": {"channels": 8, "heads": 2, "timesteps": 8}}


@pytest.fixture(scope="module")
def _one_epoch_judge():
    """One judge for the module (one epoch: seconds), the session's own cache put back after."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "_cache", {})
        patch.setattr(metrics, "JUDGE_EPOCHS", 1)
        yield


@pytest.fixture
def tiny(monkeypatch, _one_epoch_judge):

    def shrink(name, model, **extra):
        task = get_task(name)
        entry = task.models[model]
        small = ModelEntry(entry.cls, dataclasses.replace(entry.config, **TINY[name], **extra),
                           entry.description, entry.train)
        monkeypatch.setattr(task, "models", {**task.models, model: small})
        monkeypatch.setattr(task, "num_samples", 40)
        if name == "ddpm":
            monkeypatch.setattr(task, "ddim_steps", 3)
        return task
    return shrink


def _train(capsys, out, task, *flags):
    code = cli.main(["train", task, "--out", str(out), "--max-steps", "2", "--batch-size", "32",
                     "--no-progress", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with open(out / "results.json") as f:
        return json.load(f)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_vae_trains_two_steps_and_writes_elbo_reconstruction_accuracy_and_grids(capsys, tmp_path, tiny):
    tiny("vae", "mlp2d")
    out = tmp_path / "vae"
    results = _train(capsys, out, "vae", "--model", "mlp2d")
    assert {"last.pt", "metrics.csv", "results.json", "reconstructions.png", "samples.png",
            "latent_traversal.png"} <= set(os.listdir(out))
    assert results["steps"] == 2 and results["test_elbo"] < 0
    assert results["test_loss"] == pytest.approx(-results["test_elbo"], rel=0.05)
    assert 0 <= results["recon_classifier_accuracy"] <= 1
    assert results["prior_sample_frechet_distance"] > results["frechet_distance_floor"] > 0
    assert all(_is_png(out / p) for p in ("reconstructions.png", "samples.png", "latent_traversal.png"))


def test_gan_trains_two_steps_and_writes_sample_scores_and_a_grid_per_epoch(capsys, tmp_path, tiny):
    tiny("gan", "dcgan")
    out = tmp_path / "gan"
    # 2 epochs of 2 steps (a training split of 1257 at batch 629): a grid after each
    results = _train(capsys, out, "gan", "--batch-size", "629", "--epochs", "2", "--max-steps", "4")
    assert {"last.pt", "metrics.csv", "results.json", "samples.png", "samples"} <= set(os.listdir(out))
    assert sorted(os.listdir(out / "samples")) == ["epoch_001.png", "epoch_002.png"]
    assert _is_png(out / "samples" / "epoch_002.png") and _is_png(out / "samples.png")
    assert results["steps"] == 4 and results["num_samples"] == 40
    for key in ("sample_classifier_accuracy", "test_sample_accuracy"):
        assert 0 <= results[key] <= 1
    assert results["frechet_distance"] >= 0


def test_ddpm_trains_two_steps_and_writes_sample_scores_timing_and_grids(capsys, tmp_path, tiny):
    tiny("ddpm", "unet-linear")
    out = tmp_path / "ddpm"
    results = _train(capsys, out, "ddpm", "--model", "unet-linear")
    assert {"last.pt", "metrics.csv", "results.json", "samples.png", "samples_ddim.png"} <= set(os.listdir(out))
    assert results["steps"] == 2 and results["test_eps_mse"] > 0
    assert 0 <= results["sample_classifier_accuracy"] <= 1 and results["sample_seconds_per_100"] > 0
    assert 0 <= results["ancestral_sample_classifier_accuracy"] <= 1
    assert "DDIM, 3 of 8 steps" in results["sampler"]
