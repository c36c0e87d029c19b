"""The notes' regression families, the digits CNN and the ViT: shapes, closed forms, and that a
few optimizer steps lower the loss (tiny configs: training to accuracy is `kiln train`'s job)."""

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.models.basis import FAMILIES, BasisConfig, BasisRegression
from kiln.models.cnn import CNN, CNNConfig
from kiln.models.vit import ViT, ViTConfig, drop_path


def _curve(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 6 - 3
    return x, torch.sin(2 * x) + 0.3 * x + 0.05 * torch.randn(n, 1, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("family", ["linear", "poly", "fourier", "rbf"])
def test_least_squares_fit_is_the_normal_equations_solution(family):
    torch.manual_seed(0)
    model = BasisRegression(BasisConfig(family, num_basis=6)).double()
    x, y = _curve()
    mse = model.fit_least_squares(x, y)
    phi = torch.cat([model.features(x), torch.ones_like(x)], dim=-1)
    theta = torch.linalg.solve(phi.T @ phi, phi.T @ y)               # the normal equations
    assert torch.allclose(model(x), phi @ theta, rtol=0, atol=1e-8)
    assert abs(mse - F.mse_loss(model(x), y).item()) < 1e-10


def test_gradient_descent_approaches_the_closed_form():
    torch.manual_seed(0)
    x, y = _curve()
    model = BasisRegression(BasisConfig("poly", num_basis=3)).double()
    floor = BasisRegression(BasisConfig("poly", num_basis=3)).double().fit_least_squares(x, y)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    assert F.mse_loss(model(x), y).item() < floor * 1.01


def test_relu_kinks_are_where_units_switch_on():
    torch.manual_seed(0)
    model = BasisRegression(BasisConfig("relu", num_basis=5)).double()
    kinks = model.kinks()
    a, b = model.hidden.weight[:, 0], model.hidden.bias
    for k in range(5):
        eps = 1e-6
        left = torch.relu(a[k] * (kinks[k] - eps) + b[k])
        right = torch.relu(a[k] * (kinks[k] + eps) + b[k])
        assert (left == 0) != (right == 0)
    with pytest.raises(ValueError, match="only the relu family"):
        BasisRegression(BasisConfig("poly")).kinks()
    with pytest.raises(ValueError, match="not linear in its parameters"):
        model.fit_least_squares(*_curve())
    with pytest.raises(ValueError, match="family"):
        BasisRegression(BasisConfig("spline"))
    assert set(FAMILIES) == {"linear", "poly", "fourier", "rbf", "relu", "sigmoid"}


def _few_steps_lower_the_loss(model, x, y, steps=8, lr=3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = kiln.nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("build", [lambda: CNN(CNNConfig(channels=(8, 16), hidden=32)),
                                   lambda: CNN(CNNConfig(channels=(8,), hidden=16, batch_norm=False)),
                                   lambda: ViT(ViTConfig(dim=32, depth=2, heads=4))],
                         ids=["cnn", "cnn-no-bn", "vit"])
def test_classifiers_take_flat_or_image_digits_and_learn(build):
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    assert model(x).shape == (32, 10)
    assert torch.equal(model.eval()(x), model(x.reshape(32, 1, 8, 8)))
    _few_steps_lower_the_loss(model.train(), x, y)


def test_cnn_penultimate_features_and_config_errors():
    model = CNN(CNNConfig(channels=(8, 16), hidden=32)).eval()
    assert model.penultimate(torch.randn(3, 64)).shape == (3, 32)
    with pytest.raises(ValueError, match="below 1 pixel"):
        CNN(CNNConfig(channels=(8, 8, 8, 8)))
    with pytest.raises(ValueError, match="does not divide image_size"):
        ViT(ViTConfig(patch_size=3))
    with pytest.raises(ValueError, match="does not divide dim"):
        ViT(ViTConfig(dim=30, heads=4))


def test_drop_path_keeps_the_expectation_and_is_off_in_eval():
    torch.manual_seed(0)
    x = torch.ones(20000, 3)
    out = drop_path(x, 0.25, training=True)
    values = out[:, 0].unique()
    assert len(values) == 2 and values[0] == 0 and abs(values[1].item() - 4 / 3) < 1e-6
    assert abs(out.mean().item() - 1) < 0.02
    assert torch.equal(drop_path(x, 0.25, training=False), x)
