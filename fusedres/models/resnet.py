"""Fused ResNets: torchvision's architectures, state_dict keys and initialisation, fused units.

Every builder takes ``weights`` (a path to a local torchvision-format checkpoint, or a
state_dict; nothing is ever downloaded), ``backend`` and torchvision's keyword arguments
(``num_classes``, ``zero_init_residual``, ``norm_layer``, ...).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from fusedres import reference
from fusedres.backend import current_backend_name
from fusedres.modules import FusedBasicBlock, FusedBottleneck
from fusedres.ops.unit import conv_bn_act

__all__ = [
    "FusedResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
    "wide_resnet101_2", "load_checkpoint",
]

Weights = Union[None, str, os.PathLike, dict]


class FusedResNet(reference.ResNet):
    """torchvision's ResNet with a fused stem and fused blocks.

    Args:
        block: FusedBasicBlock or FusedBottleneck.
        layers, num_classes, zero_init_residual, groups, width_per_group,
        replace_stride_with_dilation, norm_layer: as torchvision.models.ResNet.
        backend: the backend of every unit (None: the global choice).

    Shapes: [N, 3, H, W] -> [N, num_classes].
    """

    def __init__(self, block, layers: list, num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[list] = None, norm_layer=None,
                 backend: Optional[str] = None) -> None:
        super().__init__(block, layers, num_classes, zero_init_residual, groups, width_per_group,
                         replace_stride_with_dilation, norm_layer,
                         block_kwargs={"backend": backend})
        self.backend = None if backend is None else current_backend_name(backend)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend,
                           name="ResNet.conv1")


def load_checkpoint(model: torch.nn.Module, weights: Weights, strict: bool = True) -> None:
    """Loads a torchvision-format checkpoint (a local path or a state_dict) into ``model``.

    A file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (common training-script
    layouts) is unwrapped first.
    """
    if weights is None:
        return
    if isinstance(weights, (str, os.PathLike)):
        state = torch.load(weights, map_location="cpu", weights_only=True)
    elif isinstance(weights, dict):
        state = weights
    else:
        raise TypeError("weights must be None, a path to a local checkpoint file or a state_dict, "
                        f"got {type(weights).__name__} (fusedres never downloads weights)")
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    model.load_state_dict(state, strict=strict)


def _build(block, layers, weights: Weights, backend: Optional[str], **kwargs) -> FusedResNet:
    model = FusedResNet(block, layers, backend=backend, **kwargs)
    load_checkpoint(model, weights)
    return model


def resnet18(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-18: BasicBlock [2, 2, 2, 2]."""
    return _build(FusedBasicBlock, [2, 2, 2, 2], weights, backend, **kwargs)


def resnet34(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-34: BasicBlock [3, 4, 6, 3]."""
    return _build(FusedBasicBlock, [3, 4, 6, 3], weights, backend, **kwargs)


def resnet50(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-50 (v1.5): Bottleneck [3, 4, 6, 3]."""
    return _build(FusedBottleneck, [3, 4, 6, 3], weights, backend, **kwargs)


def resnet101(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-101: Bottleneck [3, 4, 23, 3]."""
    return _build(FusedBottleneck, [3, 4, 23, 3], weights, backend, **kwargs)


def resnet152(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-152: Bottleneck [3, 8, 36, 3]."""
    return _build(FusedBottleneck, [3, 8, 36, 3], weights, backend, **kwargs)


def resnext50_32x4d(*, weights: Weights = None, backend: Optional[str] = None,
                    **kwargs) -> FusedResNet:
    """ResNeXt-50 32x4d: Bottleneck [3, 4, 6, 3], 32 groups of width 4."""
    return _build(FusedBottleneck, [3, 4, 6, 3], weights, backend, groups=32, width_per_group=4,
                  **kwargs)


def resnext101_32x8d(*, weights: Weights = None, backend: Optional[str] = None,
                     **kwargs) -> FusedResNet:
    """ResNeXt-101 32x8d: Bottleneck [3, 4, 23, 3], 32 groups of width 8."""
    return _build(FusedBottleneck, [3, 4, 23, 3], weights, backend, groups=32, width_per_group=8,
                  **kwargs)


def resnext101_64x4d(*, weights: Weights = None, backend: Optional[str] = None,
                     **kwargs) -> FusedResNet:
    """ResNeXt-101 64x4d: Bottleneck [3, 4, 23, 3], 64 groups of width 4."""
    return _build(FusedBottleneck, [3, 4, 23, 3], weights, backend, groups=64, width_per_group=4,
                  **kwargs)


def wide_resnet50_2(*, weights: Weights = None, backend: Optional[str] = None,
                    **kwargs) -> FusedResNet:
    """Wide ResNet-50-2: Bottleneck [3, 4, 6, 3] with twice the inner width."""
    return _build(FusedBottleneck, [3, 4, 6, 3], weights, backend, width_per_group=128, **kwargs)


def wide_resnet101_2(*, weights: Weights = None, backend: Optional[str] = None,
                     **kwargs) -> FusedResNet:
    """Wide ResNet-101-2: Bottleneck [3, 4, 23, 3] with twice the inner width."""
    return _build(FusedBottleneck, [3, 4, 23, 3], weights, backend, width_per_group=128, **kwargs)
