"""Speed paths of the curvature products: model patching and custom kernels, behind one switch.

Each path computes the same function of the same parameters as the model's own code, with cheaper
derivatives; products agree with the unpatched ones to rounding (the tests compare both against
dense float64 references). Timings: see benchmarks/README.md. The paths, and where they are used by
default (where they were measured faster):

- **Convolutions with an explicit double backward** (:class:`_ConvGrad`): ``nn.Conv2d`` modules run
  through :func:`conv2d_forward` for the double-backprop products, on the CPU only (CUDA keeps
  PyTorch's own until it has been timed there).
- **Eval-mode BatchNorm as the affine map it computes** (:func:`affine_forward`): double-backprop
  products in eval mode, any device.
- **Channels-last image batches** (:meth:`FastPaths.run`): 4-D floating-point inputs on the CPU go in
  NHWC memory order, the order oneDNN's convolutions work in.

**The switch.** A path is taken only when both are on: the operator's ``fast_paths=`` argument
(default ``True``) and the global switch, on unless turned off by :func:`enabled` (``with
hessianflow.curvature.fast_paths.enabled(False): ...``) or the environment (``HESSIANFLOW_FAST_PATHS=0``). Off,
no module of the model gets an instance-level ``forward`` and inputs keep their memory format: a user
debugging a model sees it run exactly as written.

Not here: TF32 (an accuracy setting, the operators' ``allow_tf32=``) and the attention kernel
selection (:func:`hessianflow.curvature.attention.product_kernels`, needed for correctness: the fused kernels have
no double backward).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ENV", "enabled", "is_enabled", "FastPaths", "conv2d_forward", "affine_forward"]

#: The environment variable of the global switch: ``0``, ``false``, ``off`` or ``no`` turn every
#: speed path off (read at every product).
ENV = "HESSIANFLOW_FAST_PATHS"

_OFF_WORDS = ("0", "false", "off", "no")
_override: bool | None = None  # set by enabled(); None: the environment decides


def is_enabled() -> bool:
    """The global switch: the innermost :func:`enabled` block's flag, else ``$HESSIANFLOW_FAST_PATHS``.

    Example:
        >>> from hessianflow.curvature import fast_paths
        >>> with fast_paths.enabled(False):
        ...     fast_paths.is_enabled()
        False
    """
    if _override is not None:
        return _override
    return os.environ.get(ENV, "1").strip().lower() not in _OFF_WORDS


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """Turn every speed path on or off for a block (nested blocks: the innermost wins).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import HessianOperator
        >>> from hessianflow.curvature import fast_paths
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])
        >>> H = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y))
        >>> v = torch.randn(H.size)
        >>> fast = H @ v
        >>> with fast_paths.enabled(False):  # the model runs exactly as written
        ...     plain = H @ v
        >>> torch.allclose(fast, plain, rtol=1e-4, atol=1e-5)
        True
    """
    global _override
    previous = _override
    _override = bool(flag)
    try:
        yield
    finally:
        _override = previous


class FastPaths:
    """The speed paths of one operator: :meth:`patched` around a product, :meth:`run` for its forward.

    Args:
        on: the operator's own switch (``fast_paths=``); the global one (:func:`is_enabled`) must be on
            too.

    Attributes:
        channels_last: whether image batches are still sent in channels-last order; a model that cannot
            take it (e.g. ``x.view(n, -1)`` on a non-contiguous activation raises) is run in NCHW from
            its first failure on.
    """

    def __init__(self, on: bool = True):
        self.on = bool(on)
        self.channels_last = True

    def active(self) -> bool:
        """Both switches on."""
        return self.on and is_enabled()

    @contextlib.contextmanager
    def patched(self, model: nn.Module, *, device: torch.device, double_backprop: bool, train_mode: bool):
        """Give the model's convolutions and eval-mode BatchNorms the faster forwards for a block.

        Only for double-backprop products (``torch.func`` traces a module's own forward), and never for a
        module that already has an instance-level ``forward`` of its own; removed again on exit.
        """
        forwards = []
        if self.active() and double_backprop:
            if device.type == "cpu":
                for m in model.modules():
                    if isinstance(m, nn.Conv2d) and "forward" not in m.__dict__:
                        fwd = conv2d_forward(m)
                        if fwd is not None:
                            forwards.append((m, fwd))
            if not train_mode:
                for m in model.modules():
                    if (
                        isinstance(m, nn.modules.batchnorm._BatchNorm)
                        and m.running_mean is not None
                        and m.running_var is not None
                        and "forward" not in m.__dict__
                    ):
                        forwards.append((m, affine_forward(m)))
        try:
            for m, fwd in forwards:
                m.forward = fwd
            yield
        finally:
            for m, _ in forwards:
                m.__dict__.pop("forward", None)

    def run(self, model: nn.Module, inputs):
        """``model(inputs)``; a CPU image batch goes in channels-last (NHWC) memory order.

        oneDNN's CPU convolutions work in NHWC: fed NCHW, they reorder every activation and gradient. The
        values are the same up to rounding, but rounding decides on which side of a ReLU or max-pool kink
        a float32 activation falls, so against float64 either layout can be the more accurate one
        (benchmarks/README.md, "Float32 honesty").
        """
        if not isinstance(inputs, torch.Tensor):  # a mapping or a tuple of inputs: the model's own call
            return model(inputs)
        cpu_image = inputs.dim() == 4 and inputs.is_floating_point() and inputs.device.type == "cpu"
        if cpu_image and self.channels_last and self.active():
            try:
                return model(inputs.contiguous(memory_format=torch.channels_last))
            except RuntimeError:
                self.channels_last = False
        return model(inputs)


# ------------------------------------------------------------------------------------------------
# eval-mode BatchNorm as an affine map
# ------------------------------------------------------------------------------------------------
def affine_forward(m: nn.Module):
    """Eval-mode BatchNorm as the affine map it computes (same function of the same parameters).

    :math:`x \\mapsto x\\,s + (\\beta - \\mu s)` with :math:`s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}`
    from the running statistics. Its double backward is a few elementwise products instead of the
    generic batch-norm double backward; products equal the module's own to rounding (timings:
    benchmarks/README.md).
    """

    def forward(inp):
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = m.weight * scale
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = m.bias + shift
        shape = (1, -1) + (1,) * (inp.dim() - 2)
        return inp * scale.view(shape) + shift.view(shape)

    return forward


# ------------------------------------------------------------------------------------------------
# 2-D convolution with an explicit double backward
# ------------------------------------------------------------------------------------------------
_conv_backward = torch.ops.aten.convolution_backward


class _ConvGrad(torch.autograd.Function):
    """``(grad_input, grad_weight)`` of a bias-free 2-D convolution, differentiable once more.

    PyTorch's own double backward of a convolution forms the weight-gradient terms as convolutions of
    batch-transposed tensors (a 32x32 "kernel" for a ResNet stage, plus copies to make them contiguous).
    Here each term is one of the kernels a plain gradient uses: for ``gx = conv_input_grad(gy, W)`` and
    ``gW = conv_weight_grad(x, gy)`` with cotangents ``u_x`` and ``u_W``,

    .. math::
        \\bar{g}_y = \\mathrm{conv}(u_x, W) + \\mathrm{conv}(x, u_W),\\quad
        \\bar{W} = \\mathrm{conv\\_weight\\_grad}(u_x, g_y),\\quad
        \\bar{x} = \\mathrm{conv\\_input\\_grad}(g_y, u_W).

    Timings: see benchmarks/README.md. Products equal PyTorch's to rounding: tests/test_operators.py
    checks them against ``torch.func.hessian`` for strided, dilated, grouped and bias-free convolutions.
    """

    @staticmethod
    def forward(ctx, gy, x, W, conf, need_x):
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(gy, x, W)
        ctx.conf, ctx.need_x = conf, need_x
        zeros = [0] * len(stride)
        mask = [need_x, True, False]
        gx, gW, _ = _conv_backward(gy, x, W, None, stride, padding, dilation, False, zeros, groups, mask)
        return (gx if need_x else gy.new_zeros(())), gW

    @staticmethod
    def backward(ctx, u_x, u_W):
        gy, x, W = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        zeros = [0] * len(stride)
        ggy = gx2 = gW2 = None
        if ctx.needs_input_grad[0]:
            ggy = torch.nn.functional.conv2d(x, u_W, None, stride, padding, dilation, groups)
            if ctx.need_x:
                ggy = ggy + torch.nn.functional.conv2d(u_x, W, None, stride, padding, dilation, groups)
        if ctx.need_x and ctx.needs_input_grad[2]:
            mask = [False, True, False]
            _, gW2, _ = _conv_backward(gy, u_x, W, None, stride, padding, dilation, False, zeros, groups, mask)
        if ctx.needs_input_grad[1]:
            mask = [True, False, False]
            gx2, _, _ = _conv_backward(gy, x, u_W, None, stride, padding, dilation, False, zeros, groups, mask)
        return ggy, gx2, gW2, None, None


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward is :class:`_ConvGrad` (so its double backward is the one above)."""

    @staticmethod
    def forward(ctx, x, W, b, conf):
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(x, W)
        ctx.conf, ctx.has_bias = conf, b is not None
        return torch.nn.functional.conv2d(x, W, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, W = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        gx, gW = _ConvGrad.apply(gy, x, W, ctx.conf, need_x)
        gb = gy.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (gx if need_x else None), gW, gb, None


def conv2d_forward(module: nn.Conv2d):
    """A forward for ``module`` with the explicit double backward, or ``None`` where it does not apply
    (non-zero padding modes and ``padding="same"/"valid"`` keep the module's own)."""
    if type(module) is not nn.Conv2d or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    conf = (list(module.stride), list(module.padding), list(module.dilation), module.groups)

    def forward(x):
        if x.dim() != 4:  # unbatched input: the module's own path
            return nn.Conv2d.forward(module, x)
        return _Conv2d.apply(x, module.weight, module.bias, conf)

    return forward
