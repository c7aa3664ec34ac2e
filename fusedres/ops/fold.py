"""Inference with eval-mode BatchNorm folded into the convolution, cached per parameter version.

With frozen statistics a unit is ``act(conv(x, w * s) + t + residual)``, ``s = gamma /
sqrt(running_var + eps)`` and ``t = beta - running_mean * s`` per output channel: one convolution
whose bias, residual add and ReLU the convolution library applies as it stores its output
(oneDNN post-ops on the CPU, cuDNN's fused convolution + bias (+ add) + ReLU on CUDA, the Triton
convolution's epilogue), so the activation is written once and never re-read.

Folding reads every weight once; it is cached per (conv, BatchNorm) pair and recomputed whenever
the conv weight, gamma, beta, a running statistic or eps changes. Changes are seen through the
tensors' version counters, which every in-place op and optimizer step bumps (and fusedres's own
training ops bump for the running statistics), and their storage, which a swap under
``t.data = other`` changes (:func:`fusedres.backend.contents_key`). A weight the conv computes on
each access (a parametrization) is folded on every call, never cached. An in-place write through
``.data`` bypasses the version counter, as it does for autograd's own checks: call
:func:`clear_fold_cache` after one.

This is the no-gradient path. With gradients wanted, eval units run ``unit_eval``, which computes
scale and shift inside the op and keeps exact gradients for x, the conv weight, gamma and beta.
"""

from __future__ import annotations

import weakref
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from fusedres.backend import ConvParams, contents_key
from fusedres.ops.python_unit import eval_coefficients

__all__ = ["FoldedConv", "clear_fold_cache", "clear_with_fold_cache", "fold_conv_bn"]


class FoldedConv(NamedTuple):
    """A convolution with eval BatchNorm folded in.

    Attributes:
        weight: [Cout, Cin/groups, kh, kw] ``w * s`` in the activation dtype, in the layout (or
            prepacked form) the backend's inference convolution wants; for the cpu backend's
            small maps, oneDNN's prepacked [Cout, kh*kw*Cin] linear weight.
        bias: [Cout] ``t``, in the dtype the backend's convolution takes for it.
    """

    weight: torch.Tensor
    bias: torch.Tensor


# conv module -> (key, FoldedConv). Weak keys: the cache dies with the module, is never copied
# by deepcopy or pickled, and holds no reference that keeps a model alive.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


# Caches of inference plans that hold folded weights of their own (fusedres.ops.unit,
# fusedres.modules): cleared with this one.
_PLAN_CACHES: list = []


def clear_with_fold_cache(cache) -> None:
    """Registers ``cache`` (anything with ``clear()``) to be cleared by :func:`clear_fold_cache`."""
    _PLAN_CACHES.append(cache)


def clear_fold_cache() -> None:
    """Drops every cached folded weight, and the inference plans that hold some (after in-place
    edits the version counters cannot see)."""
    _CACHE.clear()
    for cache in _PLAN_CACHES:
        cache.clear()


def _version_key(tensors) -> Optional[tuple]:
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
            continue
        try:
            key.append((id(t), *contents_key(t)))
        except RuntimeError:  # an inference tensor has no version counter: do not cache
            return None
    return tuple(key)


def fold_conv_bn(conv: nn.Conv2d, weight: torch.Tensor, gamma: Optional[torch.Tensor],
                 beta: Optional[torch.Tensor], running_mean: torch.Tensor,
                 running_var: torch.Tensor, eps: float, dtype: torch.dtype, flavor: str,
                 prepare: Callable[[torch.Tensor, torch.Tensor], FoldedConv]) -> FoldedConv:
    """The folded convolution of ``conv`` and its BatchNorm, from the cache when still valid.

    Args:
        conv: the unit's convolution module (the cache key; its weight is ``weight``'s source).
        weight: [Cout, Cin/groups, kh, kw] conv weight (``conv.weight``).
        gamma, beta: [Cout] or None (1 and 0); running_mean, running_var: [Cout]; eps: > 0.
        dtype: the activation dtype the folded weight must have.
        flavor: names the backend's layout of the result (part of the cache key).
        prepare: ``prepare(folded_weight, bias) -> FoldedConv`` in the backend's layout, with
            folded_weight in ``dtype`` and bias in the statistics dtype.

    Returns:
        The FoldedConv.
    """
    # Identities key only the tensors a module holds: a computed weight (a parametrized conv makes
    # a new one on every access) may take a freed one's id with the same version, a stale hit.
    key = (_version_key((weight, gamma, beta, running_mean, running_var))
           if weight is conv._parameters.get("weight") else None)
    if key is not None:
        key = (flavor, dtype, weight.device, float(eps)) + key
        hit = _CACHE.get(conv)
        if hit is not None and hit[0] == key:
            return hit[1]
    with torch.no_grad():
        scale, shift = eval_coefficients(gamma, beta, running_mean, running_var, eps, dtype)
        folded_weight = (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(dtype)
        folded = prepare(folded_weight, shift)
    if key is not None:
        _CACHE[conv] = (key, folded)
    return folded


def geometry_lists(conv: ConvParams) -> tuple[list, list, list, int]:
    """(stride, padding, dilation, groups) as int lists, the form the convolution ops take."""
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups
