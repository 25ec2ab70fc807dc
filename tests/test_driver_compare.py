"""hessian_eig_driver.py --compare: compare_curvatures on the checkpoint's data (a tiny ResNet-8 on synthetic
images), its table printed, its numbers in the JSON, checked against operators built here without the driver."""

import json

import pytest
from dense_reference import check_png
from test_driver import DATA_SEED, full_checkpoint, tiny_resnet
from torch import nn

from hessianflow.cli import eig as drv
from hessianflow.curvature import GGNOperator, HessianOperator
from hessianflow.linalg.eigen import lanczos
from hessianflow.training.data import fixed_batch, get_datasets

BATCH = 8


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    model = tiny_resnet()
    path = full_checkpoint(model, d / "model_param.pkl")
    jpath = d / "result.json"
    argv = [
        "--resume", path, "--hessian-batch-size", str(BATCH), "--compare", "--compare-k", "2",
        "--compare-kinds", "ggn", "empirical_fisher", "sampled_fisher", "--mc-samples", "2", "--trace-matvecs", "4",
        "--compare-runs", "1", "--compare-steps", "6", "--tol", "1e-3", "--json", str(jpath), "--out-dir", str(d),
        "--no-progress",
    ]  # fmt: skip
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        result = drv.main(drv.parse_args(argv))
    with open(jpath) as f:
        saved = json.load(f)
    return {"result": result, "json": saved, "text": buf.getvalue(), "model": model}


def _batch():
    _, plain, _ = get_datasets("synthetic", augment=False, seed=DATA_SEED, num_train=256, num_test=128)
    return fixed_batch(plain, BATCH, seed=1)  # the driver's approximate batch for --seed 1


def test_compare_section_in_the_json(compared):
    cmp = compared["json"]["compare"]
    kinds = cmp["kinds"]
    assert list(kinds) == ["hessian", "ggn", "empirical_fisher", "sampled_fisher"]
    for kind, row in kinds.items():
        assert len(row["top_k_rel_error"]) == 2 and len(row["eigenvalues"]) == 2, kind
        assert {"subspace_overlap", "trace_ratio", "density_w1", "converged", "num_matvecs"} <= set(row), kind
        assert cmp["num_matvecs"][kind] == row["num_matvecs"] > 0
    h = kinds["hessian"]
    assert h["top_k_rel_error"] == [0.0, 0.0] and h["trace_ratio"] == 1.0 and h["density_w1"] == 0.0
    assert abs(h["subspace_overlap"] - 1.0) < 1e-6
    for kind in ("ggn", "empirical_fisher", "sampled_fisher"):
        row = kinds[kind]
        assert 0.0 < row["trace_ratio"] < float("inf"), kind
        assert 0.0 <= row["subspace_overlap"] <= 1.0 + 1e-9
        assert min(row["eigenvalues"]) > -1e-6 * max(abs(v) for v in row["eigenvalues"])  # PSD kinds
        # the relative errors are those of the eigenvalues written beside the Hessian's
        for lam, lam_h, err in zip(row["eigenvalues"], h["eigenvalues"], row["top_k_rel_error"]):
            assert abs(err - abs(lam - lam_h) / abs(lam_h)) < 1e-9 * max(1.0, err)
    assert cmp["k"] == 2 and cmp["mc_samples"] == 2
    assert cmp["table"].splitlines()[2].startswith("| hessian |") and len(cmp["table"].splitlines()) == 6
    assert compared["result"]["compare"]["kinds"] == kinds  # the returned dict is the written one


def test_compare_numbers_against_operators_built_here(compared):
    """The top eigenvalues the driver wrote are those of the Hessian and GGN of its batch, found here."""
    x, y = _batch()
    model = compared["model"]
    kinds = compared["json"]["compare"]["kinds"]
    for kind, cls in (("hessian", HessianOperator), ("ggn", GGNOperator)):
        res = lanczos(cls(model, nn.CrossEntropyLoss(), data=(x, y)), k=2, which="LA", tol=1e-4, seed=0)
        for got, ref in zip(kinds[kind]["eigenvalues"], res.eigenvalues.tolist()):
            assert abs(got - ref) <= 2e-3 * abs(ref), (kind, got, ref)
    # the sampled Fisher with the driver's seed (--seed 1 + 4) and --mc-samples 2: the same top eigenvalue
    F = GGNOperator(model, nn.CrossEntropyLoss(), data=(x, y), mc_samples=2, seed=5)
    top = float(lanczos(F, k=1, which="LA", tol=1e-4, seed=0).eigenvalues[0])
    assert abs(kinds["sampled_fisher"]["eigenvalues"][0] - top) <= 2e-3 * top


def test_compare_table_printed_and_figure_written(compared):
    text = compared["text"]
    assert "compare     hessian, ggn, empirical_fisher, sampled_fisher against the Hessian, top 2" in text
    for kind in ("hessian", "ggn", "empirical_fisher", "sampled_fisher"):
        assert f"| {kind} |" in text
    fig = compared["json"]["compare"]["figure"]
    if fig is not None:  # matplotlib installed
        assert fig == compared["json"]["figures"]["compare"]
        check_png(fig)
    assert "compare" in compared["json"]["seconds"]


def test_compare_flags_need_compare(capsys):
    for extra in (["--compare-k", "3"], ["--mc-samples", "4"], ["--compare-kinds", "ggn"]):
        with pytest.raises(SystemExit) as err:
            drv.parse_args(["--resume", "x.pkl", *extra])
        assert err.value.code == 2
        assert "apply to --compare only" in capsys.readouterr().err
    args = drv.parse_args(["--resume", "x.pkl", "--compare"])
    assert args.compare_k == 5 and args.compare_kinds == ["ggn", "empirical_fisher", "block_diagonal"]
