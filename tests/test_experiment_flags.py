"""experiments/ refuse bad flags before any work, in one line, exit 2, like the three scripts (issue 21).

Measured before: ``--max-epochs 0``, ``--small-batch 0``, ``--lr -1``, ``--num-train 0``,
``--track-samples 0`` and an unwritable ``--out-dir`` gave tracebacks (exit 1), ``--eig-tol 0`` failed
after the first model had trained, ``--threads -3`` and duplicate seeds were accepted; the same held for
absa_vs_baseline.py. Each case runs through the scripts' entry (``common.run``) on settings small enough
that a case the script accepted would train quickly.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from hessianflow.cli import common as _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHARP = ["--name", "synthetic", "--arch", "c1", "--num-train", "32", "--small-batch", "16", "--large-batch", "32",
         "--max-epochs", "1", "--seeds", "0", "--track-samples", "16", "--eval-batch", "32",
         "--device", "cpu"]  # fmt: skip
ABSA = ["--name", "synthetic", "--synthetic-train", "32", "--synthetic-test", "16", "--arch", "c1", "--epochs", "1",
        "--batch-size", "16", "--large-ratio", "2", "--hessian-batch-size", "16", "--eval-batch", "16",
        "--device", "cpu"]  # fmt: skip

CASES = {
    "large_batch_sharpness": [
        (["--max-epochs", "0"], "--max-epochs"),
        (["--small-batch", "0"], "--small-batch"),
        (["--large-batch", "0"], "--large-batch"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--num-train", "0"], "--num-train"),
        (["--track-samples", "0"], "--track-samples"),
        (["--eig-tol", "0"], "--eig-tol"),
        (["--threads", "-3"], "--threads"),
        (["--seeds", "0", "1", "0"], "--seeds"),
        (["--eval-batch", "0"], "--eval-batch"),
        (["--momentum", "-0.5"], "--momentum"),
        (["--lr-cap", "0"], "--lr-cap"),
        (["--large-batch", "8"], "--large-batch 8 must exceed --small-batch 16"),
        (["--arch", "ResNet", "--depth", "9"], "6n+2"),
        (["--device", "tpu"], "--device"),
    ],
    "absa_vs_baseline": [
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--large-ratio", "0"], "--large-ratio"),
        (["--lr", "-1"], "--lr"),
        (["--duration", "0"], "--duration"),
        (["--hessian-batch-size", "0"], "--hessian-batch-size"),
        (["--eval-batch", "0"], "--eval-batch"),
        (["--final-eig-tol", "0"], "--final-eig-tol"),
        (["--final-num-batches", "0"], "--final-num-batches"),
        (["--target-acc", "1.5"], "--target-acc"),
        (["--adv-ratio", "-0.1"], "--adv-ratio"),
        (["--threads", "-3"], "--threads"),
        (["--epochs", "9", "--lr-decay-epoch", "5", "3"], "--lr-decay-epoch 5 3: must increase"),
        (["--epochs", "4", "--lr-decay-epoch", "7"], "--lr-decay-epoch"),
        (["--arch", "ResNet", "--depth", "9"], "6n+2"),
        (["--device", "tpu"], "--device"),
    ],
}


def run_experiment(module, argv, capsys):
    try:
        code = _cli.run(module.main, module.parse_args, argv)
    except SystemExit as exc:  # an argparse error outside run's reach
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "name, flags, message", [(name, f, m) for name, cases in CASES.items() for f, m in cases], ids=str
)
def test_bad_flags_are_one_line_before_any_work(name, flags, message, tmp_path, capsys):
    module = load(name)
    base = SHARP if name == "large_batch_sharpness" else ABSA
    out_dir = tmp_path / "out"
    code, out, err = run_experiment(module, [*base, *flags, "--out-dir", str(out_dir)], capsys)
    line = one_line(err)
    assert code == 2 and "error:" in line and message in line, (code, line)
    assert out == "" and not out_dir.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_unwritable_out_dir_is_one_line_before_any_work(name, tmp_path, capsys):
    module = load(name)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    base = SHARP if name == "large_batch_sharpness" else ABSA
    code, out, err = run_experiment(module, [*base, "--out-dir", str(blocker / "sub")], capsys)
    line = one_line(err)
    assert code == 2 and str(blocker) in line, line
    assert out == ""
