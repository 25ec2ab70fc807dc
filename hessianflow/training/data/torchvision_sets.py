"""CIFAR-10/100, SVHN and MNIST through torchvision: where the files are looked for, what a missing or
corrupted set says, and the normalised (and augmented) data sets built from them."""

from __future__ import annotations

import copy
import os

from .registry import DATASETS, DataNotFoundError
from .transforms import RandomCropFlip, _Normalize

__all__: list = []


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
