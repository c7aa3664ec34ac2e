"""fusedres: fused convolution + BatchNorm + residual + ReLU for ResNet blocks.

Drop-in modules with torchvision's arguments and state_dict keys::

    from fusedres import FusedBottleneck, convert, to_eager
    import fusedres.models
    model = fusedres.models.resnet50(weights="resnet50.pth")   # a local torchvision checkpoint

Backends (``eager``, ``cpu``, ``triton``, ``cuda``, ``auto``) are chosen per module with
``backend=``, globally with :func:`set_backend`, or with the environment variable
``FUSEDRES_BACKEND``; ``python -m fusedres.info`` says which are usable here.
"""

from fusedres import models, reference  # noqa: F401
from fusedres._ext import extension_loaded
from fusedres.backend import (
    BACKEND_NAMES, available_backends, current_backend_name, get_backend, resolve, set_backend,
)
from fusedres.convert import convert, fusion_summary, to_eager
from fusedres.modules import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU
from fusedres.ops import conv_bn_act

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES", "FusedBasicBlock", "FusedBottleneck", "FusedConvBNReLU", "available_backends",
    "conv_bn_act", "convert", "current_backend_name", "extension_loaded", "fusion_summary",
    "get_backend", "models", "reference", "resolve", "set_backend", "to_eager",
]
