"""The data sets by name (:func:`get_datasets`), their loaders (:func:`getData`, :func:`subset_loader`)
and the fixed batch a Hessian is computed on (:func:`fixed_batch`)."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..._checks import check_int
from ..._random import make_generator
from .digits import _digits_datasets
from .registry import _canonical_name, _reject_synthetic_kwargs, _synthetic_config
from .synthetic import _synthetic_datasets
from .torchvision_sets import _torchvision_datasets

__all__ = ["fixed_batch", "getData", "get_datasets", "subset_loader"]


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

    Example:
        >>> train, plain, test = get_datasets("synthetic", num_train=40, num_test=8, image_size=8)
        >>> len(train), len(plain), len(test)
        (40, 40, 8)
        >>> x, y = plain[0]  # normalised with the set's mean 0.5 and std 0.25
        >>> tuple(x.shape), bool(x.min() >= -2 and x.max() <= 2)
        ((3, 8, 8), True)
    """
    key = _canonical_name(name)
    if key == "synthetic":
        return _synthetic_datasets(augment, seed, _synthetic_config(synthetic_kwargs))
    _reject_synthetic_kwargs(key, synthetic_kwargs)
    if key == "digits":
        return _digits_datasets()
    root = os.path.expanduser(os.fspath(data_dir))
    return _torchvision_datasets(key, root, download, augment, seed)


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

    Example:
        >>> train, test = getData("synthetic", train_bs=16, test_bs=100, num_train=40, num_test=8, image_size=8)
        >>> [len(y) for _, y in train], [len(y) for _, y in test]  # the last partial batch is kept
        ([16, 16, 8], [8])
    """
    train_bs = check_int("train_bs", train_bs, minimum=1)
    test_bs = check_int("test_bs", test_bs, minimum=1)
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

    Example:
        >>> _, plain, _ = get_datasets("synthetic", num_train=40, num_test=8, image_size=8, channels=1)
        >>> loader = subset_loader(plain, batch_size=8, num_batches=3, seed=0)
        >>> [len(y) for _, y in loader]
        [8, 8, 8]
        >>> [y.tolist() for _, y in loader] == [y.tolist() for _, y in loader]  # the same on every pass
        True
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    n = len(dataset)
    if num_batches is None:
        count = n
    else:
        num_batches = check_int("num_batches", num_batches, minimum=1)
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

    Example:
        >>> _, plain, _ = get_datasets("synthetic", num_train=40, num_test=8, image_size=8, channels=1)
        >>> x, y = fixed_batch(plain, batch_size=16, seed=0)
        >>> tuple(x.shape), y.dtype
        ((16, 1, 8, 8), torch.int64)
        >>> torch.equal(x, fixed_batch(plain, batch_size=16, seed=0)[0])  # the same seed, the same batch
        True
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    n = len(dataset)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the data set size {n}")
    indices = torch.randperm(n, generator=make_generator(seed))[:batch_size].tolist()
    items = [dataset[i] for i in indices]
    inputs = torch.stack([x for x, _ in items])
    targets = torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
    return inputs, targets
