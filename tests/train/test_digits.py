import torch

from kiln.train import data, digits


def test_digits_split_is_standardized_on_train_only_and_disjoint():
    (x_train, y_train), (x_test, y_test) = data.digits(seed=3)
    assert x_train.shape[1] == 64 and len(x_train) + len(x_test) == 1797
    assert abs(len(x_test) - 0.2 * 1797) <= 1
    assert torch.allclose(x_train.mean(0), torch.zeros(64), atol=1e-5)
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())


def test_mlp_of_kiln_layers_learns_digits():
    result = digits.train(epochs=12, hidden=128, progress=False)
    assert result["backend"] == "cpu"
    assert result["test_accuracy"] >= 0.95, result
