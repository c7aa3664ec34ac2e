"""Loads the compiled extension ``fusedres._C`` if it was built, and says why not otherwise."""

from __future__ import annotations

try:
    from fusedres import _C  # noqa: F401  (registers the torch.ops.fusedres.* kernels)

    EXTENSION_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = f"fusedres._C could not be imported ({exc}); build it with `pip install -e . --no-build-isolation`"

try:
    from fusedres._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = {}


def extension_loaded() -> bool:
    return _C is not None


def cuda_kernels_built() -> bool:
    """Whether the extension holds the CUDA kernels (it may, even where torch has no CUDA)."""
    return _C is not None and bool(_C.cuda_kernels_built())
