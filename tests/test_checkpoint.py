"""Checkpoints: atomic writes, weights_only loads that refuse code, legacy state_dicts, RNG states."""

import builtins
import os
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from hessianflow.io.checkpoint import (
    CheckpointError,
    check_writable_dir,
    extract_state_dict,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    versions,
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def _same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_round_trip(tmp_path):
    net = _net()
    obj = {
        "state_dict": net.state_dict(),
        "epoch": 7,
        "args": {"arch": "c1", "lr": 0.1, "milestones": [30, 60], "resume": None, "flag": True},
        "versions": versions(),
        "tensor": torch.arange(5, dtype=torch.float64),
    }
    path = tmp_path / "ckpt.pt"
    written = save_checkpoint(obj, path)
    assert written == str(path.resolve())
    back = load_checkpoint(path)
    assert back["epoch"] == 7 and back["args"] == obj["args"] and back["versions"] == obj["versions"]
    _same_state(back["state_dict"], obj["state_dict"])
    torch.testing.assert_close(back["tensor"], obj["tensor"], rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    # The permissions are those of a plain open() (mkstemp's 0600 would hide it from other users).
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_versions_are_plain_and_correct():
    import hessianflow

    v = versions()
    assert v["torch"] == torch.__version__ and v["numpy"] == np.__version__
    assert v["hessianflow"] == hessianflow.__version__
    assert all(x is None or type(x) is str for x in v.values())  # not TorchVersion: weights_only


def test_failed_write_leaves_old_file_intact_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # write real bytes first: the failure is mid-file
        f.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt.*No space left on device"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_interrupt_during_write_cleans_up_and_propagates(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"

    def interrupted(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    assert os.listdir(tmp_path) == []


def test_unwritable_targets(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint({"a": 1}, tmp_path / "missing" / "ckpt.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint({"a": 1}, tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        check_writable_dir(blocker)
    with pytest.raises(CheckpointError, match=str(blocker)):
        check_writable_dir(blocker / "sub")
    made = check_writable_dir(tmp_path / "a" / "b")
    assert made == str((tmp_path / "a" / "b").resolve()) and os.listdir(made) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="ro"):
            check_writable_dir(ro)
        with pytest.raises(CheckpointError):
            save_checkpoint({"a": 1}, ro / "ckpt.pt")
    finally:
        ro.chmod(0o700)


def test_permission_denied_is_reported_even_when_running_as_root(tmp_path, monkeypatch):
    import hessianflow.io.checkpoint as ck

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ck.tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoints to .*Permission denied"):
        check_writable_dir(tmp_path, what="checkpoints")
    with pytest.raises(CheckpointError, match=r"cannot write figures to .*Permission denied"):
        check_writable_dir(tmp_path, what="figures")  # the driver's figure directory is not for checkpoints
    with pytest.raises(CheckpointError, match=r"ckpt\.pt.*Permission denied"):
        save_checkpoint({"a": 1}, tmp_path / "ckpt.pt")
    assert os.listdir(tmp_path) == []


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", [_SystemPayload, _ExecPayload])
def test_code_payload_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": payload(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert (
        "refusing to load: the file contains Python objects that would run code when unpickled "
        "(only tensors and plain containers are allowed)" in msg
    )
    assert not marker.exists()
    # The payload is live: an unrestricted load would have run it (so the check above has teeth).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_damaged_files_raise_one_line_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "truncated_head.pt": data[:50],
        "random.pt": np.random.default_rng(0).bytes(4096),
        "empty.pt": b"",
        "text.pt": b"hello, I am not a checkpoint\n",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    for name in [*cases, "missing.pt"]:
        p = tmp_path / name
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(p)
        msg = str(info.value)
        assert str(p) in msg and "\n" not in msg, msg
        if name == "missing.pt":
            assert "no such file" in msg
        else:
            assert "truncated" in msg or "corrupt" in msg, msg
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_extract_state_dict_from_every_layout(tmp_path):
    net = _net()
    sd = net.state_dict()
    wrapped = nn.DataParallel(net).state_dict()
    assert all(k.startswith("module.") for k in wrapped)
    double = OrderedDict(("module." + k, v) for k, v in wrapped.items())
    layouts = {
        "bare": sd,
        "bare_module": wrapped,
        "bare_module_module": double,
        "full": {"state_dict": wrapped, "epoch": 3, "arch": "c1"},
        "model_key": {"model": sd, "optimizer": {"state": {}, "param_groups": []}},
    }
    for name, obj in layouts.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)  # written like a legacy file, not through save_checkpoint
        out = extract_state_dict(load_checkpoint(path))
        _same_state(out, sd)
        fresh = _net()
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        fresh.load_state_dict(out, strict=True)
        _same_state(fresh.state_dict(), sd)
    # only a prefix shared by every key is stripped
    mixed = OrderedDict([("module.a", torch.ones(1)), ("b", torch.ones(1))])
    assert list(extract_state_dict(mixed)) == ["module.a", "b"]
    for bad in ({"epoch": 3, "model": "c1"}, {}, [1, 2]):
        with pytest.raises(CheckpointError):
            extract_state_dict(bad)


def _draw():
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state ...
    np.random.standard_normal()  # ... and in NumPy's
    state = rng_state()
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    expected = _draw()
    _draw()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == expected
    assert _draw() != expected  # the generators do advance, so the equality above is not trivial


def test_set_rng_state_rejects_garbage():
    with pytest.raises(ValueError):
        set_rng_state({"python": [1, 2, 3]})


def test_remove_stale_temporaries_only_touches_this_checkpoints_leftovers(tmp_path):
    from hessianflow.io.checkpoint import remove_stale_temporaries

    for name in (".c.pkl.abc123.tmp", ".c.pkl.zz.tmp", ".other.pkl.abc.tmp", "c.pkl", ".c.pkl.keep"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path / "c.pkl")
    assert sorted(os.path.basename(p) for p in removed) == [".c.pkl.abc123.tmp", ".c.pkl.zz.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".c.pkl.keep", ".other.pkl.abc.tmp", "c.pkl"]
