"""hessianflow.curvature.attention: kernel selection for products, its restore, and attention modules' curvature.

The products are checked against a dense float64 Hessian built row by row by double backprop and by
central differences of the gradient (tests/dense_reference.py), never against hessianflow itself.
"""

import pytest
import torch
import torch.nn.functional as F
from dense_reference import hessian_central_differences, hessian_rows, rel_err
from torch import nn
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

import hessianflow as hf
from hessianflow.curvature.attention import AttentionKernelError, product_kernels


def _double_backward(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), k)
    return gg


def _eager_attention(q, k, v):
    """Attention written out (Vaswani et al. 2017, eq. 1) with a causal mask: the reference formula."""
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]


def test_default_kernel_has_no_double_backward_on_this_cpu():
    # the premise of the module: if PyTorch ever adds the derivative, this test says the switch is moot
    with pytest.raises(RuntimeError, match="not implemented"):
        _double_backward(*_qkv())


def test_double_backward_through_sdpa_equals_eager_attention():
    q, k, v = _qkv()
    with product_kernels("cpu", "double_backprop"):
        got = _double_backward(q, k, v)
    out = _eager_attention(q, k, v)
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (want,) = torch.autograd.grad(g.sum(), k)
    assert want.abs().max() > 1e-2  # a non-trivial second derivative
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_forward_over_reverse_through_sdpa_equals_eager_attention():
    q, k, v = (t.detach() for t in _qkv(1))
    t = torch.randn_like(q)

    def f(attn):
        return torch.func.grad(lambda q_: attn(q_, k, v).square().sum())

    with pytest.raises(RuntimeError, match="forward AD"):  # the fused CPU kernel has no forward AD
        torch.func.jvp(f(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True)), (q,), (t,))
    with product_kernels("cpu", "forward_over_reverse"):
        _, got = torch.func.jvp(f(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True)), (q,), (t,))
    _, want = torch.func.jvp(f(_eager_attention), (q,), (t,))
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _settings():
    return (
        _cur_sdpa_kernel_backends(),
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed(),
    )


def test_settings_inside_and_restored_after_user_selection_and_exception():
    before = _settings()
    with product_kernels("cpu", "double_backprop"):
        assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
        assert torch.backends.mha.get_fastpath_enabled() is False
    assert _settings() == before
    # a user's own selection (flash only), an exception inside, and nesting
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        user = _settings()
        with pytest.raises(ZeroDivisionError):
            with product_kernels("cpu", "double_backprop"):
                with product_kernels("cpu", "forward_over_reverse"):
                    assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
                assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
                raise ZeroDivisionError
        assert _settings() == user
        assert _cur_sdpa_kernel_backends() == [SDPBackend.FLASH_ATTENTION]
    assert _settings() == before


def test_fastpath_switch_restored_when_user_turned_it_off():
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with product_kernels("cpu"):
            assert torch.backends.mha.get_fastpath_enabled() is False
        assert torch.backends.mha.get_fastpath_enabled() is False
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_cuda_half_precision_reduction_flag_off_inside_and_restored():
    # the flag is process-global and can be set without a GPU: the restore logic is testable here
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with product_kernels(torch.device("cuda"), "double_backprop"):
            assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() is False
        assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() is True
        with product_kernels("cpu", "double_backprop"):  # the CPU leaves the CUDA flag alone
            assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() is True
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)


def test_first_order_backends_keep_the_users_kernels():
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        with product_kernels("cpu", "finite_difference"):
            assert set(_cur_sdpa_kernel_backends()) == {SDPBackend.FLASH_ATTENTION, SDPBackend.MATH}
            assert torch.backends.mha.get_fastpath_enabled() is False


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        with product_kernels("cpu", "double_backward"):
            pass


class _FlashInForward(nn.Module):
    """A model that forces the fused kernel inside its own forward (bypassing the selection)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 12).double()

    def forward(self, x):
        q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v).flatten(1)


def test_a_kernel_without_second_derivatives_gets_an_error_naming_the_fix():
    model = _FlashInForward()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(AttentionKernelError, match="attn_implementation='sdpa'") as info:
        with product_kernels("cpu", "double_backprop", model=model):
            g = torch.autograd.grad(model(x).square().sum(), list(model.parameters()), create_graph=True)
            torch.autograd.grad(sum(t.sum() for t in g), list(model.parameters()))
    assert "sdpa_kernel" in str(info.value) and "not implemented" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    # unrelated errors pass through unchanged
    with pytest.raises(RuntimeError, match="^boom$"):
        with product_kernels("cpu"):
            raise RuntimeError("boom")


# -- nn.MultiheadAttention in eval mode: its fast path, and its SDPA call --------------------------


class _MHAModel(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)  # need_weights=False: the SDPA path
        return self.head(self.norm(x + a).mean(1))


def _mha_problem():
    torch.manual_seed(0)
    model = _MHAModel().double().eval()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    return model, x, y


def _dense_pair(model, x, y, names):
    params = [dict(model.named_parameters())[n] for n in names]
    rows = hessian_rows(lambda: F.cross_entropy(model(x), y), params)
    fd = hessian_central_differences(model, lambda m: F.cross_entropy(m(x), y), names)
    return rows, fd


@pytest.mark.parametrize("backend", ["double_backprop", "forward_over_reverse"])
def test_multihead_attention_eval_mode_products_equal_dense(backend):
    model, x, y = _mha_problem()
    names = [n for n, _ in model.named_parameters()]  # 331 parameters
    rows, fd = _dense_pair(model, x, y, names)
    scale = torch.linalg.matrix_norm(rows, ord=2)
    # the two references agree: measured 3.3e-12 (h=1e-5), 1.4e-10 (h=1e-4), 1.4e-8 (h=1e-3: O(h^2))
    assert rel_err(rows, fd, scale) < 1e-9
    # the eval-mode fast path is live for this module outside products (no grad needed):
    calls = []
    native = torch._native_multi_head_attention
    torch._native_multi_head_attention = lambda *a, **k: calls.append(1) or native(*a, **k)
    try:
        with torch.no_grad():
            model(x)
        assert calls, "the fast path was expected outside products"
        calls.clear()
        H = hf.HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), backend=backend)
        with product_kernels(H.device, backend):
            V = torch.randn(H.size, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            HV = torch.stack([H @ V[:, j] for j in range(3)], dim=1)
        assert not calls
    finally:
        torch._native_multi_head_attention = native
    assert rel_err(HV, rows @ V, scale * V.norm(dim=0).max()) < 1e-10
