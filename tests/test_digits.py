"""The digits data set (scikit-learn's bundled 8x8 handwritten digits) loaded for real: its shape, values,
split, normalisation, the absence of augmentation, a model learning it, and the scripts on it.

scikit-learn is the optional extra ``hessianflow[data]``: without it these tests skip with the reason,
except under CI (``CI=true``), where a missing extra is a broken setup and fails them.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from dense_reference import need_sklearn
from torch import nn

from hessianflow.cli import common as _cli
from hessianflow.cli import eig as drv
from hessianflow.cli import train
from hessianflow.curvature import HessianOperator
from hessianflow.io.checkpoint import save_checkpoint
from hessianflow.linalg.eigen import lanczos
from hessianflow.training.data import (
    DATASETS,
    DataNotFoundError,
    dataset_info,
    fixed_batch,
    get_datasets,
    getData,
    load_digits_tensors,
    set_augmentation_epoch,
)
from hessianflow.training.models import get_model


@pytest.fixture(scope="module")
def raw():
    need_sklearn()
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.as_tensor(bunch.images, dtype=torch.float32), torch.as_tensor(bunch.target)


@pytest.fixture(scope="module")
def digits(raw):
    return load_digits_tensors()


def test_shapes_values_and_the_images_are_the_upsampled_digits(raw, digits):
    images, targets = raw
    assert digits["train_images"].shape == (1437, 1, 16, 16) and digits["test_images"].shape == (360, 1, 16, 16)
    assert digits["train_images"].dtype == torch.float32 and digits["train_targets"].dtype == torch.int64
    for key in ("train_images", "test_images"):
        x = digits[key]
        assert x.min().item() == 0.0 and x.max().item() == 1.0  # /16, and bilinear stays in the hull
    # each image is its load_digits row, /16, bilinearly upsampled; each label that row's target
    for split in ("train", "test"):
        idx = digits[f"{split}_index"]
        ref = F.interpolate(images[idx].unsqueeze(1) / 16, size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(digits[f"{split}_images"], ref, rtol=0, atol=1e-6)
        assert torch.equal(digits[f"{split}_targets"], targets[idx])
    # the 16 grey levels survive on the pixels bilinear upsampling copies (weights 9/16 3/16 3/16 1/16)
    levels = torch.unique((digits["train_images"] * 256).round())
    assert len(levels) > 16 and torch.all(levels % 1 == 0)


def test_split_is_stratified_disjoint_complete_and_fixed(raw, digits):
    _, targets = raw
    tr, te = digits["train_index"], digits["test_index"]
    assert len(tr) == 1437 and len(te) == 360
    assert torch.equal(torch.sort(torch.cat([tr, te])).values, torch.arange(1797))
    assert torch.equal(torch.bincount(digits["test_targets"], minlength=10), torch.full((10,), 36))
    assert torch.equal(torch.bincount(digits["train_targets"]), torch.bincount(targets) - 36)
    again = load_digits_tensors()
    assert all(torch.equal(digits[k], again[k]) for k in digits)
    # the split does not follow a run's seed: every run and the driver evaluate on the same 360 images
    _, plain0, test0 = get_datasets("digits", seed=0)
    _, plain7, test7 = get_datasets("digits", seed=7)
    assert torch.equal(plain0.images, plain7.images) and torch.equal(test0.targets, test7.targets)
    # pinned by sum: a change of scikit-learn's data or of torch.randperm's stream would show here
    assert int(te.sum()) == _TEST_INDEX_SUM


# sum of the 360 test rows drawn by load_digits_tensors (torch.randperm, seed 0, per class), as measured
_TEST_INDEX_SUM = 331441


def test_normalisation_is_the_training_splits(digits):
    info = dataset_info("digits")
    shape = (info.num_classes, info.in_channels, info.input_size, info.num_train, info.num_test)
    assert shape == (10, 1, 16, 1437, 360)
    x = digits["train_images"]
    assert info.mean[0] == pytest.approx(x.mean().item(), abs=5e-5)
    assert info.std[0] == pytest.approx(x.std().item(), abs=5e-5)
    train_set, plain, test_set = get_datasets("digits")
    assert plain.images.mean().item() == pytest.approx(0.0, abs=2e-4)
    assert plain.images.std().item() == pytest.approx(1.0, abs=2e-4)
    torch.testing.assert_close(test_set.images, (digits["test_images"] - info.mean[0]) / info.std[0])


def test_no_training_augmentation(digits):
    train_set, plain, _ = get_datasets("digits", augment=True, seed=3)
    assert train_set is plain  # no crop (a quarter of a 16x16 image), no flip (a mirrored digit is another)
    assert set_augmentation_epoch(train_set, 2) == 0
    assert DATASETS["digits"].flip is False


def test_every_model_takes_digits_and_getData_batches(digits):
    info = dataset_info("DIGITS")
    train_loader, test_loader = getData("digits", train_bs=32, test_bs=100, seed=0)
    x, y = next(iter(train_loader))
    assert x.shape == (32, 1, 16, 16) and y.dtype == torch.int64
    assert sum(len(b[1]) for b in test_loader) == 360
    for arch in ("c1", "c2", "ResNet"):
        model = get_model(arch, depth=8, num_classes=info.num_classes, in_channels=info.in_channels,
                          input_size=info.input_size)  # fmt: skip
        assert model.eval()(x).shape == (32, 10)


def test_missing_scikit_learn_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataNotFoundError, match=r"pip install 'hessianflow\[data\]'"):
        get_datasets("digits")
    argv = ["--name", "digits", "--arch", "c1", "--epochs", "1", "--out-dir", str(tmp_path), "--save",
            str(tmp_path / "m.pkl"), "--no-progress"]  # fmt: skip
    assert _cli.run(train.main, train.parse_args, argv) == _cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hessianflow[data]" in err[0] and "digits" in err[0]


@pytest.mark.slow
def test_train_script_learns_digits_and_the_driver_reads_its_checkpoint(digits, tmp_path, capsys):
    """~15 s: two epochs of C1 through train.py, then the driver on the checkpoint and on its bare state_dict."""
    ckpt = tmp_path / "model_param.pkl"
    argv = ["--name", "digits", "--arch", "c1", "--method", "sgd", "--large-ratio", "1", "--epochs", "2",
            "--batch-size", "32", "--lr", "0.02", "--seed", "4", "--out-dir", str(tmp_path), "--save", str(ckpt),
            "--no-progress"]  # fmt: skip
    metrics = train.main(train.parse_args(argv))
    assert metrics["updates"] == 2 * 45  # ceil(1437 / 32) steps an epoch
    assert metrics["final_test_acc"] > 0.8  # 10 balanced classes: chance is 0.1

    # the driver's approximate eigenvalue against an independent lanczos on the same digits batch
    out = drv.main(drv.parse_args(["--resume", str(ckpt), "--hessian-batch-size", "64", "--no-progress"]))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    model = get_model("c1", num_classes=10, in_channels=1, input_size=16)
    model.load_state_dict(state)
    _, plain, _ = get_datasets("digits", augment=False)
    batch = fixed_batch(plain, 64, seed=1)  # the driver's default --seed is 1
    ref = lanczos(HessianOperator(model, nn.CrossEntropyLoss(), data=batch), k=1, tol=1e-5, seed=11)
    got, res = out["eigen"]["eigenvalues"][0], out["eigen"]["residuals"][0]
    assert got > 0 and abs(got - ref.eigenvalues[0].item()) <= res + ref.residuals[0].item() + 1e-4 * got
    assert "digits train" in capsys.readouterr().out

    # a bare state_dict knows nothing of its data: --name digits gives the model's shape and the same batch
    bare = tmp_path / "bare.pt"
    save_checkpoint(state, bare)
    out2 = drv.main(drv.parse_args(["--resume", str(bare), "--arch", "c1", "--name", "digits",
                                    "--hessian-batch-size", "64", "--no-progress"]))  # fmt: skip
    assert out2["eigen"]["eigenvalues"][0] == pytest.approx(got, rel=1e-5)
