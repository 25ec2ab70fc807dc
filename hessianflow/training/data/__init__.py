"""Data sets and loaders for hessianflow's scripts: CIFAR-10/100, SVHN, MNIST (through torchvision),
scikit-learn's bundled handwritten digits (a real data set that needs no download) and an in-memory
synthetic data set.

The library itself (``hessianflow``) knows nothing of data sets; this package is the data layer of the
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

One module per topic; every name is importable from ``hessianflow.training.data`` (and from the checkout's
``utils``, HessianFlow's name for it):

* :mod:`~hessianflow.training.data.registry`: :class:`DatasetInfo`, :data:`DATASETS`, :func:`dataset_info`,
  :func:`data_range`, :class:`DataNotFoundError`.
* :mod:`~hessianflow.training.data.transforms`: :class:`RandomCropFlip`, :func:`set_augmentation_epoch`,
  :class:`TensorImageDataset` and the normalisation.
* :mod:`~hessianflow.training.data.synthetic`: :func:`make_synthetic`.
* :mod:`~hessianflow.training.data.digits`: :func:`load_digits_tensors`.
* :mod:`~hessianflow.training.data.torchvision_sets`: CIFAR-10/100, SVHN and MNIST files through torchvision.
* :mod:`~hessianflow.training.data.loaders`: :func:`get_datasets`, :func:`getData`, :func:`subset_loader`,
  :func:`fixed_batch`.
"""

from .digits import load_digits_tensors
from .loaders import fixed_batch, get_datasets, getData, subset_loader
from .registry import DATASETS, DataNotFoundError, DatasetInfo, data_range, dataset_info
from .synthetic import make_synthetic
from .transforms import RandomCropFlip, TensorImageDataset, set_augmentation_epoch

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
