"""compare_curvatures against dense float64 references on a tiny MLP: every number (top-k eigenvalues and
their relative errors, principal cosines, trace ratios, Wasserstein-1 distances between the spectral
measures) recomputed from dense matrices built independently (torch.func.hessian, J^T H_out J, per-sample
gradients by torch.func, a masked Hessian), with torch.linalg.eigh and scipy.stats.wasserstein_distance."""

import pytest
import torch
from dense_reference import check_png, func_hessian, ggn, mlp
from torch import nn

from hessianflow.curvature.compare import CurvatureComparison, compare_curvatures, plot_comparison, wasserstein1
from hessianflow.linalg.density import DensityResult

DT = torch.float64
K = 3
SEED = 7


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = mlp(3, 5, 3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)
    crit = nn.CrossEntropyLoss()
    H = func_hessian(model, crit, x, y)
    G = ggn(model, crit, x, y)
    # empirical Fisher: per-sample gradients of each sample's own loss, by torch.func (mean over samples)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(ps, xi, yi):
        return crit(torch.func.functional_call(model, ps, (xi[None],)), yi[None])

    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    Gs = torch.cat([per[n].reshape(10, -1) for n in names], dim=1)
    F = Gs.T @ Gs / 10
    # block diagonal: each Linear's weight and bias together (the modules "0", "2" of the Sequential)
    sizes = [p.numel() for p in params.values()]
    owner = torch.cat([torch.full((s,), i // 2) for i, s in enumerate(sizes)])
    B = torch.where(owner[:, None] == owner[None, :], H, 0.0)
    dense = {"hessian": H, "ggn": G, "empirical_fisher": F, "block_diagonal": B}
    n = H.shape[0]
    res = compare_curvatures(
        model, crit, data=(x, y), k=K, seed=SEED, tol=1e-12, trace_matvecs=2 * n, num_runs=3, num_steps=n
    )
    return res, dense, n


def _top(M, k):
    lam, U = torch.linalg.eigh(M)
    return lam.flip(0)[:k], U.flip(1)[:, :k]


def test_eigenvalues_errors_and_subspaces_against_dense(problem):
    res, dense, _ = problem
    assert isinstance(res, CurvatureComparison) and list(res.kinds) == list(dense)
    lam_h, U_h = _top(dense["hessian"], K)
    for kind, M in dense.items():
        kc = res.kinds[kind]
        lam, U = _top(M, K)
        assert kc.converged
        assert torch.allclose(torch.tensor(kc.eigenvalues, dtype=DT), lam, rtol=1e-9, atol=1e-12), kind
        rel = (lam - lam_h).abs() / lam_h.abs()
        assert torch.allclose(torch.tensor(kc.top_k_rel_error, dtype=DT), rel, rtol=1e-6, atol=1e-9), kind
        cos = torch.linalg.svdvals(U_h.T @ U)
        assert torch.allclose(torch.tensor(kc.principal_cosines, dtype=DT), cos, atol=1e-6), kind
        assert kc.subspace_overlap == pytest.approx(float((cos**2).mean()), abs=1e-6), kind
    # the approximations are not the Hessian here: the audit shows it
    assert max(res.kinds["empirical_fisher"].top_k_rel_error) > 0.05
    assert res.kinds["hessian"].top_k_rel_error == [0.0] * K
    assert res.kinds["hessian"].subspace_overlap == pytest.approx(1.0, abs=1e-14)


def test_trace_ratios_against_dense(problem):
    res, dense, _ = problem
    tr_h = float(dense["hessian"].trace())
    for kind, M in dense.items():
        kc = res.kinds[kind]
        assert kc.trace == pytest.approx(float(M.trace()), rel=1e-10), kind  # 2n products: exact
        assert kc.trace_ratio == pytest.approx(float(M.trace()) / tr_h, rel=1e-10), kind
    assert res.kinds["block_diagonal"].trace_ratio == pytest.approx(1.0, rel=1e-10)  # same diagonal


def test_density_distances_against_scipy(problem):
    """With n Lanczos steps each SLQ run is the exact spectral measure sum_i (v^T u_i)^2 / n at the eigenvalues,
    for the run's Rademacher vector v (redrawn here from the seed); scipy measures W1 between the mixtures."""
    stats = pytest.importorskip("scipy.stats")
    res, dense, n = problem
    g = torch.Generator().manual_seed(SEED)
    vs = [(2 * torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) - 1).to(DT) for _ in range(3)]

    def measure(M):
        lam, U = torch.linalg.eigh(M)
        w = torch.cat([(U.T @ v) ** 2 / n for v in vs]) / len(vs)
        return lam.repeat(len(vs)).numpy(), w.numpy()

    xh, wh = measure(dense["hessian"])
    width = float(xh.max() - xh.min())
    for kind, M in dense.items():
        xk, wk = measure(M)
        ref = stats.wasserstein_distance(xk, xh, wk, wh)
        kc = res.kinds[kind]
        assert kc.density_w1 == pytest.approx(ref, rel=1e-6, abs=1e-10), kind
        assert kc.density_w1_rel == pytest.approx(ref / width, rel=1e-6, abs=1e-10), kind
    assert res.kinds["hessian"].density_w1 < 1e-15 and res.kinds["ggn"].density_w1 > 1e-4


def test_wasserstein1_closed_forms():
    a = DensityResult(torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=DT), torch.tensor([[0.5, 0.5], [1.0, 0.0]]), 0, 2)
    b = DensityResult(torch.tensor([[2.0]], dtype=DT), torch.tensor([[1.0]], dtype=DT), 0, 1)
    # a = 0.75 delta_0 + 0.25 delta_1, b = delta_2: W1 = 0.75 * 2 + 0.25 * 1
    assert wasserstein1(a, b) == pytest.approx(1.75, abs=1e-15) and wasserstein1(b, a) == pytest.approx(1.75)
    assert wasserstein1(a, a) == 0.0


def test_to_dict_table_figure_and_errors(problem, tmp_path):
    pytest.importorskip("matplotlib")
    res, _, _ = problem
    d = res.to_dict()
    assert list(d) == ["hessian", "ggn", "empirical_fisher", "block_diagonal"]
    for entry in d.values():
        assert len(entry["top_k_rel_error"]) == K
        assert 0.0 <= entry["subspace_overlap"] <= 1.0 + 1e-12 and isinstance(entry["trace_ratio"], float)
    assert res.table().count("\n") == 1 + 4
    check_png(plot_comparison(res, tmp_path / "cmp.png", title="tiny MLP"))
    with pytest.raises(ValueError, match="unknown kind"):
        compare_curvatures(mlp(2, 2), nn.MSELoss(), data=(torch.ones(3, 2, dtype=DT), torch.ones(3, 2, dtype=DT)),
                           kinds=("kfac",))  # fmt: skip
