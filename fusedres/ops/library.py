"""Fake (meta) kernels of the C++ ops ``torch.ops.fusedres.*`` defined in csrc/fusedres.cpp.

The unit-level ops (``unit_train``, ``unit_eval``, ``unit_backward``) take their fakes from
:mod:`fusedres.ops.unit_schema`, which every backend's unit ops share; the BatchNorm primitives'
fakes are here, and ``block_backward``'s, which runs the block op's Python loop
(:func:`fusedres.ops.block.backward_units`) over the unit ops' fakes.

They let ``torch.compile`` and ``torch.export`` trace through the ops without running them: each
returns empty tensors with the shapes, dtypes and strides the real kernels produce. They are
registered only when the extension ``fusedres._C`` is loaded, since the ops (their schemas) come
from it; importing this module is harmless otherwise.

Conventions shared with the C++ code (csrc/common/checks.h):

- the *statistics dtype* of per-channel vectors is float64 for float64 activations, else float32;
- activation outputs take z's dtype and memory format: channels_last when z is channels_last
  dense and not also NCHW contiguous, NCHW contiguous otherwise (other strided inputs are copied).

The ReLU bit mask of ``bn_act_fwd_mask`` / ``bn_act_bwd_mask`` (see :func:`pack_relu_mask`):
a uint8 [ceil(N*C*H*W / 8)] tensor, bit k (least significant first) of byte j set when element
8j + k of y, in y's memory order, passes the gradient (``not y <= 0``, the rule of torch's
threshold_backward); the last byte's padding bits are 0.

When the mask pays: the backward reads 1/8 byte per element for the ReLU gate instead of y's 2-4
bytes, in the memory-bound pass that reduces dbias/dweight (and in the dz pass when there is no
residual gradient to read g from). It saves no memory in a ResNet unit: y is the next
convolution's input, saved for that convolution's weight gradient anyway, so
``fusedres.ops.unit`` keeps y. Memory is saved only where nothing else keeps y alive.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedres import _ext
from fusedres.backend import BlockOps, memory_format_of
from fusedres.ops import unit_schema
from fusedres.ops.block import backward_units, unit_geometry
from fusedres.ops.pool import max_pool_output_hw
from fusedres.reference import stats_dtype

__all__ = ["REGISTERED", "output_memory_format", "pack_relu_mask", "relu_mask_bytes"]


#: The memory format the ops give their activation outputs for input z (see
#: :func:`fusedres.backend.memory_format_of`).
output_memory_format = memory_format_of


def relu_mask_bytes(numel) -> int:
    """Bytes of the packed ReLU mask of a tensor of ``numel`` elements: ceil(numel / 8)."""
    return (numel + 7) // 8


def pack_relu_mask(y: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """The packed ReLU mask of ``y``, in plain PyTorch: the definition the kernels are tested against.

    Args:
        y: [N, C, H, W] forward output (any strides).
        memory_format: the element order of the bits, the output format of the op that made y
            (:func:`output_memory_format` of its z): ``torch.channels_last`` (NHWC order) or
            ``torch.contiguous_format`` (NCHW order).

    Returns:
        uint8 [ceil(N*C*H*W / 8)] on y's device: bit k of byte j is ``not y[e] <= 0`` for the
        element e = 8j + k in that order; padding bits are 0.
    """
    ordered = y.permute(0, 2, 3, 1) if memory_format == torch.channels_last else y
    gate = (~(ordered.reshape(-1) <= 0)).to(torch.int32)
    gate = torch.cat([gate, gate.new_zeros(relu_mask_bytes(gate.numel()) * 8 - gate.numel())]).view(-1, 8)
    return (gate << torch.arange(8, dtype=torch.int32, device=y.device)).sum(1).to(torch.uint8)


def _bn_stats_fake(z: torch.Tensor):
    """z: [N, C, H, W] -> (mean [C], var [C]) in the statistics dtype."""
    c = z.shape[1]
    sdt = stats_dtype(z.dtype)
    return z.new_empty((c,), dtype=sdt), z.new_empty((c,), dtype=sdt)


def _bn_act_fwd_fake(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """z, residual: [N, C, H, W]; scale, shift: [C] -> y: [N, C, H, W] like z."""
    return torch.empty_like(z, memory_format=output_memory_format(z))


def _bn_act_bwd_fake(dy: torch.Tensor, y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                     invstd: torch.Tensor, weight: torch.Tensor, relu: bool, has_residual: bool,
                     training: bool):
    """dy, y, z: [N, C, H, W]; mean, invstd, weight: [C].

    Returns:
        (dz [N, C, H, W] like z, dweight [C], dbias [C] in the statistics dtype, dresidual
        [N, C, H, W] like z when ``has_residual``, else an empty [0] tensor).
    """
    fmt = output_memory_format(z)
    c = z.shape[1]
    sdt = stats_dtype(z.dtype)
    dz = torch.empty_like(z, memory_format=fmt)
    if has_residual:
        dres = torch.empty_like(z, dtype=dy.dtype, memory_format=fmt)
    else:
        dres = dy.new_empty((0,))
    return dz, z.new_empty((c,), dtype=sdt), z.new_empty((c,), dtype=sdt), dres


def _bn_act_fwd_mask_fake(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                          residual: Optional[torch.Tensor]):
    """z, residual: [N, C, H, W]; scale, shift: [C] -> (y [N, C, H, W] like z, mask uint8 [ceil(numel/8)])."""
    y = torch.empty_like(z, memory_format=output_memory_format(z))
    return y, z.new_empty((relu_mask_bytes(z.numel()),), dtype=torch.uint8)


def _bn_act_bwd_mask_fake(dy: torch.Tensor, mask: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                          invstd: torch.Tensor, weight: torch.Tensor, has_residual: bool, training: bool):
    """dy, z: [N, C, H, W]; mask: uint8 [ceil(numel/8)]; mean, invstd, weight: [C].

    Returns:
        as ``bn_act_bwd`` with ``relu=True``.
    """
    return _bn_act_bwd_fake(dy, z, z, mean, invstd, weight, True, has_residual, training)


def _max_pool2d_fake(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool):
    """x: [N, C, H, W] -> [N, C, Ho, Wo] channels_last (nn.MaxPool2d's output size)."""
    ho, wo = max_pool_output_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation,
                                ceil_mode)
    return torch.empty((x.shape[0], x.shape[1], ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _block_backward_fake(dy, x, y, weights, gammas, betas, zs, means, invstds, geometry, relus,
                         downsample, needs):
    """The block op's Python loop over the unit ops' fakes: the C++ op runs the same ops."""
    ops = torch.ops.fusedres
    block_ops = BlockOps(ops.unit_train.default, ops.unit_backward.default,
                         ops.bn_act_fwd.default, unit_schema.ATEN_LAYOUT.z)
    dx, grads = backward_units(block_ops, dy, x, y, weights, gammas, betas, zs, means, invstds,
                               unit_geometry(geometry), relus, downsample, needs)
    # The op's [0] placeholders where a gradient is not asked for.
    return (dy.new_empty((0,)) if dx is None else dx,
            [dy.new_empty((0,)) if g is None else g for g in grads])


def _register() -> bool:
    if not _ext.extension_loaded():
        return False
    if hasattr(torch.ops.fusedres, "unit_train"):
        unit_schema.register_fakes("fusedres", unit_schema.ATEN_LAYOUT)
    torch.library.register_fake("fusedres::bn_stats")(_bn_stats_fake)
    torch.library.register_fake("fusedres::bn_act_fwd")(_bn_act_fwd_fake)
    torch.library.register_fake("fusedres::bn_act_bwd")(_bn_act_bwd_fake)
    # An extension built before the mask ops existed lacks them; the package must still import
    # (tests/test_opcheck.py fails on any op without a fake).
    if hasattr(torch.ops.fusedres, "bn_act_fwd_mask"):
        torch.library.register_fake("fusedres::bn_act_fwd_mask")(_bn_act_fwd_mask_fake)
        torch.library.register_fake("fusedres::bn_act_bwd_mask")(_bn_act_bwd_mask_fake)
    if hasattr(torch.ops.fusedres, "max_pool2d"):
        torch.library.register_fake("fusedres::max_pool2d")(_max_pool2d_fake)
    if hasattr(torch.ops.fusedres, "block_backward"):
        torch.library.register_fake("fusedres::block_backward")(_block_backward_fake)
    return True


#: Whether the fake kernels were registered (the extension is loaded).
REGISTERED: bool = _register()
