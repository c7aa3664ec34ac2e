"""Whole fused ResNets with torchvision's names, architectures and state_dict keys."""

from fusedres.models.resnet import (  # noqa: F401
    FusedResNet, load_checkpoint, resnet18, resnet34, resnet50, resnet101, resnet152,
    resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2,
)

ARCHITECTURES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)
