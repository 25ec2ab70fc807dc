"""Data sets and loaders for hessianflow's scripts: CIFAR-10/100, SVHN, MNIST (through torchvision),
scikit-learn's bundled handwritten digits (a real data set that needs no download) and an in-memory
synthetic data set.

The library itself (``hessianflow``) knows nothing of data sets; this module is the data layer of the
training and analysis scripts. No training code lives here.

Usage::

    from utils import getData, get_datasets, dataset_info, fixed_batch

    train_loader, test_loader = getData(name="cifar10", train_bs=128, test_bs=1000)   # HessianFlow's call
    train_loader, test_loader = getData("synthetic", train_bs=64, num_train=2000)     # no download
    train_loader, test_loader = getData("digits", train_bs=32)                         # real, no download
    train_set, train_set_plain, test_set = get_datasets("cifar10", data_dir="./data", download=True)
    inputs, targets = fixed_batch(train_set_plain, batch_size=512, seed=0)             # for a Hessian

Three sets come back from :func:`get_datasets`: the training set with the training augmentation, the
same training data *without* augmentation (normalised only: ``train_set_plain``), and the test set.
Hessians, eigenvalues and traces are always computed on plain data, never on augmented data, so that
the operator is a fixed matrix.

Differences from HessianFlow's ``utils.getData`` (all deliberate):

* Normalisation uses each data set's own per-channel mean and standard deviation (see :data:`DATASETS`).
  HessianFlow normalised CIFAR-100 with CIFAR-10's statistics, used the widely copied
  ``(0.2023, 0.1994, 0.2010)`` (not the per-channel standard deviation of CIFAR-10) and did not
  normalise its default ``"cifar10"`` or ``"svhn"`` at all. Eigenvalues depend on the input scale, so
  numbers are comparable with HessianFlow's only up to that scale.
* SVHN trains on ``split="train"`` (HessianFlow used ``"extra"``).
* ``"digits"`` is new: see :func:`load_digits_tensors` for how the 8x8 images are shaped for the models.
* Nothing is downloaded unless ``download=True``; a missing data set raises :class:`DataNotFoundError`.
* Augmentation draws from its own seeded generator (:class:`RandomCropFlip`), so a seed reproduces the
  augmented batches too, with any number of loader workers; :func:`set_augmentation_epoch` ties the
  crops and flips to ``(seed, epoch)`` so that a resumed run repeats them.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ._random import make_generator

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "DatasetInfo",
    "RandomCropFlip",
    "TensorImageDataset",
    "data_range",
    "dataset_info",
    "fixed_batch",
    "getData",
    "get_datasets",
    "load_digits_tensors",
    "make_synthetic",
    "set_augmentation_epoch",
    "subset_loader",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an attack need to know about a data set.

    Attributes:
        name: canonical (lower-case) name.
        num_classes: number of classes.
        in_channels: image channels.
        input_size: image height and width (all sets here are square).
        mean: per-channel mean of the training pixels in [0, 1], used for normalisation.
        std: per-channel standard deviation of the training pixels, used for normalisation.
        num_train: training-set size.
        num_test: test-set size.
        flip: whether the training augmentation flips horizontally (not for digits).
    """

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple
    std: tuple
    num_train: int
    num_test: int
    flip: bool = True

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# Per-channel statistics of each training set, as computed over all training pixels in [0, 1]
# (the values quoted throughout the literature; CIFAR-10's std is the per-channel one, 0.247/0.243/0.261).
# Digits: the fixed 1,437-image training split of load_digits_tensors (pixels /16, bilinear 8x8 -> 16x16);
# bilinear upsampling keeps the mean of the 8x8 pixels (0.3060) and lowers their std (0.3765 -> 0.3195).
# The synthetic set's generator is built so that its pixels have mean ~0.5 and std ~0.25 at the defaults
# (measured: mean 0.51, std 0.246); these nominal values are used for every configuration.
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 50000, 10000, True
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 50000, 10000, True
    ),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 73257, 26032, False),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), 60000, 10000, False),
    "synthetic": DatasetInfo("synthetic", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 5000, 1000, False),
    "digits": DatasetInfo("digits", 10, 1, 16, (0.3060,), (0.3195,), 1437, 360, False),
}

# The digits split: this many test images per class (36 x 10 = 360, 20% of 1,797), drawn with this seed.
_DIGITS_TEST_PER_CLASS = 36
_DIGITS_SPLIT_SEED = 0
_DIGITS_SIZE = 16

# Defaults of the synthetic generator (see make_synthetic for what they mean and why).
_SYNTHETIC_DEFAULTS = {
    "num_train": 5000,
    "num_test": 1000,
    "num_classes": 10,
    "image_size": 32,
    "channels": 3,
    "noise": 0.2,
    "distortion": 3.0,
    "max_shift": None,
}

# Where torchvision looks for each data set under data_dir, and where the files come from.
_SOURCES = {
    "cifar10": (
        [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
        + ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"],
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it there)",
    ),
    "cifar100": (
        ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it there)",
    ),
    "svhn": (
        ["train_32x32.mat", "test_32x32.mat"],
        "http://ufldl.stanford.edu/housenumbers/ (the cropped-digit .mat files)",
    ),
    "mnist": (
        [
            "MNIST/raw/train-images-idx3-ubyte",
            "MNIST/raw/train-labels-idx1-ubyte",
            "MNIST/raw/t10k-images-idx3-ubyte",
            "MNIST/raw/t10k-labels-idx1-ubyte",
        ],
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (gunzip the four files)",
    ),
}


class DataNotFoundError(FileNotFoundError):
    """A data set is not where it was looked for (or is corrupted) and was not to be downloaded."""


def _canonical_name(name: str) -> str:
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def _synthetic_config(kwargs: dict) -> dict:
    unknown = set(kwargs) - set(_SYNTHETIC_DEFAULTS)
    if unknown:
        raise TypeError(
            f"unexpected synthetic-data option(s) {sorted(unknown)}; valid: {', '.join(_SYNTHETIC_DEFAULTS)}"
        )
    return {**_SYNTHETIC_DEFAULTS, **kwargs}


def _reject_synthetic_kwargs(name: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"options {sorted(kwargs)} apply only to the 'synthetic' data set, not to {name!r}")


def dataset_info(name: str, **synthetic_kwargs) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of a data set (name case-insensitive).

    For ``"synthetic"``, the generator options of :func:`make_synthetic` (``num_classes``,
    ``channels``, ``image_size``, ``num_train``, ``num_test``) may be passed to get the info of that
    configuration.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    key = _canonical_name(name)
    info = DATASETS[key]
    if key != "synthetic":
        _reject_synthetic_kwargs(key, synthetic_kwargs)
        return info
    cfg = _synthetic_config(synthetic_kwargs)
    c = cfg["channels"]
    return replace(
        info,
        num_classes=cfg["num_classes"],
        in_channels=c,
        input_size=cfg["image_size"],
        mean=(info.mean[0],) * c,
        std=(info.std[0],) * c,
        num_train=cfg["num_train"],
        num_test=cfg["num_test"],
    )


def data_range(name: str, dtype: torch.dtype = torch.float32, **synthetic_kwargs) -> tuple:
    """The valid pixel range [0, 1] mapped into the normalised input space, per channel.

    An adversarial perturbation (FGSM) clamps to this box so that the perturbed input is still an image.

    Returns:
        ``(lo, hi)``, tensors of shape ``[C, 1, 1]``: ``lo = (0 - mean) / std``, ``hi = (1 - mean) / std``.
    """
    info = dataset_info(name, **synthetic_kwargs)
    mean = torch.tensor(info.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float64).view(-1, 1, 1)
    return ((0.0 - mean) / std).to(dtype), ((1.0 - mean) / std).to(dtype)


def _mix_seed(*parts) -> int:
    # A process-independent 63-bit seed from several integers (Python's hash() is salted per process).
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _current_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RandomCropFlip:
    """Random crop after zero padding, and an optional random horizontal flip, of a ``[C, H, W]`` tensor.

    The same augmentation as torchvision's ``RandomCrop(size, padding=4)`` followed by
    ``RandomHorizontalFlip()`` (the standard CIFAR augmentation of He et al., 2016), applied to pixels in
    [0, 1] before normalisation (so padding is black, as with torchvision's PIL padding), but drawing
    from its own generator, so that a seed reproduces the augmented batches:

    * Before :meth:`set_epoch` is called, the main process (``num_workers=0``) draws one stream seeded by
      ``seed`` across all epochs; a loader worker reseeds from its worker seed (which the loader derives
      from its own seeded generator) combined with ``seed``, so workers do not repeat each other.
    * After ``set_epoch(epoch)`` (see :func:`set_augmentation_epoch`), the stream is a function of
      ``(seed, epoch, rank, worker id)`` only, so a run resumed at ``epoch`` repeats the crops and flips
      of the uninterrupted run (for the same sampler order, ``num_workers`` and world size), and
      distributed ranks draw different streams. Workers must not be persistent (the default), since the
      epoch reaches them when they are started.

    Args:
        size: output height and width.
        padding: zero padding on every side before cropping (4, as in He et al., 2016).
        flip: whether to flip horizontally with probability 1/2.
        seed: seed of the generator.
    """

    def __init__(self, size: int, padding: int = 4, flip: bool = True, seed: int = 0):
        self.size = size
        self.padding = padding
        self.flip = flip
        self.seed = seed
        self.epoch = None
        self.rank = 0
        self._gen = None
        self._owner = None

    def set_epoch(self, epoch: int, rank: Optional[int] = None) -> None:
        """Make the stream a function of ``(seed, epoch, rank, worker id)``; ``rank`` defaults to the
        ``torch.distributed`` rank (0 when not distributed)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch
        self.rank = _current_rank() if rank is None else int(rank)
        self._gen = None
        self._owner = None

    def _generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        owner = None if info is None else (info.id, info.seed)
        if self._gen is None or owner != self._owner:
            if self.epoch is not None:
                s = _mix_seed(self.seed, self.epoch, self.rank, -1 if info is None else info.id)
            elif info is None:
                s = self.seed
            else:
                s = _mix_seed(self.seed, "worker", info.seed)
            self._gen = make_generator(s)
            self._owner = owner
        return self._gen

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_gen"] = None  # a worker builds its own generator
        state["_owner"] = None
        return state

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        g = self._generator()
        p = self.padding
        padded = F.pad(img, (p, p, p, p)) if p > 0 else img
        h, w = padded.shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"crop size {self.size} exceeds the padded image size {(h, w)}")
        i = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
        j = int(torch.randint(0, w - self.size + 1, (1,), generator=g))
        out = padded[..., i : i + self.size, j : j + self.size]
        if self.flip and bool(torch.rand((), generator=g) < 0.5):
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return f"RandomCropFlip(size={self.size}, padding={self.padding}, flip={self.flip}, seed={self.seed})"


def _augmentations(dataset) -> list:
    # The RandomCropFlip transforms of a data set, looking through Subset wrappers and Compose lists.
    found = []
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    stack = [getattr(dataset, "transform", None)]
    while stack:
        t = stack.pop()
        if isinstance(t, RandomCropFlip):
            found.append(t)
        elif t is not None:
            stack.extend(getattr(t, "transforms", []) or [])
    return found


def set_augmentation_epoch(dataset, epoch: int, rank: Optional[int] = None) -> int:
    """Tie a training set's crops and flips to ``(seed, epoch, rank, worker)``: see :class:`RandomCropFlip`.

    Call it at the start of every epoch, before iterating the loader (as with
    ``DistributedSampler.set_epoch``); a resumed run then repeats the augmentations of the uninterrupted
    one. A set without augmentation (``train_set_plain``, ``augment=False``) is left alone.

    Returns:
        The number of augmentation transforms updated (0 for an un-augmented set).
    """
    augs = _augmentations(dataset)
    for aug in augs:
        aug.set_epoch(epoch, rank)
    return len(augs)


class _Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _Compose:
    def __init__(self, *transforms):
        self.transforms = list(transforms)  # the attribute name of torchvision's Compose

    def __call__(self, x):
        for fn in self.transforms:
            x = fn(x)
        return x


class TensorImageDataset(Dataset):
    """Images and labels held in memory, with an optional per-sample transform of the image.

    Args:
        images: ``[N, C, H, W]`` float tensor.
        targets: ``[N]`` int64 labels.
        transform: callable applied to each ``[C, H, W]`` image, or ``None``.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform=None):
        if images.shape[0] != targets.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]


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

    Measured at the defaults (seed 0, no augmentation, SGD with learning rate 0.05, momentum 0.9, batch
    64, CPU): a two-layer CNN (16 and 32 channels, 1 to 3 s an epoch) reaches 54-55% test accuracy after
    one epoch and 65-66% after four; C1 (9 to 30 s an epoch) about 55%, 64%, 70% after one, two, three
    epochs (chance: 10%). Generation takes about 0.5 s on two idle cores. Pixels have mean ~0.51 and
    std ~0.246; about 5% are clipped.

    The templates are not mirror-symmetric, so the training augmentation of this set crops but does not
    flip (a flipped sample would look like another class).

    Args:
        num_train: training samples (5000: a few CPU epochs of a small CNN take about a minute).
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
    """
    for key, val, lo in (
        ("num_train", num_train, 1),
        ("num_test", num_test, 1),
        ("num_classes", num_classes, 2),
        ("image_size", image_size, 4),
        ("channels", channels, 1),
    ):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{key} must be an int >= {lo}, got {val!r}")
    if not (noise >= 0 and distortion >= 0):
        raise ValueError(f"noise and distortion must be non-negative, got {noise!r}, {distortion!r}")
    if max_shift is None:
        max_shift = image_size // 8
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or not 0 <= max_shift < image_size:
        raise ValueError(f"max_shift must be an int in [0, image_size), got {max_shift!r}")
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


def load_digits_tensors() -> dict:
    """scikit-learn's handwritten digits, shaped for the models, with a fixed stratified train/test split.

    The data are the 1,797 8x8 grey images of ``sklearn.datasets.load_digits`` (the test set of the UCI
    "Optical Recognition of Handwritten Digits" data; 16 grey levels 0..16, 10 classes, 174-183 images a
    class), which ship inside the scikit-learn wheel: nothing is downloaded. They become model inputs as
    follows:

    * **Pixels** are divided by 16, to [0, 1] like the other sets before normalisation.
    * **Size**: bilinearly upsampled (``align_corners=False``) from 8x8 to 16x16, one channel. 16x16 is
      the smallest size every model here accepts (C2's two valid 5x5 convolutions need it; C1 and the
      ResNet take any size), and a 4x cheaper forward pass than 32x32. Bilinear interpolation keeps the
      values in [0, 1] (convex combinations; bicubic overshoots to [-0.24, 1.23]) and the strokes
      smooth (nearest-neighbour would only repeat each pixel in 2x2 blocks).
    * **Split**: a fixed, stratified 1,437 / 360 split: 36 test images of each class (20% of the set),
      chosen with ``torch.randperm`` under seed 0 per class; the rest, in the data set's order, train.
      The split never depends on a run's seed, so every run and the eigenvalue driver see the same test
      set. The test set is exactly balanced; the training set holds 138-147 images a class.

    Normalisation (with the training split's mean 0.3060 and std 0.3195, stored in :data:`DATASETS`)
    is done by :func:`get_datasets`, not here.

    Returns:
        A dict with ``train_images`` ``[1437, 1, 16, 16]`` and ``test_images`` ``[360, 1, 16, 16]``
        (float32 in [0, 1]), ``train_targets`` and ``test_targets`` (int64), and ``train_index`` and
        ``test_index``: the rows of ``load_digits()`` each image comes from.

    Raises:
        DataNotFoundError: when scikit-learn is not installed (``pip install 'hessianflow[data]'``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataNotFoundError(
            "the digits data set ships with scikit-learn, which is not installed: "
            f"pip install 'hessianflow[data]' (or scikit-learn) ({type(exc).__name__}: {exc})"
        ) from exc
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8]
    targets = torch.as_tensor(bunch.target, dtype=torch.int64)
    images = F.interpolate(images, size=(_DIGITS_SIZE, _DIGITS_SIZE), mode="bilinear", align_corners=False)
    g = make_generator(_DIGITS_SPLIT_SEED)
    picks = []
    for c in range(int(targets.max()) + 1):
        rows = (targets == c).nonzero().flatten()
        picks.append(rows[torch.randperm(len(rows), generator=g)[:_DIGITS_TEST_PER_CLASS]])
    test_index = torch.cat(picks).sort().values
    is_train = torch.ones(len(targets), dtype=torch.bool)
    is_train[test_index] = False
    train_index = is_train.nonzero().flatten()
    return {
        "train_images": images[train_index].contiguous(),
        "train_targets": targets[train_index].contiguous(),
        "test_images": images[test_index].contiguous(),
        "test_targets": targets[test_index].contiguous(),
        "train_index": train_index,
        "test_index": test_index,
    }


def _digits_datasets():
    # No training augmentation: a mirrored digit is not the same digit (a mirrored 3 or 7 is no digit at
    # all), and a 4-pixel crop of a 16x16 image shifts it by a quarter of its width, enough to cut strokes
    # off; without it the experiments' Hessians are over the very data the optimiser saw.
    info = DATASETS["digits"]
    data = load_digits_tensors()
    norm = _Normalize(info.mean, info.std)
    train = TensorImageDataset(norm(data["train_images"]), data["train_targets"])
    test = TensorImageDataset(norm(data["test_images"]), data["test_targets"])
    return train, train, test


def _missing_files(key: str, root: str) -> list:
    files, _ = _SOURCES[key]
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if key == "mnist" and missing:
        # torchvision also accepts its legacy processed tensors.
        legacy = [os.path.join(root, "MNIST", "processed", f) for f in ("training.pt", "test.pt")]
        if all(os.path.isfile(p) for p in legacy):
            return []
    return missing


def _not_found_message(key: str, root: str, what: str) -> str:
    files, source = _SOURCES[key]
    return (
        f"{what} the {key} data set in {root!r}. Either pass download=True (--download on the command "
        f"line) to download it there, or place the files at {', '.join(os.path.join(root, f) for f in files)} "
        f"(from {source})."
    )


def _torchvision_datasets(key: str, root: str, download: bool, augment: bool, seed: int):
    from torchvision import datasets, transforms
    from torchvision.datasets.vision import StandardTransform

    info = DATASETS[key]
    if not download:
        missing = _missing_files(key, root)
        if missing:
            raise DataNotFoundError(_not_found_message(key, root, f"Could not find {', '.join(missing)} of"))
    plain_tf = transforms.Compose([transforms.ToTensor(), _Normalize(info.mean, info.std)])
    classes = {
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
        "mnist": datasets.MNIST,
        "svhn": datasets.SVHN,
    }
    cls = classes[key]

    def build(train: bool):
        split = {"split": "train" if train else "test"} if key == "svhn" else {"train": train}
        return cls(root, download=download, transform=plain_tf, **split)

    try:
        train_plain = build(True)
        test = build(False)
    except (RuntimeError, OSError) as exc:
        if download:
            msg = _not_found_message(key, root, f"Downloading failed ({type(exc).__name__}: {exc}) for")
            raise DataNotFoundError(msg) from exc
        # The files exist (checked above) but torchvision rejected them: say so without its traceback.
        msg = _not_found_message(key, root, "Corrupted or incomplete files (failed torchvision's check) for")
        raise DataNotFoundError(msg) from None
    if augment:
        train = copy.copy(train_plain)  # shares the pixel arrays; only the transform differs
        train.transform = transforms.Compose(
            [
                transforms.ToTensor(),
                RandomCropFlip(info.input_size, padding=4, flip=info.flip, seed=seed),
                _Normalize(info.mean, info.std),
            ]
        )
        # VisionDataset keeps a second reference to the transform; keep it consistent.
        train.transforms = StandardTransform(train.transform, train.target_transform)
    else:
        train = train_plain
    return train, train_plain, test


def get_datasets(
    name: str,
    data_dir: str = "./data",
    download: bool = False,
    augment: bool = True,
    seed: int = 0,
    **synthetic_kwargs,
):
    """Return ``(train_set, train_set_plain, test_set)`` of a data set.

    Args:
        name: ``"cifar10"``, ``"cifar100"``, ``"svhn"``, ``"mnist"``, ``"digits"`` or ``"synthetic"``
            (case-insensitive).
        data_dir: directory torchvision reads from (and downloads to); unused by digits and synthetic.
        download: download a missing torchvision data set (never by default: a training run should not
            start a download by surprise).
        augment: whether ``train_set`` is augmented (random crop with 4-pixel padding, plus a
            horizontal flip except for the digit sets SVHN and MNIST, as in He et al., 2016). Digits
            are never augmented (a mirrored digit is not the same digit, and a 4-pixel crop is a quarter
            of a 16x16 image): their ``train_set`` is ``train_set_plain``.
        seed: seeds the augmentation (:class:`RandomCropFlip`) and, for ``"synthetic"``, the data.
            The digits split is fixed (see :func:`load_digits_tensors`) whatever the seed.
        **synthetic_kwargs: options of :func:`make_synthetic` (``num_train``, ``num_test``,
            ``num_classes``, ``image_size``, ``channels``, ``noise``, ``distortion``, ``max_shift``).

    Returns:
        ``train_set`` (augmented when ``augment``), ``train_set_plain`` (the same training samples,
        normalised only, in the same order: the one to compute Hessians on) and ``test_set``. Each item
        is ``(image [C, H, W] float32 normalised with the set's mean/std, label int)``.

    Raises:
        ValueError: for an unknown name.
        DataNotFoundError: when the files are missing (or corrupted) and ``download`` is false, or a
            download fails; the message names the data set, the directory and how to get the files.
            For digits: when scikit-learn is not installed.
    """
    key = _canonical_name(name)
    if key == "synthetic":
        return _synthetic_datasets(augment, seed, _synthetic_config(synthetic_kwargs))
    _reject_synthetic_kwargs(key, synthetic_kwargs)
    if key == "digits":
        return _digits_datasets()
    root = os.path.expanduser(os.fspath(data_dir))
    return _torchvision_datasets(key, root, download, augment, seed)


def _check_batch_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def getData(
    name: str = "cifar10",
    train_bs: int = 128,
    test_bs: int = 1000,
    data_dir: str = "./data",
    download: bool = False,
    augment: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: Optional[bool] = None,
    **synthetic_kwargs,
):
    """Return ``(train_loader, test_loader)``: HessianFlow's ``getData(name, train_bs, test_bs)``.

    The training loader shuffles with a generator seeded by ``seed`` (so the batch order, and the
    augmentation, are reproducible) and keeps the last partial batch (``drop_last=False``); the test
    loader does not shuffle. The defaults 128 and 1000 are HessianFlow's.

    Args:
        name: data set name, see :func:`get_datasets`.
        train_bs: training batch size.
        test_bs: test batch size.
        data_dir: directory of the data.
        download: download a missing torchvision data set.
        augment: augment the training set.
        num_workers: loader worker processes.
        seed: seeds the shuffling, the augmentation and, for ``"synthetic"``, the data.
        pin_memory: pin host memory for faster copies to a GPU; ``None`` means "when CUDA is available".
        **synthetic_kwargs: options of :func:`make_synthetic`.

    Raises:
        ValueError: for an unknown name or a non-positive batch size.
        DataNotFoundError: see :func:`get_datasets`.
    """
    _check_batch_size("train_bs", train_bs)
    _check_batch_size("test_bs", test_bs)
    train_set, _, test_set = get_datasets(
        name, data_dir=data_dir, download=download, augment=augment, seed=seed, **synthetic_kwargs
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    train_loader = DataLoader(
        train_set,
        batch_size=train_bs,
        shuffle=True,
        generator=make_generator(seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
    )
    test_loader = DataLoader(
        test_set, batch_size=test_bs, shuffle=False, num_workers=num_workers, pin_memory=pin_memory
    )
    return train_loader, test_loader


def subset_loader(
    dataset: Dataset,
    batch_size: int,
    num_batches: Optional[int] = None,
    seed: Optional[int] = None,
    num_workers: int = 0,
    pin_memory: Optional[bool] = None,
) -> DataLoader:
    """A loader over a fixed part of a data set that yields the same batches, in the same order, on every
    pass: what a Hessian over "N batches" of (plain, unaugmented) data needs.

    Args:
        dataset: usually ``train_set_plain`` from :func:`get_datasets`.
        batch_size: batch size.
        num_batches: number of batches; ``None`` means the whole data set.
        seed: ``None`` takes the first ``num_batches * batch_size`` samples in order; an int takes a
            random subset of that size drawn with this seed (in the drawn order).
        num_workers: loader worker processes.
        pin_memory: as in :func:`getData`.

    Returns:
        A non-shuffling ``DataLoader`` (the last batch may be partial when ``num_batches`` is ``None``).

    Raises:
        ValueError: for a non-positive batch size or batch count, or more samples than the data set has.
    """
    _check_batch_size("batch_size", batch_size)
    n = len(dataset)
    if num_batches is None:
        count = n
    else:
        _check_batch_size("num_batches", num_batches)
        count = num_batches * batch_size
        if count > n:
            raise ValueError(f"{num_batches} batches of {batch_size} need {count} samples; the data set has {n}")
    if seed is None:
        indices = list(range(count))
    else:
        indices = torch.randperm(n, generator=make_generator(seed))[:count].tolist()
    subset = dataset if (seed is None and count == n) else Subset(dataset, indices)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)


def fixed_batch(dataset: Dataset, batch_size: int, seed: int = 0) -> tuple:
    """One reproducible random batch: ``batch_size`` distinct samples drawn with ``seed``.

    HessianFlow's "approximate" eigenvalues use the Hessian of a single batch; this is that batch.

    Returns:
        ``(inputs [batch_size, C, H, W], targets [batch_size])``.

    Raises:
        ValueError: for a non-positive batch size or one larger than the data set.
    """
    _check_batch_size("batch_size", batch_size)
    n = len(dataset)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the data set size {n}")
    indices = torch.randperm(n, generator=make_generator(seed))[:batch_size].tolist()
    items = [dataset[i] for i in indices]
    inputs = torch.stack([x for x, _ in items])
    targets = torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
    return inputs, targets
