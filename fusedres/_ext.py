"""Loads the compiled extension ``fusedres._C`` if it was built, and says why not otherwise."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

from fusedres._sources import csrc_fingerprint

_BUILD_HINT = "build it with `pip install -e . --no-build-isolation`"
# Where a source checkout has them (an editable install, an in-place build); not in a wheel.
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

try:
    from fusedres._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = {}
try:
    from fusedres._build_sources import SOURCES as BUILT_FROM
except ImportError:
    BUILT_FROM = None


def abi_mismatch(extension) -> Optional[str]:
    """Why ``extension`` must not be used if its std::string ABI differs from torch's, else None.

    A library compiled with the other ``_GLIBCXX_USE_CXX11_ABI`` usually fails to load (an
    undefined ABI-tagged symbol), but where it references none at load it loads and crashes the
    process at the first std::string that crosses into libtorch (an error message): refused up
    front instead. Builds that do not report it (older ones, libc++) pass.
    """
    built = getattr(extension, "glibcxx_use_cxx11_abi", None)
    wanted = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    if built is None or wanted is None or bool(built) == bool(wanted):
        return None
    return (f"fusedres._C was compiled with _GLIBCXX_USE_CXX11_ABI={int(built)} and torch with "
            f"{int(wanted)}: their std::strings differ, and the first error message would crash "
            f"the process; re{_BUILD_HINT} (setup.py passes torch's ABI)")


def stale_sources(built_from: Optional[str], csrc: str = _CSRC) -> Optional[str]:
    """Why fusedres._C must not be used if it was not built from the sources in ``csrc``, else
    None.

    setup.py's build records their fingerprint (fusedres._sources) in
    fusedres/_build_sources.py once it succeeds, ``built_from``. A library left from other
    sources (a `git pull` without a rebuild) would otherwise load and fail later, at the first
    op or function it lacks, or run old kernels. Passes where there is nothing to compare: no
    ``csrc`` folder (an installed wheel) or no record (a build by an older setup.py).
    """
    if built_from is None or not os.path.isdir(csrc) or built_from == csrc_fingerprint(csrc):
        return None
    return (f"fusedres._C was not built from the sources in {csrc} (they changed since its "
            f"build, or the last build did not finish); re{_BUILD_HINT}")


_C = None
# A library from other sources is not even loaded: loading registers its torch.ops.fusedres.*.
EXTENSION_ERROR = (f"fusedres._C is not built; {_BUILD_HINT}"
                   if importlib.util.find_spec("fusedres._C") is None
                   else stale_sources(BUILT_FROM))
if EXTENSION_ERROR is None:
    try:
        # Registers the torch.ops.fusedres.* kernels.
        _C = importlib.import_module("fusedres._C")
        EXTENSION_ERROR = abi_mismatch(_C)
    except ImportError as exc:  # e.g. built against another torch
        EXTENSION_ERROR = f"fusedres._C could not be loaded ({exc}); re{_BUILD_HINT}"
    if EXTENSION_ERROR is not None:
        _C = None


def _cpu_has_amx() -> bool:
    # torch.cpu._is_amx_tile_supported is private: a torch without it counts as no AMX.
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


#: Whether this CPU has AMX tiles: the cpu backend's rules for when a convolution runs as a
#: matrix product were measured on a Xeon with AMX and an AMD EPYC without (docs/design.md
#: section 4), and follow the one this CPU matches.
CPU_HAS_AMX = _cpu_has_amx()
#: Whether this CPU has AVX512: without it (measured: an AMD EPYC, Zen 3, AVX2 only) the cpu
#: backend's inference takes the matrix product on fewer maps than on the CPUs above
#: (fusedres/backends/extension.py). torch.cpu's probe is private: where it is missing, ATen's
#: kernel choice for this CPU says the same.
CPU_HAS_AVX512 = bool(getattr(torch.cpu, "_is_avx512_supported",
                              lambda: torch.backends.cpu.get_cpu_capability() == "AVX512")())
if _C is not None and hasattr(_C, "set_cpu_gemm_conv_float32_amx_rule"):  # else stale: rebuild
    _C.set_cpu_gemm_conv_float32_amx_rule(CPU_HAS_AMX)
if _C is not None and hasattr(_C, "set_cpu_gemm_conv_bfloat16"):
    # oneDNN runs bfloat16 only with AVX512 or AMX; elsewhere the GEMM path's bfloat16 products
    # would run in ATen's generic loops (csrc/cpu/gemm_conv.h).
    _C.set_cpu_gemm_conv_bfloat16(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
if _C is not None and hasattr(_C, "set_cpu_conv_in_float32"):
    # Without oneDNN's kernels for a dtype ATen's convolution of it runs generic code, about 15x
    # slower than float32: the unit ops convolve it in float32 (csrc/cpu/conv_precision.h).
    _C.set_cpu_conv_in_float32(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                               not torch.ops.mkldnn._is_mkldnn_fp16_supported())


def extension_loaded() -> bool:
    return _C is not None


def cuda_kernels_built() -> bool:
    """Whether the extension holds the CUDA kernels (it may, even where torch has no CUDA)."""
    return _C is not None and bool(_C.cuda_kernels_built())
