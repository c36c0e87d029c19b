import torch

from kiln.train import data
from kiln.train.tasks import get_task


def test_digits_splits_are_stratified_disjoint_fixed_and_standardized_on_train():
    splits = data.digits()
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (s.tensors for s in splits)
    assert x_train.shape[1] == 64 and len(x_train) + len(x_val) + len(x_test) == 1797
    assert abs(len(x_test) - 0.15 * 1797) <= 1 and abs(len(x_val) - 0.15 * 1797) <= 1
    assert torch.allclose(x_train.mean(0), torch.zeros(64), atol=1e-5)
    # stratified: each class count is within two examples of its share (a random split is off by ~6)
    counts = torch.bincount(torch.cat([y_train, y_val, y_test]), minlength=10).double()
    for y in (y_train, y_val, y_test):
        expected = counts * len(y) / 1797
        assert (torch.bincount(y, minlength=10) - expected).abs().max() <= 2.0
    # disjoint: no image of one split is in another
    rows = [{tuple(r.tolist()) for r in x} for x in (x_train, x_val, x_test)]
    assert not (rows[0] & rows[2]) and not (rows[1] & rows[2]) and not (rows[0] & rows[1])
    # fixed: the same split every time (every model and seed is compared on the same test set)
    again = data.digits()
    assert torch.equal(again.test.tensors[0], x_test) and torch.equal(again.test.tensors[1], y_test)
    # no standardized value blows up on held-out images
    assert x_test.abs().max() < 50 and x_val.abs().max() < 50


def test_digits_task_loss_is_cross_entropy_and_metric_is_accuracy():
    task = get_task("digits")
    model = task.model_entry("logistic").build()
    x, y = task.splits().val.tensors
    with torch.no_grad():
        logits = model(x)
        expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
        assert torch.allclose(task.loss(model, (x, y)), expected, rtol=1e-5)
        assert task.metric_value(model, (x, y)) == (logits.argmax(-1) == y).double().mean().item()
