"""Reliability of train.py: SIGKILL at random moments, a full disk mid-run, corrupt or foreign checkpoints."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from hessianflow.cli import common as _cli
from hessianflow.cli import train
from hessianflow.io import checkpoint as ckpt_mod
from hessianflow.io.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--name", "synthetic", "--synthetic-train", "192", "--synthetic-test", "64", "--no-progress",
        "--arch", "ResNet", "--depth", "8", "--batch-size", "32", "--large-ratio", "2", "--duration", "1",
        "--hessian-batch-size", "32", "--epochs", "4", "--lr", "0.05"]  # fmt: skip

# Runs train.py, but holds each checkpoint write open for a moment after the temporary file is written
# and before it is renamed, printing a marker, so a test can kill the process inside the write.
SLOW_SAVE = r"""
import sys, time, torch
from hessianflow.cli import common as _cli, train
real = torch.save
def slow_save(obj, f, *a, **k):
    real(obj, f, *a, **k)
    print("SAVING", flush=True)
    time.sleep(float(sys.argv[1]))
torch.save = slow_save
sys.exit(_cli.run(train.main, train.parse_args, sys.argv[2:]))
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _weights(path):
    return load_checkpoint(path)["state_dict"]


EPOCHS = 6


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    # the reference in a subprocess too: the same thread count gives the same floating-point reductions
    ref = subprocess.run(
        [sys.executable, "train.py", *TINY, "--epochs", str(EPOCHS), "--out-dir", str(ref_dir),
         "--save", str(ref_dir / "c.pkl")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stdout + ref.stderr
    reference = _weights(ref_dir / "c.pkl")

    save = run_dir / "c.pkl"
    argv = [*TINY, "--epochs", str(EPOCHS), "--out-dir", str(run_dir), "--save", str(save)]
    rng = random.Random(0)
    # inside a write, inside a write, anywhere, inside a write, ...: each "write" attempt commits one epoch
    # and is killed in the next epoch's write, so three kills happen before the run can finish
    kills, during_write, seen_epochs = 0, 0, []
    for attempt in range(12):
        resume = ["--resume", str(save)] if save.exists() else []
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_SAVE, "0.5", *argv, *resume],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        if attempt in (0, 1) or attempt % 2 == 1:
            # kill inside this process's second checkpoint write (the first is let through, so the run
            # advances): after the temporary file is written, before the rename
            saves, deadline = 0, time.time() + 180
            while saves < 2 and time.time() < deadline:
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    break
                saves += "SAVING" in line
            if saves == 2:
                time.sleep(rng.uniform(0.0, 0.3))
                during_write += proc.poll() is None
        else:
            time.sleep(rng.uniform(1.0, 5.0))  # anywhere: start-up, training, the eigenvalue check
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        proc.stdout.close()
        if save.exists():
            ck = load_checkpoint(save)  # always whole and loadable
            seen_epochs.append(ck["epoch"])
            assert 1 <= ck["epoch"] <= EPOCHS
        leftovers = [p for p in os.listdir(run_dir) if p.endswith(".tmp")] if run_dir.exists() else []
        assert len(leftovers) <= 1  # at most the temporary file of the killed write
        if save.exists() and load_checkpoint(save)["epoch"] == EPOCHS:
            break
    assert kills >= 3 and during_write >= 2
    assert seen_epochs == sorted(seen_epochs)  # never went back to an older checkpoint
    if load_checkpoint(save)["epoch"] < EPOCHS:  # finish the run without interruptions
        done = subprocess.run(
            [sys.executable, "train.py", *argv, "--resume", str(save)],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    final = _weights(save)
    for k in reference:
        assert torch.equal(reference[k], final[k]), k


def test_disk_full_mid_run_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    save = tmp_path / "c.pkl"
    argv = [*TINY, "--epochs", "2", "--method", "sgd", "--out-dir", str(tmp_path), "--save", str(save)]
    real = torch.save
    calls = []

    def full_disk(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's checkpoint: half written, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    code = _cli.run(train.main, train.parse_args, argv)
    err = capsys.readouterr().err
    assert code == _cli.EXIT_IO
    assert "No space left on device" in err and "Traceback" not in err
    assert load_checkpoint(save)["epoch"] == 1  # the previous checkpoint, intact
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["missing", "truncated", "random", "other_arch", "bare_state_dict", "other_classes"])
def test_bad_resume_files_are_one_line_errors(tmp_path, kind, capsys):
    good = tmp_path / "good.pkl"
    bad = tmp_path / "bad.pkl"
    base = [*TINY, "--epochs", "1", "--method", "sgd", "--out-dir", str(tmp_path)]
    if kind != "missing":
        train.main(train.parse_args([*base, "--save", str(good)]))
        data = good.read_bytes()
        if kind == "truncated":
            bad.write_bytes(data[: len(data) // 2])
        elif kind == "random":
            bad.write_bytes(random.Random(1).randbytes(4096))
        elif kind == "other_arch":
            ck = load_checkpoint(good)
            ck["args"]["arch"] = ck["arch"] = "c1"
            torch.save(ck, bad)
        elif kind == "other_classes":  # weights of a 100-class model under a 10-class description
            ck = load_checkpoint(good)
            ck["state_dict"]["fc.weight"] = torch.zeros(100, ck["state_dict"]["fc.weight"].shape[1])
            ck["state_dict"]["fc.bias"] = torch.zeros(100)
            torch.save(ck, bad)
        else:
            torch.save(load_checkpoint(good)["state_dict"], bad)
    capsys.readouterr()
    code = _cli.run(train.main, train.parse_args, [*base, "--epochs", "2", "--save", str(tmp_path / "n.pkl"),
                                                   "--resume", str(bad)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "bad.pkl" in err or kind == "other_arch", err
    if kind == "other_arch":
        assert "c1" in err  # the model of another architecture does not fit: the mismatch is named
    if kind == "other_classes":
        assert "fc.weight is [100, 64] in the checkpoint, [10, 64] in the model" in err


# train.py as a user runs it, with every checkpoint write after the first held open (a marker printed,
# then a long sleep) after the temporary file is written and before the rename. SIGINT's default handler
# is set explicitly: a shell's background job (as in some CI runners) may start with SIGINT ignored.
INTERRUPTIBLE = r"""
import runpy, signal, sys, time, torch
signal.signal(signal.SIGINT, signal.default_int_handler)
real, hold, writes = torch.save, float(sys.argv[1]), []
def slow_save(obj, f, *a, **k):
    real(obj, f, *a, **k)
    writes.append(1)
    print("SAVING", flush=True)
    if len(writes) > 1:
        time.sleep(hold)
torch.save = slow_save
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_inside_a_checkpoint_write_exits_130_and_keeps_the_last_epoch(tmp_path):
    save = tmp_path / "c.pkl"
    argv = [*TINY, "--arch", "c1", "--method", "sgd", "--large-ratio", "1", "--epochs", "2", "--out-dir",
            str(tmp_path), "--save", str(save)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTIBLE, "120", *argv],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # the first write is let through (epoch 1 committed); interrupt the second inside its hold
        saves, lines = 0, []
        while saves < 2:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            saves += line.strip() == "SAVING"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert f"train.py: {_cli.INTERRUPTED}" in output and "Traceback" not in output
    # the epoch-2 write (the last) never replaced epoch 1's checkpoint, left no temporary file, and the
    # log holds what the checkpoint holds (a resume from it is tested above, after SIGKILLs)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    ck = load_checkpoint(save)
    assert ck["epoch"] == 1 and [r["epoch"] for r in ck["history"]] == [1]
    with open(tmp_path / "train_log.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1]
