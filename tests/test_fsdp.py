"""Curvature of FSDP2-sharded models (issue 20): the same operator as the unsharded model on the global batch.

Under torchrun with 2 and 3 gloo ranks (``tests/dist_fsdp_worker.py``), each model is wrapped with
``fully_shard`` per layer and at the root, and every rank passes an unequal share of the global batch
(ignored targets, micro-batches with unequal counts, an empty shard of a one-row layer). Against the
unsharded model on the whole batch (float64):

- the sharded products ``H V`` equal the dense Hessian's rows to 1e-12;
- Lanczos top-3, the Hutchinson trace and the SLQ nodes and weights with the same seed match (the sharded
  vector space draws the same global random vectors), the same on every rank;
- the eigenvectors come back as this rank's slice, which assembled is an eigenvector of the dense Hessian;
- float32 finite-difference products lie within a small multiple of their own reported error.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import dist_fsdp_worker as worker  # noqa: E402
from dense_reference import need_transformers  # noqa: E402

try:
    from test_distributed import torchrun
except ImportError:  # pragma: no cover - run from the repository root
    from tests.test_distributed import torchrun


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def references():
    return worker.references()


def _run(world, tmp_path, gpt2=False):
    env = {"FSDP_TEST_GPT2": "1" if gpt2 else "0"}
    proc, _ = torchrun(tmp_path, nproc=world, timeout=500, env=env, script=os.path.join(HERE, "dist_fsdp_worker.py"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _check(results, refs, names):
    world = len(results)
    for name in names:
        ref, mine = refs[name], [r[name] for r in results]
        size = mine[0]["size"]
        rows = [m["rows"] for m in mine]
        # the ranks' slices partition the flat vector, and no rank holds all of it
        assert sorted(torch.cat(rows).tolist()) == list(range(size)), name
        if world > 1:
            assert all(m["local_size"] < size for m in mine), name
        assert all(m["params_are_dtensors"] for m in mine), name
        HV = torch.zeros_like(ref["HV"])
        for m in mine:
            HV[m["rows"]] = m["HV"]
        # HuggingFace's own .loss takes its cross-entropy of float32 logits: float32 agreement there
        assert rel(HV, ref["HV"]) < (1e-5 if name.endswith("own_loss") else 1e-12), (name, rel(HV, ref["HV"]))
        for key in ("GV", "FV"):  # the generalised Gauss-Newton matrix, the empirical Fisher
            if key in ref:
                got = torch.zeros_like(ref[key])
                for m in mine:
                    got[m["rows"]] = m[key]
                assert rel(got, ref[key]) < 1e-12, (name, key, rel(got, ref[key]))
        if "layers" in ref:  # per_layer: each block's top-2 and trace, dense blocks and Lanczos blocks alike
            for m in mine:
                for (n1, e1, t1), (n2, e2, t2) in zip(m["layers"], ref["layers"], strict=True):
                    assert n1 == n2 and torch.allclose(e1, e2, rtol=1e-9, atol=1e-12), (name, n1, e1, e2)
                    assert math.isclose(t1, t2, rel_tol=1e-9, abs_tol=1e-12), (name, n1, t1, t2)
        for m in mine:  # the same numbers on every rank, and those of the unsharded operator
            assert torch.equal(m["top3"], mine[0]["top3"]) and m["trace"] == mine[0]["trace"], name
            tol = 1e-4 if name.endswith("own_loss") else 1e-8
            assert torch.allclose(m["top3"], ref["top3"], rtol=tol / 100, atol=1e-12), (name, m["top3"], ref["top3"])
            assert m["converged"].all(), name
            assert math.isclose(m["trace"], ref["trace"], rel_tol=tol / 100), (name, m["trace"], ref["trace"])
            assert torch.allclose(m["nodes"], ref["density"].nodes, rtol=tol, atol=1e-10), name
            assert torch.allclose(m["weights"], ref["density"].weights, rtol=tol, atol=1e-10), name
            # power iteration, Hutch++ and MINRES go through the same vector space
            assert torch.allclose(m["power"], ref["power"], rtol=tol / 100), (name, m["power"], ref["power"])
            assert math.isclose(m["hutchpp"], ref["hutchpp"], rel_tol=tol / 100), (name, m["hutchpp"], ref["hutchpp"])
            assert math.isclose(m["solve_norm"], ref["solve_norm"], rel_tol=tol / 100), name
        if ref["dense"] is not None:
            vecs = torch.zeros(size, 3, dtype=torch.float64)
            for m in mine:
                assert m["vecs"].shape == (m["local_size"], 3), name  # sharded, not whole
                vecs[m["rows"]] = m["vecs"]
            # assembled, they are the dense Hessian's eigenvectors to the residuals the sharded run reported
            resid = (ref["dense"] @ vecs - vecs * mine[0]["top3"]).norm(dim=0)
            reported = mine[0]["residuals"].to(resid)
            assert torch.all(resid <= 1.01 * reported + 1e-12), (name, resid, reported)
            assert torch.allclose(vecs.norm(dim=0), torch.ones(3, dtype=torch.float64), atol=1e-10), name
            dense_top = torch.linalg.eigvalsh(ref["dense"]).flip(0)[:3]
            assert torch.allclose(mine[0]["top3"], dense_top, rtol=1e-9), name
        if "fd_HV" in mine[0]:
            FD = torch.zeros_like(ref["HV"])
            for m in mine:
                FD[m["rows"]] = m["fd_HV"]
            err = rel(FD, ref["HV"])
            reported = mine[0]["fd_error"]
            assert all(m["fd_error"] == reported and m["fd_step"] == mine[0]["fd_step"] for m in mine)
            # the reported error is within a factor of a few of the true one (float32: about 1e-4 to 1e-3)
            assert err < 4 * reported and 1e-6 < reported < 3e-2, (err, reported)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_unsharded(world, tmp_path, references):
    results = _run(world, tmp_path)
    _check(results, references, list(references))


@pytest.mark.slow
def test_sharded_gpt2(tmp_path, monkeypatch):
    """A HuggingFace GPT-2 (default attention, tied embeddings, right-padded batches) sharded per block."""
    need_transformers()
    monkeypatch.setenv("FSDP_TEST_GPT2", "1")
    names = ["gpt2", "gpt2_own_loss"]
    refs = {k: v for k, v in worker.references().items() if k in names}
    results = _run(2, tmp_path, gpt2=True)
    _check(results, refs, names)


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_every_rank(tmp_path):
    """A NaN loss on rank 1, then rank 1 without data: every rank raises, none waits for ever."""
    proc, _ = torchrun(tmp_path, "failures", nproc=2, timeout=300, script=os.path.join(HERE, "dist_fsdp_worker.py"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r1["nonfinite"].startswith("NonFiniteError: the loss is not finite"), r1
    assert r0["nonfinite"].startswith("NonFiniteError: 1 other rank(s) failed to compute a finite loss"), r0
    for r in (r0, r1):
        assert r["no_data"].startswith("ValueError: 1 rank(s) of a sharded model hold no data"), r


def test_one_rank_group_is_the_plain_operator(tmp_path):
    """In a one-rank process group a fully_shard model's operator is the plain one (a fast, in-process check)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import hessianflow as hf

    make, batch, kw = worker.cases()["mlp_ignored"]
    plain = hf.HessianOperator(make(), kw["criterion"], data=batch)
    V = worker.vectors(plain.size)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = make()
        mesh = init_device_mesh("cpu", (1,))
        for b in worker.blocks(model):
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        H = hf.HessianOperator(model, kw["criterion"], data=batch)
        assert H.vector_space.local_size == H.size == plain.size
        assert rel(H.matmat(V), plain.matmat(V)) < 1e-13
        # the model is left as FSDP2 had it: sharded parameters, FSDP's hooks back, forward still works
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        out = model(batch[0])
        assert torch.allclose(out, make()(batch[0]))
        G, G_plain = (hf.GGNOperator(m, kw["criterion"], data=batch) for m in (model, make()))
        assert rel(G.matmat(V), G_plain.matmat(V)) < 1e-13
        F, F_plain = (hf.EmpiricalFisherOperator(m, kw["criterion"], data=batch) for m in (model, make()))
        assert rel(F.matmat(V), F_plain.matmat(V)) < 1e-13
        with pytest.raises(ValueError, match="ForwardOverReverse products of an FSDP2-sharded model are not supported"):
            hf.HessianOperator(model, kw["criterion"], data=batch, backend="forward_over_reverse")
    finally:
        if started:
            dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_example_two_ranks_match_one(tmp_path):
    """examples/fsdp_spectrum.py under torchrun: 2 ranks give 1 rank's spectrum, each holding half the entries."""
    need_transformers()
    example = os.path.join(os.path.dirname(HERE), "examples", "fsdp_spectrum.py")
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"spectrum{n}.json"
        args = ["--train-steps", "3", "--layers", "1", "--embd", "16", "--seq", "16", "--batch", "6",
                "--trace-matvecs", "6", "--density-steps", "8", "--dtype", "float64", "--json", out]  # fmt: skip
        proc, _ = torchrun(*args, nproc=n, timeout=300, script=example)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        import json

        runs[n] = json.loads(out.read_text())
    one, two = runs[1], runs[2]
    assert one["parameters"] == two["parameters"] and two["entries_on_this_rank"] < two["parameters"]
    assert two["eigenvector_shard"] == [two["entries_on_this_rank"], 3]
    assert torch.allclose(torch.tensor(two["top_eigenvalues"]), torch.tensor(one["top_eigenvalues"]), rtol=1e-9)
    assert math.isclose(two["trace"], one["trace"], rel_tol=1e-9)
