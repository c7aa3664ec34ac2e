"""``python -m fusedres.info``: versions, how the extension was built, usable backends."""

from __future__ import annotations

import platform
import sys

import torch

import fusedres
from fusedres import _ext
from fusedres.backends import extension


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def info_lines() -> list[str]:
    """The report, one line per entry."""
    lines = [
        f"fusedres {fusedres.__version__}",
        f"python {platform.python_version()} ({sys.platform}, {platform.machine()})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"{torch.cuda.device_count()} CUDA device(s) visible)",
        f"triton {_triton_version()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    if _ext.extension_loaded():
        lines.append(f"extension fusedres._C: loaded; {_ext._C.build_info()}")
        lines.append("cpu backend's GEMM convolutions (with gradients, and small maps in "
                     "inference; csrc/cpu/gemm_conv.h): "
                     + ("on" if _ext._C.cpu_gemm_conv() else "off"))
        lines.append("  float32 training rule: "
                     + ("the AMX one (1x1s, at most 2*Cout output rows)"
                        if _ext._C.cpu_gemm_conv_float32_amx_rule() else
                        "without AMX (at most Cout/4 output rows, or an unpadded 1x1 with at "
                        "most max(Cin, Cout)/2)"))
        lines.append("  bfloat16: " + ("on (oneDNN runs bfloat16 here)"
                                       if _ext._C.cpu_gemm_conv_bfloat16() else
                                       "off (this CPU's oneDNN runs no bfloat16: ATen's "
                                       "convolution, as eager's)"))
        lines.append("  inference matrix products: "
                     + ("every small map (AMX)" if extension._MATMUL_REPEATING_COLUMNS else
                        "small maps whose columns hold each input pixel once (no AMX)"
                        if extension._MATMUL_MULTI_PIXEL_MAPS else
                        f"one-pixel maps of at least {extension._MATMUL_MIN_ONE_PIXEL_ROWS} "
                        "images whose columns hold each input pixel once (no AVX512)"))
        widened = [name for name, bf16 in (("bfloat16", True), ("float16", False))
                   if _ext._C.cpu_conv_in_float32(bf16)]
        lines.append("cpu backend's convolutions computed in float32 (no oneDNN kernels for the "
                     "dtype here; csrc/cpu/conv_precision.h): " + (", ".join(widened) or "none"))
        lines.append("cpu backend's Winograd F(2x2, 3x3) convolutions (float32 inference 3x3s; "
                     "csrc/cpu/winograd_conv.h): "
                     + ("on" if _ext._C.cpu_winograd() else "off"))
    else:
        lines.append(f"extension fusedres._C: {_ext.EXTENSION_ERROR}")
    if _ext.BUILD_INFO:
        lines.append(f"build: CUDA kernels {'yes' if _ext.BUILD_INFO.get('cuda') else 'no'} "
                     f"({_ext.BUILD_INFO.get('cuda_reason')}), arch list "
                     f"{_ext.BUILD_INFO.get('cuda_arch_list')}, built against torch "
                     f"{_ext.BUILD_INFO.get('torch')}")
    lines.append("backends:")
    for name, (ok, why) in fusedres.available_backends().items():
        lines.append(f"  {name:<7} {'usable' if ok else 'unusable'}: {why}")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        lines.append(f"auto on {device}: {fusedres.resolve('auto', torch.device(device)).name}")
    return lines


def main() -> None:
    print("\n".join(info_lines()))


if __name__ == "__main__":
    main()
