"""Swap between torchvision-layout ResNets and fused ones, sharing parameters and buffers.

A block is recognised by its class name (``BasicBlock`` / ``Bottleneck``, as in torchvision and
fusedres.reference) and torchvision's attribute names; a whole model by the name ``ResNet`` and
torchvision's stem and stage attributes. The new modules take over the old ones' submodules
(the very same nn.Conv2d and nn.BatchNorm2d objects), so nothing is copied: an optimizer built
on the old parameters keeps training the converted model.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from fusedres import reference
from fusedres.backend import current_backend_name
from fusedres.models.resnet import FusedResNet
from fusedres.modules import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU

__all__ = ["convert", "to_eager"]

_BLOCK_ATTRS = {
    "BasicBlock": ("conv1", "bn1", "conv2", "bn2", "downsample"),
    "Bottleneck": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"),
}
_RESNET_ATTRS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                 "avgpool", "fc")
_TO_FUSED = {"BasicBlock": FusedBasicBlock, "Bottleneck": FusedBottleneck, "ResNet": FusedResNet}
_TO_EAGER = {FusedBasicBlock: reference.BasicBlock, FusedBottleneck: reference.Bottleneck,
             FusedResNet: reference.ResNet, FusedConvBNReLU: reference.ConvBNAct}


def _kind(module: nn.Module) -> Optional[str]:
    """``"BasicBlock"``, ``"Bottleneck"`` or ``"ResNet"`` for a plain torchvision-layout module."""
    name = type(module).__name__
    attrs = _BLOCK_ATTRS.get(name) or (_RESNET_ATTRS if name == "ResNet" else None)
    if attrs and all(hasattr(module, a) for a in attrs):
        return name
    return None


def _rebuild(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """A ``cls`` instance that holds ``module``'s submodules, parameters and buffers themselves."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for table in ("_modules", "_parameters", "_buffers"):
        new.__dict__[table] = dict(module.__dict__[table])
    new.__dict__.update(attributes)
    return new


def _swap(module: nn.Module, transform) -> nn.Module:
    for child_name, child in module.named_children():
        new_child = _swap(child, transform)
        if new_child is not child:
            module._modules[child_name] = new_child
    return transform(module)


def convert(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Makes every ResNet block (and a whole ResNet's stem) in ``model`` fused.

    Blocks are swapped in place inside their parents; when ``model`` itself is a ResNet the
    returned object is a new :class:`fusedres.models.FusedResNet` holding the same submodules, so
    always use the return value. Already-fused modules get the new ``backend``.

    Args:
        model: any module containing torchvision-layout BasicBlock/Bottleneck blocks.
        backend: the backend name for the fused modules (None: the global choice).

    Returns:
        The converted model, sharing every parameter and buffer with ``model``.
    """
    backend = None if backend is None else current_backend_name(backend)

    def transform(module):
        if isinstance(module, (FusedBasicBlock, FusedBottleneck, FusedResNet, FusedConvBNReLU)):
            module.backend = backend
            return module
        kind = _kind(module)
        if kind is None:
            return module
        return _rebuild(module, _TO_FUSED[kind], backend=backend)

    return _swap(model, transform)


def to_eager(model: nn.Module) -> nn.Module:
    """Makes every fused module in ``model`` plain PyTorch again (fusedres.reference classes).

    Use the return value (a fused top-level module is replaced). Parameters and buffers are shared.

    Args:
        model: a module containing fused blocks, units or a FusedResNet.

    Returns:
        The model with only eager ops (nn.Conv2d, nn.BatchNorm2d, add, ReLU), ready for export.
    """

    def transform(module):
        cls = _TO_EAGER.get(type(module))
        if cls is None:
            return module
        eager = _rebuild(module, cls)
        eager.__dict__.pop("backend", None)
        if cls is reference.ResNet:
            eager._block_kwargs = {}
        return eager

    return _swap(model, transform)
