"""The stem's max pool in inference on the CPU: values only (``torch.ops.fusedres.max_pool2d``).

ATen's CPU ``max_pool2d`` always computes ``max_pool2d_with_indices`` and drops the indices: an
int64 written per output element, which inference never reads (docs/design.md section 4).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fusedres import _ext

__all__ = ["inference_max_pool", "max_pool_output_hw", "max_pool_geometry"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def max_pool_geometry(pool: nn.MaxPool2d) -> tuple[list, list, list, list]:
    """(kernel_size, stride, padding, dilation) of ``pool``, two ints each (stride None: the
    kernel size, as nn.MaxPool2d)."""
    pair = nn.modules.utils._pair
    return tuple(list(pair(v)) for v in (pool.kernel_size, pool.stride or pool.kernel_size,
                                         pool.padding, pool.dilation))


def max_pool_output_hw(h: int, w: int, kernel_size, stride, padding, dilation,
                       ceil_mode: bool) -> tuple[int, int]:
    """nn.MaxPool2d's output size for an h x w input (ATen's formula, ceil_mode included); a
    size below 1 where ATen refuses the input."""
    out = []
    for i, size in enumerate((h, w)):
        k, s, p, d = kernel_size[i], stride[i], padding[i], dilation[i]
        span = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
        o = span // s + 1
        if ceil_mode and (o - 1) * s >= size + p:
            o -= 1  # the last window must start inside the input or its left padding
        out.append(o)
    return out[0], out[1]


def inference_max_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)`` where no gradient is needed: a CPU nn.MaxPool2d runs fusedres's kernel.

    Args:
        pool: the model's max pool (any module; only nn.MaxPool2d itself, without
            ``return_indices``, is replaced).
        x: [N, C, H, W].

    Returns:
        [N, C, Ho, Wo], the values ``pool(x)`` gives; channels_last from the kernel. Input ATen
        refuses (padding over half the kernel, an empty output) goes to ``pool`` for its error.
    """
    if (type(pool) is not nn.MaxPool2d or pool.return_indices or x.device.type != "cpu"
            or x.dtype not in _KERNEL_DTYPES or x.dim() != 4 or not _ext.extension_loaded()):
        return pool(x)
    kernel_size, stride, padding, dilation = max_pool_geometry(pool)
    ho, wo = max_pool_output_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation,
                                pool.ceil_mode)
    if min(ho, wo) < 1 or any(2 * p > k for p, k in zip(padding, kernel_size)):
        return pool(x)
    return torch.ops.fusedres.max_pool2d(x, kernel_size, stride, padding, dilation,
                                         pool.ceil_mode)
