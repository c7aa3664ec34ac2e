"""The Triton launchers (fusedres.kernels) as torch.library ops, ``torch.ops.fusedres_triton.*``.

Registered ops are opaque to ``torch.compile`` and ``torch.export``: they trace the fake kernels
below instead of the launchers' Python (autotuner lookups, device guards, the Triton JIT), which
dynamo cannot follow without graph breaks. Registering them needs neither triton nor a GPU: each
real implementation imports its launcher on first call, so ``import fusedres`` stays free of
triton.

Outputs never alias inputs or each other (a torch.library rule): per-channel vectors come back
stacked in one [k, C] float32 tensor that the caller unbinds, and an output a call does not
compute is an empty [0] tensor.

Defined with ``torch.library.define`` + ``impl`` rather than ``torch.library.custom_op``: the
units call these ops on every forward and backward, and custom_op's Python autograd wrapper and
aliasing checks cost ~14 us a call against ~4 us here (measured on the 2-core CI VM). The ops
need no autograd kernel: ConvBNActFunction calls them with grad mode off.

Each module-level name (``conv2d``, ...) is the op's ``OpOverload``, the fastest handle to call.
Where nothing can trace the call (below another op of this backend, or in the block op on plain
tensors outside compile and dispatch modes: fusedres/backends/triton.py), ``direct.<name>`` calls
the same Python implementation without the dispatcher, whose argument and result conversions
cost 8-35 us a call (``conv2d_bn_train``, with 15 arguments, the most; AMD EPYC, launches
stubbed, exploratory).
"""

from __future__ import annotations

import types
from typing import Callable, Optional

import torch

from fusedres.backend import conv_output_hw
from fusedres.ops.library import output_memory_format

__all__ = ["conv2d", "conv2d_bn_train", "bn_stats", "bn_act_fwd", "bn_act_bwd"]

_NS = "fusedres_triton"

#: The ops' implementations by op name, called as Python functions: only where no tracing
#: (torch.compile, torch.export, a fake tensor mode) can meet the call, which must see the op.
direct = types.SimpleNamespace()


def _op(schema: str, fake: Callable) -> Callable:
    """Defines ``fusedres_triton::<schema>`` with the decorated function as its CPU and CUDA
    implementation (also ``direct.<name>``) and ``fake`` as its fake kernel; returns the op's
    OpOverload."""
    name = schema[:schema.index("(")]

    def define(impl: Callable):
        qualname = f"{_NS}::{name}"
        torch.library.define(qualname, schema[len(name):])
        torch.library.impl(qualname, ("cpu", "cuda"))(impl)
        torch.library.register_fake(qualname)(fake)
        setattr(direct, name, impl)
        return getattr(getattr(torch.ops, _NS), name).default

    return define


def _channels_last_out(x: torch.Tensor, weight: torch.Tensor, stride, padding,
                       dilation) -> torch.Tensor:
    """The convolution's output as the kernel allocates it: [N, Cout, Ho, Wo] channels_last."""
    hw = conv_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], *hw), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _stats_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    return like.new_empty((rows, like.shape[1]), dtype=torch.float32)


# -- convolution (F1, F2, F3) -----------------------------------------------------------------


def _conv2d_fake(x, weight, stride, padding, dilation, groups, scale, shift, residual, relu,
                 in_scale=None, in_shift=None):
    return _channels_last_out(x, weight, stride, padding, dilation)


@_op("conv2d(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
     "int groups, Tensor? scale, Tensor? shift, Tensor? residual, bool relu, "
     "Tensor? in_scale=None, Tensor? in_shift=None) -> Tensor",
     _conv2d_fake)
def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
           dilation: list[int], groups: int, scale: Optional[torch.Tensor],
           shift: Optional[torch.Tensor], residual: Optional[torch.Tensor],
           relu: bool, in_scale: Optional[torch.Tensor] = None,
           in_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(conv2d(p(x), weight) * scale + shift + residual)``; the epilogue parts are optional,
    and ``p(x) = relu(x * in_scale + in_shift)`` (F3) or ``x``.

    Args:
        x: [N, Cin, H, W] fp16/bf16/fp32 (with in_scale: z of the previous unit).
        weight: [Cout, Cin/groups, KH, KW], x's dtype (or float32 with 16-bit x: autocast's
            master weight, cast once per weight version).
        stride, padding, dilation: pairs; groups: int.
        scale, shift: [Cout] float32, both or neither (eval BatchNorm folded in, F2).
        residual: [N, Cout, Ho, Wo] or None; relu: apply ReLU last.
        in_scale, in_shift: [Cin] float32, both or neither: the previous unit's BatchNorm scale
            and shift, applied with ReLU to x while the kernel loads it (F3); zero padding
            applies to the result.

    Returns:
        [N, Cout, Ho, Wo] channels_last, x's dtype.
    """
    from fusedres.kernels import conv as conv_k
    return conv_k.conv2d(x, weight, stride, padding, dilation, groups, scale=scale, shift=shift,
                         residual=residual, relu=relu, in_scale=in_scale, in_shift=in_shift)


def _conv2d_bn_train_fake(x, weight, stride, padding, dilation, groups, gamma, beta, eps,
                          running_mean=None, running_var=None, num_batches_tracked=None,
                          momentum=None, in_scale=None, in_shift=None):
    z = _channels_last_out(x, weight, stride, padding, dilation)
    return z, _stats_rows(z, 5)


@_op("conv2d_bn_train(Tensor x, Tensor weight, int[2] stride, int[2] padding, "
     "int[2] dilation, int groups, Tensor gamma, Tensor beta, float eps, "
     "Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, "
     "Tensor(c!)? num_batches_tracked=None, float? momentum=None, Tensor? in_scale=None, "
     "Tensor? in_shift=None) -> (Tensor, Tensor)",
     _conv2d_bn_train_fake)
def conv2d_bn_train(x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                    padding: list[int], dilation: list[int], groups: int, gamma: torch.Tensor,
                    beta: torch.Tensor, eps: float, running_mean: Optional[torch.Tensor] = None,
                    running_var: Optional[torch.Tensor] = None,
                    num_batches_tracked: Optional[torch.Tensor] = None,
                    momentum: Optional[float] = None, in_scale: Optional[torch.Tensor] = None,
                    in_shift: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution with batch statistics from its epilogue (F1), and their finalize, which
    also updates the running statistics in place as nn.BatchNorm2d does. With ``in_scale`` it
    is the training forward of a unit fed by the previous unit's z (F3): that unit's
    BatchNorm + ReLU is applied while the kernel loads x, so its y is never written.

    Args:
        x, weight, stride, padding, dilation, groups: as :func:`conv2d` (x: with in_scale,
            z of the previous unit).
        gamma, beta: [Cout] float32.
        eps: BatchNorm's epsilon.
        running_mean, running_var: [Cout] or None (not tracked).
        num_batches_tracked: [] int64 or None; counts this batch (+1, on the device).
        momentum: the update factor, or None for the cumulative average 1/num_batches_tracked
            (without a counter, None leaves the running statistics as they are, like nn).
        in_scale, in_shift: [Cin] float32 or None, both or neither: the previous unit's
            BatchNorm scale and shift (rows 3 and 4 of its stats), applied with ReLU to x.

    Returns:
        (z [N, Cout, Ho, Wo] channels_last in x's dtype, stats [5, Cout] float32: the rows are
        the batch mean, biased variance, invstd, scale = gamma * invstd, shift = beta - mean *
        scale).
    """
    from fusedres.kernels import bn
    from fusedres.kernels import conv as conv_k
    z, pmean, pm2, rows = conv_k.conv2d(x, weight, stride, padding, dilation, groups, stats=True,
                                        in_scale=in_scale, in_shift=in_shift)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    cumulative = momentum is None
    update = running_mean is not None and not (cumulative and num_batches_tracked is None)
    stats = bn.stats_from_partials(
        pmean, pm2, z.numel() // z.shape[1], rows, gamma, beta, eps,
        running_mean=running_mean if update else None,
        running_var=running_var if update else None,
        counter=num_batches_tracked if cumulative else None,
        momentum=0.0 if cumulative else momentum)
    return z, stats


# -- BatchNorm (F2, B1) -----------------------------------------------------------------------


def _bn_stats_fake(z):
    return _stats_rows(z, 2)


@_op("bn_stats(Tensor z) -> Tensor", _bn_stats_fake)
def bn_stats(z: torch.Tensor) -> torch.Tensor:
    """Per-channel batch statistics of z [N, C, H, W]: [2, C] float32 (mean, biased var)."""
    from fusedres.kernels import bn
    return bn.bn_stats(z)


def _bn_act_fwd_fake(z, scale, shift, residual, relu):
    return torch.empty_like(z, memory_format=output_memory_format(z))


@_op("bn_act_fwd(Tensor z, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor",
     _bn_act_fwd_fake)
def bn_act_fwd(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """``act(z * scale + shift + residual)``: z, residual [N, C, H, W]; scale, shift [C] fp32.

    Returns:
        y [N, C, H, W] in z's dtype and memory format.
    """
    from fusedres.kernels import bn
    return bn.bn_act_fwd(z, scale, shift, residual, relu)


def _bn_act_bwd_fake(dy, y, z, mean, invstd, weight, relu, has_residual, training, need_dweight):
    ref = z if z is not None else dy
    dz = torch.empty_like(ref, memory_format=output_memory_format(ref))
    dres = torch.empty_like(dz) if has_residual else dz.new_empty((0,))
    return dz, _stats_rows(dz, 2), dres


@_op("bn_act_bwd(Tensor dy, Tensor y, Tensor? z, Tensor mean, Tensor invstd, Tensor weight, "
     "bool relu, bool has_residual, bool training, bool need_dweight) "
     "-> (Tensor, Tensor, Tensor)", _bn_act_bwd_fake)
def bn_act_bwd(dy: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor], mean: torch.Tensor,
               invstd: torch.Tensor, weight: torch.Tensor, relu: bool, has_residual: bool,
               training: bool, need_dweight: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`bn_act_fwd` (B1); see ``fusedres.kernels.bn.bn_act_bwd``.

    Args:
        dy, y: [N, C, H, W]; z: [N, C, H, W], or None when neither ``training`` nor
            ``need_dweight``; mean, invstd, weight: [C] float32.
        relu, has_residual, training, need_dweight: the unit's switches.

    Returns:
        (dz [N, C, H, W], sums [2, C] float32 with rows dbias and dweight (dweight zeros
        unless ``need_dweight`` or ``training``), dresidual [N, C, H, W], or [0] without
        ``has_residual``); dz and dresidual in z's (else dy's) dtype and memory format.
    """
    from fusedres.kernels import bn
    dz, sums, dres = bn.bn_act_bwd_packed(dy, y, z, mean, invstd, weight, relu, has_residual,
                                          training, need_dweight)
    return dz, sums, (dres if dres is not None else dz.new_empty((0,)))
