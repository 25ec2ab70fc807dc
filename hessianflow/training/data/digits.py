"""scikit-learn's bundled handwritten digits: a real data set that needs no download
(:func:`load_digits_tensors`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._random import make_generator
from .registry import DATASETS, DataNotFoundError
from .transforms import TensorImageDataset, _Normalize

__all__ = ["load_digits_tensors"]


# The digits split: this many test images per class (36 x 10 = 360, 20% of 1,797), drawn with this seed.
_DIGITS_TEST_PER_CLASS = 36
_DIGITS_SPLIT_SEED = 0
_DIGITS_SIZE = 16


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
