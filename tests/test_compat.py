"""The historical HessianFlow API on top of the new core."""

import contextlib

import pytest
import torch
from dense_reference import mlp
from torch import nn

import hessianflow as hf

DT = torch.float64


def setup_model(seed=0):
    model = mlp(5, 6, 3, seed=seed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (23,), generator=g)
    return model, x, y


def dominant(H):
    ev = torch.linalg.eigvalsh(H)
    return ev[ev.abs().argmax()].item()


def test_get_eigen_matches_dense_dominant_eigenvalue():
    model, x, y = setup_model()
    crit = nn.CrossEntropyLoss()
    H = hf.exact_hessian(model, crit, data=(x, y))
    model.train()
    with pytest.warns(RuntimeWarning, match="no GPU") if not torch.cuda.is_available() else contextlib.nullcontext():
        eig, vec = hf.get_eigen(model, x, y, crit, cuda=True, maxIter=200, tol=1e-8)
    assert eig == pytest.approx(dominant(H), rel=1e-6)
    assert [v.shape for v in vec] == [p.shape for p in model.parameters()]
    flat = torch.cat([v.reshape(-1) for v in vec])
    assert torch.linalg.norm(flat).item() == pytest.approx(1.0, abs=1e-10)
    assert torch.linalg.norm(H @ flat - eig * flat).item() < 1e-3 * abs(eig)
    assert model.training  # the original left the model in eval mode
    assert all(p.grad is None for p in model.parameters())


def test_get_eigen_full_dataset_keeps_the_last_small_batch():
    model, x, y = setup_model()
    crit = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)  # 10, 10, 3
    eig, _ = hf.get_eigen_full_dataset(model, loader, crit, cuda=False, maxIter=300, tol=1e-9)
    assert eig == pytest.approx(dominant(hf.exact_hessian(model, crit, data=(x, y))), rel=1e-6)
    dropped = hf.exact_hessian(model, crit, data=(x[:20], y[:20]))  # what HessianFlow computed
    assert abs(dominant(dropped) - eig) > 1e-6 * abs(eig)


def test_group_helpers():
    a = [torch.tensor([1.0, 2.0], dtype=DT), torch.tensor([[3.0]], dtype=DT)]
    b = [torch.tensor([0.5, -1.0], dtype=DT), torch.tensor([[2.0]], dtype=DT)]
    assert hf.group_product(a, b).item() == pytest.approx(0.5 - 2.0 + 6.0)
    n = hf.normalization(a)
    assert hf.group_product(n, n).item() == pytest.approx(1.0, abs=1e-14)
    s = hf.group_add(a, b, alpha=2.0)
    # in place, as HessianFlow's params[i].data.add_(update[i] * alpha): the same list, updated
    assert s is a and torch.equal(a[0], torch.tensor([2.0, 0.0], dtype=DT)) and a[1].item() == 7.0
    z = hf.normalization([torch.zeros(3, dtype=DT)])
    assert torch.equal(z[0], torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError):
        hf.group_product(a, b[:1])


def test_hessian_vector_product_and_get_params_grad():
    model, x, y = setup_model()
    crit = nn.CrossEntropyLoss()
    loss = crit(model(x), y)
    loss.backward(create_graph=True)
    params, grads = hf.get_params_grad(model)
    assert len(params) == 4 and all(g.shape == p.shape for g, p in zip(grads, params))
    gradsH = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
    v = [torch.ones_like(p) for p in params]
    hv = hf.hessian_vector_product(gradsH, params, v)
    H = hf.exact_hessian(model, crit, data=(x, y))
    expected = H @ torch.ones(H.shape[0], dtype=DT)
    assert torch.allclose(torch.cat([h.reshape(-1) for h in hv]), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="does not match"):
        hf.hessian_vector_product(gradsH, params, [torch.ones(2, dtype=DT)] * 4)
    for p in model.parameters():
        p.grad = None


def test_group_add_perturbs_a_models_weights_in_place():
    """Old code moved the weights along a direction through group_add (e.g. HessianFlow's landscape)."""
    model, x, y = setup_model()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    direction = [torch.ones_like(p) for p in params]
    hf.group_add(params, direction, alpha=0.5)
    assert all(torch.equal(p, b + 0.5) for p, b in zip(params, before))
    assert all(p.requires_grad and p.is_leaf for p in params)
    hf.group_add(params, direction, alpha=-0.5)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_get_eigen_follows_torch_manual_seed():
    """HessianFlow drew its start vector with torch.randn: the global seed reproduces the result."""
    model, x, y = setup_model()
    crit = nn.CrossEntropyLoss()
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(hf.get_eigen(model, x, y, crit, cuda=False, maxIter=3, tol=1e-12)[0])
    assert runs[0] == runs[1]  # bit for bit
    assert runs[0] != runs[2]  # 3 iterations from another start: another estimate
