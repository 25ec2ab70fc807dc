"""train.py and train_resnet.py end to end on small synthetic data: the numbers they write, resume, faults."""

import json
import math
import os

import pytest
import torch

from hessianflow.cli import common as _cli
from hessianflow.cli import train, train_resnet
from hessianflow.curvature import HessianOperator
from hessianflow.io.checkpoint import load_checkpoint
from hessianflow.linalg.eigen import lanczos
from hessianflow.training.data import dataset_info, get_datasets
from hessianflow.training.models import get_model

TINY = ["--name", "synthetic", "--synthetic-train", "320", "--synthetic-test", "160", "--no-progress"]


def run_train(tmp_path, *extra, module=train):
    argv = [*TINY, "--out-dir", str(tmp_path), "--save", str(tmp_path / "ckpt.pkl"), *extra]
    return module.main(module.parse_args(argv))


def read_log(tmp_path):
    with open(tmp_path / "train_log.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_absa_end_to_end_batch_grows_and_lr_follows(tmp_path):
    metrics = run_train(
        tmp_path, "--arch", "c2", "--epochs", "4", "--batch-size", "32", "--large-ratio", "4", "--duration", "1",
        "--lr", "0.01", "--lr-decay-epoch", "3", "--lr-decay", "0.5", "--hessian-batch-size", "32",
    )  # fmt: skip
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    # duration 1: with no eigenvalue drop the batch doubles after every epoch until the cap of 4
    assert [r["batch_size"] for r in log] == [32, 64, 128, 128]
    assert [r["large_ratio"] for r in log] == [1, 2, 4, 4]
    # linear scaling with the batch; --lr-decay-epoch 3 halves it after epoch 3 (HessianFlow's meaning)
    assert [r["lr"] for r in log] == pytest.approx([0.01, 0.02, 0.04, 0.04 * 0.5])
    # eigenvalues are computed while the batch can grow, not at the cap
    assert all(math.isfinite(r["eigenvalue"]) and r["eigenvalue"] > 0 for r in log[:2])
    assert log[2]["eigenvalue"] is None and log[3]["eigenvalue"] is None
    # adversarial ratio halves with each growth and stops at the cap / half-way (epoch index 2 of 4)
    assert [r["adv_ratio"] for r in log] == pytest.approx([0.2, 0.1, 0.0, 0.0])
    # 320 samples: 10 mini-batches of 32; steps = ceil(10 / large_ratio)
    assert [r["updates"] for r in log] == [10, 15, 18, 21]
    assert metrics["updates"] == 21 and metrics["final_batch_size"] == 128
    assert metrics["final_test_acc"] == pytest.approx(log[-1]["test_acc"])
    assert metrics["best_test_acc"] == pytest.approx(max(r["test_acc"] for r in log))
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["updates"] == 21
    ckpt = load_checkpoint(tmp_path / "ckpt.pkl")  # weights_only=True inside
    assert ckpt["arch"] == "c2" and ckpt["epoch"] == 4 and ckpt["num_classes"] == 10
    assert ckpt["absa"]["large_ratio"] == 4
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_sgd_learns_above_chance(tmp_path):
    run_train(
        tmp_path, "--arch", "c1", "--method", "sgd", "--epochs", "3", "--batch-size", "32", "--large-ratio", "1",
        "--lr", "0.02", "--synthetic-train", "640",
    )  # fmt: skip
    log = read_log(tmp_path)
    assert all(r["eigenvalue"] is None and r["adv_ratio"] == 0 and r["batch_size"] == 32 for r in log)
    assert [r["updates"] for r in log] == [20, 40, 60]
    assert log[-1]["test_acc"] > 0.3  # 10 classes: chance is 0.1
    assert log[-1]["train_loss"] < log[0]["train_loss"]


@pytest.mark.slow
def test_resume_gives_the_same_weights(tmp_path):
    common = ["--arch", "ResNet", "--depth", "8", "--epochs", "3", "--batch-size", "32", "--large-ratio", "2",
              "--duration", "1", "--hessian-batch-size", "32", "--lr", "0.05"]  # fmt: skip
    run_train(tmp_path / "full", *common)
    # stop after epoch 2 of a 3-epoch run (as a kill would), then resume
    argv2 = [*TINY, "--out-dir", str(tmp_path / "part"), "--save", str(tmp_path / "part" / "ckpt.pkl"), *common]
    _run_until(train.parse_args(argv2), 2)
    assert load_checkpoint(tmp_path / "part" / "ckpt.pkl")["epoch"] == 2
    train.main(train.parse_args([*argv2, "--resume", str(tmp_path / "part" / "ckpt.pkl")]))
    a = load_checkpoint(tmp_path / "full" / "ckpt.pkl")
    b = load_checkpoint(tmp_path / "part" / "ckpt.pkl")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert [r["eigenvalue"] for r in read_log(tmp_path / "full")] == [
        r["eigenvalue"] for r in read_log(tmp_path / "part")
    ]


def _run_until(args, epochs_done):
    """Run ``args`` but stop after ``epochs_done`` epochs, as if killed after that epoch's checkpoint."""

    class Stop(Exception):
        pass

    original = train.save_checkpoint
    calls = []

    def save_then_maybe_stop(obj, path):
        original(obj, path)
        calls.append(obj["epoch"])
        if obj["epoch"] >= epochs_done:
            raise Stop

    train.save_checkpoint = save_then_maybe_stop
    try:
        with pytest.raises(Stop):
            train.main(args)
    finally:
        train.save_checkpoint = original
    assert calls[-1] == epochs_done


def test_nan_loss_stops_with_exit_3_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    argv = [*TINY, "--arch", "c2", "--method", "sgd", "--large-ratio", "1", "--epochs", "3", "--batch-size", "64",
            "--out-dir", str(tmp_path), "--save", str(tmp_path / "ckpt.pkl")]  # fmt: skip
    real_epoch = train.train_epoch
    seen = []

    def poisoned(model, loader, *a, **kw):
        seen.append(kw["epoch"])
        if kw["epoch"] == 2:  # the second epoch's loss turns NaN: corrupt the inputs
            loader = [(x * float("nan"), y) for x, y in loader]
        return real_epoch(model, loader, *a, **kw)

    monkeypatch.setattr(train, "train_epoch", poisoned)
    code = _cli.run(train.main, train.parse_args, argv)
    err = capsys.readouterr().err
    assert code == _cli.EXIT_NUMERIC
    assert "numerical error" in err and "Traceback" not in err
    ckpt = load_checkpoint(tmp_path / "ckpt.pkl")
    assert ckpt["epoch"] == 1  # the last good epoch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_train_resnet_eigen_history_crosses_lr_decay(tmp_path):
    argv = ["--epochs", "3", "--lr-decay-epoch", "2", "--depth", "8", "--batch-size", "32",
            "--hessian-batch-size", "48", "--eig-max-iter", "100", "--eig-tol", "1e-4"]  # fmt: skip
    metrics = run_train(tmp_path, *argv, module=train_resnet)
    with open(tmp_path / "eigen_history.json") as f:
        hist = json.load(f)
    hist = hist["history"] if isinstance(hist, dict) else hist
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert all(math.isfinite(h["eigenvalue"]) for h in hist)
    assert [h["lr"] for h in hist] == pytest.approx([0.1, 0.1, 0.01])  # HessianFlow's decay 0.1
    assert metrics["eigenvalues"] == pytest.approx([h["eigenvalue"] for h in hist])
    png = (tmp_path / "eigen_history.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # an independent computation on the same batch and the final weights
    ckpt = load_checkpoint(tmp_path / "ckpt.pkl")
    info = dataset_info("synthetic")
    model = get_model("ResNet", depth=8, num_classes=info.num_classes)
    model.load_state_dict(ckpt["state_dict"])
    _, plain, _ = get_datasets("synthetic", augment=False, seed=1, num_train=320, num_test=160)
    g = torch.Generator().manual_seed(1)  # train_resnet's approximate batch: drawn once with --seed
    idx = torch.randperm(len(plain), generator=g)[:48]
    x = torch.stack([plain[int(i)][0] for i in idx])
    y = torch.as_tensor([int(plain[int(i)][1]) for i in idx])
    H = HessianOperator(model, torch.nn.CrossEntropyLoss(), data=(x, y))
    ref = lanczos(H, k=2, which="LM", tol=1e-8, seed=0)
    top = max(ref.eigenvalues.tolist(), key=abs)
    assert hist[-1]["eigenvalue"] == pytest.approx(top, rel=1e-4)
    # the driver, given only the checkpoint (and the same batch: size 48, seed 1), reproduces it
    from hessianflow.cli import eig as drv

    drv.main(drv.parse_args(["--resume", str(tmp_path / "ckpt.pkl"), "--hessian-batch-size", "48",
                                   "--seed", "1", "--method", "power", "--max-iter", "100", "--tol", "1e-6",
                                   "--json", str(tmp_path / "spec.json"), "--no-progress"]))  # fmt: skip
    with open(tmp_path / "spec.json") as f:
        assert json.load(f)["eigen"]["eigenvalues"][0] == pytest.approx(hist[-1]["eigenvalue"], rel=1e-4)


@pytest.mark.slow
def test_the_lr_decay_is_told_at_the_first_epoch_run_at_the_new_rate(tmp_path, monkeypatch, capsys):
    """--lr-decay-epoch 2: epoch 3 is the first at the new rate, in the log, the epoch line and the figure
    (the figure marked epoch 2 while its rate panel dropped at 3)."""
    pytest.importorskip("matplotlib")
    from hessianflow import plotting

    figures = []
    original = plotting.plot_eigen_history

    def keep(*args, **kwargs):
        path, fig = original(*args, **kwargs, return_fig=True)
        figures.append(fig)
        return path

    monkeypatch.setattr(plotting, "plot_eigen_history", keep)
    run_train(tmp_path, "--arch", "c1", "--method", "sgd", "--large-ratio", "1", "--batch-size", "64", "--epochs",
              "4", "--lr", "0.05", "--lr-decay-epoch", "2", "--track-eigen", "--hessian-batch-size", "32",
              "--eig-max-iter", "2")  # fmt: skip
    out = capsys.readouterr().out
    log = read_log(tmp_path)
    assert [r["lr"] for r in log] == pytest.approx([0.05, 0.05, 0.01, 0.01])  # train.py's --lr-decay 0.2
    assert [r["next_lr"] for r in log] == pytest.approx([0.05, 0.01, 0.01, 0.01])
    first_new = next(r["epoch"] for r in log if r["lr"] < log[0]["lr"])
    assert first_new == 3
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch")]
    assert "-> lr 0.01 from epoch 3" in lines[1] and all("-> lr" not in ln for ln in lines[:1] + lines[2:])
    (fig,) = figures
    (decay,) = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert list(decay.get_xdata()) == [first_new, first_new] and "from epoch 3" in decay.get_label()
    lo, hi = fig.axes[0].get_xlim()
    assert all(float(t).is_integer() for t in fig.axes[0].get_xticks() if lo <= t <= hi)


@pytest.mark.parametrize("flags", [["--method", "absa", "--duration", "5"], ["--method", "sgd", "--track-eigen"]])
def test_an_unconverged_eigenvalue_is_one_line_of_the_epoch_log_not_a_warning(flags, tmp_path, capsys):
    """The ABSA check (and the tracker) printed a raw ConvergenceWarning (source line, "consider lanczos()")."""
    import warnings

    from hessianflow.linalg.eigen import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_train(tmp_path, "--arch", "c1", "--batch-size", "64", "--large-ratio", "2", "--epochs", "2",
                  "--hessian-batch-size", "32", "--eig-max-iter", "2", "--eig-tol", "1e-6", *flags)  # fmt: skip
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    out = capsys.readouterr().out
    log = read_log(tmp_path)
    # 2 power iterations cannot reach a relative change of 1e-6: every epoch's eigenvalue is unconverged
    assert [r["eig_converged"] for r in log] == [False, False]
    assert all(r["eigenvalue"] > 0 and r["eig_residual"] > 0 for r in log)
    notes = [ln for ln in out.splitlines() if ln.startswith("note:") and "not converged" in ln]
    assert len(notes) == 2, out
    for r, note in zip(log, notes):
        assert f"epoch {r['epoch']}" in note and f"{r['eigenvalue']:.4g}" in note
        assert "raise --eig-max-iter (now 2) or loosen --eig-tol (now 1e-06)" in note, note
    assert "consider lanczos" not in out and "Warning" not in out
    if "--track-eigen" in flags:  # the tracker's own record says the same
        with open(tmp_path / "eigen_history.json") as f:
            assert [h["converged"] for h in json.load(f)["history"]] == [False, False]


@pytest.mark.slow
def test_track_eigen_with_absa_records_every_epoch_without_changing_the_run(tmp_path):
    """--track-eigen beside ABSA: the tracker's eigenvalue after every epoch (and in the log where ABSA
    took none), the training itself bit for bit that of the same run untracked."""
    common = ["--arch", "ResNet", "--depth", "8", "--method", "absa", "--epochs", "2", "--batch-size", "32",
              "--large-ratio", "2", "--duration", "1", "--hessian-batch-size", "32", "--eig-max-iter", "100",
              "--eig-tol", "1e-4", "--synthetic-train", "160"]  # fmt: skip
    run_train(tmp_path / "plain", *common)
    metrics = run_train(tmp_path / "tracked", *common, "--track-eigen")
    plain, tracked = read_log(tmp_path / "plain"), read_log(tmp_path / "tracked")
    a, b = load_checkpoint(tmp_path / "plain" / "ckpt.pkl"), load_checkpoint(tmp_path / "tracked" / "ckpt.pkl")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert [r["batch_size"] for r in tracked] == [r["batch_size"] for r in plain] == [32, 64]
    with open(tmp_path / "tracked" / "eigen_history.json") as f:
        hist = json.load(f)
    hist = hist["history"] if isinstance(hist, dict) else hist
    assert [h["epoch"] for h in hist] == [1, 2] and all(math.isfinite(h["eigenvalue"]) for h in hist)
    assert [h["lr"] for h in hist] == pytest.approx([r["lr"] for r in tracked])
    # epoch 1: ABSA's own check (its batch), as without tracking; at the cap ABSA takes none: the tracker's
    assert tracked[0]["eigenvalue"] == plain[0]["eigenvalue"] is not None
    assert plain[1]["eigenvalue"] is None and tracked[1]["eigenvalue"] == hist[1]["eigenvalue"]
    assert metrics["eigenvalues"] == [r["eigenvalue"] for r in tracked]
    assert (tmp_path / "tracked" / "eigen_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the last record against an independent Lanczos on the tracker's batch (drawn once with --seed 1)
    model = get_model("ResNet", depth=8, num_classes=10)
    model.load_state_dict(b["state_dict"])
    _, plain_set, _ = get_datasets("synthetic", augment=False, seed=1, num_train=160, num_test=160)
    idx = torch.randperm(len(plain_set), generator=torch.Generator().manual_seed(1))[:32]
    x = torch.stack([plain_set[int(i)][0] for i in idx])
    y = torch.as_tensor([int(plain_set[int(i)][1]) for i in idx])
    ref = lanczos(HessianOperator(model, torch.nn.CrossEntropyLoss(), data=(x, y)), k=2, which="LM", tol=1e-4, seed=0)
    # --eig-tol 1e-4 (float32 products certify no better than ~1e-5); another batch is off by percents
    assert hist[-1]["eigenvalue"] == pytest.approx(max(ref.eigenvalues.tolist(), key=abs), rel=1e-3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "5", "--lr-decay-epoch", "7"], "--lr-decay-epoch"),
        (["--epochs", "9", "--lr-decay-epoch", "5", "3"], "--lr-decay-epoch 5 3: must increase"),
        (["--epochs", "9", "--lr-decay-epoch", "3", "3"], "--lr-decay-epoch 3 3: must increase"),
        (["--arch", "ResNet", "--depth", "21"], "6n+2"),
        (["--arch", "vgg"], "--arch"),
        (["--name", "imagenet"], "--name"),
        (["--method", "adam"], "--method"),
        (["--eigen-type", "exact"], "--eigen-type"),
        (["--large-ratio", "0"], "--large-ratio"),
        (["--eps", "1.5"], "--eps"),
        (["--adv-ratio", "-0.1"], "--adv-ratio"),
        (["--device", "tpu"], "--device"),
    ]
    + ([(["--device", "cuda"], "no CUDA")] if not torch.cuda.is_available() else []),
)
@pytest.mark.parametrize("module", [train, train_resnet])
def test_bad_flags_exit_2_before_work(module, flags, message, capsys):
    if module is train_resnet and flags[:1] == ["--arch"]:
        flags = flags[2:]  # train_resnet.py always trains a ResNet: --arch itself is refused
        if not flags:
            flags, message = ["--arch", "vgg"], "unrecognized arguments"
    with pytest.raises(SystemExit) as exc:
        module.parse_args(flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_out_dir_is_an_error_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = _cli.run(train.main, train.parse_args, [*TINY, "--epochs", "1", "--out-dir", str(blocker / "sub")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "model_param.pkl")


def test_resume_with_conflicting_flags_is_refused(tmp_path, capsys):
    run_train(tmp_path, "--arch", "c2", "--method", "sgd", "--large-ratio", "1", "--epochs", "1", "--batch-size", "64")
    argv = [*TINY, "--out-dir", str(tmp_path), "--save", str(tmp_path / "ckpt.pkl"), "--epochs", "2",
            "--resume", str(tmp_path / "ckpt.pkl"), "--arch", "c1"]  # fmt: skip
    assert _cli.run(train.main, train.parse_args, argv) == 2
    assert "--arch 'c1' (checkpoint: 'c2')" in capsys.readouterr().err


def test_resume_may_extend_the_number_of_epochs(tmp_path):
    common = ["--arch", "c2", "--method", "sgd", "--large-ratio", "1", "--batch-size", "64"]
    run_train(tmp_path, *common, "--epochs", "1")
    metrics = run_train(tmp_path, *common, "--epochs", "2", "--resume", str(tmp_path / "ckpt.pkl"))
    assert metrics["epochs"] == 2 and [r["epoch"] for r in read_log(tmp_path)] == [1, 2]
    assert load_checkpoint(tmp_path / "ckpt.pkl")["epoch"] == 2


@pytest.mark.parametrize("script", ["train", "train_resnet"])
def test_help_states_each_default_once(script):
    parser = {"train": train, "train_resnet": train_resnet}[script].build_parser()
    text = " ".join(parser.format_help().split())
    assert text.count("(default: auto)") == 1  # --device: its help text says it, the formatter must not repeat it
    assert "(default: 0.9)" in text  # --momentum: added by the formatter
    for chunk in text.split("--")[1:]:
        assert chunk.count("(default") <= 1, chunk
