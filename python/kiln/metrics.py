"""Quality scores for generated 8 x 8 digits, the same for every generator (VAE, GAN, DDPM).

A digits CNN (kiln.models.cnn, the digits task's classifier) judges the samples: by default one
trained here on the fly with a fixed seed (small, a few epochs, a few seconds; kept for the
process), or the model of a ``kiln train digits --model cnn`` checkpoint.

- ``sample_classifier_accuracy``: the fraction of samples of class c that the CNN calls c.
- ``frechet_distance``: the Frechet distance between Gaussians fitted to the CNN's penultimate
  features (an FID with the digits CNN for Inception) of the samples and of the test split;
  ``frechet_floor`` is the test split against the training split, the value real data gets.

Images everywhere here are (N, 64) or (N, 1, 8, 8) with pixels in [0, 1] (the data's 0..16 grey
levels divided by 16); the CNN sees them standardized as the digits task does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from kiln.models.cnn import CNN, CNNConfig
from kiln.train.data import Splits

# The on-the-fly judge: half the digits task's CNN, a few epochs (test accuracy ~0.97).
JUDGE_CONFIG = CNNConfig(channels=(16, 32), hidden=64, dropout=0.1)
JUDGE_EPOCHS, JUDGE_SEED = 8, 0

_cache: dict = {}


def digits_pixels(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Splits:
    """The digits task's train / val / test split (``kiln.train.data.digits``, same examples),
    pixels divided by 16 into [0, 1] instead of standardized: x (n, 64) float32, y classes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    index = torch.arange(len(data.target)).numpy()
    rest, test = train_test_split(index, test_size=test_fraction, stratify=data.target, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  stratify=data.target[rest], random_state=seed)
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target, dtype=torch.long)
    return Splits(*(TensorDataset(x[split], y[split]) for split in (train, val, test)))


class Judge:
    """The digits CNN and the standardization its inputs need."""

    def __init__(self, cnn: CNN, mean: Tensor, std: Tensor):
        self.cnn, self.mean, self.std = cnn.eval(), mean, std

    def inputs(self, images: Tensor) -> Tensor:
        device = next(self.cnn.parameters()).device
        x = images.reshape(len(images), -1).to(device, torch.float32) * 16
        return (x - self.mean.to(device)) / self.std.to(device)

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        return torch.cat([self.cnn(self.inputs(images[i:i + batch_size])).argmax(-1).cpu()
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        return torch.cat([self.cnn.penultimate(self.inputs(images[i:i + batch_size])).double().cpu()
                          for i in range(0, len(images), batch_size)])


def _standardization() -> tuple[Tensor, Tensor]:
    """The digits task's mean and std (of the training split, std floored at 1) in grey levels."""
    x = digits_pixels().train.tensors[0].double() * 16
    return x.mean(0).float(), x.std(0).clamp_min(1.0).float()


def judge(checkpoint: str | None = None, device: str | torch.device = "cpu") -> Judge:
    """The digits CNN of ``checkpoint`` (a digits task run of the cnn model), or one trained here
    with a fixed seed; cached per (checkpoint, device). The global RNGs are left as they were."""
    key = (checkpoint, str(device))
    if key in _cache:
        return _cache[key]
    mean, std = _standardization()
    if checkpoint is not None:
        import kiln.train
        cnn = kiln.train.load(checkpoint, map_location=device)
        if not isinstance(cnn, CNN):
            raise ValueError(f"checkpoint {checkpoint!r} holds a {type(cnn).__name__}, not the digits task's CNN")
    else:
        # its own seed, the caller's RNGs untouched; grad on even inside an evaluation
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(JUDGE_SEED)
            cnn = _train_judge(mean, std, device)
    _cache[key] = Judge(cnn, mean, std)
    return _cache[key]


def _train_judge(mean: Tensor, std: Tensor, device) -> CNN:
    import kiln

    x, y = digits_pixels().train.tensors
    x, y = ((x * 16 - mean) / std).to(device), y.to(device)
    cnn = CNN(JUDGE_CONFIG).to(device)
    optimizer = torch.optim.Adam(cnn.parameters(), lr=2e-3)
    for _ in range(JUDGE_EPOCHS):
        for batch in torch.randperm(len(x), device=device).split(64):
            loss = kiln.ops.cross_entropy(cnn(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return cnn.eval()


def judge_accuracy(judge_: Judge | None = None) -> float:
    """The judge's accuracy on the real test split (how far its verdicts can be trusted)."""
    judge_ = judge_ or judge()
    x, y = digits_pixels().test.tensors
    return (judge_.predict(x) == y).double().mean().item()


def sample_classifier_accuracy(images: Tensor, labels: Tensor, judge_: Judge | None = None) -> float:
    """The fraction of ``images`` that the digits CNN classifies as their ``labels``."""
    if len(images) != len(labels):
        raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
    judge_ = judge_ or judge()
    return (judge_.predict(images) == labels.cpu()).double().mean().item()


def _sqrtm_psd(a: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(a)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64; tr (S1 S2)^(1/2) is taken as
    tr (S1^(1/2) S2 S1^(1/2))^(1/2), the same eigenvalues on a symmetric matrix."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root = _sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(root @ sigma2 @ root).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(value.item(), 0.0)


def frechet_distance(features1: Tensor, features2: Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    if features1.dim() != 2 or features2.dim() != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"features1, features2: need (N, D) sets of one D, got {tuple(features1.shape)} "
                         f"and {tuple(features2.shape)}")
    f1, f2 = features1.double(), features2.double()
    return gaussian_frechet_distance(f1.mean(0), torch.cov(f1.T), f2.mean(0), torch.cov(f2.T))


def frechet_floor(judge_: Judge | None = None) -> float:
    """The test split against the training split: the distance real digits get."""
    judge_ = judge_ or judge()
    splits = digits_pixels()
    return frechet_distance(judge_.features(splits.test.tensors[0]), judge_.features(splits.train.tensors[0]))


def quality(images: Tensor, labels: Tensor | None = None, judge_: Judge | None = None) -> dict:
    """The scores of generated ``images`` (their ``labels`` for a conditional generator):
    sample_classifier_accuracy (conditional only), frechet_distance to the test split, and
    frechet_distance_floor and judge_test_accuracy beside them."""
    judge_ = judge_ or judge()
    test_x = digits_pixels().test.tensors[0]
    out = {}
    if labels is not None:
        out["sample_classifier_accuracy"] = sample_classifier_accuracy(images, labels, judge_)
    out["frechet_distance"] = frechet_distance(judge_.features(images), judge_.features(test_x))
    out["frechet_distance_floor"] = frechet_floor(judge_)
    out["judge_test_accuracy"] = judge_accuracy(judge_)
    out["num_samples"] = len(images)
    return out


def balanced_labels(n: int, num_classes: int = 10) -> Tensor:
    """n labels, each class n / num_classes times (class-major, as the rows of a grid)."""
    return torch.arange(num_classes).repeat_interleave(-(-n // num_classes))[:n]


def write_png(path: str, pixels: Tensor) -> None:
    """A greyscale PNG of an (H, W) tensor in [0, 1] (zlib only: fast enough for a grid per epoch)."""
    import struct
    import zlib

    rows = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", rows.shape[1], rows.shape[0], 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def save_grid(path: str, images: Tensor, nrow: int, scale: int = 4, pad: int = 1) -> None:
    """(N, 64) images in [0, 1] as a PNG grid, ``nrow`` images a row, each pixel ``scale``
    pixels wide, ``pad`` grey pixels between images; dark digits on white, as on paper."""
    images = images.detach().float().cpu().reshape(len(images), 8, 8)
    rows = -(-len(images) // nrow)
    cell = 8 * scale + pad
    canvas = torch.full((rows * cell + pad, nrow * cell + pad), 0.5)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        big = image.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        canvas[pad + r * cell: pad + r * cell + 8 * scale, pad + c * cell: pad + c * cell + 8 * scale] = 1 - big
    write_png(path, canvas)
