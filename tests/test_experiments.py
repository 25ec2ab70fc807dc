"""experiments/: each experiment's main() on a tiny digits setting, its JSON's numbers checked against each
other and against an independent computation on the saved models, its PNG checked as an image; the
bookkeeping of the ABSA comparison (updates to a target, schedule, reference study) on hand-made logs."""

import importlib.util
import json
import math
import os

import pytest
import torch
from dense_reference import check_png, need_sklearn
from torch import nn

from hessianflow.curvature import HessianOperator
from hessianflow.io.checkpoint_format import load_model
from hessianflow.linalg.eigen import lanczos
from hessianflow.training.data import get_datasets, subset_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sharp():
    return load("large_batch_sharpness")


@pytest.fixture(scope="module")
def absa():
    return load("absa_vs_baseline")


def independent_eigenvalue(ckpt, loader):
    model = load_model(ckpt)[0]
    res = lanczos(HessianOperator(model, nn.CrossEntropyLoss(), dataloader=loader), k=1, tol=1e-4, seed=99)
    return float(res.eigenvalues[0]), float(res.residuals[0])


# -- cheap: the flags and the bookkeeping -----------------------------------------------------------------


def test_learning_rate_rules(sharp):
    base = ["--small-batch", "32", "--large-batch", "512", "--lr", "0.05"]
    assert sharp.large_lr(sharp.parse_args(base)) == 0.05
    assert sharp.large_lr(sharp.parse_args([*base, "--lr-rule", "linear"])) == pytest.approx(0.8)
    assert sharp.large_lr(sharp.parse_args([*base, "--lr-rule", "linear", "--lr-cap", "0.3"])) == 0.3
    assert sharp.large_lr(sharp.parse_args([*base, "--lr-rule", "sqrt"])) == pytest.approx(0.2)
    cifar = sharp.parse_args(["--config", "cifar10", "--lr", "0.2"])  # a flag given wins over the config
    assert (cifar.name, cifar.arch, cifar.depth, cifar.lr) == ("cifar10", "ResNet", 20, 0.2)


def _log(eigs, grow_after=None, reasons=None):
    rows, batch = [], 32
    for i, e in enumerate(eigs):
        nxt = batch * 2 if grow_after == i + 1 else batch
        reason = (reasons or {}).get(i + 1, "first" if i == 0 else "none")
        rows.append(
            {
                "epoch": i + 1,
                "eigenvalue": e,
                "train_loss": 1.0 / (i + 1),
                "test_acc": 0.5 + 0.1 * i,
                "updates": 10 * (i + 1),
                "batch_size": batch,
                "next_batch_size": nxt,
                "decision": reason,
            }
        )
        batch = nxt
    return rows


def test_updates_to_target_schedule_and_reference_study(absa):
    log = _log([2.0, 8.0, 10.0, 4.0, 9.0], grow_after=4, reasons={4: "duration"})
    assert absa.updates_to_target(log, 0.7) == (30, 3)
    assert absa.updates_to_target(log, 0.71) == (40, 4)
    assert absa.updates_to_target(log, 0.99) == (None, None)
    assert absa.schedule(log) == [{"after_epoch": 4, "from": 32, "to": 64, "rule": "duration"}]
    ref = absa.reference_study(log)
    assert ref["reference_eigenvalue"] == 2.0 and ref["train_loss_at_reference"] == 1.0
    assert [c["over_reference"] for c in ref["checks"]] == [1.0, 4.0, 5.0, 2.0, 4.5]
    assert not ref["halving_fired"] and ref["first_change_rule"] == "duration" and ref["first_change_epoch"] == 4
    # a peak reference (10 at epoch 3) is halved at epoch 4: 4 <= 10 / 2
    assert ref["peak_reference_would_fire_at_epoch"] == 4
    # no halving from the peak before the first change: no counterfactual firing
    assert absa.reference_study(_log([2.0, 8.0, 6.0], grow_after=2))["peak_reference_would_fire_at_epoch"] is None


# -- the experiments on tiny settings ---------------------------------------------------------------------


@pytest.mark.slow
def test_large_batch_sharpness_tiny(sharp, tmp_path):
    """~30 s: ResNet-8 on 128 digits, two seeds, two epochs."""
    need_sklearn()
    argv = [
        "--num-train",
        "128",
        "--small-batch",
        "16",
        "--large-batch",
        "64",
        "--max-epochs",
        "2",
        "--seeds",
        "0",
        "1",
        "--track-samples",
        "32",
        "--eval-batch",
        "64",
        "--eig-tol",
        "1e-3",
        "--out-dir",
        str(tmp_path),
    ]
    out = sharp.main(sharp.parse_args(argv))
    with open(out["json"]) as f:
        saved = json.load(f)
    # the JSON holds the summary main() returned, field by field (a list among them: pytest.approx of a
    # nested mapping is a TypeError since pytest 9.2); JSON round-trips Python floats exactly
    assert saved["num_train"] == 128 and saved["summary"].keys() == out["summary"].keys()
    for key, value in out["summary"].items():
        assert saved["summary"][key] == value, (key, saved["summary"][key], value)
    runs = {(r["regime"], r["seed"]): r for r in saved["runs"]}
    s = saved["summary"]
    ratios = [runs["large", k]["eigenvalue"] / runs["small", k]["eigenvalue"] for k in (0, 1)]
    assert s["ratios"] == pytest.approx(ratios, rel=1e-12)
    assert s["ratio_mean"] == pytest.approx(sum(ratios) / 2) and s["ratio_std"] == pytest.approx(
        abs(ratios[0] - ratios[1]) / math.sqrt(2)
    )
    assert s["seeds_large_sharper"] == sum(q > 1 for q in ratios)
    for (regime, seed), r in runs.items():
        assert r["eigenvalue"] > 0 and r["converged"]
        steps = math.ceil(128 / r["batch_size"])  # every epoch is a full pass
        assert r["updates"] == steps * r["epochs"] and 1 <= r["epochs"] <= 2
        assert r["batch_size"] == (16 if regime == "small" else 64) and r["lr"] == 0.05  # constant rule
        assert r["reached_target"] == (r["train_loss"] <= 0.05)
        assert ("eigenvalue_subset" in r["history"][0]) == (seed == 0)  # --track-seeds 1
        assert 0 <= r["test_acc"] <= 1 and r["history"][-1]["train_loss"] == r["train_loss"]
    # the saved model's top eigenvalue over the same 128 samples, computed here independently
    _, plain, _ = get_datasets("digits", augment=False)
    loader = subset_loader(torch.utils.data.Subset(plain, range(128)), batch_size=64)
    for key in (("small", 0), ("large", 1)):
        r = runs[key]
        ref, res = independent_eigenvalue(r["checkpoint"], loader)
        assert abs(r["eigenvalue"] - ref) <= r["residual"] + res + 1e-4 * ref, (key, r["eigenvalue"], ref)
    check_png(out["png"], min_side=300)


@pytest.mark.slow
def test_absa_vs_baseline_tiny(absa, tmp_path):
    """~40 s: ResNet-8 on digits, two epochs per run, the final eigenvalue on 64 training samples."""
    need_sklearn()
    argv = [
        "--epochs",
        "2",
        "--large-ratio",
        "4",
        "--duration",
        "1",
        "--hessian-batch-size",
        "32",
        "--eval-batch",
        "64",
        "--final-num-batches",
        "1",
        "--target-acc",
        "0.0",
        "--out-dir",
        str(tmp_path),
    ]
    out = absa.main(absa.parse_args(argv))
    with open(out["json"]) as f:
        saved = json.load(f)
    table, runs = saved["table"], saved["runs"]
    # target 0: reached after the first epoch; 1,437 images in mini-batches of 32 = 45, stepping every 4 for large
    assert [table[k]["updates_to_target"] for k in ("small", "large", "absa")] == [45, 12, 45]
    assert table["large"]["fewer_updates_than_small"] == pytest.approx(45 / 12)
    assert [table[k]["final_batch_size"] for k in ("small", "large", "absa")] == [32, 128, 128]
    # ABSA with --duration 1 doubles after every epoch, by the halving rule or by duration
    sched = runs["absa"]["schedule"]
    assert [(c["after_epoch"], c["from"], c["to"]) for c in sched] == [(1, 32, 64), (2, 64, 128)]
    assert all(c["rule"] in ("eigen_drop", "duration") for c in sched)
    ref = runs["absa"]["reference"]
    log = runs["absa"]["log"]
    assert ref["reference_eigenvalue"] == log[0]["eigenvalue"] > 0 and ref["reference_epoch"] == 1
    assert ref["checks"][1]["over_reference"] == pytest.approx(log[1]["eigenvalue"] / log[0]["eigenvalue"])
    assert ref["halving_fired"] == (sched[1]["rule"] == "eigen_drop")
    # the final eigenvalue is the driver's, and an independent lanczos on the checkpoint agrees
    _, plain, _ = get_datasets("digits", augment=False)
    loader = subset_loader(plain, batch_size=64, num_batches=1)
    for run in ("small", "absa"):
        final = runs[run]["final"]
        with open(tmp_path / run / "eigen_full.json") as f:
            assert json.load(f)["eigen"]["eigenvalues"][0] == final["eigenvalue"] == table[run]["final_top_eigenvalue"]
        ref_val, res = independent_eigenvalue(str(tmp_path / run / "model_param.pkl"), loader)
        assert abs(final["eigenvalue"] - ref_val) <= final["residual"] + res + 1e-4 * ref_val
    check_png(out["png"], min_side=300)
