"""Tests of utils.py, the data layer: torchvision loading on files written in the data sets' own formats,
normalisation, augmentation, missing data, the synthetic set, data_range and the batch helpers."""

import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessianflow.training.data as utils
from hessianflow.training.data import (
    DATASETS,
    DataNotFoundError,
    data_range,
    dataset_info,
    fixed_batch,
    get_datasets,
    getData,
    make_synthetic,
    subset_loader,
)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- file writers


def write_cifar10(root, n_per_batch=4, n_test=6, seed=0):
    """Write a tiny CIFAR-10 in its python format; return (train bytes [N, 3072], labels, test ...).

    The real files are Python 2 pickles whose byte-string keys torchvision reads with
    ``encoding="latin1"``, i.e. as ``str`` keys ``"data"`` and ``"labels"``; a Python 3 pickle with those
    ``str`` keys loads identically (one with ``bytes`` keys would not: torchvision looks up ``"data"``).
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        if i == 1:  # a black and a white image pin the ends of the pixel range
            x[0, :] = 0
            x[1, :] = 255
        y = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": "training batch 1 of 5"}, f)
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_y = [int(v) for v in rng.integers(0, 10, size=n_test)]
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": test_x, "labels": test_y}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return np.concatenate(train_x), train_y, test_x, test_y


@pytest.fixture
def no_cifar_checksum(monkeypatch):
    """Bypass only torchvision's md5 check: the files must still exist."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def expected_normalised(raw, mean, std, channels, size):
    x = torch.from_numpy(raw.astype(np.float64)).view(-1, channels, size, size) / 255.0
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return ((x - m) / s).float()


def stack(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor([int(y) for y in ys])


def is_crop_of(aug, plain, padding=4, flip=True):
    """Whether ``aug`` equals a (possibly flipped) crop of the zero-padded ``plain`` image (both [C, H, W])."""
    h, w = plain.shape[-2:]
    padded = F.pad(plain, (padding,) * 4)
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            crop = padded[:, i : i + h, j : j + w]
            if torch.allclose(aug, crop, atol=1e-6) or (flip and torch.allclose(aug, crop.flip(-1), atol=1e-6)):
                return True
    return False


def unnormalise(x, info):
    m = torch.tensor(info.mean).view(-1, 1, 1)
    s = torch.tensor(info.std).view(-1, 1, 1)
    return x * s + m


# --------------------------------------------------------------------------- metadata


def test_dataset_metadata():
    assert set(DATASETS) == {"cifar10", "cifar100", "svhn", "mnist", "synthetic", "digits"}
    info = dataset_info("CIFAR10")
    assert (info.num_classes, info.in_channels, info.input_size) == (10, 3, 32)
    assert info.mean == CIFAR10_MEAN and info.std == CIFAR10_STD
    assert (dataset_info("cifar100").num_classes, dataset_info("mnist").input_size) == (100, 28)
    assert dataset_info("mnist").in_channels == 1 and len(dataset_info("mnist").mean) == 1
    assert not dataset_info("svhn").flip and not dataset_info("mnist").flip and dataset_info("cifar10").flip
    for info in DATASETS.values():
        assert len(info.mean) == len(info.std) == info.in_channels
    d = dataset_info("svhn").to_dict()
    assert d["num_classes"] == 10 and d["mean"] == [0.4377, 0.4438, 0.4728]


def test_unknown_dataset_lists_valid_names(tmp_path):
    for call in (lambda: dataset_info("imagenet"), lambda: get_datasets("imagenet", data_dir=tmp_path),
                 lambda: getData("cifar-10"), lambda: data_range("tinyimagenet")):  # fmt: skip
        with pytest.raises(ValueError, match="cifar10, cifar100, svhn, mnist, synthetic"):
            call()


def test_synthetic_options_only_for_synthetic(tmp_path):
    info = dataset_info("synthetic", num_classes=4, channels=1, image_size=20)
    assert (info.num_classes, info.in_channels, info.input_size, info.mean) == (4, 1, 20, (0.5,))
    with pytest.raises(TypeError, match="only to the 'synthetic'"):
        get_datasets("cifar10", data_dir=tmp_path, num_train=10)
    with pytest.raises(TypeError, match="num_trian"):
        dataset_info("synthetic", num_trian=10)


def test_data_range_maps_pixel_range():
    lo, hi = data_range("cifar10")
    assert lo.shape == hi.shape == (3, 1, 1) and lo.dtype == torch.float32
    for c in range(3):
        assert lo[c, 0, 0].item() == pytest.approx(-CIFAR10_MEAN[c] / CIFAR10_STD[c], rel=1e-6)
        assert hi[c, 0, 0].item() == pytest.approx((1 - CIFAR10_MEAN[c]) / CIFAR10_STD[c], rel=1e-6)
    lo, hi = data_range("mnist", dtype=torch.float64)
    assert lo.shape == (1, 1, 1) and lo.dtype == torch.float64
    assert lo.item() == pytest.approx(-0.1307 / 0.3081, rel=1e-12)
    assert hi.item() == pytest.approx(0.8693 / 0.3081, rel=1e-12)
    lo, hi = data_range("synthetic", channels=2)
    assert torch.equal(lo, torch.full((2, 1, 1), -2.0)) and torch.equal(hi, torch.full((2, 1, 1), 2.0))


# --------------------------------------------------------------------------- CIFAR-10 through torchvision


def test_cifar10_loads_and_normalises_the_bytes_written(tmp_path, no_cifar_checksum):
    train_raw, train_y, test_raw, test_y = write_cifar10(tmp_path)
    train, plain, test = get_datasets("cifar10", data_dir=tmp_path, augment=True, seed=0)
    assert len(train) == len(plain) == 20 and len(test) == 6

    xp, yp = stack(plain)
    torch.testing.assert_close(xp, expected_normalised(train_raw, CIFAR10_MEAN, CIFAR10_STD, 3, 32))
    assert yp.tolist() == train_y
    xt, yt = stack(test)
    torch.testing.assert_close(xt, expected_normalised(test_raw, CIFAR10_MEAN, CIFAR10_STD, 3, 32))
    assert yt.tolist() == test_y

    # plain data is not augmented: reading twice gives the same tensors
    assert torch.equal(stack(plain)[0], xp)
    # black and white images land exactly on the ends of data_range
    lo, hi = data_range("cifar10")
    torch.testing.assert_close(xp[0], lo.expand(3, 32, 32))
    torch.testing.assert_close(xp[1], hi.expand(3, 32, 32))
    assert xp.min() >= lo.min() - 1e-6 and xp.max() <= hi.max() + 1e-6

    # the augmented set holds the same samples, each a (flipped) crop of the padded image
    info = dataset_info("cifar10")
    xa, ya = stack(train)
    assert ya.tolist() == train_y
    assert not torch.allclose(xa, xp)
    for k in range(2, 8):
        assert is_crop_of(unnormalise(xa[k], info), unnormalise(xp[k], info), flip=True)
    # the epoch seeding reaches the augmentation inside torchvision's Compose
    assert utils.set_augmentation_epoch(train, 0) == 1 and utils.set_augmentation_epoch(plain, 0) == 0
    epoch0 = stack(train)[0]
    utils.set_augmentation_epoch(train, 0)
    assert torch.equal(stack(train)[0], epoch0)


def test_cifar10_without_augmentation_is_the_plain_set(tmp_path, no_cifar_checksum):
    write_cifar10(tmp_path)
    train, plain, _ = get_datasets("cifar10", data_dir=str(tmp_path), augment=False)
    assert torch.equal(stack(train)[0], stack(plain)[0])


def test_getData_cifar10_loaders(tmp_path, no_cifar_checksum):
    train_raw, train_y, test_raw, test_y = write_cifar10(tmp_path)
    # HessianFlow's call style, plus the data directory
    train_loader, test_loader = getData(name="cifar10", train_bs=8, test_bs=4, data_dir=tmp_path, augment=False)
    assert train_loader.batch_size == 8 and test_loader.batch_size == 4
    assert train_loader.pin_memory == torch.cuda.is_available()
    assert not train_loader.drop_last
    batches = list(train_loader)
    assert [len(y) for _, y in batches] == [8, 8, 4]  # the last partial batch is kept
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert sorted(y.tolist()) == sorted(train_y)
    expected = expected_normalised(train_raw, CIFAR10_MEAN, CIFAR10_STD, 3, 32)
    # shuffled: find each loaded image among the expected ones
    order = [int(torch.argmin((expected - xi).flatten(1).abs().amax(1))) for xi in x]
    assert sorted(order) == list(range(20)) and order != list(range(20))
    torch.testing.assert_close(x, expected[order])
    assert y.tolist() == [train_y[i] for i in order]
    # the test loader is in file order
    xt = torch.cat([b[0] for b in test_loader])
    torch.testing.assert_close(xt, expected_normalised(test_raw, CIFAR10_MEAN, CIFAR10_STD, 3, 32))

    # the shuffle is seeded: same seed, same order; another seed, another order
    def first_labels(seed):
        loader, _ = getData("cifar10", train_bs=20, data_dir=tmp_path, seed=seed)
        return next(iter(loader))

    a, b, c = first_labels(3), first_labels(3), first_labels(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # augmentation reproducible too
    assert not torch.equal(a[0], c[0])


def test_cifar100_uses_fine_labels_and_its_own_statistics(tmp_path, no_cifar_checksum):
    rng = np.random.default_rng(2)
    folder = os.path.join(tmp_path, "cifar-100-python")
    os.makedirs(folder)
    written = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump({"data": x, "fine_labels": fine, "coarse_labels": [0] * n}, f)
        written[split] = (x, fine)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    _, plain, test = get_datasets("cifar100", data_dir=tmp_path)
    info = dataset_info("cifar100")
    for ds, (x, fine) in ((plain, written["train"]), (test, written["test"])):
        xs, ys = stack(ds)
        torch.testing.assert_close(xs, expected_normalised(x, info.mean, info.std, 3, 32))
        assert ys.tolist() == fine


def test_svhn_reads_train_and_test_mat_files(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    import torchvision.datasets.svhn as svhn

    monkeypatch.setattr(svhn, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    rng = np.random.default_rng(3)
    written = {}
    for split, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # MATLAB layout [H, W, C, N]
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)  # digit 0 is stored as label 10
        y[0, 0] = 10
        scipy_io.savemat(os.path.join(tmp_path, f"{split}_32x32.mat"), {"X": x, "y": y})
        written[split] = (x, y)
    train, plain, test = get_datasets("svhn", data_dir=tmp_path)
    info = dataset_info("svhn")
    for ds, (x, y) in ((plain, written["train"]), (test, written["test"])):
        xs, ys = stack(ds)
        raw = np.ascontiguousarray(x.transpose(3, 2, 0, 1)).reshape(x.shape[-1], -1)  # [N, C*H*W]
        torch.testing.assert_close(xs, expected_normalised(raw, info.mean, info.std, 3, 32))
        assert ys.tolist() == [int(v) % 10 for v in y[:, 0]]
        assert ys[0] == 0
    xa, _ = stack(train)
    xp, _ = stack(plain)
    for k in range(len(xa)):  # digits are cropped but never flipped
        assert is_crop_of(unnormalise(xa[k], info), unnormalise(xp[k], info), flip=False)


# --------------------------------------------------------------------------- MNIST through torchvision


def write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for d in array.shape:
            f.write(struct.pack(">I", d))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_loads_raw_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    raw = os.path.join(tmp_path, "MNIST", "raw")
    os.makedirs(raw)
    data = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        x = rng.integers(0, 256, size=(n, 28, 28))
        y = rng.integers(0, 10, size=n)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), x, 0x00000803)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), y, 0x00000801)
        data[prefix] = (x, y)
    train, plain, test = get_datasets("mnist", data_dir=tmp_path, augment=True)
    for ds, (x, y) in ((plain, data["train"]), (test, data["t10k"])):
        xs, ys = stack(ds)
        assert xs.shape == (len(y), 1, 28, 28)
        torch.testing.assert_close(xs, expected_normalised(x.reshape(len(y), -1), (0.1307,), (0.3081,), 1, 28))
        assert ys.tolist() == y.tolist()
    info = dataset_info("mnist")
    xa, _ = stack(train)
    xp, _ = stack(plain)
    # MNIST is cropped but never flipped
    for k in range(len(train)):
        assert is_crop_of(unnormalise(xa[k], info), unnormalise(xp[k], info), flip=False)


# --------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    "name, needle",
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat"),
     ("mnist", "train-images-idx3-ubyte")],
)  # fmt: skip
def test_missing_dataset_is_a_helpful_error(tmp_path, name, needle):
    root = str(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError) as info:
        getData(name=name, data_dir=root)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert name in msg and root in msg and needle in msg
    assert "download=True" in msg and "--download" in msg
    assert err.__cause__ is None and err.__context__ is None  # raised before torchvision is called


def test_partly_missing_cifar10_names_the_missing_file(tmp_path, no_cifar_checksum):
    write_cifar10(tmp_path)
    os.remove(os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3"))
    with pytest.raises(DataNotFoundError, match="Could not find cifar-10-batches-py/data_batch_3 of"):
        get_datasets("cifar10", data_dir=tmp_path)


def test_corrupted_cifar10_is_reported_without_torchvision_traceback(tmp_path):
    write_cifar10(tmp_path)  # the files exist but fail torchvision's md5 check (no monkeypatch here)
    with pytest.raises(DataNotFoundError, match="Corrupted or incomplete") as info:
        get_datasets("cifar10", data_dir=tmp_path)
    assert info.value.__suppress_context__ and info.value.__cause__ is None
    assert str(tmp_path) in str(info.value)


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_seeded():
    a = make_synthetic(num_train=300, num_test=100, seed=5)
    b = make_synthetic(num_train=300, num_test=100, seed=5)
    c = make_synthetic(num_train=300, num_test=100, seed=6)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["train_images"], c["train_images"])
    assert a["train_images"].shape == (300, 3, 32, 32) and a["train_images"].dtype == torch.float32
    assert a["test_images"].shape == (100, 3, 32, 32)
    assert a["train_targets"].dtype == torch.int64
    assert torch.bincount(a["train_targets"]).tolist() == [30] * 10  # balanced
    assert a["train_images"].min() >= 0 and a["train_images"].max() <= 1
    # train and test are different draws
    assert not torch.equal(a["train_images"][:100], a["test_images"])


def test_synthetic_defaults_are_fast_and_match_nominal_statistics():
    import time

    t0 = time.perf_counter()
    d = make_synthetic()
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0  # about 0.5 s on two idle cores; the margin is for a busy test machine
    x = d["train_images"]
    assert x.shape == (5000, 3, 32, 32) and d["test_images"].shape == (1000, 3, 32, 32)
    info = dataset_info("synthetic")
    # the fixed normalisation constants are close to the real statistics of the default set
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.tensor(info.mean), atol=0.03)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.tensor(info.std), atol=0.03)
    assert ((x == 0) | (x == 1)).float().mean() < 0.1  # clipping stays rare


def test_synthetic_datasets_shapes_normalisation_and_range():
    train, plain, test = get_datasets("synthetic", seed=2, num_train=64, num_test=32, num_classes=4, channels=1,
                                      image_size=20)  # fmt: skip
    raw = make_synthetic(num_train=64, num_test=32, num_classes=4, channels=1, image_size=20, seed=2)
    xp, yp = stack(plain)
    assert xp.shape == (64, 1, 20, 20)
    torch.testing.assert_close(xp, (raw["train_images"] - 0.5) / 0.25)
    assert torch.equal(yp, raw["train_targets"])
    xt, yt = stack(test)
    torch.testing.assert_close(xt, (raw["test_images"] - 0.5) / 0.25)
    lo, hi = data_range("synthetic", channels=1)
    assert xp.min() >= lo.min() and xp.max() <= hi.max()
    info = dataset_info("synthetic", channels=1, image_size=20, num_classes=4)
    xa, ya = stack(train)
    assert torch.equal(ya, yp)
    assert not torch.allclose(xa, xp)
    for k in range(10):  # cropped (padding 4) but never flipped
        assert is_crop_of(unnormalise(xa[k], info), unnormalise(xp[k], info), flip=False)


def test_synthetic_bad_options():
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(num_classes=1)
    with pytest.raises(ValueError, match="noise"):
        make_synthetic(noise=-0.1)
    with pytest.raises(ValueError, match="max_shift"):
        make_synthetic(image_size=16, max_shift=16)


@pytest.mark.slow
def test_synthetic_is_learnable_but_not_trivial():
    """A two-layer CNN gets far above chance (10%) in four quick epochs, but not near 100%."""
    data = get_datasets("synthetic", augment=False, seed=0, num_train=2000, num_test=500)
    x, y = data[1].images, data[1].targets
    xt, yt = data[2].images, data[2].targets
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    test_acc = []
    for _ in range(4):  # on one thread (the autouse fixture), as measured
        for idx in torch.randperm(len(y), generator=g).split(50):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            test_acc.append((model(xt).argmax(1) == yt).float().mean().item())
    # measured: 0.46, 0.50, 0.52, 0.58 (the later epochs vary by a few points with the thread count)
    assert test_acc[0] < 0.8, test_acc  # not solved after one epoch
    assert max(test_acc) >= 0.45, test_acc  # 4.5x chance
    assert max(test_acc) < 0.9, test_acc


def test_getData_synthetic_seeding_and_workers():
    kw = {"num_train": 40, "num_test": 10, "image_size": 16}
    l1, t1 = getData("synthetic", train_bs=16, test_bs=10, seed=1, **kw)
    l2, _ = getData("synthetic", train_bs=16, test_bs=10, seed=1, **kw)
    l3, _ = getData("synthetic", train_bs=16, test_bs=10, seed=2, **kw)
    b1, b2, b3 = [list(loader) for loader in (l1, l2, l3)]
    assert [len(y) for _, y in b1] == [16, 16, 8]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(b1, b2))
    assert not torch.equal(b1[0][0], b3[0][0])
    # a second epoch draws new augmentations and a new order
    assert not torch.equal(next(iter(l1))[0], b1[0][0])
    assert next(iter(t1))[0].shape == (10, 3, 16, 16)


def test_augmentation_is_reproducible_with_workers():
    kw = {"num_train": 24, "num_test": 8, "image_size": 12}

    def epoch(seed):
        loader, _ = getData("synthetic", train_bs=4, seed=seed, num_workers=2, **kw)
        return torch.cat([x for x, _ in loader])

    a, b = epoch(0), epoch(0)
    assert torch.equal(a, b)
    train, plain, _ = get_datasets("synthetic", seed=0, **kw)
    info = dataset_info("synthetic", image_size=12)
    xp = unnormalise(stack(plain)[0], info)
    for xi in unnormalise(a, info):  # every sample is still a valid crop of some plain image
        assert any(is_crop_of(xi, xp[k], flip=False) for k in range(len(xp)))


def test_random_crop_flip_streams(monkeypatch):
    """Seeded in the main process; reseeded per worker from the worker's seed, so workers differ."""
    img = torch.arange(2 * 10 * 10, dtype=torch.float32).view(2, 10, 10)

    def crops(worker=None, n=30):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
        aug = utils.RandomCropFlip(10, padding=4, flip=True, seed=0)
        return torch.stack([aug(img) for _ in range(n)])

    class Info:
        def __init__(self, id, seed):
            self.id, self.seed = id, seed

    main_a, main_b = crops(), crops()
    assert torch.equal(main_a, main_b)
    assert len({tuple(c.flatten().tolist()) for c in main_a}) > 10  # many different crops and flips
    w0, w0_again, w1 = crops(Info(0, 1234)), crops(Info(0, 1234)), crops(Info(1, 1235))
    assert torch.equal(w0, w0_again)
    assert not torch.equal(w0, w1) and not torch.equal(w0, main_a)
    for c in main_a[:5]:
        assert is_crop_of(c, img, flip=True)


def test_random_crop_flip_reaches_every_offset_and_both_orientations(monkeypatch):
    # Unique, row-increasing pixel values: each (offset, flip) pair gives a different crop, and with a
    # 4-pixel shift of a 10x10 image part of the image is always visible. 9 x 9 offsets x 2 flips = 162.
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    img = torch.arange(1, 101, dtype=torch.float32).view(1, 10, 10)
    aug = utils.RandomCropFlip(10, padding=4, flip=True, seed=0)
    seen = {tuple(aug(img).flatten().tolist()) for _ in range(3000)}
    assert len(seen) == 162
    aug = utils.RandomCropFlip(10, padding=4, flip=False, seed=0)
    assert len({tuple(aug(img).flatten().tolist()) for _ in range(2000)}) == 81


def test_set_augmentation_epoch_makes_augmentation_resumable():
    kw = {"num_train": 24, "num_test": 8, "image_size": 12}

    def run(epochs, start=0, num_workers=0, rank=None):
        train, plain, _ = get_datasets("synthetic", seed=0, **kw)
        assert utils.set_augmentation_epoch(plain, start) == 0  # the plain set has nothing to seed
        loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=False, num_workers=num_workers)
        out = {}
        for epoch in range(start, epochs):
            assert utils.set_augmentation_epoch(train, epoch, rank=rank) == 1
            out[epoch] = torch.cat([x for x, _ in loader])
        return out

    full = run(3)
    resumed = run(3, start=2)
    assert torch.equal(full[2], resumed[2])  # a resumed run repeats the crops of the uninterrupted one
    assert not torch.equal(full[0], full[1]) and not torch.equal(full[1], full[2])
    assert not torch.equal(run(1, rank=1)[0], full[0])  # ranks draw different streams
    workers = run(2, num_workers=2)
    assert torch.equal(run(2, start=1, num_workers=2)[1], workers[1])
    assert not torch.equal(workers[0], workers[1])
    # the two workers (batches 0, 2, 4 and 1, 3, 5) do not share a stream: the same images augmented
    # by worker 0 and worker 1 come out differently
    train, _, _ = get_datasets("synthetic", seed=0, **kw)
    same = torch.utils.data.Subset(train, [0, 1, 2, 3] * 2)
    utils.set_augmentation_epoch(same, 0)
    two = torch.cat([x for x, _ in torch.utils.data.DataLoader(same, batch_size=4, num_workers=2)])
    assert not torch.equal(two[:4], two[4:])
    with pytest.raises(ValueError, match="epoch"):
        utils.set_augmentation_epoch(train, -1)


# --------------------------------------------------------------------------- batch helpers


def test_fixed_batch_is_reproducible():
    _, plain, _ = get_datasets("synthetic", num_train=50, num_test=10, image_size=8)
    x1, y1 = fixed_batch(plain, 12, seed=3)
    x2, y2 = fixed_batch(plain, 12, seed=3)
    x3, _ = fixed_batch(plain, 12, seed=4)
    assert x1.shape == (12, 3, 8, 8) and y1.shape == (12,) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    # distinct samples of the data set, with their own labels
    xs, ys = stack(plain)
    idx = [int(torch.argmin((xs - xi).flatten(1).abs().amax(1))) for xi in x1]
    assert len(set(idx)) == 12
    assert torch.equal(xs[idx], x1) and torch.equal(ys[idx], y1)
    with pytest.raises(ValueError, match="exceeds"):
        fixed_batch(plain, 51)
    with pytest.raises(ValueError, match="batch_size"):
        fixed_batch(plain, 0)


def test_subset_loader_first_batches_and_seeded_subset():
    _, plain, _ = get_datasets("synthetic", num_train=50, num_test=10, image_size=8)
    xs, ys = stack(plain)
    loader = subset_loader(plain, batch_size=8, num_batches=3)
    passes = [torch.cat([x for x, _ in loader]) for _ in range(2)]
    assert torch.equal(passes[0], xs[:24]) and torch.equal(passes[1], xs[:24])
    assert len(loader) == 3
    seeded = subset_loader(plain, batch_size=8, num_batches=2, seed=7)
    a = torch.cat([y for _, y in seeded])
    b = torch.cat([y for _, y in subset_loader(plain, batch_size=8, num_batches=2, seed=7)])
    assert torch.equal(a, b) and len(a) == 16
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:16]
    assert torch.equal(torch.cat([x for x, _ in seeded]), xs[perm])
    whole = subset_loader(plain, batch_size=16)
    assert [len(y) for _, y in whole] == [16, 16, 16, 2]
    with pytest.raises(ValueError, match="need 56 samples"):
        subset_loader(plain, batch_size=8, num_batches=7)


def test_getData_rejects_bad_batch_sizes():
    with pytest.raises(ValueError, match="train_bs"):
        getData("synthetic", train_bs=0)
    with pytest.raises(ValueError, match="test_bs"):
        getData("synthetic", test_bs=2.5)


@pytest.mark.slow
def test_root_utils_serves_hessianflows_imports_from_a_checkout():
    """``from utils import getData`` (HessianFlow's import, run from a checkout) is the package's data layer:
    the same batches as :func:`hessianflow.training.data.getData` (and ``import *`` fails on a stale ``__all__``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "from utils import *\n"
        "from utils import getData\n"
        "train, test = getData('synthetic', train_bs=8, test_bs=16, num_train=40, num_test=20, seed=5)\n"
        "x, y = next(iter(train)); xt, yt = next(iter(test))\n"
        "print(float(x.double().sum()).hex(), y.tolist(), float(xt.double().sum()).hex(), yt.tolist())\n"
    )
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    train, test = getData("synthetic", train_bs=8, test_bs=16, num_train=40, num_test=20, seed=5)
    (x, y), (xt, yt) = next(iter(train)), next(iter(test))
    expected = f"{float(x.double().sum()).hex()} {y.tolist()} {float(xt.double().sum()).hex()} {yt.tolist()}"
    assert out.stdout.strip() == expected
