"""The finite-difference Hessian-vector product (``backend="finite_difference"``): two gradients, no
second derivatives. Checked against dense float64 Hessians built by double-backprop rows (independent of
hessianflow), on an MLP, over a loader with a loss function and dict batches, and through
``F.scaled_dot_product_attention`` with the user's default (flash) kernel, which has no double backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dense_reference import hessian_rows, mlp
from torch import nn

import hessianflow as hf

DT = torch.float64


def test_products_equal_the_dense_hessian_in_float64():
    model = mlp(5, 7, 3)
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    H = hessian_rows(lambda: F.cross_entropy(model(x), y), params)
    before = [p.detach().clone() for p in params]
    op = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), backend="finite_difference")
    V = torch.randn(op.size, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    for j in range(4):
        err = (op @ V[:, j] - H @ V[:, j]).norm() / (H @ V[:, j]).norm()
        assert err < 1e-8, err  # central differences at h ~ eps^(1/3): measured ~1e-10
    assert torch.allclose(op.matmat(V), H @ V, rtol=0, atol=1e-8 * (H @ V).abs().max())
    assert all(torch.equal(p, b) and p.requires_grad for p, b in zip(params, before))  # weights untouched
    lam = hf.lanczos(op, k=3, tol=1e-8, seed=0).eigenvalues
    ref = torch.linalg.eigvalsh(H).flip(0)[:3]
    assert torch.allclose(lam, ref, rtol=1e-6, atol=0), (lam, ref)


def test_loader_of_dict_batches_with_a_loss_function():
    model = mlp(5, 7, 3, seed=1)
    batches = [{"x": torch.randn(n, 5, dtype=DT), "y": torch.randint(0, 3, (n,))} for n in (6, 4, 3)]

    def loss_fn(m, b):
        return F.cross_entropy(m(b["x"]), b["y"], reduction="sum")

    params = list(model.parameters())
    H = hessian_rows(lambda: sum(loss_fn(model, b) for b in batches), params)
    op = hf.HessianOperator(model, loss_fn=loss_fn, reduction="sum", dataloader=batches, backend="finite_difference")
    v = torch.randn(op.size, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert (op @ v - H @ v).norm() / (H @ v).norm() < 1e-8


class Attention(nn.Module):
    """One self-attention layer through F.scaled_dot_product_attention, then a linear read-out."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).mean(1))


def test_attention_with_the_default_kernel():
    torch.manual_seed(0)
    model = Attention().to(DT)
    x, y = torch.randn(4, 5, 8, dtype=DT), torch.randint(0, 2, (4,))
    # the reference runs the math kernel (one with a double backward); the operator the default one
    H = hessian_rows(lambda: F.cross_entropy(model(x), y), list(model.parameters()))
    op = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), backend="finite_difference")
    v = torch.randn(op.size, dtype=DT, generator=torch.Generator().manual_seed(3))
    assert (op @ v - H @ v).norm() / (H @ v).norm() < 1e-7


def test_float32_accuracy_and_bad_step():
    model = mlp(5, 7, 3, seed=2)
    x, y = torch.randn(32, 5, dtype=DT), torch.randint(0, 3, (32,))
    H = hessian_rows(lambda: F.cross_entropy(model(x), y), list(model.parameters()))
    m32 = model.float()
    op = hf.HessianOperator(m32, nn.CrossEntropyLoss(), data=(x.float(), y), backend="finite_difference")
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(4))
    err = ((op @ v).double() - H @ v.double()).norm() / (H @ v.double()).norm()
    assert err < 1e-3, err  # float32 gradients differenced at h ~ 5e-3: measured in the 1e-5 range
    with pytest.raises(ValueError, match="fd_step"):
        hf.HessianOperator(m32, nn.CrossEntropyLoss(), data=(x.float(), y), backend="finite_difference", fd_step=2)


class HalfPrecisionInside(nn.Module):
    """A float64 model whose middle layer computes in float32 (as Llama's RMSNorm does in a float64 model)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b = nn.Linear(5, 7).double(), nn.Linear(7, 3).double()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = (h.float() / h.float().square().mean(-1, keepdim=True).add(1e-6).sqrt()).double()  # RMS norm
        return self.b(h)


def test_the_step_follows_the_precision_the_model_computes_in():
    model = HalfPrecisionInside()
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 3, (16,))
    H = hessian_rows(lambda: F.cross_entropy(model(x), y), list(model.parameters()))
    v = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(6))

    def error(op):
        return float((op @ v - H @ v).norm() / (H @ v).norm())

    textbook = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), backend="finite_difference",
                                  fd_step=torch.finfo(DT).eps ** (1 / 3))  # fmt: skip
    measured = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), backend="finite_difference")
    e_textbook, e_measured = error(textbook), error(measured)
    assert e_textbook > 1e-3  # float32 rounding over a float64 step: the textbook step fails
    assert e_measured < e_textbook / 20 and e_measured < 5e-4
    assert measured.fd_step > 10 * torch.finfo(DT).eps ** (1 / 3)
    # the reported error estimate is of the size of the real one, for both steps
    for op, e in ((textbook, e_textbook), (measured, e_measured)):
        assert e / 10 < op.product_noise < 10 * e, (op.product_noise, e)


def test_a_pure_float64_model_keeps_a_small_step_and_reports_a_small_error():
    model = mlp(5, 7, 3)
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 3, (16,))
    op = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), backend="finite_difference")
    assert op.product_noise is None  # measured on the first product
    op @ torch.ones(op.size, dtype=DT)
    assert op.fd_step < 1e-3 and op.product_noise < 1e-7
    exact = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y))
    assert exact.product_noise is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_finite_differences_are_refused_in_one_sentence(dtype):
    """Issue 20: in bf16 the step ladder starts at eps^(1/3) = 0.2 of the parameters' scale and has no second
    rung below 0.5, so no error could be measured (it crashed with an empty min() before)."""
    model = nn.Linear(3, 2).to(dtype)
    batch = (torch.randn(4, 3).to(dtype), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match=f"finite-difference products of a {str(dtype)[6:]} model are refused"):
        hf.HessianOperator(model, nn.CrossEntropyLoss(), data=batch, backend="finite_difference")
