"""The oracle: the unit and the ResNet blocks in plain PyTorch, with torchvision's semantics.

Everything here is eager PyTorch (``F.conv2d``, ``F.batch_norm``, ``+``, ``relu``), so it is the
definition every backend is tested against. Op-level references (``bn_stats``, ``bn_act_fwd``,
``bn_act_bwd``) compute in float64 when ``upcast`` is set (the default), and :func:`upcast`
copies a whole module to float64 for model-level oracles.

The block classes mirror torchvision.models.resnet (ResNet v1.5: the stride sits on the 3x3 conv
of a Bottleneck), with the same attribute names and state_dict keys, so checkpoints load
unchanged and :func:`fusedres.to_eager` can return them.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "stats_dtype", "bn_stats", "bn_act_fwd", "bn_act_bwd", "unit_forward", "BasicBlock",
    "Bottleneck", "conv1x1", "conv3x3", "upcast",
]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel statistics for activations of ``dtype``: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.float64 if upcast else stats_dtype(dtype)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def bn_stats(z: torch.Tensor, upcast: bool = True):
    """Per-channel batch mean and biased variance.

    Args:
        z: [N, C, H, W] activations.
        upcast: compute in float64.

    Returns:
        (mean, var): [C] each, in ``stats_dtype(z.dtype)``.
    """
    zc = z.to(_compute_dtype(z.dtype, upcast))
    var, mean = torch.var_mean(zc, dim=(0, 2, 3), correction=0)
    out = stats_dtype(z.dtype)
    return mean.to(out), var.to(out)


def bn_act_fwd(z, scale, shift, residual: Optional[torch.Tensor], relu: bool, upcast: bool = True):
    """``y = act(z*scale + shift + residual)``.

    Args:
        z: [N, C, H, W]; scale, shift: [C]; residual: [N, C, H, W] or None.

    Returns:
        y: [N, C, H, W] in z's dtype and memory format.
    """
    dt = _compute_dtype(z.dtype, upcast)
    v = z.to(dt) * _per_channel(scale.to(dt)) + _per_channel(shift.to(dt))
    if residual is not None:
        v = v + residual.to(dt)
    if relu:
        v = torch.relu(v)
    return v.to(z.dtype).contiguous(memory_format=_memory_format(z))


def bn_act_bwd(dy, y, z, mean, invstd, weight, relu: bool, has_residual: bool, training: bool,
               upcast: bool = True):
    """Backward of ``bn_act_fwd`` composed with batch (training) or running (eval) statistics.

    Args:
        dy, y, z: [N, C, H, W]: the output gradient, the saved output and conv output.
        mean, invstd, weight: [C]: the statistics used in forward and gamma (ones if not affine).
        relu, has_residual, training: the unit's switches.

    Returns:
        (dz [N, C, H, W] in z's dtype, dweight [C], dbias [C] in the statistics dtype,
        dresidual [N, C, H, W] or None).
    """
    dt = _compute_dtype(z.dtype, upcast)
    g = dy.to(dt)
    if relu:
        g = torch.where(y <= 0, torch.zeros_like(g), g)
    mean_, invstd_, weight_ = (_per_channel(t.to(dt)) for t in (mean, invstd, weight))
    xhat = (z.to(dt) - mean_) * invstd_
    dbias = g.sum((0, 2, 3))
    dweight = (g * xhat).sum((0, 2, 3))
    if training:
        count = z.numel() // z.shape[1]
        dz = weight_ * invstd_ * (g - _per_channel(dbias) / count - xhat * _per_channel(dweight) / count)
    else:
        dz = weight_ * invstd_ * g
    fmt = _memory_format(z)
    sdt = stats_dtype(z.dtype)
    dres = g.to(dy.dtype).contiguous(memory_format=fmt) if has_residual else None
    return dz.to(z.dtype).contiguous(memory_format=fmt), dweight.to(sdt), dbias.to(sdt), dres


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def unit_forward(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                 residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """The unit ``act(bn(conv(x)) + residual)`` in eager PyTorch, honouring ``bn.training``.

    Args:
        x: [N, Cin, H, W]; residual: [N, Cout, Ho, Wo] or None.

    Returns:
        [N, Cout, Ho, Wo].
    """
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 units, the second adding the identity.

    Shapes: [N, inplanes, H, W] -> [N, planes, H/stride, W/stride].
    """

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5): 1x1 reduce, 3x3 (stride, groups), 1x1 expand + identity.

    Shapes: [N, inplanes, H, W] -> [N, planes*4, H/stride, W/stride].
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def upcast(module: nn.Module) -> nn.Module:
    """A float64 deep copy of ``module`` (buffers included), for oracles. The original is untouched."""
    return copy.deepcopy(module).double()
