"""VAE, conditional GAN and DDPM (kiln.models.vae / gan / diffusion) and kiln.metrics: shapes,
the closed forms against torch in float64, and a few steps of each loss going down."""

import math

import pytest
import torch

from kiln import metrics
from kiln.models.diffusion import Diffusion, DiffusionConfig, cosine_betas, linear_betas
from kiln.models.gan import ConditionalGAN, GANConfig
from kiln.models.vae import VAE, VAEConfig, gaussian_kl


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits(n=64):
    x, y = metrics.digits_pixels().train.tensors
    return x[:n], y[:n]


def _steps(model, loss_fn, steps, lr):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# -- VAE ---------------------------------------------------------------------------------------

def test_gaussian_kl_matches_torch_distributions_in_float64():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), want, rtol=1e-12, atol=1e-12)


def test_vae_shapes_and_the_elbo_is_the_bernoulli_log_likelihood_minus_the_kl():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden=(32,))).double()
    x = _digits(6)[0].double()
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (6, 2)
    assert model.decode(mu).shape == (6, 64) and model.sample(4).shape == (4, 64)
    torch.manual_seed(1)
    elbo = model.elbo(x)
    torch.manual_seed(1)
    logits, mu, logvar = model(x)
    likelihood = torch.distributions.Bernoulli(logits=logits, validate_args=False)
    # Bernoulli's log_prob at a grey level t is t log p + (1 - t) log(1 - p), the same cross-entropy
    want = likelihood.log_prob(x).sum(-1) - gaussian_kl(mu, logvar)
    torch.testing.assert_close(elbo, want, rtol=1e-10, atol=1e-10)
    assert (elbo < 0).all()


def test_vae_loss_goes_down():
    torch.manual_seed(0)
    model, (x, _) = VAE(VAEConfig(hidden=(64,))), _digits()
    losses = _steps(model, lambda: -model.elbo(x).mean(), 15, 3e-3)
    assert losses[-1] < 0.9 * losses[0]


# -- GAN ---------------------------------------------------------------------------------------

def test_gan_shapes_and_each_loss_moves_only_its_own_player():
    torch.manual_seed(0)
    model = ConditionalGAN(GANConfig(channels=8))
    x, y = _digits(8)
    fake = model(y)
    assert fake.shape == (8, 1, 8, 8) and 0 <= fake.min() and fake.max() <= 1
    assert model.discriminator(x.reshape(-1, 1, 8, 8), y).shape == (8,)
    assert model.sample(y).shape == (8, 64) and model.training
    d_loss, g_loss = model.losses(x.reshape(-1, 1, 8, 8), y)
    d_params = list(model.discriminator.parameters())
    g_params = list(model.generator.parameters())
    assert all(g is None for g in torch.autograd.grad(d_loss, g_params, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(g_loss, d_params, allow_unused=True))
    assert any(g is not None for g in torch.autograd.grad(g_loss, g_params, allow_unused=True))


def test_gan_discriminator_loss_goes_down_against_a_fixed_generator():
    torch.manual_seed(0)
    model, (x, y) = ConditionalGAN(GANConfig(channels=8, dropout=0.0)), _digits()
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        d_loss, _ = model.losses(x.reshape(-1, 1, 8, 8), y)
        optimizer.zero_grad()
        d_loss.backward()
        optimizer.step()
        losses.append(d_loss.item())
    assert losses[-1] < 0.8 * losses[0]


# -- diffusion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_x_t_matches_iterating_the_forward_process(schedule):
    """q(x_t | x_0) in closed form against iterating q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1},
    beta_t I): exactly for the mean and variance recursions (float64), and to sampling error for
    20000 draws of the iterated process."""
    config = DiffusionConfig(timesteps=20, schedule=schedule, channels=8)
    model = Diffusion(config)
    betas = (linear_betas if schedule == "linear" else cosine_betas)(config.timesteps)
    torch.manual_seed(0)
    x0 = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1
    mean, var = x0.clone(), torch.zeros((), dtype=torch.float64)
    draws = x0.expand(20000, -1, -1, -1).clone()
    for t in range(config.timesteps):
        mean, var = (1 - betas[t]).sqrt() * mean, (1 - betas[t]) * var + betas[t]
        draws = (1 - betas[t]).sqrt() * draws + betas[t].sqrt() * torch.randn_like(draws)
        abar = model.alphas_cumprod[t].double()
        # x_t with zero noise is the mean; x_t's variance is 1 - abar_t
        torch.testing.assert_close(model.q_sample(x0.float(), torch.tensor([t]), torch.zeros(1, 1, 8, 8)),
                                   mean.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var, 1 - abar, rtol=1e-6, atol=1e-7)
        if t in (0, config.timesteps // 2, config.timesteps - 1):
            sd = (1 - abar).sqrt()
            assert (draws.mean(0) - abar.sqrt() * x0[0]).abs().max() < 5 * sd / math.sqrt(len(draws))
            assert (draws.std(0) / sd - 1).abs().max() < 0.05
    torch.testing.assert_close(model.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)


def test_schedules_start_small_and_end_near_pure_noise():
    for betas in (linear_betas(200), cosine_betas(200)):
        abar = torch.cumprod(1 - betas, 0)
        assert betas.shape == (200,) and (betas > 0).all() and (betas < 1).all()
        assert abar[0] > 0.99 and abar[-1] < 1e-3
    with pytest.raises(ValueError, match="schedule"):
        Diffusion(DiffusionConfig(schedule="quadratic"))


def test_unet_shapes_and_samplers():
    torch.manual_seed(0)
    model = Diffusion(DiffusionConfig(timesteps=6, channels=8, heads=2))
    x, y = _digits(4)
    t = torch.tensor([0, 1, 2, 5])
    assert model(x.reshape(-1, 1, 8, 8) * 2 - 1, t, y).shape == (4, 1, 8, 8)
    for how in ({}, {"guidance": 2.0}, {"ddim_steps": 3}, {"ddim_steps": 3, "eta": 1.0}):
        out = model.sample(y, generator=torch.Generator().manual_seed(0), **how)
        assert out.shape == (4, 64) and 0 <= out.min() and out.max() <= 1, how
    a = model.sample(y, ddim_steps=3, generator=torch.Generator().manual_seed(0))
    b = model.sample(y, ddim_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and model.training
    with pytest.raises(ValueError, match="ddim_steps"):
        model.sample(y, ddim_steps=7)


def test_diffusion_loss_goes_down():
    torch.manual_seed(0)
    model, (x, y) = Diffusion(DiffusionConfig(timesteps=50, channels=8, heads=2)), _digits()
    images = x.reshape(-1, 1, 8, 8)
    losses = _steps(model, lambda: model.loss(images, y), 30, 3e-3)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


# -- metrics -----------------------------------------------------------------------------------

def test_frechet_distance_of_identical_sets_is_zero_and_of_shifted_gaussians_the_closed_form():
    torch.manual_seed(0)
    a = torch.randn(500, 4, dtype=torch.float64)
    assert metrics.frechet_distance(a, a) < 1e-9
    # same covariance, means apart by d: the distance is ||d||^2 exactly for the fitted Gaussians
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9)
    # N(0, s1^2 I) against N(m, s2^2 I): ||m||^2 + D (s1 - s2)^2
    mu = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    got = metrics.gaussian_frechet_distance(torch.zeros(3), 4 * torch.eye(3), mu, 9 * torch.eye(3))
    assert got == pytest.approx(mu.square().sum().item() + 3 * (2 - 3) ** 2, rel=1e-9)
    # and a non-diagonal pair against scipy's matrix square root
    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = torch.randn(6, 3, dtype=torch.float64)
    s1, s2 = b.T @ b / 6 + 0.1 * torch.eye(3, dtype=torch.float64), torch.cov(a[:, :3].T) * 2
    cross = scipy_linalg.sqrtm((s1 @ s2).numpy()).real.trace()
    want = (s1.trace() + s2.trace() - 2 * cross).item()
    assert metrics.gaussian_frechet_distance(torch.zeros(3), s1, torch.zeros(3), s2) == pytest.approx(want, rel=1e-8)
    with pytest.raises(ValueError, match="features"):
        metrics.frechet_distance(a, a[:, :3])


def test_digits_pixels_is_the_digits_task_split_in_unit_pixels():
    from kiln.train import data
    ours, theirs = metrics.digits_pixels(), data.digits(dtype=torch.float64)
    mean, std = metrics._standardization()
    for a, b in zip(ours, theirs):
        assert torch.equal(a.tensors[1], b.tensors[1])
        torch.testing.assert_close(((a.tensors[0].double() * 16 - mean.double()) / std.double()), b.tensors[0],
                                   rtol=1e-5, atol=1e-5)
    assert 0 <= ours.train.tensors[0].min() and ours.train.tensors[0].max() == 1


def test_judge_scores_real_digits_and_refuses_mismatched_labels():
    judge = metrics.judge()
    x, y = metrics.digits_pixels().test.tensors
    assert metrics.sample_classifier_accuracy(x, y, judge) > 0.9
    assert metrics.sample_classifier_accuracy(x, (y + 1) % 10, judge) < 0.1
    assert metrics.judge() is judge
    with pytest.raises(ValueError, match="labels"):
        metrics.sample_classifier_accuracy(x, y[:5], judge)
    scores = metrics.quality(x[:100], y[:100], judge)
    assert scores["frechet_distance"] < 10 * scores["frechet_distance_floor"] + 1


def test_save_grid_writes_a_png(tmp_path):
    path = tmp_path / "grid.png"
    metrics.save_grid(str(path), torch.rand(23, 64), 10)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import struct
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (10 * 33 + 1, 3 * 33 + 1)


def test_gan_class_spread_is_the_within_class_std():
    from kiln.models.gan import class_spread
    torch.manual_seed(0)
    h, labels = torch.randn(9, 5, dtype=torch.float64), torch.tensor([0, 1, 0, 2, 1, 0, 1, 1, 0])
    got = class_spread(h, labels, 4)
    for i, c in enumerate(labels):
        rows = h[labels == c]
        want = ((rows.var(0, correction=0) + 1e-8).sqrt()).mean()
        torch.testing.assert_close(got[i, 0], want)
    assert class_spread(h[3:4], labels[3:4], 4).item() < 1e-3   # a class seen once
