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

import contextlib
import copy
import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedres.backend import explicit_padding, memory_format_of
from fusedres.fusability import eager_only_reason, forward_replaced

__all__ = [
    "stats_dtype", "bn_stats", "bn_act_fwd", "bn_act_bwd", "unit_forward", "BasicBlock",
    "Bottleneck", "ConvBNAct", "ResNet", "conv1x1", "conv3x3", "upcast",
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
    return v.to(z.dtype).contiguous(memory_format=memory_format_of(z))


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
    fmt = memory_format_of(z)
    sdt = stats_dtype(z.dtype)
    dres = g.to(dy.dtype).contiguous(memory_format=fmt) if has_residual else None
    return dz.to(z.dtype).contiguous(memory_format=fmt), dweight.to(sdt), dbias.to(sdt), dres


def unit_forward(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                 residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """The unit ``act(bn(conv(x)) + residual)`` in eager PyTorch, honouring ``bn.training``.

    Args:
        x: [N, Cin, H, W]; residual: [N, Cout, Ho, Wo] or None.

    Returns:
        [N, Cout, Ho, Wo].
    """
    pads = explicit_padding(x, conv) if _plain_zero_padded(conv) else None
    if pads is None:
        out = bn(conv(x))
    else:
        # Beyond-half-span padding, done explicitly: oneDNN crashes on some such geometries
        # (fusedres.backend.explicit_padding).
        out = bn(F.conv2d(F.pad(x, pads), conv.weight, conv.bias, conv.stride, 0, conv.dilation,
                          conv.groups))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _plain_zero_padded(conv: nn.Module) -> bool:
    """Whether calling ``conv`` is exactly ``F.conv2d`` with zero padding: an nn.Conv2d itself,
    its forward not replaced on the instance, no hooks on it, nothing that keeps every module
    eager (global hooks: fusedres.fusability.eager_only_reason)."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not forward_replaced(conv, "_conv_forward") and eager_only_reason() is None
            and not (conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks
                     or conv._backward_pre_hooks))


class ConvBNAct(nn.Module):
    """One unit ``act(bn(conv(x)) + residual)`` as plain modules (the eager twin of
    :class:`fusedres.FusedConvBNReLU`, with the same arguments and state_dict keys).

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as nn.Conv2d (no bias).
        padding: as nn.Conv2d; default ``dilation * (kernel_size // 2)``.
        relu: apply ReLU at the end.
        eps, momentum, affine, track_running_stats: as nn.BatchNorm2d.

    Shapes:
        x: [N, in_channels, H, W]; residual: [N, out_channels, Ho, Wo] or None;
        output: [N, out_channels, Ho, Wo].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                 groups: int = 1, relu: bool = True, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size // 2)
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias=False, **factory)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats,
                                 **factory)
        self.relu = relu

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return unit_forward(x, self.conv, self.bn, residual, self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


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


class ResNet(nn.Module):
    """torchvision's ResNet (also ResNeXt and Wide ResNet through groups and width_per_group).

    Args:
        block: the block class (BasicBlock or Bottleneck, or their fused versions).
        layers: blocks per stage, e.g. [3, 4, 6, 3] for ResNet-50.
        num_classes: outputs of the final linear layer.
        zero_init_residual: zero the last BN's gamma in each block, so blocks start as identities.
        groups, width_per_group: ResNeXt cardinality and width per group (Wide ResNet: 128).
        replace_stride_with_dilation: per stage 2-4, dilate instead of striding.
        norm_layer: the normalisation layer class (default nn.BatchNorm2d).
        block_kwargs: extra keyword arguments for every block (the fused blocks take ``backend``).

    Shapes: [N, 3, H, W] -> [N, num_classes].
    """

    def __init__(self, block, layers: list, num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[list] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 block_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self._block_kwargs = dict(block_kwargs or {})
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer, **self._block_kwargs)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer, **self._block_kwargs))
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 + bn1 + relu: [N, 3, H, W] -> [N, 64, H/2, W/2]."""
        return self.relu(self.bn1(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def upcast(module: nn.Module) -> nn.Module:
    """A float64 deep copy of ``module`` (buffers included), for oracles. The original is untouched."""
    return copy.deepcopy(module).double()


@contextlib.contextmanager
def oracle_convolutions(device: torch.device | str) -> Iterator[None]:
    """Within it, CPU convolutions run ATen's native kernels instead of oneDNN's.

    torch 2.13.0+cpu's oneDNN convolution backward returned input gradients ~0.7% off (relative
    L2 against float64) at ResNet-50 layer3 shapes, depending on which convolutions ran before,
    in eager PyTorch (NCHW) and fused models (channels_last) alike; the native kernels agree
    with float64. Every backend runs ATen's convolutions, so comparisons of fused kernels with
    eager PyTorch and the float64 oracle run inside this to measure fusedres and not that
    discrepancy. A no-op for other devices.

    Args:
        device: the device the comparison runs on.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    with warnings.catch_warnings():
        # torch.backends.mkldnn.flags() warns about Intel-GPU TF32 on every CPU build.
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield
