"""hessian_eig_driver.py on tiny checkpoints (ResNet-8 on 256 synthetic images): its numbers against an
independent computation, its figures, its JSON against what it prints, and its errors for unusable input."""

import json
import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from dense_reference import check_png
from torch import nn

from hessianflow.cli import common as _cli
from hessianflow.cli import eig as drv
from hessianflow.curvature import GGNOperator, HessianOperator
from hessianflow.io.checkpoint import save_checkpoint
from hessianflow.io.checkpoint_format import make_checkpoint
from hessianflow.linalg.eigen import lanczos, power_iteration
from hessianflow.training.data import fixed_batch, get_datasets
from hessianflow.training.models import get_model

SYN = ["--name", "synthetic", "--synthetic-train", "256", "--synthetic-test", "128"]
BATCH = 16
DATA_SEED = 3  # the training run's seed: the synthetic data is regenerated from it


def tiny_resnet(num_classes=10, seed=0):
    """A ResNet-8 with BatchNorm running statistics from a few train-mode passes (so eval mode is not
    the identity) and weights a few SGD steps away from the initialisation."""
    torch.manual_seed(seed)
    model = get_model("ResNet", depth=8, num_classes=num_classes)
    _, plain, _ = get_datasets("synthetic", augment=False, seed=DATA_SEED, num_train=256, num_test=128)
    x, y = fixed_batch(plain, 32, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y % num_classes).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def full_checkpoint(model, path, **over):
    """A checkpoint in the format train.py writes (hessianflow.io.checkpoint_format), ``over`` replacing fields."""
    args = {"name": "synthetic", "seed": DATA_SEED, "synthetic_train": 256, "synthetic_test": 128}
    ckpt = {**make_checkpoint(model, dataset="synthetic", epoch=1, args=args), **over}
    save_checkpoint(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_resnet()
    return {"path": full_checkpoint(model, d / "model_param.pkl"), "model": model, "dir": d}


def reference_batch(seed=1, split="train"):
    """The approximate batch, built here without the driver: the same data set and fixed_batch."""
    _, plain, test = get_datasets("synthetic", augment=False, seed=DATA_SEED, num_train=256, num_test=128)
    return fixed_batch(plain if split == "train" else test, BATCH, seed=seed)


def run_driver(argv, capsys):
    out = drv.main(drv.parse_args(argv))
    return out, capsys.readouterr().out


def printed_eigenvalues(text):
    """The eigenvalue table of the terminal summary: [(value, residual, converged)]."""
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+(yes|NO)\s*$", text, flags=re.M)
    return [(float(v), float(r), c == "yes") for _, v, r, c in rows]


def close(a, b, ra, rb):
    """Weyl: each Ritz value is within its residual of an eigenvalue; float32 products add ~1e-6."""
    return abs(a - b) <= ra + rb + 1e-5 * abs(b)


# -- numbers against an independent computation -------------------------------------------------
@pytest.fixture(scope="module")
def everything(ckpt, tmp_path_factory):
    """One driver run with every analysis (shared by several tests: products are the expensive part)."""
    out_dir = tmp_path_factory.mktemp("figs")
    jpath = out_dir / "result.json"
    argv = [
        "--resume", ckpt["path"], "--hessian-batch-size", str(BATCH), "--trace",
        "--trace-matvecs", "8", "--density", "--density-runs", "2", "--density-steps", "12", "--per-layer",
        "--layers", "layer3.0.conv2", "layer3.0.bn2", "fc", "--exact-threshold", "700", "--landscape", "1",
        "--landscape-points", "5", "--landscape-radius", "0.5", "--json", str(jpath), "--out-dir", str(out_dir),
        "--no-progress",
    ]  # fmt: skip
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        result = drv.main(drv.parse_args(argv))
    with open(jpath) as f:
        saved = json.load(f)
    return {"result": result, "text": buf.getvalue(), "json": saved, "out_dir": out_dir}


def test_top_eigenvalues_match_an_independent_lanczos(ckpt, everything):
    x, y = reference_batch(seed=1)  # the driver's default --seed is 1
    model = get_model("ResNet", depth=8)
    model.load_state_dict(torch.load(ckpt["path"], weights_only=True)["state_dict"])
    ref = lanczos(HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y)), k=1, tol=1e-5, seed=123)
    got = everything["json"]["eigen"]
    assert got["method"] == "lanczos" and got["which"] == "LA" and got["all_converged"]
    for a, b, ra, rb in zip(got["eigenvalues"], ref.eigenvalues.tolist(), got["residuals"], ref.residuals.tolist()):
        assert close(a, b, ra, rb), (a, b, ra, rb)
    assert len(got["eigenvalues"]) == 1 and got["eigenvalues"][0] > 0
    # the loss printed as a check of the weights is that of the model on this batch
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model.eval()(x), y))
    assert everything["json"]["loss"] == pytest.approx(loss, rel=1e-6)


def test_json_holds_the_printed_numbers(everything):
    text, saved = everything["text"], everything["json"]
    rows = printed_eigenvalues(text)
    assert len(rows) == 1
    for (v, r, c), jv, jr, jc in zip(rows, saved["eigen"]["eigenvalues"], saved["eigen"]["residuals"],
                                     saved["eigen"]["converged"]):  # fmt: skip
        assert v == float(drv._num(jv)) and r == float(format(jr, ".2e")) and c == jc
    m = re.search(r"^trace\s+(\S+) ± (\S+)", text, flags=re.M)
    assert float(m.group(1)) == float(drv._num(saved["trace"]["estimate"]))
    assert float(m.group(2)) == float(drv._num(saved["trace"]["stderr"]))
    m = re.search(r"loss\s+(\S+) \(accuracy (\S+)\)", text)
    assert float(m.group(1)) == float(drv._num(saved["loss"]))
    assert float(m.group(2)) == float(drv._num(saved["accuracy"]))
    m = re.search(r"support \[(\S+), (\S+)\], trace estimate (\S+)", text)
    dens = saved["density"]
    assert [float(g) for g in m.groups()] == [float(drv._num(v)) for v in (*dens["support"], dens["trace_estimate"])]
    for layer in saved["per_layer"]["layers"]:
        line = next(ln for ln in text.splitlines() if ln.split() and ln.split()[0] == layer["name"])
        cells = line.split()
        assert float(cells[2]) == float(drv._num(layer["eigenvalue"]))
        assert float(cells[3]) == float(drv._num(layer["trace"]))
    # the settings and versions are recorded; the returned dict is what was written
    assert saved["settings"]["top_k"] == 1 and saved["versions"]["torch"] == torch.__version__
    returned = everything["result"]["eigen"]
    assert saved["eigen"]["eigenvalues"] == list(returned["eigenvalues"])
    assert saved["eigen"]["num_matvecs"] == returned["num_matvecs"] and saved["eigen"]["tol"] == returned["tol"]
    assert saved["converged"] is True and saved["warnings"] == []
    assert saved["model"]["num_parameters"] == 78042 and saved["data"]["num_samples"] == BATCH


def test_figures_are_written_and_not_blank(everything):
    saved, out_dir = everything["json"], everything["out_dir"]
    figs = saved["figures"]
    assert set(figs) == {"density", "per_layer", "landscape"}
    for path in figs.values():
        assert os.path.dirname(path) == str(out_dir)
        assert os.path.basename(path).startswith("model_param_hessian_approximate-train_")
        check_png(path)
        assert f"figure      {[k for k, v in figs.items() if v == path][0]}: {path}" in everything["text"]


def test_trace_and_per_layer_are_consistent(everything):
    saved = everything["json"]
    layers = {r["name"]: r for r in saved["per_layer"]["layers"]}
    assert list(layers) == ["layer3.0.conv2", "layer3.0.bn2", "fc"]
    assert layers["fc"]["exact"] and layers["fc"]["size"] == 650 and layers["fc"]["trace_stderr"] == 0.0
    assert not layers["layer3.0.conv2"]["exact"] and layers["layer3.0.conv2"]["trace_stderr"] > 0
    # interlacing: no diagonal block has a larger top eigenvalue than the whole Hessian
    lam1, res1 = saved["eigen"]["eigenvalues"][0], saved["eigen"]["residuals"][0]
    assert max(r["eigenvalue"] for r in layers.values()) <= lam1 + res1
    tr = saved["trace"]
    assert tr["num_matvecs"] == 8 and tr["stderr"] > 0
    # the per-layer sum is printed with its combined standard error
    total = sum(r["trace"] for r in layers.values())
    assert saved["per_layer"]["trace_sum"] == pytest.approx(total, rel=1e-12)
    assert f"{drv._num(total)} ± " in everything["text"]
    # every block converged (the iterative conv2 block too): no row is marked, no warning
    assert saved["per_layer"]["all_converged"] and all(all(r["converged"]) for r in layers.values())
    assert "(!)" not in everything["text"] and "per-layer lanczos did not converge" not in everything["text"]


def per_layer_rows(text):
    """The per-layer table's rows: {layer: cells} (the lines under the "per layer" heading)."""
    block = text.split("per layer   top eigenvalue", 1)[1].split("sum of the block traces", 1)[0]
    return {ln.split()[0]: ln.split() for ln in block.splitlines()[2:] if ln.strip() and not ln.strip().startswith("-")}


def test_a_block_that_did_not_converge_is_marked_in_its_row(ckpt, capsys, tmp_path):
    """--per-layer with 3 Lanczos steps: the iterative conv2 block cannot converge and its row alone is
    marked "(!)"; the fc block, formed densely (650 <= --exact-threshold), is exact and unmarked."""
    jpath = tmp_path / "pl.json"
    argv = ["--resume", ckpt["path"], "--hessian-batch-size", "8", "--max-iter", "3", "--tol", "1e-9",
            "--per-layer", "--layers", "fc", "layer3.0.conv2", "--exact-threshold", "700", "--trace-matvecs", "4",
            "--out-dir", str(tmp_path), "--json", str(jpath), "--no-progress"]  # fmt: skip
    out, text = run_driver(argv, capsys)
    layers = {r["name"]: r for r in json.loads(jpath.read_text())["per_layer"]["layers"]}
    assert layers["fc"]["exact"] and all(layers["fc"]["converged"])
    assert not layers["layer3.0.conv2"]["exact"] and not all(layers["layer3.0.conv2"]["converged"])
    rows = per_layer_rows(text)
    assert set(rows) == {"fc", "layer3.0.conv2"}, text
    conv, fc = rows["layer3.0.conv2"], rows["fc"]
    assert conv[3] == "(!)" and float(conv[2]) == float(drv._num(layers["layer3.0.conv2"]["eigenvalue"]))
    assert "(!)" not in fc and float(fc[2]) == float(drv._num(layers["fc"]["eigenvalue"]))
    assert text.count("(!)") == 2  # the row and the warning that explains the mark
    assert "per-layer lanczos did not converge for layer3.0.conv2 (marked (!))" in text
    assert out["per_layer"]["all_converged"] is False


def test_landscape_curve_is_centred_on_the_loss(everything):
    land = everything["json"]["landscape"]
    assert land["dims"] == 1 and land["alphas"] == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    losses = land["losses"]
    # alpha = 0 is the checkpoint itself: the loss printed for the analysed batch
    assert losses[2] == pytest.approx(everything["json"]["loss"], rel=1e-6)
    # along the top eigenvector the loss bends up: the second difference is positive and of the size of
    # lambda_1 (a large step, so only loosely: the quadratic model is local)
    h = 0.25
    second = (losses[1] - 2 * losses[2] + losses[3]) / h**2
    assert 0.3 * land["eigenvalues"][0] < second < 3 * land["eigenvalues"][0]


@pytest.mark.slow
def test_which_sa_gives_the_most_negative_and_a_2d_landscape(ckpt, capsys, tmp_path):
    argv = ["--resume", ckpt["path"], *SYN, "--hessian-batch-size", str(BATCH), "--which", "SA", "--landscape",
            "2", "--landscape-points", "3", "--landscape-radius", "0.1", "--out-dir", str(tmp_path),
            "--no-progress"]  # fmt: skip
    out, text = run_driver(argv, capsys)
    x, y = reference_batch(seed=1)
    op = HessianOperator(ckpt["model"], nn.CrossEntropyLoss(), data=(x, y))
    ref = lanczos(op, k=1, which="SA", tol=1e-5, seed=7)
    vals = out["eigen"]["eigenvalues"]
    assert len(vals) == 2 and "computing k = 2" in text  # --landscape 2 needs two eigenvectors
    assert vals[0] < 0 and vals[0] <= vals[1]
    assert close(vals[0], float(ref.eigenvalues[0]), out["eigen"]["residuals"][0], float(ref.residuals[0]))
    assert [v for v, _, _ in printed_eigenvalues(text)] == [float(drv._num(v)) for v in vals]
    grid = out["landscape"]["losses"]
    assert grid.shape == (3, 3) and float(grid[1, 1]) == pytest.approx(out["loss"], rel=1e-6)
    # along the most negative eigenvector the loss bends down
    assert float(grid[0, 1] - 2 * grid[1, 1] + grid[2, 1]) < 0
    check_png(out["figures"]["landscape"])
    assert out["figures"]["landscape"].endswith("_landscape2d.png")


@pytest.mark.slow
def test_ggn_eigenvalues_are_nonnegative(ckpt, capsys, tmp_path):
    argv = ["--resume", ckpt["path"], "--hessian-batch-size", str(BATCH), "--operator", "ggn", "--which", "SA",
            "--top-k", "2", "--json", str(tmp_path / "g.json"), "--no-progress"]  # fmt: skip
    out, text = run_driver(argv, capsys)
    x, y = reference_batch(seed=1)
    top = lanczos(GGNOperator(ckpt["model"], nn.CrossEntropyLoss(), data=(x, y)), k=1, tol=1e-2, seed=0)
    lam_max = float(top.eigenvalues[0])
    assert lam_max > 0
    assert min(out["eigen"]["eigenvalues"]) >= -1e-5 * lam_max
    assert "generalised Gauss-Newton" in text and out["operator"]["type"] == "ggn"


def test_full_eigen_type_over_batches_equals_the_concatenated_batch(ckpt, capsys):
    argv = ["--resume", ckpt["path"], "--eigen-type", "full", "--num-batches", "2", "--hessian-batch-size", "8",
            "--data", "test", "--no-progress"]  # fmt: skip
    out, _ = run_driver(argv, capsys)
    _, _, test = get_datasets("synthetic", augment=False, seed=DATA_SEED, num_train=256, num_test=128)
    x = torch.stack([test[i][0] for i in range(16)])
    y = torch.tensor([int(test[i][1]) for i in range(16)])
    ref = lanczos(HessianOperator(ckpt["model"], nn.CrossEntropyLoss(), data=(x, y)), k=1, tol=1e-5, seed=5)
    assert out["data"]["num_samples"] == 16 and out["data"]["num_batches"] == 2
    assert close(out["eigen"]["eigenvalues"][0], float(ref.eigenvalues[0]), out["eigen"]["residuals"][0],
                 float(ref.residuals[0]))  # fmt: skip


@pytest.mark.slow
def test_micro_batches_give_the_same_eigenvalues_and_per_layer_table(ckpt, capsys):
    """--micro-batch-size: the full data in chunks of 3 is the same matrix as the unsplit batches of 8."""
    argv = ["--resume", ckpt["path"], "--eigen-type", "full", "--num-batches", "2", "--hessian-batch-size", "8",
            "--data", "test", "--no-progress", "--top-k", "2", "--per-layer", "--layers", "fc"]  # fmt: skip
    whole, _ = run_driver(argv, capsys)
    split, _ = run_driver(argv + ["--micro-batch-size", "3"], capsys)
    assert split["data"]["num_samples"] == whole["data"]["num_samples"] == 16
    for a, b, ra, rb in zip(split["eigen"]["eigenvalues"], whole["eigen"]["eigenvalues"], split["eigen"]["residuals"],
                            whole["eigen"]["residuals"]):  # fmt: skip
        assert close(a, b, ra, rb)
    (fc_split,), (fc_whole,) = split["per_layer"]["layers"], whole["per_layer"]["layers"]
    assert fc_split["eigenvalue"] == pytest.approx(fc_whole["eigenvalue"], rel=1e-5)
    with pytest.raises(SystemExit):
        drv.parse_args(argv + ["--micro-batch-size", "0"])


def test_a_solver_that_does_not_converge_says_so(ckpt, capsys, tmp_path):
    jpath = tmp_path / "nc.json"
    argv = ["--resume", ckpt["path"], "--hessian-batch-size", "8", "--top-k", "2", "--max-iter", "3", "--tol",
            "1e-9", "--json", str(jpath), "--no-progress"]  # fmt: skip
    out, text = run_driver(argv, capsys)
    assert "NO" in text and "WARNING: lanczos did not converge" in text
    saved = json.loads(jpath.read_text())
    assert saved["converged"] is False and saved["eigen"]["all_converged"] is False
    assert saved["eigen"]["num_matvecs"] == 3 and saved["warnings"]
    assert [c for _, _, c in printed_eigenvalues(text)] == saved["eigen"]["converged"]


def test_a_tolerance_below_the_float32_noise_is_reported_with_the_accuracy_reached(ckpt, capsys):
    """The solver's own reason reaches the user: the products' noise, the accuracy reached, and the advice
    that fits it (not 'raise --max-iter', which cannot help)."""
    out, text = run_driver(["--resume", ckpt["path"], "--hessian-batch-size", "8", "--tol", "1e-8",
                            "--no-progress"], capsys)  # fmt: skip
    assert out["eigen"]["converged"] == [False]
    warning = next(line for line in text.splitlines() if line.startswith("WARNING: lanczos did not converge"))
    assert "the products' noise limits the eigenvalues to about" in warning
    assert "loosen --tol to it" in warning and "raise --max-iter" not in warning


def test_power_method(ckpt, capsys):
    """--method power is HessianFlow's power iteration: the library's, with the driver's seed and budget."""
    out, text = run_driver(["--resume", ckpt["path"], "--hessian-batch-size", "8", "--method", "power",
                            "--max-iter", "20", "--no-progress"], capsys)  # fmt: skip
    assert out["eigen"]["method"] == "power_iteration" and out["eigen"]["which"] == "LM"
    assert out["eigen"]["tol"] == 1e-3 and out["eigen"]["max_iter"] == 20
    _, plain, _ = get_datasets("synthetic", augment=False, seed=DATA_SEED, num_train=256, num_test=128)
    xb, yb = fixed_batch(plain, 8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = power_iteration(HessianOperator(ckpt["model"], nn.CrossEntropyLoss(), data=(xb, yb)), max_iter=20,
                              tol=1e-3, seed=1)  # fmt: skip
    assert out["eigen"]["eigenvalues"][0] == pytest.approx(float(ref.eigenvalues[0]), rel=1e-5)
    assert out["eigen"]["converged"] == ref.converged.tolist()
    assert [c for _, _, c in printed_eigenvalues(text)] == ref.converged.tolist()
    assert ("WARNING: power did not converge" in text) != ref.all_converged


# -- loading -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "module."])
def test_legacy_state_dicts_load_with_arch_and_depth(ckpt, capsys, tmp_path, prefix):
    """HessianFlow's torch.save(model.state_dict()), plain and from DataParallel: the same eigenvalue as the
    full checkpoint (same weights, same data: the data seed of a bare file is --seed)."""
    state = {prefix + k: v for k, v in ckpt["model"].state_dict().items()}
    path = tmp_path / "legacy.pkl"
    torch.save(state, path)
    common = ["--hessian-batch-size", "8", "--seed", str(DATA_SEED), "--tol", "1e-3", "--no-progress"]
    legacy, text = run_driver(["--resume", str(path), "--arch", "resnet", *SYN, *common] +
                              (["--depth", "8"] if prefix else []), capsys)  # fmt: skip
    assert legacy["checkpoint"]["kind"] == "bare state_dict" and legacy["model"]["description"] == "ResNet-8"
    if not prefix:
        assert "ResNet-8 read off the state_dict" in text
    full, _ = run_driver(["--resume", ckpt["path"], *common], capsys)
    assert legacy["loss"] == full["loss"]
    assert close(legacy["eigen"]["eigenvalues"][0], full["eigen"]["eigenvalues"][0], legacy["eigen"]["residuals"][0],
                 full["eigen"]["residuals"][0])  # fmt: skip


def run_cli(argv, capsys):
    code = _cli.run(drv.main, drv.parse_args, argv)
    captured = capsys.readouterr()
    return code, captured.err


def one_line_error(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_mismatched_checkpoints_are_one_line_errors(ckpt, capsys, tmp_path):
    # another architecture: keys unexpected (C2's names are a superset of C1's) and shapes
    c2 = tmp_path / "c2.pkl"
    torch.save(get_model("c2").state_dict(), c2)
    code, err = run_cli(["--resume", str(c2), "--arch", "c1", "--name", "cifar10"], capsys)
    line = one_line_error(err)
    assert code == 2 and "does not fit a c1 with 10 classes" in line and "unexpected key(s)" in line
    assert "conv3.weight" in line and "conv1.weight is [64, 3, 3, 3] in the checkpoint, [64, 3, 5, 5]" in line
    # and the other way round: keys missing
    c1 = tmp_path / "c1.pkl"
    torch.save(get_model("c1").state_dict(), c1)
    code, err = run_cli(["--resume", str(c1), "--arch", "c2", "--name", "cifar10"], capsys)
    line = one_line_error(err)
    assert code == 2 and "does not fit a c2 with 10 classes" in line and "missing key(s): conv3.weight" in line
    # another class count: the first shape mismatch, with both shapes
    c100 = tmp_path / "c1_100.pkl"
    torch.save({"module." + k: v for k, v in get_model("c1", num_classes=100).state_dict().items()}, c100)
    code, err = run_cli(["--resume", str(c100), "--arch", "c1", "--name", "cifar10"], capsys)
    line = one_line_error(err)
    assert code == 2 and "fc3.weight is [100, 192] in the checkpoint, [10, 192] in the model" in line
    # another ResNet depth given on the command line for a bare file
    legacy = tmp_path / "r8.pkl"
    torch.save(ckpt["model"].state_dict(), legacy)
    code, err = run_cli(["--resume", str(legacy), "--arch", "ResNet", "--depth", "14", *SYN], capsys)
    assert code == 2 and "does not fit a ResNet-14" in one_line_error(err)
    # a full checkpoint whose weights disagree with its own description
    bad = full_checkpoint(get_model("ResNet", depth=8, num_classes=7), tmp_path / "bad.pkl", num_classes=10)
    code, err = run_cli(["--resume", bad], capsys)
    line = one_line_error(err)
    assert code == 2 and "fc.weight is [7, 64] in the checkpoint, [10, 64] in the model" in line
    # flags contradicting a full checkpoint
    code, err = run_cli(["--resume", ckpt["path"], "--arch", "c1"], capsys)
    assert code == 2 and "--arch c1 does not match" in one_line_error(err) and "ResNet-8" in err
    code, err = run_cli(["--resume", ckpt["path"], "--depth", "20"], capsys)
    assert code == 2 and "--depth 20 does not match" in one_line_error(err)
    code, err = run_cli(["--resume", ckpt["path"], "--name", "cifar100"], capsys)
    assert code == 2 and "does not fit the model" in one_line_error(err)
    # a bare state_dict without --arch
    code, err = run_cli(["--resume", str(legacy), *SYN], capsys)
    assert code == 2 and "pass --arch" in one_line_error(err)


def test_missing_corrupt_and_code_carrying_files_are_one_line_errors(capsys, tmp_path):
    code, err = run_cli(["--resume", str(tmp_path / "nope.pkl")], capsys)
    assert code == 2 and "no such file" in one_line_error(err)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    code, err = run_cli(["--resume", str(junk)], capsys)
    assert code == 2 and "truncated, corrupt or not a torch checkpoint" in one_line_error(err)
    good = tmp_path / "good.pkl"
    torch.save(get_model("c1").state_dict(), good)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[:5000])
    code, err = run_cli(["--resume", str(truncated), "--arch", "c1"], capsys)
    assert code == 2 and "cannot load checkpoint" in one_line_error(err)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pkl"
    torch.save({"state_dict": {}, "x": Payload()}, evil)
    code, err = run_cli(["--resume", str(evil), "--arch", "c1"], capsys)
    assert code == 2 and "refusing to load" in one_line_error(err)
    # a missing data set is a one-line error too (cifar10 is not downloaded without --download)
    code, err = run_cli(["--resume", str(good), "--arch", "c1", "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2 and "--download" in one_line_error(err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top-k", "0"], "positive integer"),
        (["--method", "arnoldi"], "invalid choice"),
        (["--which", "LM"], "invalid choice"),
        (["--operator", "fisher"], "invalid choice"),
        (["--eigen-type", "exact"], "invalid choice"),
        (["--tol", "0"], "positive"),
        (["--tol=-1e-3"], "positive"),
        (["--method", "power", "--which", "SA"], "use --method lanczos"),
        (["--num-batches", "2"], "--eigen-type full only"),
        (["--trace", "--trace-matvecs", "3"], "at least 4"),
        (["--landscape", "3"], "invalid choice"),
        (["--landscape-points", "2"], "at least 3"),
        (["--depth", "9"], "6n+2"),
        (["--layers", "fc"], "--per-layer only"),
        (["--name", "cifar10", "--synthetic-train", "10"], "synthetic only"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        drv.parse_args(["--resume", "x.pkl", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_is_required_and_cuda_is_checked(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        drv.parse_args([])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        drv.parse_args(["--resume", "x.pkl", "--device", "cuda"])
    assert exc.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_hessianflow_command_line_is_accepted():
    args = drv.parse_args("--name cifar10 --arch c1 --resume model_param.pkl --eigen-type full".split())
    assert (args.name, args.arch, args.resume, args.eigen_type) == ("cifar10", "c1", "model_param.pkl", "full")
    assert args.method == "lanczos" and args.top_k == 1 and args.data == "train"


@pytest.mark.slow
def test_gradient_start(ckpt, capsys):
    """--start gradient --criterion eigenvalue: the library's lanczos with those arguments on the same batch."""
    out, _ = run_driver(["--resume", ckpt["path"], "--hessian-batch-size", "8", "--start", "GRADIENT",
                         "--top-k", "2", "--criterion", "eigenvalue", "--no-progress"], capsys)  # fmt: skip
    _, plain, _ = get_datasets("synthetic", augment=False, seed=DATA_SEED, num_train=256, num_test=128)
    xb, yb = fixed_batch(plain, 8, seed=1)
    H = HessianOperator(ckpt["model"], nn.CrossEntropyLoss(), data=(xb, yb))
    ref = lanczos(H, k=2, tol=drv.LANCZOS_TOL, seed=1, v0="gradient", criterion="eigenvalue")
    assert out["eigen"]["eigenvalues"] == ref.eigenvalues.tolist() and out["eigen"]["all_converged"]
    assert out["eigen"]["num_matvecs"] == ref.num_matvecs
    tight = lanczos(H, k=2, tol=1e-7, seed=7)  # a random start, tight: within the asked 1e-4 relative
    for a, b in zip(out["eigen"]["eigenvalues"], tight.eigenvalues.tolist()):
        assert abs(a - b) <= drv.LANCZOS_TOL * abs(b), (a, b)


def test_figures_are_skipped_with_a_note_without_matplotlib(ckpt, capsys, tmp_path, monkeypatch):
    """matplotlib is optional: without it the numbers are computed and written, and one line says why
    there is no figure (what a plain `pip install hessianflow` user meets)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    jpath = tmp_path / "d.json"
    argv = ["--resume", ckpt["path"], "--hessian-batch-size", str(BATCH), "--density", "--density-runs", "1",
            "--density-steps", "8", "--out-dir", str(tmp_path), "--json", str(jpath), "--no-progress"]  # fmt: skip
    code = _cli.run(drv.main, drv.parse_args, argv)
    out = capsys.readouterr().out
    assert code == 0 and "no figures (matplotlib is not installed: pip install 'hessianflow[plot]')" in out
    saved = json.loads(jpath.read_text())
    assert saved["density"]["figure"] is None and saved["figures"] == {}
    assert len(saved["density"]["nodes"]) > 0 and not list(tmp_path.glob("*.png"))


def test_an_unusable_out_dir_is_a_one_line_error_before_work(ckpt, capsys, tmp_path):
    """--out-dir under a regular file cannot be created, whoever runs the test (root included)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    jpath = tmp_path / "r.json"
    argv = ["--resume", ckpt["path"], "--hessian-batch-size", "8", "--density", "--out-dir", str(blocker / "sub"),
            "--json", str(jpath), "--no-progress"]  # fmt: skip
    code = _cli.run(drv.main, drv.parse_args, argv)
    captured = capsys.readouterr()
    line = one_line_error(captured.err)
    assert code == 2 and "error:" in line and str(blocker / "sub") in line and "figures" in line
    assert "loss" not in captured.out and "eigenvalue" not in captured.out  # nothing was computed
    assert not jpath.exists() and blocker.read_text() == "not a directory"


def test_json_naming_a_directory_fails_before_work(ckpt, capsys, tmp_path):
    code, err = run_cli(["--resume", ckpt["path"], "--json", str(tmp_path), "--no-progress"], capsys)
    assert code == 2 and "is a directory" in one_line_error(err)
    assert not list(tmp_path.parent.glob(tmp_path.name + ".tmp"))
