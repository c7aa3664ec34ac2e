"""One unit ``y = act(bn(conv(x)) + residual)``: input checks, the autograd Function, BN state.

The flow (DESIGN.md section 4): :func:`conv_bn_act` checks the inputs, picks the backend, runs
:class:`ConvBNActFunction` (which calls the backend's composite ops) and only then, once every
kernel has succeeded, updates the BatchNorm running statistics exactly like ``nn.BatchNorm2d``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from fusedres import reference
from fusedres.backend import Backend, ConvParams, conv_output_hw, resolve

__all__ = ["ConvBNActFunction", "conv_bn_act", "check_unit_inputs"]


def _fused_forward(x, weight, gamma, beta, residual, stat_mean, stat_var, backend: Backend,
                   conv: ConvParams, relu: bool, use_batch_stats: bool, eps: float):
    """The unit's forward on ``backend``: (y, z, mean, var, invstd, gamma in stats dtype)."""
    sdt = reference.stats_dtype(x.dtype)
    gamma_s, beta_s = gamma.to(sdt), beta.to(sdt)
    if use_batch_stats:
        y, z, mean, var, invstd = backend.forward_train(x, weight, gamma_s, beta_s, residual,
                                                        relu, eps, conv)
    else:
        mean, var = stat_mean.to(sdt), stat_var.to(sdt)
        invstd = torch.rsqrt(var + eps)
        scale = gamma_s * invstd
        y, z = backend.forward_eval(x, weight, scale, beta_s - mean * scale, residual, relu,
                                    conv)
    return y, z, mean, var, invstd, gamma_s


class ConvBNActFunction(torch.autograd.Function):
    """Autograd for one unit on a fused backend.

    Forward returns ``(y, mean, var)``: y [N, Cout, Ho, Wo]; the batch mean and biased variance
    [Cout] (statistics dtype; only meaningful with batch statistics) for the caller's running
    statistics update. mean and var carry no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, residual, stat_mean, stat_var, backend: Backend,
                conv: ConvParams, relu: bool, use_batch_stats: bool, eps: float):
        y, z, mean, var, invstd, gamma_s = _fused_forward(
            x, weight, gamma, beta, residual, stat_mean, stat_var, backend, conv, relu,
            use_batch_stats, eps)
        # Without ReLU there is no mask, so backward never reads y; keeping it would hold one
        # activation per downsample unit (its y is the block's identity branch) for nothing.
        ctx.save_for_backward(x, weight, y if relu else None, z, mean, invstd, gamma_s)
        ctx.backend, ctx.conv, ctx.relu, ctx.use_batch_stats = backend, conv, relu, use_batch_stats
        ctx.gamma_dtype, ctx.beta_dtype = gamma.dtype, beta.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, y, z, mean, invstd, gamma_s = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dw, dgamma, dbeta, dres = ctx.backend.backward(
            dy, x, weight, y, z, mean, invstd, gamma_s, ctx.relu, has_residual=needs[4],
            training=ctx.use_batch_stats, conv=ctx.conv,
            needs=(needs[0], needs[1], needs[2] or needs[3]))
        dgamma = dgamma.to(ctx.gamma_dtype) if needs[2] else None
        dbeta = dbeta.to(ctx.beta_dtype) if needs[3] else None
        return dx, dw, dgamma, dbeta, dres, None, None, None, None, None, None, None


def conv_output_shape(shape: Sequence[int], conv: nn.Conv2d) -> torch.Size:
    """The output shape of ``conv`` for an input of ``shape`` [N, Cin, H, W]."""
    hw = conv_output_hw(shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return torch.Size([shape[0], conv.out_channels, *hw])


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with batch statistics (training, or no running statistics)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def single_value_error(out_size: Sequence[int]) -> ValueError:
    """nn.BatchNorm2d's error, word for word, for one value per channel in training."""
    return ValueError(f"Expected more than 1 value per channel when training, got input size "
                      f"{torch.Size(out_size)}")


def check_unit_inputs(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module,
                      residual: Optional[torch.Tensor], name: str) -> torch.Size:
    """Raises a clear error for input the fused unit cannot take; returns the conv output size.

    Args:
        x: [N, Cin, H, W]; residual: [N, Cout, Ho, Wo] or None.
        name: how the unit is called in messages (e.g. ``"layer1.0.conv1"``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: input must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"{name}: input has {x.shape[1]} channels but the convolution expects "
                         f"in_channels={conv.in_channels} (input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor, got {x.dtype}")
    w = conv.weight
    if x.device != w.device:
        raise RuntimeError(f"{name}: input is on {x.device} but the convolution weight is on "
                           f"{w.device}; move the model or the input")
    if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the convolution weight dtype "
                        f"{w.dtype}; cast the model (model.to(dtype)) or use autocast")
    for pname in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, pname, None)
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"{name}: BatchNorm {pname} is on {t.device} but the input is on "
                               f"{x.device}")
        if t.dtype not in (x.dtype, torch.float32, torch.float64):
            raise TypeError(f"{name}: BatchNorm {pname} has dtype {t.dtype}; it must match the input "
                            f"({x.dtype}) or be float32")
    out_size = conv_output_shape(x.shape, conv)
    if min(out_size[2:]) <= 0:
        raise ValueError(f"{name}: input spatial size {tuple(x.shape[2:])} is too small for the "
                         f"{tuple(conv.kernel_size)} convolution (output would be {tuple(out_size)})")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{name}: residual must be a torch.Tensor or None")
        if residual.shape != out_size:
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)} but the unit's "
                             f"output has shape {tuple(out_size)}")
        if residual.device != x.device or (residual.dtype != x.dtype
                                           and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"{name}: residual is {residual.dtype} on {residual.device} but the "
                            f"input is {x.dtype} on {x.device}; they must match")
    return out_size


def _is_fusable(conv: nn.Module, bn: nn.Module) -> bool:
    # Exactly what the kernels implement: a bias-free, zero-padded Conv2d and a BatchNorm2d.
    # Anything else (SyncBatchNorm, GroupNorm, reflect padding, conv bias) keeps eager semantics.
    return (isinstance(conv, nn.Conv2d) and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and isinstance(bn, nn.BatchNorm2d))


def _autocast_dtype(dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype autocast hands a convolution's ``dtype`` operand: float64 is left alone."""
    return dtype if autocast_dtype is None or dtype == torch.float64 else autocast_dtype


def conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                residual: Optional[torch.Tensor] = None, relu: bool = True,
                backend: Optional[str] = None, name: str = "unit") -> torch.Tensor:
    """``act(bn(conv(x)) + residual)`` with nn.BatchNorm2d semantics, on a fused backend.

    The modules hold their parameters in ``conv`` and ``bn`` (so state_dicts match torchvision);
    this reads them and, in training, updates ``bn``'s running statistics and
    ``num_batches_tracked`` as nn.BatchNorm2d does, after the kernels have succeeded.

    Args:
        x: [N, Cin, H, W], contiguous or channels_last.
        conv: a bias-free nn.Conv2d (anything else falls back to the eager composition).
        bn: nn.BatchNorm2d over Cout channels.
        residual: [N, Cout, Ho, Wo] added before the activation, or None.
        relu: apply ReLU at the end.
        backend: a backend name, or None for the global choice (see fusedres.backend).
        name: the unit's name in error messages.

    Returns:
        [N, Cout, Ho, Wo] in x's dtype.
    """
    out_size = check_unit_inputs(x, conv, bn, residual, name)
    autocast = (torch.get_autocast_dtype(x.device.type)
                if torch.is_autocast_enabled(x.device.type) else None)
    be = resolve(backend, x.device, _autocast_dtype(x.dtype, autocast))
    if getattr(be, "uses_reference_composition", False) or not _is_fusable(conv, bn):
        return reference.unit_forward(x, conv, bn, residual, relu)
    weight = conv.weight
    if autocast is not None:
        # What autocast does to the eager unit: conv input and weight in the autocast dtype, BN
        # parameters and statistics in float32, so the output is in the autocast dtype.
        x = x.to(_autocast_dtype(x.dtype, autocast))
        weight = weight.to(_autocast_dtype(weight.dtype, autocast))
        if residual is not None:
            residual = residual.to(_autocast_dtype(residual.dtype, autocast))
    if x.shape[0] == 0:
        # nn.BatchNorm2d on an empty batch returns it, leaves the running statistics alone and
        # still counts the batch; the eager composition is that behaviour exactly.
        return reference.unit_forward(x, conv, bn, residual, relu)

    use_batch_stats = uses_batch_stats(bn)
    if use_batch_stats and out_size[0] * out_size[2] * out_size[3] == 1:
        raise single_value_error(out_size)
    sdt = reference.stats_dtype(x.dtype)
    channels = conv.out_channels
    gamma = bn.weight if bn.affine else torch.ones(channels, dtype=sdt, device=x.device)
    beta = bn.bias if bn.affine else torch.zeros(channels, dtype=sdt, device=x.device)
    stat_mean = bn.running_mean if not use_batch_stats else None
    stat_var = bn.running_var if not use_batch_stats else None
    params = ConvParams(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
    args = (x, weight, gamma, beta, residual, stat_mean, stat_var, be, params, relu,
            use_batch_stats, bn.eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, gamma, beta, residual)):
        y, mean, var = ConvBNActFunction.apply(*args)
    else:
        # Nothing to differentiate (inference, frozen layers): the autograd.Function's
        # bookkeeping and saved tensors would be pure overhead.
        y, _, mean, var, _, _ = _fused_forward(*args)
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean, var, count=out_size[0] * out_size[2] * out_size[3])
    return y


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
                          count: int) -> None:
    """nn.BatchNorm2d's update: unbiased variance, ``momentum`` or a cumulative average."""
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        factor = 1.0 / float(bn.num_batches_tracked)
    else:
        factor = bn.momentum
    if bn.running_mean is None:
        return
    unbiased = var * (count / (count - 1))
    # The same expression as ATen's batch_norm update, so the statistics match it bit for bit
    # as often as the rounding of the batch statistics allows.
    bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
