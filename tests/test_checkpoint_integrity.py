"""Checkpoints that load but would mislead (issue 21, "Bad input gets one clear sentence").

- A flipped byte among the weights: torch's archive loads it without complaint (measured below: the
  value changes, ``torch.load`` succeeds), so the checkpoint carries a SHA-256 of its state_dict's
  tensors and every reader verifies it: the driver and ``--resume`` exit 2 with one line naming the file.
  A checkpoint written before the checksum existed still loads, with a note.
- A description that cannot be right (an unknown data set, a negative input size, ``args`` that are not
  a mapping) is refused in one line before any work, by the driver and by ``--resume`` (which left the
  file rewritten and printed "done" before).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from hessianflow.cli import common as _cli
from hessianflow.cli import eig as drv
from hessianflow.cli import train
from hessianflow.curvature import HessianOperator
from hessianflow.io import checkpoint_format as cf
from hessianflow.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hessianflow.linalg.eigen import lanczos
from hessianflow.training.data import fixed_batch, get_datasets
from hessianflow.training.models import get_model

SYN = {"name": "synthetic", "seed": 3, "synthetic_train": 64, "synthetic_test": 32}
BATCH = 16


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_script(module, argv, capsys):
    code = _cli.run(module.main, module.parse_args, argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def drive(path, capsys, *extra):
    return run_script(drv, ["--resume", str(path), "--hessian-batch-size", str(BATCH), "--top-k", "1",
                            "--no-progress", "--device", "cpu", *extra], capsys)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_model("c1")


@pytest.fixture(scope="module")
def good(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "c.pkl"
    save_checkpoint(cf.make_checkpoint(model, dataset="synthetic", epoch=1, args=dict(SYN)), path)
    return path


def flip_weight_byte(src, dst, key="fc3.weight", index=7):
    """Copy ``src`` to ``dst`` with one exponent bit of ``state_dict[key][index]`` (float32) flipped in the
    file's bytes; returns (old value, new value)."""
    raw = bytearray(src.read_bytes())
    weights = load_checkpoint(src)["state_dict"][key]
    start = raw.find(weights.numpy().tobytes())
    assert start > 0 and raw.find(weights.numpy().tobytes(), start + 1) < 0  # found, once
    at = start + 4 * index
    old = struct.unpack("<f", raw[at : at + 4])[0]
    raw[at + 3] ^= 0x02  # exponent bit 2 (little-endian: the high byte is the last): x16 or /16
    new = struct.unpack("<f", raw[at : at + 4])[0]
    dst.write_bytes(bytes(raw))
    return old, new


def test_state_checksum_depends_on_every_byte_name_and_order(model):
    state = model.state_dict()
    digest = cf.state_checksum(state)
    assert len(digest) == 64 and digest == cf.state_checksum({k: v.clone() for k, v in state.items()})
    bumped = {k: v.clone() for k, v in state.items()}
    bumped["fc3.weight"].view(-1)[5] = torch.nextafter(bumped["fc3.weight"].view(-1)[5], torch.tensor(1.0))
    assert cf.state_checksum(bumped) != digest  # one ulp of one weight
    assert cf.state_checksum(dict(reversed(list(state.items())))) != digest
    renamed = {("x" + k if k == "fc3.bias" else k): v for k, v in state.items()}
    assert cf.state_checksum(renamed) != digest
    as_double = {k: (v.double() if k == "fc3.bias" else v) for k, v in state.items()}
    assert cf.state_checksum(as_double) != digest  # the same numbers in another dtype
    assert cf.make_checkpoint(model, dataset="synthetic", epoch=1)["state_dict_sha256"] == digest


def test_a_flipped_weight_byte_loads_in_torch_and_is_refused_here(good, tmp_path):
    bad = tmp_path / "flipped.pkl"
    old, new = flip_weight_byte(good, bad)
    assert abs(new) == pytest.approx(16 * abs(old), rel=1e-6) or abs(new) == pytest.approx(abs(old) / 16, rel=1e-6)
    # torch itself notices nothing: the file loads, with the changed weight
    assert load_checkpoint(bad)["state_dict"]["fc3.weight"].view(-1)[7].item() == new
    with pytest.raises(CheckpointError) as info:
        cf.load_model(bad)
    msg = str(info.value)
    assert str(bad) in msg and "checksum" in msg and "\n" not in msg, msg
    model, spec, _ = cf.load_model(good)  # the intact file loads
    assert spec.describe() == "c1"


@pytest.mark.slow
def test_the_driver_refuses_a_flipped_byte_in_one_line(good, model, tmp_path, capsys):
    # the intact file: exit 0, and the eigenvalue in the JSON is the model's
    jpath = tmp_path / "good.json"
    code, _, err = drive(good, capsys, "--json", str(jpath))
    assert code == 0, err
    _, plain, _ = get_datasets("synthetic", augment=False, seed=SYN["seed"], num_train=64, num_test=32)
    x, y = fixed_batch(plain, BATCH, seed=1)  # the driver's default --seed 1
    ref = lanczos(HessianOperator(model.eval(), nn.CrossEntropyLoss(), data=(x, y)), k=1, tol=1e-4, seed=5)
    got = json.loads(jpath.read_text())["eigen"]
    # Weyl: each Ritz value lies within its residual of an eigenvalue (float32 products add ~1e-5)
    lam, res = ref.eigenvalues[0].item(), ref.residuals[0].item()
    assert abs(got["eigenvalues"][0] - lam) <= got["residuals"][0] + res + 1e-5 * lam, (got, lam, res)
    # the flipped file: one line naming it, exit 2, no JSON
    bad = tmp_path / "flipped.pkl"
    flip_weight_byte(good, bad)
    code, out, err = drive(bad, capsys, "--json", str(tmp_path / "bad.json"))
    line = one_line(err)
    assert code == 2 and str(bad) in line and "checksum" in line, line
    assert "eigenvalue" not in out and not (tmp_path / "bad.json").exists()


def test_a_checkpoint_without_checksum_loads_with_a_note(good, tmp_path, capsys):
    ckpt = load_checkpoint(good)
    del ckpt["state_dict_sha256"]
    old = tmp_path / "old.pkl"
    save_checkpoint(ckpt, old)
    notes = []
    model, _, _ = cf.load_model(old, log=notes.append)
    assert len(notes) == 1 and "no checksum" in notes[0] and str(old) in notes[0], notes
    reference, _, _ = cf.load_model(good)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    code, out, err = drive(old, capsys)
    assert code == 0, err
    assert "no checksum" in out


def test_a_checksum_that_is_not_a_digest_is_refused(good, tmp_path):
    ckpt = load_checkpoint(good)
    ckpt["state_dict_sha256"] = 12
    path = tmp_path / "odd.pkl"
    save_checkpoint(ckpt, path)
    with pytest.raises(CheckpointError, match="'state_dict_sha256'"):
        cf.read_checkpoint(path)


# -- descriptions that cannot be right ------------------------------------------------------------------------

BAD_FIELDS = {
    "unknown data set": ({"dataset": "imagenet", "args": {**SYN, "name": "imagenet"}}, "'dataset' is not a known"),
    "negative input size": ({"input_size": -4}, "'input_size'"),
    "args None": ({"args": None}, "'args' should be a Mapping"),
    "args name differs": ({"args": {**SYN, "name": "cifar10"}}, "'args' name 'cifar10' contradicts"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_the_driver_refuses_an_impossible_description(good, case, tmp_path, capsys):
    over, expected = BAD_FIELDS[case]
    path = tmp_path / "bad.pkl"
    save_checkpoint({**load_checkpoint(good), **over}, path)
    code, out, err = drive(path, capsys)
    line = one_line(err)
    assert code == 2 and str(path) in line and expected in line, line
    assert "eigenvalue" not in out


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A finished 1-epoch train.py run."""
    d = tmp_path_factory.mktemp("resumable")
    argv = ["--name", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32", "--arch", "c1",
            "--batch-size", "32", "--hessian-batch-size", "16", "--eig-max-iter", "2", "--no-progress",
            "--device", "cpu", "--epochs", "1", "--out-dir", str(d), "--save", str(d / "c.pkl")]  # fmt: skip
    assert _cli.run(train.main, train.parse_args, argv) == 0
    return d / "c.pkl"


@pytest.mark.parametrize("case", ["unknown data set", "args None", "flipped byte"])
def test_resume_refuses_before_any_work_and_leaves_the_file(resumable, case, tmp_path, capsys):
    path = tmp_path / "bad.pkl"
    if case == "flipped byte":
        flip_weight_byte(resumable, path, key="fc1.weight", index=3)
        expected = "checksum"
    else:
        over, expected = BAD_FIELDS[case]
        save_checkpoint({**load_checkpoint(resumable), **over}, path)
    before = path.read_bytes()
    code, out, err = run_script(train, ["--resume", str(path), "--no-progress", "--device", "cpu"], capsys)
    line = one_line(err)
    assert code == 2 and str(path) in line and expected in line, line
    assert "done" not in out and path.read_bytes() == before
