"""The eigenvalue history's files (hessianflow.io.history): the format, and what a failed write does.

A tracker's CSV or a figure that cannot be written mid-run is an I/O failure: the library raises
``OSError`` and keeps the previous file; the scripts exit with status 4 (not 2, a user mistake).
"""

import errno
import json
import os

import pytest

import hessianflow
from hessianflow import plotting as plotting_mod
from hessianflow.cli import common as _cli
from hessianflow.cli import train
from hessianflow.io import history as history_mod
from hessianflow.io.checkpoint import atomic_write as real_atomic_write
from hessianflow.training import tracking

T = ["--name", "synthetic", "--synthetic-train", "128", "--synthetic-test", "64", "--arch", "c1", "--batch-size", "32",
     "--hessian-batch-size", "32", "--eig-max-iter", "3", "--no-progress", "--device", "cpu"]  # fmt: skip


def test_load_history_is_one_function_under_its_old_names():
    # (the top level no longer exports it: issue 19 keeps 40 names there)
    assert tracking.load_history is history_mod.load_history
    assert not hasattr(hessianflow, "load_history")


def test_round_trip_keeps_every_value(tmp_path):
    records = [
        {"epoch": 1, "eigenvalue": 0.1 + 0.2, "top_k": [0.30000000000000004, -1e-300], "converged": True,
         "lr": 0.1, "note": "nan", "big": 2**70},
        {"epoch": 2, "eigenvalue": None, "top_k": [], "converged": False, "lr": 5e-324},
    ]  # fmt: skip
    csv_path = history_mod.write_csv(records, tmp_path / "h.csv")
    json_path = history_mod.write_json(records, tmp_path / "h.json", config={"method": "power"})
    from_csv, from_json = history_mod.load_history(csv_path), history_mod.load_history(json_path)
    assert from_json == records
    for rec, back in zip(records, from_csv):
        assert {k: back[k] for k in rec} == rec
        assert [k for k in back][: len(history_mod.FIELDS)] == list(history_mod.FIELDS)
    with open(json_path) as fh:
        assert json.load(fh)["version"] == history_mod.VERSION


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        history_mod.plain_value("loss", float("nan"))
    assert history_mod.plain_value("x", (1, 2.5, None)) == [1, 2.5, None]


def _failing(target_suffix, fail_on, calls):
    """An atomic_write whose ``fail_on``-th write of a file ending in ``target_suffix`` hits a full disk
    half-way (after some bytes are in the temporary file)."""

    def atomic_write(path, write, what="file", **kw):
        if os.fspath(path).endswith(target_suffix):
            calls.append(path)
            if len(calls) == fail_on:

                def full(fh):
                    fh.write(b"partial")
                    raise OSError(errno.ENOSPC, "No space left on device")

                return real_atomic_write(path, full, what, **kw)
        return real_atomic_write(path, write, what, **kw)

    return atomic_write


def test_failed_csv_write_raises_oserror_and_keeps_the_previous_file(tmp_path, monkeypatch):
    tracker = hessianflow.EigenTracker(out_dir=tmp_path)
    tracker.record(1, 2.0)
    before = (tmp_path / "eigen_history.csv").read_bytes()
    monkeypatch.setattr(history_mod, "atomic_write", _failing(".csv", 1, []))
    with pytest.raises(OSError, match="no space left on device"):
        tracker.record(2, 1.0)
    assert (tmp_path / "eigen_history.csv").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["eigen_history.csv", "eigen_history.json"]  # no temporary file


def test_tracker_csv_failing_mid_run_exits_4(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(history_mod, "atomic_write", _failing("eigen_history.csv", 2, calls))
    argv = [*T, "--epochs", "2", "--track-eigen", "--out-dir", str(tmp_path), "--save", str(tmp_path / "c.pkl")]
    code = _cli.run(train.main, train.parse_args, argv)
    err = capsys.readouterr().err
    assert code == _cli.EXIT_IO == 4, err
    assert "I/O error" in err and "no space left on device" in err and "Traceback" not in err
    assert len(calls) == 2
    assert [r["epoch"] for r in history_mod.load_history(tmp_path / "eigen_history.csv")] == [1]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_figure_failing_mid_run_exits_4(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    calls = []
    monkeypatch.setattr(plotting_mod, "atomic_write", _failing(".png", 1, calls))
    argv = [*T, "--epochs", "1", "--track-eigen", "--out-dir", str(tmp_path), "--save", str(tmp_path / "c.pkl")]
    code = _cli.run(train.main, train.parse_args, argv)
    err = capsys.readouterr().err
    assert code == 4, err
    assert "I/O error" in err and "cannot save figure" in err and "Traceback" not in err
    assert calls and not os.path.exists(tmp_path / "eigen_history.png")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("target, module", [("train_log.jsonl", "train"), ("metrics.json", "checkpoint")])
def test_other_mid_run_writes_failing_exit_4(tmp_path, monkeypatch, capsys, target, module):
    """The epoch log and metrics.json are written mid-run too: an I/O failure (4), not a user mistake (2)."""
    from hessianflow.io import checkpoint as ckpt_mod

    calls = []
    monkeypatch.setattr(train if module == "train" else ckpt_mod, "atomic_write", _failing(target, 1, calls))
    argv = [*T, "--epochs", "1", "--out-dir", str(tmp_path), "--save", str(tmp_path / "c.pkl")]
    code = _cli.run(train.main, train.parse_args, argv)
    err = capsys.readouterr().err
    assert code == 4, err
    assert calls and "I/O error" in err and "no space left on device" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / target)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
