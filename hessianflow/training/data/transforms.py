"""In-memory images and the transforms applied to them: normalisation, and the seeded random crop and
flip of the training augmentation (:class:`RandomCropFlip`, :func:`set_augmentation_epoch`)."""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ..._checks import check_int
from ..._random import make_generator

__all__ = ["RandomCropFlip", "TensorImageDataset", "set_augmentation_epoch"]


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

    Example:
        >>> img = torch.arange(16.0).view(1, 4, 4)
        >>> aug = RandomCropFlip(4, padding=1, seed=0)
        >>> aug.set_epoch(3, rank=0)
        >>> first = aug(img)
        >>> aug.set_epoch(3, rank=0)  # the same epoch again: the same crop and flip
        >>> torch.equal(aug(img), first), tuple(first.shape)
        (True, (1, 4, 4))
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
        self.epoch = check_int("epoch", epoch, minimum=0)
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

    Example:
        >>> from hessianflow.training.data import get_datasets
        >>> train, plain, _ = get_datasets("synthetic", num_train=8, num_test=4, image_size=8)
        >>> set_augmentation_epoch(train, 0), set_augmentation_epoch(plain, 0)
        (1, 0)
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

    Example:
        >>> ds = TensorImageDataset(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]), transform=lambda x: x + 1)
        >>> len(ds), ds[2][0].sum().item(), ds[2][1].item()
        (3, 4.0, 2)
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
