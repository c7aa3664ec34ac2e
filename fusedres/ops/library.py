"""Fake (meta) kernels of the C++ ops ``torch.ops.fusedres.*`` defined in csrc/fusedres.cpp.

They let ``torch.compile`` and ``torch.export`` trace through the ops without running them: each
returns empty tensors with the shapes, dtypes and strides the real kernels produce. They are
registered only when the extension ``fusedres._C`` is loaded, since the ops (their schemas) come
from it; importing this module is harmless otherwise.

Conventions shared with the C++ code (csrc/common/checks.h):

- the *statistics dtype* of per-channel vectors is float64 for float64 activations, else float32;
- activation outputs take z's dtype and memory format: channels_last when z is channels_last
  dense and not also NCHW contiguous, NCHW contiguous otherwise (other strided inputs are copied).
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedres import _ext
from fusedres.reference import stats_dtype

__all__ = ["REGISTERED", "output_memory_format"]


def output_memory_format(z: torch.Tensor) -> torch.memory_format:
    """The memory format the ops give their activation outputs for input ``z``.

    Args:
        z: [N, C, H, W] activation (any strides).

    Returns:
        ``torch.channels_last`` when z is channels_last dense and not also NCHW contiguous,
        else ``torch.contiguous_format``.
    """
    if z.dim() == 4 and not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _bn_stats_fake(z: torch.Tensor):
    """z: [N, C, H, W] -> (mean [C], var [C]) in the statistics dtype."""
    c = z.shape[1]
    sdt = stats_dtype(z.dtype)
    return z.new_empty((c,), dtype=sdt), z.new_empty((c,), dtype=sdt)


def _bn_act_fwd_fake(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """z, residual: [N, C, H, W]; scale, shift: [C] -> y: [N, C, H, W] like z."""
    return torch.empty_like(z, memory_format=output_memory_format(z))


def _bn_act_bwd_fake(dy: torch.Tensor, y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                     invstd: torch.Tensor, weight: torch.Tensor, relu: bool, has_residual: bool,
                     training: bool):
    """dy, y, z: [N, C, H, W]; mean, invstd, weight: [C].

    Returns:
        (dz [N, C, H, W] like z, dweight [C], dbias [C] in the statistics dtype, dresidual
        [N, C, H, W] like z when ``has_residual``, else an empty [0] tensor).
    """
    fmt = output_memory_format(z)
    c = z.shape[1]
    sdt = stats_dtype(z.dtype)
    dz = torch.empty_like(z, memory_format=fmt)
    if has_residual:
        dres = torch.empty_like(z, dtype=dy.dtype, memory_format=fmt)
    else:
        dres = dy.new_empty((0,))
    return dz, z.new_empty((c,), dtype=sdt), z.new_empty((c,), dtype=sdt), dres


def _register() -> bool:
    if not _ext.extension_loaded():
        return False
    torch.library.register_fake("fusedres::bn_stats")(_bn_stats_fake)
    torch.library.register_fake("fusedres::bn_act_fwd")(_bn_act_fwd_fake)
    torch.library.register_fake("fusedres::bn_act_bwd")(_bn_act_bwd_fake)
    return True


#: Whether the fake kernels were registered (the extension is loaded).
REGISTERED: bool = _register()
