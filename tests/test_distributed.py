"""torch.distributed: the helpers, and real two-process gloo runs on the loopback interface.

The two-process tests start ``tests/dist_worker.py`` under ``python -m torch.distributed.run`` with a
short collective timeout and a subprocess timeout, so a failing or stalled rank fails the test instead
of hanging the suite. References: the one-process operator over the union of the shards, the dense
float64 Hessian from ``torch.func.hessian`` and its ``eigvalsh``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time

try:
    import dist_worker as worker
    from dense_reference import func_hessian
except ImportError:  # pragma: no cover - pytest's importlib mode
    from tests import dist_worker as worker
    from tests.dense_reference import func_hessian
import pytest
import torch
from torch import nn

from hessianflow import distributed as hd
from hessianflow.curvature import HessianOperator
from hessianflow.distributed import (
    DistContext,
    all_reduce_sum,
    assert_same_on_all_ranks,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    launched_by_torchrun,
    shard,
)
from hessianflow.linalg.linop import NonFiniteError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", hd.TIMEOUT_ENV)


# -- helpers, in this process ------------------------------------------------------------------------


def test_shards_partition_the_range_in_order():
    for world in range(1, 6):
        for n in range(0, 23):
            parts = [shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            # the first n % world ranks hold one more sample
            assert sizes == [n // world + (1 if r < n % world else 0) for r in range(world)]
    assert shard(37, 0, 2) == slice(0, 19) and shard(37, 1, 2) == slice(19, 37)
    assert shard(1, 1, 2) == slice(1, 1)  # an empty shard
    for bad in [(5, 2, 2), (5, -1, 2), (5, 0, 0), (-1, 0, 1), (5.0, 0, 1), (True, 0, 1)]:
        with pytest.raises(ValueError):
            shard(*bad)


def test_single_process_context_without_torchrun(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not launched_by_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: one process, no group
    assert not launched_by_torchrun()
    was = torch.distributed.is_initialized()
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled, ctx.initialized_here) == (0, 1, True, False, False)
    assert ctx.device == torch.device("cpu") and torch.distributed.is_initialized() == was
    ctx.barrier()
    ctx.close()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            init_distributed("cuda")


def test_torchrun_environment_gives_gloo_with_the_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(hd.TIMEOUT_ENV, "7.5")
    ctx = init_distributed("cpu")
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=7.5)}]
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.enabled) == (1, 3, 1, False, True)
    assert ctx.initialized_here
    init_distributed("cpu", timeout_s=2)  # an explicit timeout beats the environment
    assert calls[-1]["timeout"] == datetime.timedelta(seconds=2)
    monkeypatch.delenv(hd.TIMEOUT_ENV)
    init_distributed("cpu")
    assert calls[-1]["timeout"] == datetime.timedelta(seconds=hd.DEFAULT_TIMEOUT_S)
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv(hd.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="seconds"):
            init_distributed("cpu")
    assert len(calls) == 3


def test_helpers_are_the_identity_without_a_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    t = torch.arange(3.0)
    assert all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    assert broadcast_object({"a": 1}) == {"a": 1}
    bn = nn.BatchNorm1d(2)
    assert broadcast_buffers(bn) == 0
    assert_same_on_all_ranks([1.0, None])  # nothing to compare with
    assert DistContext().is_main and not DistContext().enabled
    model, X, y = worker.problem()
    assert not HessianOperator(model, nn.CrossEntropyLoss(), dataloader=worker._loader(X, y)).distributed
    with pytest.raises(ValueError, match="process group"):
        HessianOperator(model, nn.CrossEntropyLoss(), dataloader=worker._loader(X, y), distributed=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_group_reduction_path(tmp_path):
    """``distributed=True`` in a real one-rank gloo group: the status + payload all-reduces in process."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    try:
        model, X, y = worker.problem()
        ce = nn.CrossEntropyLoss()
        loader = worker._loader(X, y)
        plain = HessianOperator(model, ce, dataloader=loader)
        assert not plain.distributed  # one rank: nothing to reduce, so off unless asked for
        H = HessianOperator(model, ce, dataloader=loader, distributed=True)
        v, V = worker.vectors(H.size)
        torch.testing.assert_close(H @ v, plain @ v, rtol=1e-14, atol=1e-16)
        torch.testing.assert_close(H @ V, plain @ V, rtol=1e-14, atol=1e-16)
        assert H.num_samples == worker.N
        bad = X.clone()
        bad[7, 1] = float("nan")
        with pytest.raises(NonFiniteError, match="not finite"):
            HessianOperator(model, ce, dataloader=worker._loader(bad, y), distributed=True) @ v
        empty = worker._loader(X[:0], y[:0])
        with pytest.raises(ValueError, match="no samples"):
            HessianOperator(model, ce, dataloader=empty, distributed=True) @ v
        # the group survived both errors
        torch.testing.assert_close(H @ v, plain @ v, rtol=1e-14, atol=1e-16)
    finally:
        torch.distributed.destroy_process_group()


# -- two processes ------------------------------------------------------------------------------------


def torchrun(*args, nproc=2, timeout=240, env=None, script=WORKER):
    """Run the worker (or ``script``) under torchrun on the loopback interface; returns (CompletedProcess,
    seconds)."""
    full_env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    full_env.update(
        {
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": ROOT + os.pathsep + full_env.get("PYTHONPATH", ""),
            hd.TIMEOUT_ENV: "60",
        }
    )
    full_env.update(env or {})
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script, *map(str, args),
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _check_ok(proc):
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _assert_identical(a, b, where="results"):
    """Bit-identical values on two ranks (tensors, numbers, strings, nested dicts and tuples)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs across ranks"
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, z) in enumerate(zip(a, b)):
            _assert_identical(x, z, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def ops_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ops")
    proc, _ = torchrun("ops", out)
    _check_ok(proc)
    ranks = [torch.load(out / f"ops_rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, worker.operator_results(0, 1)


@pytest.mark.slow
def test_two_ranks_give_the_full_data_set_product_on_every_rank(ops_runs):
    (r0, r1), one = ops_runs
    # everything, the DDP and fault sections included, bit for bit
    # (but the shards themselves, and the NaN error: the rank with the NaN names its own)
    mask = {"shard_size": None, "fault": {**r0["fault"], "nan_error": None}}
    _assert_identical({**r0, **mask}, {**r1, **mask, "fault": {**r1["fault"], "nan_error": None}})
    assert (r0["shard_size"], r1["shard_size"], one["shard_size"]) == (19, 18, 37)  # unequal shards
    assert r0["num_samples"] == one["num_samples"] == 37
    model, X, y = worker.problem()
    ce = nn.CrossEntropyLoss()
    dense = func_hessian(model, ce, X, y)
    v, V = worker.vectors(dense.shape[0])
    # the distributed product is the one-process full-data-set product (float64: rounding only)
    torch.testing.assert_close(r0["Hv"], dense @ v, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(r0["HV"], dense @ V, rtol=1e-10, atol=1e-13)
    for key in ("Hv", "HV", "ggn_v", "sum_v"):
        torch.testing.assert_close(r0[key], one[key], rtol=1e-6, atol=0)
        torch.testing.assert_close(r0[key], one[key], rtol=1e-12, atol=1e-15)
    dense_sum = func_hessian(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    torch.testing.assert_close(r0["sum_v"], dense_sum @ v, rtol=1e-10, atol=1e-12)
    # the tolerances can tell a size-weighted mean of the batch products (10, 9 | 10, 8 samples) from an
    # unweighted one
    starts = [0, 10, 19, 29, 37]
    unweighted = sum(func_hessian(model, ce, X[a:b], y[a:b]) @ v for a, b in zip(starts, starts[1:])) / 4
    assert (unweighted - dense @ v).norm() > 1e-4 * (dense @ v).norm()
    # a one-batch list sharded over the ranks (train.py's Hessian batch), and an empty shard
    torch.testing.assert_close(r0["one_batch_v"], func_hessian(model, ce, X[:12], y[:12]) @ v, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(r0["tiny_v"], func_hessian(model, ce, X[:1], y[:1]) @ v, rtol=1e-10, atol=1e-13)
    # the gradient is all-reduced the same way: the whole data set's, an empty shard included
    for key, n in (("gradient", 37), ("tiny_gradient", 1)):
        loss = nn.CrossEntropyLoss()(model(X[:n]), y[:n])
        ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
        torch.testing.assert_close(r0[key], ref, rtol=1e-10, atol=1e-14)
    dense_top = torch.linalg.eigvalsh(dense)[-1]
    torch.testing.assert_close(r0["lanczos_gradient_start"][0], dense_top, rtol=1e-10, atol=0)


@pytest.mark.slow
def test_two_ranks_run_every_algorithm_like_one_process(ops_runs):
    (r0, r1), one = ops_runs
    model, X, y = worker.problem()
    exact = torch.linalg.eigvalsh(func_hessian(model, nn.CrossEntropyLoss(), X, y))
    # Lanczos top-3: the same on both ranks (checked bitwise above), as one process, and as eigvalsh
    torch.testing.assert_close(r0["lanczos"], one["lanczos"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r0["lanczos"], exact.flip(0)[:3], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r0["power"], one["power"], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(r0["slq_nodes"], one["slq_nodes"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(r0["slq_weights"], one["slq_weights"], rtol=1e-9, atol=1e-11)
    # data-dependent stopping (rtol=) and method choice take the same branches as in one process
    assert r0["hutchinson_matvecs"] == one["hutchinson_matvecs"] == 24
    assert r0["hutchinson"] == pytest.approx(one["hutchinson"], rel=1e-12)
    assert r0["trace_auto_method"] == one["trace_auto_method"]
    assert r0["trace_auto"] == pytest.approx(one["trace_auto"], rel=1e-12)
    assert r0["trace_auto"] == pytest.approx(float(exact.sum()), rel=0.2)


@pytest.mark.slow
def test_hvps_through_ddp_leave_training_intact(ops_runs):
    (r0, _), _ = ops_runs
    ref = worker.ddp_reference()
    ddp = r0["ddp"]
    assert ddp["no_grad_after_hvp0"] and ddp["no_grad_after_hvp1"]  # DDP's gradient hooks never fired
    for step in range(2):  # the HVP of the new weights after each DDP step (with a no_sync micro-step)
        torch.testing.assert_close(ddp[f"hv{step}"], ref[f"hv{step}"], rtol=1e-12, atol=1e-14)
    # two DDP steps = two full-batch steps of one process: DDP's all-reduce was intact after each HVP
    torch.testing.assert_close(ddp["params"], ref["params"], rtol=1e-12, atol=1e-14)
    model, _, _ = worker.problem()
    init = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (ddp["params"] - init).abs().max() > 1e-3


@pytest.mark.slow
def test_a_failure_on_one_rank_raises_on_every_rank(ops_runs):
    (r0, r1), one = ops_runs
    f0, f1 = r0["fault"], r1["fault"]
    # the rank with the NaN raises its own error; the other one is told instead of waiting for ever
    assert f1["nan_error"][0] == "NonFiniteError" and "not finite" in f1["nan_error"][1]
    assert f0["nan_error"][0] == "NonFiniteError" and "other rank" in f0["nan_error"][1]
    torch.testing.assert_close(f0["after_error_v"], one["Hv"], rtol=1e-12, atol=1e-15)
    # one rank without a batched product: both fall back to single products, together
    assert f0["fallback_batched_ok"] is False and f1["fallback_batched_ok"] is False
    torch.testing.assert_close(f0["fallback_HV"], one["HV"], rtol=1e-12, atol=1e-15)
    assert f0["buffers_sent"] == 3 and torch.equal(f1["bn_mean"], torch.ones(3))
    assert f0["disagree_error"] == f1["disagree_error"]
    assert "rank 0: [0.5, 0.0]; rank 1: [0.5, 1.0]" in f0["disagree_error"]


TRAIN_FLAGS = [
    "--name", "synthetic", "--synthetic-train", "128", "--synthetic-test", "32", "--arch", "ResNet", "--depth", "8",
    "--epochs", "3", "--duration", "1", "--large-ratio", "8", "--hessian-batch-size", "32", "--no-progress",
    "--device", "cpu",
]  # fmt: skip


def _read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_absa_on_two_processes_matches_one_process(tmp_path, capsys):
    from hessianflow.cli import train
    from hessianflow.io.checkpoint import load_checkpoint
    from hessianflow.training.data import get_datasets
    from hessianflow.training.models import get_model
    from hessianflow.training.tracking import top_eigenvalue

    two, one = tmp_path / "two", tmp_path / "one"
    # the same per-step effective batch: 32 per process x 2 processes = 64 in one process
    proc, _ = torchrun(
        "train", two, "--", *TRAIN_FLAGS, "--batch-size", "32", "--out-dir", two, "--save", two / "c.pkl"
    )
    _check_ok(proc)
    assert "batch 32 x up to 8 accumulated x 2 process(es) = effective batch up to 512" in proc.stdout
    assert proc.stdout.count("epoch   1/3") == 1  # rank 0 alone prints
    train.main(
        train.parse_args([*TRAIN_FLAGS, "--batch-size", "64", "--out-dir", str(one), "--save", str(one / "c.pkl")])
    )
    log2, log1 = _read_log(two / "train_log.jsonl"), _read_log(one / "train_log.jsonl")

    # every rank took the same decisions from the same (collective) eigenvalues
    m0, m1 = (json.loads((two / f"metrics_rank{r}.json").read_text()) for r in range(2))
    assert m0 == {**m1, "wall_time": m0["wall_time"]}
    assert m0["world_size"] == 2 and m0["eigenvalues"] == [r["eigenvalue"] for r in log2]
    # the same schedule as one process: effective batch, ratio, lr, number of optimizer steps
    for key in ("epoch", "batch_size", "large_ratio", "lr", "updates", "next_batch_size", "adv_ratio"):
        assert [r[key] for r in log2] == [r[key] for r in log1], key
    assert [r["batch_size"] for r in log2] == [64, 128, 256] and [r["updates"] for r in log2] == [2, 3, 4]
    # The two runs' weights are not the same (per-rank BatchNorm batch statistics, a different sample
    # order and augmentation streams): their eigenvalues agree only roughly ...
    for e2, e1 in zip(m0["eigenvalues"], [r["eigenvalue"] for r in log1]):
        assert 1 / 1.5 < e2 / e1 < 1.5
    # ... but the collective eigenvalue is exactly the one-process eigenvalue of the same weights: the
    # 2-process checkpoint, loaded in this process, on the whole (un-sharded) Hessian batch.
    ckpt = load_checkpoint(two / "c.pkl")
    a = ckpt["args"]
    model = get_model(ckpt["arch"], depth=ckpt["depth"], num_classes=ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    _, plain, _ = get_datasets("synthetic", augment=False, seed=a["seed"], num_train=128, num_test=32)
    epoch = ckpt["epoch"] - 1
    x, y = train._hessian_batch(plain, 32, a["seed"] * 7919 + epoch, DistContext())
    res = top_eigenvalue(
        model, nn.CrossEntropyLoss(), data=(x, y), method="power", max_iter=a["eig_max_iter"], tol=a["eig_tol"],
        seed=a["seed"] + epoch,
    )  # fmt: skip
    # float32 products summed in another order: ~1e-7; unsynchronised BatchNorm statistics gave ~1e-2
    assert float(res.eigenvalues[0]) == pytest.approx(log2[-1]["eigenvalue"], rel=1e-4)

    # and one process resumes from it: everything loads (weights, optimizer, controller, RNG), nothing is
    # left to train (a longer --epochs is refused by the ABSA controller's configuration check)
    capsys.readouterr()
    argv = ["--resume", str(two / "c.pkl"), "--out-dir", str(two), "--save", str(two / "c.pkl"), "--no-progress"]
    more = train.main(train.parse_args([*argv, "--device", "cpu"]))
    assert "written by 2 process(es), resumed by 1" in capsys.readouterr().out
    assert more["world_size"] == 1 and more["epochs"] == 3 and more["updates"] == 4
    assert more["eigenvalues"] == m0["eigenvalues"]


@pytest.mark.slow
def test_train_resnet_tracks_the_full_set_eigenvalue_of_one_process(tmp_path):
    from hessianflow.io.checkpoint import load_checkpoint
    from hessianflow.training.data import get_datasets
    from hessianflow.training.models import get_model
    from hessianflow.training.tracking import top_eigenvalue

    # --eig-batches 2 of 24: the first 48 samples, whatever the world size (each rank holds 24 of them)
    flags = [
        "--name", "synthetic", "--synthetic-train", "128", "--synthetic-test", "32", "--depth", "8",
        "--epochs", "1", "--batch-size", "32", "--eigen-type", "full", "--eig-batches", "2",
        "--hessian-batch-size", "24", "--no-progress", "--device", "cpu", "--out-dir", tmp_path,
        "--save", tmp_path / "c.pkl",
    ]  # fmt: skip
    proc, _ = torchrun("train_resnet", tmp_path, "--", *flags)
    _check_ok(proc)
    m0, m1 = (json.loads((tmp_path / f"metrics_rank{r}.json").read_text()) for r in range(2))
    assert m0["eigenvalues"] == m1["eigenvalues"] and m0["world_size"] == 2
    ckpt = load_checkpoint(tmp_path / "c.pkl")
    a = ckpt["args"]
    model = get_model("ResNet", depth=8, num_classes=ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    _, plain, _ = get_datasets("synthetic", augment=False, seed=a["seed"], num_train=128, num_test=32)
    first = torch.utils.data.Subset(plain, range(48))
    loader = torch.utils.data.DataLoader(first, batch_size=24)
    res = top_eigenvalue(
        model, nn.CrossEntropyLoss(), dataloader=loader, max_iter=a["eig_max_iter"], tol=a["eig_tol"], seed=a["seed"]
    )
    assert m0["eigenvalues"][0] == pytest.approx(float(res.eigenvalues[0]), rel=1e-4)
    rows = (tmp_path / "eigen_history.csv").read_text().splitlines()
    assert len(rows) == 2  # a header and epoch 1, written once (by rank 0)


@pytest.mark.slow
def test_a_failing_rank_stops_the_run_with_its_error(tmp_path):
    flags = [
        "--name", "synthetic", "--synthetic-train", "128", "--synthetic-test", "32", "--arch", "c1",
        "--batch-size", "32", "--epochs", "2", "--large-ratio", "4", "--hessian-batch-size", "32", "--no-progress",
        "--device", "cpu", "--out-dir", tmp_path, "--save", tmp_path / "c.pkl",
    ]  # fmt: skip
    # rank 1 raises in the epoch-1 eigenvalue check, while rank 0 waits in that collective
    proc, seconds = torchrun("train", tmp_path, "--", *flags, env={"DIST_WORKER_FAIL_RANK": "1"})
    assert proc.returncode != 0
    assert "injected failure on rank 1 in the eigenvalue check" in proc.stderr
    assert not (tmp_path / "c.pkl").exists() and not list(tmp_path.glob("metrics_rank*.json"))
    assert seconds < 200


@pytest.mark.slow
def test_a_stalled_rank_times_out_instead_of_hanging(tmp_path):
    # the last rank sleeps 120 s instead of joining an all-reduce; the group's timeout is 5 s
    proc, seconds = torchrun("stall", tmp_path, "120", env={hd.TIMEOUT_ENV: "5"})
    assert proc.returncode != 0
    assert "Timed out" in proc.stderr or "timed out" in proc.stderr.lower()
    assert seconds < 100  # far less than the sleep: torchrun stops the stalled rank once rank 0 fails


# -- the loss landscape over shards -------------------------------------------------------------------


def _landscape_reference(model, X, y, v, steps, reduction="mean"):
    """The loss at theta + a v over all of (X, y), from a copy of the model with its weights moved."""
    import copy

    out = []
    for a in steps:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            offset = 0
            for p in moved.parameters():
                p.add_(a * v[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            out.append(float(nn.CrossEntropyLoss(reduction=reduction)(moved(X), y)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.slow
def test_two_ranks_give_the_one_process_loss_landscape(ops_runs):
    (r0, r1), one = ops_runs
    model, X, y = worker.problem()
    v, V = worker.vectors(sum(p.numel() for p in model.parameters()))
    steps = [-0.5, 0.0, 0.3]
    ref = _landscape_reference(model, X, y, v, steps)
    # the size-weighted mean over the shards (19 and 18 samples): the whole data set's loss, on both ranks
    torch.testing.assert_close(r0["landscape"], ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(r0["landscape"], one["landscape"], rtol=1e-13, atol=0)
    assert torch.equal(r0["landscape"], r1["landscape"])
    # that tolerance tells it from the unweighted mean of the two ranks' mean losses
    halves = [_landscape_reference(model, X[sl], y[sl], v, steps) for sl in (shard(37, 0, 2), shard(37, 1, 2))]
    assert ((halves[0] + halves[1]) / 2 - ref).abs().max() > 1e-6 * ref.abs().max()
    # and from rank 0's own shard alone
    assert (halves[0] - ref).abs().max() > 1e-3 * ref.abs().max()
    torch.testing.assert_close(r0["landscape_sum"], _landscape_reference(model, X, y, v, steps, "sum"), rtol=1e-12,
                               atol=0)  # fmt: skip
    one_batch = _landscape_reference(model, X[:12], y[:12], v, steps)
    torch.testing.assert_close(r0["landscape_one_batch"], one_batch, rtol=1e-12, atol=0)
    # rank 1's shard of one sample is empty: it still joins, and adds nothing
    torch.testing.assert_close(r1["landscape_tiny"], _landscape_reference(model, X[:1], y[:1], v, steps), rtol=1e-12,
                               atol=0)  # fmt: skip
    assert r0["landscape_2d"].shape == (3, 1)
    torch.testing.assert_close(r0["landscape_2d"], one["landscape_2d"], rtol=1e-13, atol=0)
    with torch.no_grad():
        assert ref[1] == pytest.approx(float(nn.CrossEntropyLoss()(model(X), y)), rel=1e-14)


def test_loss_landscape_reduction_in_a_one_rank_group(tmp_path):
    """``distributed=True`` in a real one-rank gloo group; without a group it is refused."""
    from hessianflow.curvature.analysis import loss_landscape

    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model, X, y = worker.problem()
    ce = nn.CrossEntropyLoss()
    v, _ = worker.vectors(sum(p.numel() for p in model.parameters()))
    steps = [-0.4, 0.0, 0.25]
    with pytest.raises(ValueError, match="process group"):
        loss_landscape(model, ce, dataloader=worker._loader(X, y), directions=v, alphas=steps, distributed=True)
    # no group: a loader is not distributed, and an empty one is an error
    plain = loss_landscape(model, ce, dataloader=worker._loader(X, y), directions=v, alphas=steps)
    with pytest.raises(ValueError, match="no samples"):
        loss_landscape(model, ce, dataloader=[(X[:0], y[:0])], directions=v, alphas=steps)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    try:
        got = loss_landscape(model, ce, dataloader=worker._loader(X, y), directions=v, alphas=steps, distributed=True)
        torch.testing.assert_close(got, plain, rtol=1e-15, atol=0)
        torch.testing.assert_close(got, _landscape_reference(model, X, y, v, steps), rtol=1e-12, atol=0)
        with pytest.raises(ValueError, match="no samples on any rank"):
            loss_landscape(model, ce, dataloader=[(X[:0], y[:0])], directions=v, alphas=steps, distributed=True)
        # a failure of this rank's evaluation is raised after the status all-reduce, and the group survives
        per_sample = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
        with pytest.raises(ValueError, match="scalar"):
            loss_landscape(
                model, per_sample, dataloader=[(X, y)], directions=v, alphas=steps, distributed=True, reduction="mean"
            )  # (a plain function's reduction is never guessed over ranks: issue 10)
        again = loss_landscape(model, ce, dataloader=[(X, y)], directions=v, alphas=steps, distributed=True)
        torch.testing.assert_close(again, plain, rtol=1e-13, atol=0)
    finally:
        torch.distributed.destroy_process_group()


# -- hessian_eig_driver.py on two processes -----------------------------------------------------------

DRIVER = os.path.join(ROOT, "hessian_eig_driver.py")


@pytest.fixture(scope="module")
def driver_ckpt(tmp_path_factory):
    """A train.py checkpoint of a ResNet-8 on synthetic data, as tests/test_driver.py builds it."""
    try:
        from test_driver import full_checkpoint, tiny_resnet
    except ImportError:  # pragma: no cover - pytest's importlib mode
        from tests.test_driver import full_checkpoint, tiny_resnet
    return full_checkpoint(tiny_resnet(), tmp_path_factory.mktemp("driver_ckpt") / "model_param.pkl")


def _one_process_driver(argv, capsys):
    from hessianflow.cli import eig as drv

    capsys.readouterr()
    result = drv.main(drv.parse_args([str(a) for a in argv]))
    return result, capsys.readouterr().out


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


@pytest.mark.slow
def test_driver_full_data_set_on_two_processes_matches_one_process(driver_ckpt, tmp_path, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    # 3 batches of 5: 15 samples, shards of 8 and 7 (batches of 5+3 and 5+2)
    flags = [
        "--resume", driver_ckpt, "--eigen-type", "full", "--num-batches", "3", "--hessian-batch-size", "5",
        "--top-k", "2", "--trace", "--trace-matvecs", "8", "--landscape", "1", "--landscape-points", "3",
        "--landscape-radius", "0.5", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    proc, seconds = torchrun(*flags, "--json", two / "eig.json", "--out-dir", two, script=DRIVER)
    _check_ok(proc)
    ref, text = _one_process_driver([*flags, "--json", one / "eig.json", "--out-dir", one], capsys)
    # rank 0 alone prints and writes: one summary, one JSON, one figure
    out = proc.stdout
    assert out.count("checkpoint  ") == 1 and out.count("done in") == 1 and out.count("json        ") == 1
    assert "eval mode, cpu, 2 processes sharing the samples" in out
    assert "full: 15 samples in 3 batches of 5" in out and "full: 15 samples in 3 batches of 5" in text
    assert "Traceback" not in proc.stderr
    landscape_png = "model_param_hessian_full-train_landscape1d.png"
    assert sorted(p.name for p in two.iterdir()) == ["eig.json", landscape_png]
    got = json.loads((two / "eig.json").read_text())
    assert got["world_size"] == 2 and ref["world_size"] == 1
    assert got["data"]["num_samples"] == 15 and got["data"]["num_batches"] == 3
    # the collective operator is the one-process operator: the same numbers up to the order of float32 sums
    assert got["eigen"]["all_converged"] and ref["eigen"]["all_converged"]
    assert got["eigen"]["eigenvalues"] == pytest.approx(ref["eigen"]["eigenvalues"], rel=1e-5)
    assert got["eigen"]["eigenvalues"][0] > got["eigen"]["eigenvalues"][1] > 0
    assert got["trace"]["estimate"] == pytest.approx(ref["trace"]["estimate"], rel=1e-5)
    assert got["trace"]["stderr"] == pytest.approx(ref["trace"]["stderr"], rel=1e-5)
    assert got["trace"]["num_matvecs"] == ref["trace"]["num_matvecs"] == 8
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6) and got["accuracy"] == ref["accuracy"]
    # the landscape sums both shards' losses: its middle point is the loss of all 15 samples
    assert got["landscape"]["losses"] == pytest.approx(ref["landscape"]["losses"].tolist(), rel=1e-5)
    assert got["landscape"]["losses"][1] == pytest.approx(got["loss"], rel=1e-6)


DRIVER_APPROX_FLAGS = [
    "--hessian-batch-size", "9", "--top-k", "1", "--density", "--density-runs", "1", "--density-steps", "8",
    "--per-layer", "--layers", "layer3.0.bn2", "fc", "--exact-threshold", "700", "--landscape", "1",
    "--landscape-points", "3", "--landscape-radius", "0.5", "--no-progress", "--device", "cpu",
]  # fmt: skip


@pytest.mark.slow
def test_driver_gives_every_rank_the_same_numbers(driver_ckpt, tmp_path, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    one.mkdir()
    # the approximate batch of 9 samples: shards of 5 and 4, passed as one-batch lists
    flags = ["--resume", driver_ckpt, *DRIVER_APPROX_FLAGS]
    proc, _ = torchrun("driver", two, "--", *flags, "--json", two / "eig.json", "--out-dir", two)
    _check_ok(proc)
    r0, r1 = (json.loads((two / f"driver_rank{r}.json").read_text()) for r in range(2))
    # every number (eigenvalues, density, per-layer blocks, landscape, loss) bit for bit on both ranks
    assert _without_seconds(r0) == _without_seconds(r1)
    assert proc.stdout.count("done in") == 1
    pngs = sorted(p.name for p in two.glob("*.png"))
    assert len(pngs) == 3 and len(list(two.glob("*.json"))) == 3 and not list(two.glob("*.tmp"))
    saved = json.loads((two / "eig.json").read_text())
    assert _without_seconds(saved) == _without_seconds(r0)
    ref, _ = _one_process_driver([*flags, "--json", one / "eig.json", "--out-dir", one], capsys)
    ref = json.loads((one / "eig.json").read_text())
    assert r0["data"]["num_samples"] == ref["data"]["num_samples"] == 9
    assert r0["eigen"]["eigenvalues"] == pytest.approx(ref["eigen"]["eigenvalues"], rel=1e-5)
    for key in ("nodes", "weights"):  # [runs, steps]
        got, want = torch.tensor(r0["density"][key]), torch.tensor(ref["density"][key])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(r0["per_layer"]["layers"], ref["per_layer"]["layers"]):
        assert a["exact"] and a["name"] == b["name"]
        assert a["eigenvalue"] == pytest.approx(b["eigenvalue"], rel=1e-5)
        assert a["trace"] == pytest.approx(b["trace"], rel=1e-5)
    assert r0["landscape"]["losses"] == pytest.approx(ref["landscape"]["losses"], rel=1e-5)
    assert r0["loss"] == pytest.approx(ref["loss"], rel=1e-6) and r0["accuracy"] == ref["accuracy"]


@pytest.mark.slow
def test_driver_stops_every_rank_when_one_fails(driver_ckpt, tmp_path):
    flags = ["--resume", driver_ckpt, "--hessian-batch-size", "9", "--landscape", "1", "--landscape-points", "3",
             "--no-progress", "--device", "cpu"]  # fmt: skip
    # rank 1's landscape fails while rank 0 waits for the landscape's all-reduce
    proc, seconds = torchrun(
        "driver", tmp_path, "--", *flags, "--json", tmp_path / "eig.json", "--out-dir", tmp_path,
        env={"DIST_WORKER_FAIL_RANK": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "injected failure on rank 1 in the loss landscape" in proc.stderr
    assert "1 other rank(s) failed to evaluate the loss landscape" in proc.stderr
    assert not (tmp_path / "eig.json").exists() and not list(tmp_path.glob("driver_rank*.json"))
    assert seconds < 100


def test_rank_zero_first_orders_the_download():
    """--download under torchrun: rank 0 runs it before the barrier, the others after it."""
    from hessianflow.cli import common as _cli

    class Ctx:
        def __init__(self, rank, events):
            self.is_main, self.events, self.rank = rank == 0, events, rank

        def barrier(self):
            self.events.append(f"barrier{self.rank}")

    for rank, expected in ((0, ["fetch0", "barrier0"]), (1, ["barrier1", "fetch1"])):
        events = []
        ctx = Ctx(rank, events)
        assert _cli.rank_zero_first(ctx, True, lambda e=events, r=rank: e.append(f"fetch{r}") or 7) == 7
        assert events == expected
        events.clear()
        _cli.rank_zero_first(ctx, False, lambda e=events: e.append("fetch"))
        assert events == ["fetch"]  # one process, or nothing to download: no barrier
