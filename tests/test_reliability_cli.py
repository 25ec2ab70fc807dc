"""The scripts under faults and mistakes (issue "Reliability, second round"): a diverging run never
replaces a good checkpoint, the epoch log holds each epoch once in strict JSON, damaged checkpoints and
bad outputs are one-line errors before any work, a full disk is named, resume continues where it was.

The scripts run in-process through ``common.run`` (their console entry), on a tiny synthetic C1 run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hessianflow.cli import common as _cli
from hessianflow.cli import eig as drv
from hessianflow.cli import train, train_resnet
from hessianflow.io import checkpoint as ck
from hessianflow.io.checkpoint import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = ["--name", "synthetic", "--synthetic-train", "128", "--synthetic-test", "64", "--arch", "c1", "--batch-size", "32",
     "--hessian-batch-size", "32", "--eig-max-iter", "3", "--no-progress", "--device", "cpu"]  # fmt: skip


def strict_json(line: str):
    """json.loads that refuses NaN/Infinity (not JSON)."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def log_epochs(path) -> list[int]:
    with open(path) as f:
        return [strict_json(line)["epoch"] for line in f]


def run_script(module, argv, capsys):
    code = _cli.run(module.main, module.parse_args, argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def finite(state) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint of 2 finished epochs, with its log."""
    d = tmp_path_factory.mktemp("good")
    argv = [*T, "--epochs", "2", "--out-dir", str(d), "--save", str(d / "c.pkl")]
    assert _cli.run(train.main, train.parse_args, argv) == 0
    return d


# -- 1. divergence ------------------------------------------------------------------------------------------


def test_a_diverging_run_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    argv = [*T, "--epochs", "6", "--large-ratio", "4", "--duration", "1", "--lr", "1", "--out-dir", str(tmp_path),
            "--save", str(tmp_path / "c.pkl")]  # fmt: skip
    code, _, err = run_script(train, argv, capsys)
    line = one_line(err)
    assert code == 3 and "not finite" in line and "diverged" in line
    ckpt = load_checkpoint(tmp_path / "c.pkl")
    assert finite(ckpt["state_dict"]) and all(
        r["test_loss"] is not None and abs(r["test_loss"]) < float("inf") for r in ckpt["history"]
    )
    assert f"the checkpoint of epoch {ckpt['epoch']} is kept" in line
    assert log_epochs(tmp_path / "train_log.jsonl") == list(range(1, ckpt["epoch"] + 1))  # strict JSON


def test_a_run_diverging_in_its_first_epoch_claims_no_checkpoint(tmp_path, capsys, monkeypatch):
    real = train.train_epoch

    def nan_loss(*a, **k):
        out = real(*a, **k)
        return {**out, "loss": float("nan")}

    monkeypatch.setattr(train, "train_epoch", nan_loss)
    code, _, err = run_script(train, [*T, "--epochs", "1", "--out-dir", str(tmp_path), "--save",
                                      str(tmp_path / "c.pkl")], capsys)  # fmt: skip
    assert code == 3 and "no checkpoint was written" in one_line(err) and "kept" not in err
    assert not (tmp_path / "c.pkl").exists()


# -- 2. the epoch log after interrupted writes -------------------------------------------------------------


@pytest.mark.slow
def test_the_log_holds_each_epoch_once_after_interrupted_checkpoint_writes(tmp_path, capsys, monkeypatch):
    save = str(tmp_path / "c.pkl")
    real = ck.atomic_write
    calls = {"n": 0}

    def interrupted_on_third_checkpoint(path, write, what="file"):
        if what == "checkpoint":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # Ctrl-C inside the write of epoch 3's checkpoint
        return real(path, write, what)

    monkeypatch.setattr(ck, "atomic_write", interrupted_on_third_checkpoint)
    code, _, err = run_script(train, [*T, "--epochs", "5", "--out-dir", str(tmp_path), "--save", save], capsys)
    assert code == 130 and "interrupted" in err
    assert load_checkpoint(save)["epoch"] == 2 and log_epochs(tmp_path / "train_log.jsonl") == [1, 2]
    monkeypatch.setattr(ck, "atomic_write", real)
    code, out, _ = run_script(train, ["--resume", save, "--no-progress", "--device", "cpu"], capsys)
    assert code == 0 and "resuming" in out
    assert log_epochs(tmp_path / "train_log.jsonl") == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_duplicates_log_lines(tmp_path):
    """Real kills: SIGKILL right after each of the first checkpoints' temporary file is written."""
    script = (
        "import sys, time, torch\n"
        "from hessianflow.cli import common, train\n"
        "real = torch.save\n"
        "def slow(obj, f, *a, **k):\n"
        "    real(obj, f, *a, **k); print('SAVING', flush=True); time.sleep(2)\n"
        "torch.save = slow\n"
        "sys.exit(common.run(train.main, train.parse_args, sys.argv[1:]))\n"
    )
    save, out_dir = str(tmp_path / "c.pkl"), str(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills = 0
    for attempt in range(3):  # the first run is killed inside its 2nd checkpoint write, the resumed ones in their 1st
        fresh = [*T, "--epochs", "4", "--out-dir", out_dir, "--save", save]
        argv = fresh if attempt == 0 else ["--resume", save]
        proc = subprocess.Popen([sys.executable, "-c", script, *argv], cwd=str(tmp_path), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        writes = 0
        for line in proc.stdout:
            if line.startswith("SAVING"):
                writes += 1
                if writes == (2 if attempt == 0 else 1):
                    proc.kill()
                    kills += 1
                    break
        proc.wait(timeout=300)
        assert load_checkpoint(save)["epoch"] == 1  # every kill left the last whole checkpoint
    assert kills == 3
    last = subprocess.run([sys.executable, "-m", "hessianflow.cli.train", "--resume", save, "--no-progress"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert last.returncode == 0, last.stderr
    assert load_checkpoint(save)["epoch"] == 4
    assert log_epochs(tmp_path / "train_log.jsonl") == [1, 2, 3, 4]


# -- 3. damaged but safe checkpoints ----------------------------------------------------------------------

DAMAGE = {
    "no optimizer": (lambda c: c.pop("optimizer"), "'optimizer' is missing"),
    "no rng": (lambda c: c.pop("rng"), "'rng' is missing"),
    "no absa": (lambda c: c.pop("absa"), "'absa' is missing"),
    "no epoch": (lambda c: c.pop("epoch"), "'epoch' is missing"),
    "no history": (lambda c: c.pop("history"), "'history' is missing"),
    "epoch three": (lambda c: c.update(epoch="three"), "'epoch' should be a int, got str"),
    "vgg": (lambda c: c.update(arch="vgg"), "'arch' is not a known architecture"),
    "num_classes -1": (lambda c: c.update(num_classes=-1), "'num_classes' is out of range: -1"),
    "optimizer garbage": (lambda c: c.update(optimizer={"state": 3}), "'optimizer' is damaged"),
    "rng garbage": (lambda c: c.update(rng={"torch": 1}), "'rng' is damaged"),
    "history garbage": (lambda c: c.update(history=[{"x": 1}]), "'history' holds a record without integer"),
}
ANALYSABLE = {"no optimizer", "no rng", "no absa", "no history", "optimizer garbage", "rng garbage", "history garbage"}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoints_are_one_line_errors(good, damage, tmp_path, capsys):
    ckpt = load_checkpoint(good / "c.pkl")
    edit, expected = DAMAGE[damage]
    edit(ckpt)
    path = tmp_path / "damaged.pkl"
    save_checkpoint(ckpt, path)
    code, out, err = run_script(train, ["--resume", str(path), "--no-progress", "--device", "cpu"], capsys)
    line = one_line(err)
    assert code == 2 and str(path) in line and expected in line, line
    assert "epoch" not in out.split("resuming")[-1] or "epoch   " not in out  # no epoch was trained
    code, _, err = run_script(drv, ["--resume", str(path), "--hessian-batch-size", "16", "--no-progress",
                                    "--device", "cpu"], capsys)  # fmt: skip
    if damage in ANALYSABLE:  # the model is whole: the driver analyses it
        assert code == 0, err
    else:
        assert code == 2 and str(path) in one_line(err) and expected in one_line(err)


# -- 4. outputs checked before any work ----------------------------------------------------------------


def test_save_naming_a_directory_fails_before_training(tmp_path, capsys):
    argv = [*T, "--epochs", "1", "--out-dir", str(tmp_path), "--save", str(tmp_path)]
    code, out, err = run_script(train, argv, capsys)
    assert code == 2 and "is a directory" in one_line(err) and "kept" not in err
    assert "epoch" not in out and not (tmp_path / "train_log.jsonl").exists()


def test_unknown_layer_fails_before_the_eigenvalues(good, capsys):
    code, out, err = run_script(drv, ["--resume", str(good / "c.pkl"), "--per-layer", "--layers", "nosuchlayer",
                                      "--no-progress", "--device", "cpu"], capsys)  # fmt: skip
    assert code == 2 and "no such layer" in one_line(err) and "eigenvalues" not in out


# -- 5. resume continues where the checkpoint is ------------------------------------------------------------


def test_resume_without_save_continues_in_the_resumed_file(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    assert _cli.run(train.main, train.parse_args, [*T, "--epochs", "1", "--out-dir", str(d), "--save",
                                                   str(d / "c.pkl")]) == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the old default --save/--out-dir would land here
    for epochs in (2, 3):
        code, _, err = run_script(train, ["--resume", str(d / "c.pkl"), "--epochs", str(epochs), "--no-progress",
                                          "--device", "cpu"], capsys)  # fmt: skip
        assert code == 0, err
        assert load_checkpoint(d / "c.pkl")["epoch"] == epochs
    assert not (tmp_path / "model_param.pkl").exists() and not (tmp_path / "runs").exists()
    assert log_epochs(d / "train_log.jsonl") == [1, 2, 3]


def test_resuming_a_finished_run_to_a_new_file_writes_it(good, tmp_path, capsys):
    new = tmp_path / "copy.pkl"
    code, out, err = run_script(train, ["--resume", str(good / "c.pkl"), "--save", str(new), "--out-dir",
                                        str(tmp_path), "--no-progress", "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0 and str(new) in out
    assert load_checkpoint(new)["epoch"] == 2


def test_resume_accepts_the_saved_synthetic_size_and_refuses_another(good, tmp_path, capsys):
    base = ["--resume", str(good / "c.pkl"), "--save", str(tmp_path / "c.pkl"), "--out-dir", str(tmp_path),
            "--no-progress", "--device", "cpu"]  # fmt: skip
    code, _, err = run_script(train, [*base, "--synthetic-train", "128"], capsys)
    assert code == 0, err
    code, _, err = run_script(train, [*base, "--synthetic-train", "256"], capsys)
    assert code == 2 and "--synthetic-train 256 (checkpoint: 128)" in one_line(err)


def test_train_resnet_refuses_to_resume_a_c1(good, capsys):
    code, out, err = run_script(train_resnet, ["--resume", str(good / "c.pkl"), "--no-progress"], capsys)
    assert code == 2 and "holds a c1" in one_line(err) and "train.py" in err


# -- 6. a full disk -------------------------------------------------------------------------------------------


def test_a_full_disk_is_named_mocked(tmp_path, monkeypatch, capsys):
    """The CI variant: the file system reports no free space during the write."""
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    real_save = torch.save

    def fail_like_a_full_disk(obj, f, *a, **k):
        monkeypatch.setattr(ck.shutil, "disk_usage", lambda d: Usage(10, 10, 0))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 30912 vs 30808")

    monkeypatch.setattr(torch, "save", fail_like_a_full_disk)
    code, _, err = run_script(train, [*T, "--epochs", "1", "--out-dir", str(tmp_path), "--save",
                                      str(tmp_path / "c.pkl")], capsys)  # fmt: skip
    monkeypatch.setattr(torch, "save", real_save)
    line = one_line(err)
    assert code == 4 and "no space left on device" in line and "no checkpoint was written" in line
    assert not list(tmp_path.glob(".c.pkl.*"))


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_a_real_full_disk_is_named(tmp_path, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        # the log and metrics fit; the C1 checkpoint (7 MB) does not
        code, _, err = run_script(train, [*T, "--epochs", "1", "--out-dir", str(mnt), "--save", str(mnt / "c.pkl")],
                                  capsys)  # fmt: skip
        line = one_line(err)
        assert code == 4 and "no space left on device" in line and "no checkpoint was written" in line
        assert sorted(os.listdir(mnt)) == []  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(mnt)])


# -- 7. one line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [train, drv])
def test_usage_errors_are_one_line(module, capsys):
    argv = ["--lr", "-1"] if module is train else ["--resume", "x.pkl", "--top-k", "0"]
    with pytest.raises(SystemExit) as exc:
        module.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "expected a positive" in one_line(err) and "usage:" not in err


def test_usage_errors_print_once_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        train.parse_args(["--lr", "-1"])
    assert capsys.readouterr().err == ""  # rank 0 says it


def test_a_raw_pickle_is_one_line_without_torch_warnings(tmp_path, capsys):
    import pickle

    path = tmp_path / "raw.pkl"
    with open(path, "wb") as f:
        pickle.dump({"a": [1, 2]}, f, protocol=4)
    code = subprocess.run([sys.executable, "hessian_eig_driver.py", "--resume", str(path), "--arch", "c1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert code.returncode == 2 and str(path) in one_line(code.stderr)


def test_driver_interrupt_message_claims_no_checkpoint(good, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(drv, "check_loss", interrupt)
    code = drv.cli(["--resume", str(good / "c.pkl"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 130 and "nothing written" in err and "checkpoint" not in err


@pytest.mark.slow
def test_a_diverging_run_under_torchrun_keeps_the_last_finite_checkpoint(tmp_path):
    try:
        from test_distributed import torchrun
    except ImportError:  # run from another rootdir
        from tests.test_distributed import torchrun

    argv = [*T, "--epochs", "6", "--large-ratio", "4", "--duration", "1", "--lr", "1", "--out-dir", str(tmp_path),
            "--save", str(tmp_path / "c.pkl")]  # fmt: skip
    proc, _ = torchrun(*argv, script=os.path.join(ROOT, "train.py"), timeout=400)
    assert proc.returncode != 0 and "not finite" in proc.stderr  # torchrun reports the failing rank(s)
    ckpt = load_checkpoint(tmp_path / "c.pkl")
    assert finite(ckpt["state_dict"]) and ckpt["epoch"] >= 1
    assert log_epochs(tmp_path / "train_log.jsonl") == list(range(1, ckpt["epoch"] + 1))
