"""Attention kernels that curvature products can differentiate through.

Scaled dot-product attention (Vaswani et al. 2017),

.. math::
    \\operatorname{Attention}(Q, K, V) = \\operatorname{softmax}\\!\\left(\\frac{Q K^\\top}{\\sqrt{d_k}} + M\\right) V,

(:math:`M`: the mask, 0 or :math:`-\\infty`) is a smooth function of :math:`Q, K, V`, so its Hessian
exists and double backprop (or forward-over-reverse) computes it. What stands in the way is the kernel PyTorch picks for
``F.scaled_dot_product_attention`` (HuggingFace's default ``attn_implementation="sdpa"``, nanoGPT,
``nn.MultiheadAttention`` with ``need_weights=False``):

* the fused kernels (flash attention on the CPU and CUDA, memory-efficient and cuDNN attention on
  CUDA) have a backward but no derivative of that backward, so double backprop fails with
  ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``;
* they have no forward-mode derivative either, so forward-over-reverse fails with
  ``Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu``;
* the *math* kernel (``SDPBackend.MATH``) is composed of matrix products, a softmax and a masked fill,
  each of which has both, and it computes the same function (in float32 more accurately than the
  fused kernels, which it is the reference for).

:func:`product_kernels` selects the math kernel for the duration of a product and puts the user's
selection back afterwards. It also turns off ``nn.MultiheadAttention``'s (and
``nn.TransformerEncoder``'s) eval-mode fast path, ``torch._native_multi_head_attention``, which has
no derivatives at all. PyTorch already skips it when a parameter or input requires grad, but not
always when only some of the model's parameters are selected, and its nested-tensor conversion of
padded batches is not something a product should depend on.

HuggingFace models: ``attn_implementation="sdpa"`` (the default) and ``"eager"`` (attention written
out in matrix products) both work inside products. Kernels outside PyTorch's dispatcher
(``"flash_attention_2"``, ``"flash_attention_3"``, ``"flex_attention"`` and hub kernels) ignore the
selection; a product through one of them raises :class:`AttentionKernelError`, which says to load the
model with ``attn_implementation="sdpa"`` or call ``model.set_attn_implementation("sdpa")``.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["AttentionKernelError", "product_kernels", "SECOND_ORDER_BACKENDS", "FIRST_ORDER_BACKENDS"]

#: Backends whose products differentiate the backward pass (double backprop) or push a tangent
#: through it (forward-over-reverse): they need the math attention kernel.
SECOND_ORDER_BACKENDS = ("double_backprop", "forward_over_reverse")
#: Backends that only take first derivatives (finite differences of gradients, per-sample gradients):
#: every attention kernel has a backward, so the user's kernel selection is kept.
FIRST_ORDER_BACKENDS = ("finite_difference", "first_order")

# What PyTorch says when an attention kernel without second (or forward-mode) derivatives is hit.
_KERNEL_ERROR = re.compile(
    r"(derivative for (aten::)?\S*(attention|attn)\S* is not implemented"
    r"|forward AD with \S*(attention|attn)\S* that does not support it"
    r"|\S*(attention|attn)\S* does not support (forward AD|double backward|higher order))",
    re.IGNORECASE,
)


class AttentionKernelError(RuntimeError):
    """A curvature product reached an attention kernel that has no second or forward-mode derivative."""


@contextlib.contextmanager
def _fastpath_disabled():
    """Turn ``torch.backends.mha``'s fast path off, and put the user's setting back afterwards."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # older PyTorch: no switch to turn
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def _full_precision_math_sdp(device: torch.device):
    """On CUDA, keep the math kernel's reductions in float32 for half-precision inputs.

    PyTorch's default already does this; a user who enabled
    ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp`` for speed gets it back afterwards. It is
    the attention counterpart of the operators' ``allow_tf32=False``.
    """
    getter = getattr(torch.backends.cuda, "fp16_bf16_reduction_math_sdp_allowed", None)
    if device.type != "cuda" or getter is None:
        yield
        return
    previous = getter()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(previous)


def _explain(error: RuntimeError, device: torch.device, backend: str, model) -> AttentionKernelError:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    hf = (
        f" This HuggingFace model uses attn_implementation={impl!r}; load it with attn_implementation='sdpa' "
        "(or 'eager'), or call model.set_attn_implementation('sdpa') before building the operator."
        if impl is not None
        else " For a HuggingFace model, load it with attn_implementation='sdpa' (or 'eager')."
    )
    return AttentionKernelError(
        f"the {backend} product on {device} reached an attention kernel without "
        f"{'forward-mode' if backend == 'forward_over_reverse' else 'second'} derivatives ({error}). "
        "Inside products, hessianflow selects PyTorch's math kernel for F.scaled_dot_product_attention, "
        "which has them; this model's attention did not go through that selection: it calls a fused "
        "kernel directly, or enters torch.nn.attention.sdpa_kernel(...) itself inside forward() (remove it, "
        "or allow SDPBackend.MATH there)." + hf
    )


@contextlib.contextmanager
def product_kernels(device: torch.device | str | None = None, backend: str = "double_backprop", model=None):
    """Run the enclosed curvature products with attention kernels they can differentiate through.

    Inside the context:

    * ``F.scaled_dot_product_attention`` uses the math kernel only (``sdpa_kernel(SDPBackend.MATH)``),
      for the second-order backends (``"double_backprop"``, ``"forward_over_reverse"``); the flash,
      memory-efficient and cuDNN kernels have neither a double backward nor forward-mode derivatives.
      First-order backends (``"finite_difference"``, ``"first_order"``) keep the user's kernels.
    * ``nn.MultiheadAttention``'s eval-mode fast path is off (``torch.backends.mha``).
    * on CUDA, half-precision inputs to the math kernel are reduced in float32.
    * a product that reaches an attention kernel without the derivatives it needs raises
      :class:`AttentionKernelError` naming the fix instead of PyTorch's message.

    On exit, normal or by an exception, the previous settings come back: the enabled SDPA kernels
    (an enclosing ``sdpa_kernel(...)`` of the user's included), the fast-path switch and the CUDA
    reduction flag. The settings are process-global, like ``sdpa_kernel``'s own; the context nests.

    The math kernel materialises the ``[batch, heads, queries, keys]`` attention matrix, as the
    double backward must anyway: its memory is that of eager attention.

    Args:
        device: the device the products run on (``None``: the CPU); only CUDA has a reduction flag.
        backend: the product backend, one of :data:`SECOND_ORDER_BACKENDS` or
            :data:`FIRST_ORDER_BACKENDS`.
        model: optional; a HuggingFace model's ``config._attn_implementation`` is then named in the
            error message.

    Raises:
        ValueError: an unknown ``backend``.
        AttentionKernelError: (from the enclosed code) an attention kernel without the needed derivatives.

    Example (outside the context, PyTorch's CPU flash kernel raises on the second derivative):
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from hessianflow.curvature.attention import product_kernels
        >>> q = torch.randn(1, 1, 3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        >>> with product_kernels(torch.device("cpu"), "double_backprop"):
        ...     (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
        ...     (hv,) = torch.autograd.grad(g, q, grad_outputs=torch.ones_like(q))
        >>> hv.shape
        torch.Size([1, 1, 3, 4])
    """
    if backend not in SECOND_ORDER_BACKENDS + FIRST_ORDER_BACKENDS:
        raise ValueError(
            f"backend must be one of {SECOND_ORDER_BACKENDS + FIRST_ORDER_BACKENDS} to choose attention "
            f"kernels for it, got {backend!r}"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    second_order = backend in SECOND_ORDER_BACKENDS
    with contextlib.ExitStack() as stack:
        if second_order:
            # sdpa_kernel saves the enabled set on entry and restores it on exit, exceptions included.
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(_full_precision_math_sdp(device))
        stack.enter_context(_fastpath_disabled())
        try:
            yield
        except RuntimeError as e:
            if isinstance(e, AttentionKernelError) or not _KERNEL_ERROR.search(str(e)):
                raise
            raise _explain(e, device, backend, model) from e
