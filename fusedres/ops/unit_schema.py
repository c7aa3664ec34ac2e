"""The unit-level ops' contract, shared by every backend: schemas, layouts and fake kernels.

One op per phase of a unit ``y = act(bn(conv(x)) + residual)`` (docs/design.md section 4):

- ``unit_train``: convolution, batch statistics, the running-statistics update in place (the
  schema declares the buffers it mutates, as ``aten::_native_batch_norm_legit`` does), BN-apply +
  residual + ReLU -> ``(y, z, mean, invstd)``; z, mean and invstd are what backward needs.
- ``unit_eval``: convolution and the apply with scale/shift computed inside from gamma, beta,
  the running statistics and eps -> ``y``.
- ``unit_backward``: ReLU mask, dgamma/dbeta, dz, dresidual and the convolution's dgrad/wgrad ->
  ``(dx, dweight, dgamma, dbeta, dresidual)``; outputs not asked for in ``output_mask`` are
  ``[0]`` placeholders.

The C++ backends define these schemas in csrc/fusedres.cpp (namespace ``fusedres``); the Python
backends (Triton, the tests' reference backend) define the same ones through
:mod:`fusedres.ops.python_unit`. tests/test_opcheck.py checks that the schemas agree.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fusedres.backend import conv_output_hw, memory_format_of
from fusedres.reference import stats_dtype

__all__ = ["ATEN_LAYOUT", "CHANNELS_LAST_LAYOUT", "Layout", "SCHEMAS", "register_fakes"]

SCHEMAS = {
    "unit_train": (
        "(Tensor x, Tensor weight, Tensor? gamma, Tensor? beta, Tensor? residual, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, float? momentum, "
        "float eps) -> (Tensor y, Tensor z, Tensor mean, Tensor invstd)"),
    "unit_eval": (
        "(Tensor x, Tensor weight, Tensor? gamma, Tensor? beta, Tensor? residual, "
        "Tensor running_mean, Tensor running_var, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool relu, float eps) -> Tensor y"),
    "unit_backward": (
        "(Tensor dy, Tensor x, Tensor weight, Tensor? y, Tensor? z, Tensor mean, Tensor invstd, "
        "Tensor? gamma, int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
        "bool training, bool[5] output_mask) "
        "-> (Tensor dx, Tensor dweight, Tensor dgamma, Tensor dbeta, Tensor dresidual)"),
}


class Layout(NamedTuple):
    """Where a backend's unit ops keep their tensors.

    Attributes:
        z: ``z(x, weight, stride, padding, dilation, groups) -> z``, the convolution output as
            the backend allocates it (used by the fake kernels, so its strides must be real).
        conv_input: the x the backend's convolutions (forward and backward) read.
        y_like_x: y comes back in x's memory format (the backend computes in channels_last and
            converts); otherwise y follows z's.
    """

    z: Callable
    conv_input: Callable
    y_like_x: Callable


def _aten_conv_input(x: torch.Tensor) -> torch.Tensor:
    # The cuda backend convolves in channels_last (float64 has no NHWC cuDNN kernels).
    if x.device.type == "cuda" and x.dtype != torch.float64:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _aten_z(x, weight, stride, padding, dilation, groups):
    return torch.ops.aten.convolution.default(_aten_conv_input(x), weight, None, stride, padding,
                                              dilation, False, [0, 0], groups)


def _channels_last_z(x, weight, stride, padding, dilation, groups):
    hw = conv_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], *hw), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


#: The C++ backends: ATen convolutions, channels_last on CUDA (y back in x's layout).
ATEN_LAYOUT = Layout(z=_aten_z, conv_input=_aten_conv_input,
                     y_like_x=lambda x: x.device.type == "cuda")
#: The Triton backend: its NHWC convolution kernel; y back in x's layout.
CHANNELS_LAST_LAYOUT = Layout(z=_channels_last_z,
                              conv_input=lambda x: x.contiguous(memory_format=torch.channels_last),
                              y_like_x=lambda x: True)


def _y_like(layout: Layout, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    fmt = memory_format_of(x) if layout.y_like_x(x) else memory_format_of(z)
    return torch.empty_like(z, memory_format=fmt)


def register_fakes(namespace: str, layout: Layout) -> None:
    """Registers the fake kernels of ``<namespace>::unit_{train,eval,backward}``."""

    def unit_train_fake(x, weight, gamma, beta, residual, running_mean, running_var,
                        num_batches_tracked, stride, padding, dilation, groups, relu, momentum,
                        eps):
        z = layout.z(x, weight, stride, padding, dilation, groups)
        sdt = stats_dtype(x.dtype)
        c = weight.shape[0]
        return (_y_like(layout, x, z), z, x.new_empty((c,), dtype=sdt),
                x.new_empty((c,), dtype=sdt))

    def unit_eval_fake(x, weight, gamma, beta, residual, running_mean, running_var, stride,
                       padding, dilation, groups, relu, eps):
        return _y_like(layout, x, layout.z(x, weight, stride, padding, dilation, groups))

    def unit_backward_fake(dy, x, weight, y, z, mean, invstd, gamma, stride, padding, dilation,
                           groups, relu, training, output_mask):
        # dz takes the layout of the z the BN backward reads: the saved one, the recomputed one
        # (eval with dgamma), or dy standing in for it (eval without).
        if z is not None:
            ref = z
        elif output_mask[2]:
            ref = layout.z(x, weight, stride, padding, dilation, groups)
        else:
            ref = dy
        dz = torch.empty_like(ref, memory_format=memory_format_of(ref))
        dx, _, _ = torch.ops.aten.convolution_backward.default(
            dz, layout.conv_input(x), weight, None, stride, padding, dilation, False, [0, 0],
            groups, [output_mask[0], False, False])
        # dweight in the weight's strides, whatever ATen's convention (csrc/unit_ops.cpp).
        dw = torch.empty_like(weight)
        sdt = stats_dtype(dy.dtype)
        c = weight.shape[0]
        outputs = (dx, dw, dy.new_empty((c,), dtype=sdt), dy.new_empty((c,), dtype=sdt),
                   torch.empty_like(dz, dtype=dy.dtype))
        # One [0] placeholder per output not asked for: outputs may not alias one another.
        return tuple(t if need else dy.new_empty((0,)) for t, need in zip(outputs, output_mask))

    torch.library.register_fake(f"{namespace}::unit_train")(unit_train_fake)
    torch.library.register_fake(f"{namespace}::unit_eval")(unit_eval_fake)
    torch.library.register_fake(f"{namespace}::unit_backward")(unit_backward_fake)
