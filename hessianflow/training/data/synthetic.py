"""The synthetic data set: a learnable, CIFAR-shaped classification set generated in memory from a seed
(:func:`make_synthetic`)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._checks import check_int, is_int
from ..._random import make_generator
from .registry import dataset_info
from .transforms import RandomCropFlip, TensorImageDataset, _Compose, _Normalize

__all__ = ["make_synthetic"]


def _smooth_fields(n: int, channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    # Low-frequency random patterns: 4x4 Gaussian noise bilinearly upsampled, one per channel.
    low = torch.randn(n, channels, 4, 4, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)  # [n, C, S, S]


def _draw_samples(templates, n, noise, distortion, max_shift, g):
    k, c, s, _ = templates.shape
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # balanced classes, shuffled
    # A random circular shift per sample, as one gather on the flattened image.
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    ar = torch.arange(s)
    rows = (ar[None, :] - dy[:, None]) % s  # [n, S]
    cols = (ar[None, :] - dx[:, None]) % s
    flat_index = (rows[:, :, None] * s + cols[:, None, :]).view(n, 1, s * s).expand(n, c, s * s)
    x = templates.view(k, c, s * s)[labels].gather(2, flat_index).view(n, c, s, s)  # [n, C, S, S]
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    brightness = 0.05 * torch.randn(n, 1, 1, 1, generator=g)
    # The class signal and the nuisance share an amplitude budget of 0.2 so that clipping stays rare.
    amp = 0.2 / (1.0 + distortion**2) ** 0.5
    x.mul_(amp * contrast).add_(_smooth_fields(n, c, s, g), alpha=amp * distortion).add_(0.5 + brightness)
    x.add_(torch.randn(n, c, s, s, generator=g), alpha=noise)
    return x.clamp_(0.0, 1.0), labels


def make_synthetic(
    num_train: int = 5000,
    num_test: int = 1000,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    noise: float = 0.2,
    distortion: float = 3.0,
    max_shift: Optional[int] = None,
    seed: int = 0,
) -> dict:
    """Generate a learnable, CIFAR-shaped classification data set from a seed, in memory.

    Each class gets a smooth random template (4x4 Gaussian noise per channel, bilinearly upsampled,
    scaled to unit standard deviation). A sample of class ``c`` is

    .. math::

        x = \\mathrm{clip}_{[0,1]}\\bigl(0.5 + a\\,(\\gamma\\, \\mathrm{shift}(T_c) + d\\, N)
            + \\beta + \\sigma\\, \\varepsilon\\bigr),
        \\qquad a = 0.2 / \\sqrt{1 + d^2},

    with a random circular shift of up to ``max_shift`` pixels, a contrast :math:`\\gamma \\sim U(0.7,
    1.3)`, a brightness :math:`\\beta \\sim N(0, 0.05^2)`, a per-sample smooth nuisance pattern ``N`` of
    the same kind as the templates, weighted by ``d = distortion``, and white noise of standard deviation
    ``sigma = noise``. The nuisance pattern lives in the same low-frequency space as the templates, so
    the classes overlap: the task is learnable but not trivial.

    At the defaults, pixels have mean ~0.51 and std ~0.246, and about 5% are clipped. The accuracies a
    small CNN and C1 reach on it, epoch by epoch, and what an epoch and the generation cost on a CPU
    are measured in ``benchmarks/README.md``.

    The templates are not mirror-symmetric, so the training augmentation of this set crops but does not
    flip (a flipped sample would look like another class).

    Args:
        num_train: training samples (5000: a few CPU epochs of a small CNN are cheap; see
            ``benchmarks/README.md``).
        num_test: test samples.
        num_classes: classes (balanced).
        image_size: height and width.
        channels: image channels.
        noise: standard deviation of the white pixel noise.
        distortion: weight of the per-sample smooth nuisance pattern relative to the class template;
            the larger, the harder.
        max_shift: largest random shift in pixels; ``None`` means ``image_size // 8`` (4 at 32x32).
        seed: the same seed gives bit-identical tensors.

    Returns:
        A dict with ``train_images`` ``[num_train, C, S, S]`` and ``test_images`` (pixels in [0, 1],
        float32, not normalised), ``train_targets`` and ``test_targets`` (int64).

    Example:
        >>> data = make_synthetic(num_train=20, num_test=10, num_classes=4, image_size=8, seed=0)
        >>> tuple(data["train_images"].shape), data["train_targets"].bincount().tolist()
        ((20, 3, 8, 8), [5, 5, 5, 5])
        >>> bool(data["train_images"].min() >= 0 and data["train_images"].max() <= 1)
        True
    """
    num_train = check_int("num_train", num_train, minimum=1)
    num_test = check_int("num_test", num_test, minimum=1)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    image_size = check_int("image_size", image_size, minimum=4)
    channels = check_int("channels", channels, minimum=1)
    if not (noise >= 0 and distortion >= 0):
        raise ValueError(f"noise and distortion must be non-negative, got {noise!r}, {distortion!r}")
    if max_shift is None:
        max_shift = image_size // 8
    if not is_int(max_shift) or not 0 <= max_shift < image_size:
        raise ValueError(f"max_shift must be an integer in [0, image_size) = [0, {image_size}), got {max_shift!r}")
    max_shift = int(max_shift)
    g = make_generator(seed)
    templates = _smooth_fields(num_classes, channels, image_size, g)
    templates = templates / templates.std(dim=(1, 2, 3), keepdim=True)
    xtr, ytr = _draw_samples(templates, num_train, noise, distortion, max_shift, g)
    xte, yte = _draw_samples(templates, num_test, noise, distortion, max_shift, g)
    return {"train_images": xtr, "train_targets": ytr, "test_images": xte, "test_targets": yte}


def _synthetic_datasets(augment: bool, seed: int, cfg: dict):
    shape_keys = ("num_train", "num_test", "num_classes", "image_size", "channels")
    info = dataset_info("synthetic", **{k: cfg[k] for k in shape_keys})
    data = make_synthetic(seed=seed, **cfg)
    norm = _Normalize(info.mean, info.std)
    train_plain = TensorImageDataset(norm(data["train_images"]), data["train_targets"])
    test = TensorImageDataset(norm(data["test_images"]), data["test_targets"])
    if augment:
        aug = RandomCropFlip(info.input_size, padding=4, flip=info.flip, seed=seed)
        train = TensorImageDataset(data["train_images"], data["train_targets"], _Compose(aug, norm))
    else:
        train = train_plain
    return train, train_plain, test
