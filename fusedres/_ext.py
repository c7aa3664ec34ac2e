"""Loads the compiled extension ``fusedres._C`` if it was built, and says why not otherwise."""

from __future__ import annotations

import importlib
import importlib.util

import torch

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


def _cpu_has_amx() -> bool:
    # torch.cpu._is_amx_tile_supported is private: a torch without it counts as no AMX.
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


#: Whether this CPU has AMX tiles: the cpu backend's rules for when a convolution runs as a
#: matrix product were measured on a Xeon with AMX and an AMD EPYC without (docs/design.md
#: section 4), and follow the one this CPU matches.
CPU_HAS_AMX = _cpu_has_amx()
if _C is not None and hasattr(_C, "set_cpu_gemm_conv_float32_amx_rule"):  # else stale: rebuild
    _C.set_cpu_gemm_conv_float32_amx_rule(CPU_HAS_AMX)

try:
    from fusedres._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = {}


def extension_loaded() -> bool:
    return _C is not None


def cuda_kernels_built() -> bool:
    """Whether the extension holds the CUDA kernels (it may, even where torch has no CUDA)."""
    return _C is not None and bool(_C.cuda_kernels_built())
