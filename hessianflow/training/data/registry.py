"""The registry of data sets: what a model and an attack need to know about each (:class:`DatasetInfo`),
name checks, and the valid pixel range in each set's normalised input space (:func:`data_range`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..adversarial import normalized_bounds

__all__ = ["DATASETS", "DataNotFoundError", "DatasetInfo", "data_range", "dataset_info"]


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

    Example:
        >>> info = dataset_info("CIFAR10")
        >>> info.name, info.num_classes, info.in_channels, info.input_size
        ('cifar10', 10, 3, 32)
        >>> dataset_info("synthetic", channels=1, num_classes=4).std
        (0.25,)
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
    This is :func:`hessianflow.training.adversarial.normalized_bounds` of the set's ``mean`` and ``std``.

    Returns:
        ``(lo, hi)``, tensors of shape ``[C, 1, 1]``: ``lo = (0 - mean) / std``, ``hi = (1 - mean) / std``.

    Example:
        >>> lo, hi = data_range("synthetic", channels=1)  # mean 0.5, std 0.25
        >>> lo.flatten().tolist(), hi.flatten().tolist(), tuple(lo.shape)
        ([-2.0], [2.0], (1, 1, 1))
    """
    info = dataset_info(name, **synthetic_kwargs)
    lo, hi = normalized_bounds(info.mean, info.std)  # the formula's one home; float64, then cast
    return lo.to(dtype), hi.to(dtype)
