import math

import pytest
import torch
from torch.utils.data import TensorDataset

import kiln
from kiln.models.mlp import MLP, MLPConfig
from kiln.train import checkpoint
from kiln.train.optimizers import OPTIMIZERS, make_optimizer
from kiln.train.trainer import Trainer


def _data(n=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3] @ torch.tensor([1.0, -2.0, 0.5])).gt(0).long() + (x[:, 3] > 1).long()
    return TensorDataset(x, y)


def _loss(model, batch):
    x, y = batch
    return kiln.ops.cross_entropy(model(x), y)


def _accuracy(model, batch):
    x, y = batch
    return (model(x).argmax(-1) == y).double().mean().item()


def _trainer(seed=0, dropout=0.2, lr=1e-2, optimizer="adam", train_data=None, **kw):
    kiln.manual_seed(seed)  # torch and kiln's dropout generator, as kiln train does
    model = MLP(MLPConfig(in_features=8, hidden=[16], out_features=3, dropout=dropout))
    opt = make_optimizer(optimizer, model.parameters(), lr)
    scheduler = kw.pop("scheduler", torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100))
    kw = {"batch_size": 32, "epochs": 3, "progress": False, "metric_fn": _accuracy, "metric_name": "accuracy",
          **kw}
    return Trainer(model, opt, _loss, train_data or _data(), _data(60, seed=1), scheduler=scheduler, seed=seed, **kw)


def test_loss_goes_down_and_rows_hold_every_column():
    trainer = _trainer(epochs=6)
    first = trainer.evaluate(trainer.train_data)["loss"]
    history = trainer.fit()
    assert trainer.step == 6 * 5 and trainer.epoch == 6 and trainer.stop_reason == "epochs"
    assert history[-1]["train_loss"] < history[0]["train_loss"] < first
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert list(history[0]) == ["epoch", "step", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert not trainer.model.training


def test_max_steps_stops_mid_epoch_with_a_partial_row():
    trainer = _trainer(max_steps=7)
    trainer.fit()
    assert trainer.step == 7 and trainer.epoch == 1 and trainer.batches_done == 2
    assert trainer.stop_reason == "max_steps"
    assert [row["epoch"] for row in trainer.history] == [1, pytest.approx(1.4)]


def _tensors(state):
    """Every tensor of a (nested) state, by path."""
    out = {}
    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
    walk("", state)
    return out


@pytest.mark.parametrize("stop", [7, 10])  # mid-epoch, and at an epoch's end
def test_resume_is_bit_exact(tmp_path, stop):
    whole = _trainer(max_steps=2 * stop, epochs=5)
    whole.fit()

    first = _trainer(max_steps=stop, epochs=5)
    first.fit()
    checkpoint.save({**first.state_dict(), "config": {}, "kiln_version": kiln.__version__}, tmp_path / "last.pt")
    torch.manual_seed(123)  # whatever the process did in between must not matter
    torch.rand(10)
    second = _trainer(seed=0, max_steps=2 * stop, epochs=5)  # fresh weights, fresh optimizer
    second.load_state_dict(checkpoint.load(tmp_path / "last.pt"))
    second.fit()

    assert second.step == whole.step == 2 * stop
    a, b = whole.state_dict(), second.state_dict()
    for part in ("model", "optimizer"):
        ta, tb = _tensors(a[part]), _tensors(b[part])
        assert ta.keys() == tb.keys() and ta
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (part, key)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["last_epoch"] == 2 * stop
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["data"], b["rng"]["data"])
    whole_rows = [row for row in whole.history if row["epoch"] == int(row["epoch"])]
    resumed_rows = [row for row in second.history if row["epoch"] == int(row["epoch"])]
    for ra, rb in zip(whole_rows, resumed_rows, strict=True):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


def test_resume_without_restoring_the_data_order_would_differ(tmp_path):
    # the check above can fail: a resumed run that starts the epoch over sees other batches
    whole = _trainer(max_steps=14, epochs=5)
    whole.fit()
    first = _trainer(max_steps=7, epochs=5)
    first.fit()
    state = first.state_dict()
    state["trainer"]["batches_done"] = 0
    second = _trainer(max_steps=14, epochs=5)
    second.load_state_dict(state)
    second.fit()
    assert not torch.equal(whole.model.net[0].weight, second.model.net[0].weight)


def test_evaluation_leaves_the_rng_alone():
    trainer = _trainer()
    before = torch.get_rng_state()
    trainer.evaluate(trainer.val_data)
    assert torch.equal(before, torch.get_rng_state())


def test_early_stopping_restores_the_best_weights():
    # labels of the training set are noise: validation loss gets worse as the model memorizes
    data = _data()
    noisy = TensorDataset(data.tensors[0], torch.randint(0, 3, (len(data),), generator=torch.Generator().manual_seed(5)))
    seen = []

    class Record:
        def on_epoch_end(self, trainer):
            seen.append((trainer.history[-1]["val_loss"], {k: v.clone() for k, v in trainer.model.state_dict().items()}))

    trainer = _trainer(lr=5e-2, dropout=0.0, epochs=30, patience=3, scheduler=None, callbacks=[Record()],
                       train_data=noisy)
    trainer.fit()
    assert trainer.restore_best_weights()
    losses = [loss for loss, _ in seen]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert trainer.stop_reason == "patience" and len(seen) == best + 1 + 3 < 30
    assert trainer.best_epoch == best + 1
    for key, value in seen[best][1].items():
        assert torch.equal(trainer.model.state_dict()[key], value), key


def test_gradient_clipping_bounds_the_step():
    trainer = _trainer(optimizer="sgd", lr=1.0, dropout=0.0, scheduler=None, clip_grad_norm=1e-3, max_steps=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    moved = math.sqrt(sum(((p - b) ** 2).sum().item() for p, b in zip(trainer.model.parameters(), before)))
    assert 0 < moved <= 1e-3 * (1 + 1e-5)


def test_scheduler_steps_every_step_or_every_epoch():
    trainer = _trainer(epochs=2)
    trainer.fit()
    assert trainer.scheduler.last_epoch == 10
    model = MLP(MLPConfig(in_features=8, hidden=[16], out_features=3))
    opt = make_optimizer("sgd", model.parameters(), 0.1)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = Trainer(model, opt, _loss, _data(), scheduler=step_lr, scheduler_interval="epoch", epochs=2,
                      progress=False)
    trainer.fit()
    assert step_lr.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert "val_loss" not in trainer.history[0]  # no validation data, no validation columns


def test_no_progress_bar_when_not_a_tty(capsys):
    _trainer(progress=True, max_steps=2).fit()
    assert capsys.readouterr().err == ""


def test_a_non_finite_loss_stops_training():
    trainer = _trainer(max_steps=2)
    trainer.loss_fn = lambda model, batch: _loss(model, batch) * float("nan")
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.fit()


def test_make_optimizer_uses_the_table_and_names_the_choices():
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer("AdamW", model.parameters(), 3e-4, weight_decay=0.1)
    assert isinstance(opt, OPTIMIZERS["adamw"]) and opt.defaults["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="optimizer 'lion' is not one of sgd, adam, adamw, rmsprop"):
        make_optimizer("lion", model.parameters(), 1e-3)
