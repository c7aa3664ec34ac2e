"""Loads the compiled extension ``fusedres._C`` if it was built, and says why not otherwise."""

from __future__ import annotations

import importlib
import importlib.util

_BUILD_HINT = "build it with `pip install -e . --no-build-isolation`"

if importlib.util.find_spec("fusedres._C") is None:
    _C = None
    EXTENSION_ERROR = f"fusedres._C is not built; {_BUILD_HINT}"
else:
    try:
        # Registers the torch.ops.fusedres.* kernels.
        _C = importlib.import_module("fusedres._C")
        EXTENSION_ERROR = None
    except ImportError as exc:  # e.g. built against another torch
        _C = None
        EXTENSION_ERROR = f"fusedres._C could not be loaded ({exc}); re{_BUILD_HINT[1:]}"

try:
    from fusedres._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = {}


def extension_loaded() -> bool:
    return _C is not None


def cuda_kernels_built() -> bool:
    """Whether the extension holds the CUDA kernels (it may, even where torch has no CUDA)."""
    return _C is not None and bool(_C.cuda_kernels_built())
