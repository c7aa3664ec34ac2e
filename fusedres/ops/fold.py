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

import collections
import threading
import weakref
from typing import Callable, Hashable, NamedTuple, Optional

import torch
import torch.nn as nn

from fusedres.backend import ConvParams, contents_key
from fusedres.ops.python_unit import eval_coefficients

__all__ = ["INPUT_SIZES_KEPT", "FoldedConv", "clear_fold_cache", "clear_with_fold_cache",
           "fold_conv_bn", "folds_finite"]


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


#: Input sizes whose inference plans a module keeps (:mod:`fusedres.ops.plans`), and whose
#: folded weights a convolution keeps where its backend prepares them for the input size; read
#: at each call (0 keeps none: every inference call checks and prepares again).
INPUT_SIZES_KEPT = 4

# conv module -> (state, OrderedDict{what: result}, least recently used first): the folds of its
# tensors in each backend layout, dtype and input size asked for, and whether they fold finite,
# all for the versions and eps in ``state`` (:func:`_unit_state`). Plans for several input sizes
# may want different layouts of one conv (the cpu backend's matrix product on small maps, its
# convolution on larger ones, oneDNN's blocking for each size), so a few are kept while the
# tensors are unchanged. Weak keys: the cache dies with the module, is never copied by deepcopy
# or pickled, and holds no reference that keeps a model alive.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Threads may run one model's inference at once: each lookup with its reordering, and each
# update with its evictions, is one step (as in fusedres.ops.plans.PlanCache).
_CACHE_LOCK = threading.Lock()


# Caches of inference plans that hold folded weights of their own (fusedres.ops.unit,
# fusedres.modules): cleared with this one.
_PLAN_CACHES: list = []


def clear_with_fold_cache(cache) -> None:
    """Registers ``cache`` (anything with ``clear()``) to be cleared by :func:`clear_fold_cache`."""
    _PLAN_CACHES.append(cache)


def clear_fold_cache() -> None:
    """Drops every cached folded weight, and the inference plans that hold some (after in-place
    edits the version counters cannot see)."""
    with _CACHE_LOCK:
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


def _unit_state(conv: nn.Conv2d, weight: torch.Tensor, tensors: tuple, eps: float
                ) -> Optional[tuple]:
    """The cache key of what the unit's tensors fold to: eps, the weight's device and every
    tensor's identity and version; None where nothing may be cached."""
    # Identities key only the tensors a module holds: a computed weight (a parametrized conv makes
    # a new one on every access) may take a freed one's id with the same version, a stale hit.
    if weight is not conv._parameters.get("weight"):
        return None
    key = _version_key((weight, *tensors))
    return None if key is None else (weight.device, float(eps)) + key


def _cached(conv: nn.Conv2d, state: Optional[tuple], what: tuple, compute: Callable):
    """``compute()``, kept under ``what`` in ``conv``'s cache entry while ``state`` holds, with
    the :data:`INPUT_SIZES_KEPT` folds (and the finiteness) used most recently."""
    if state is None:
        return compute()
    with _CACHE_LOCK:
        entry = _CACHE.get(conv)
        if entry is not None and entry[0] == state and what in entry[1]:
            entry[1].move_to_end(what)
            return entry[1][what]
    result = compute()  # outside the lock: another thread's fold need not wait for this one
    with _CACHE_LOCK:
        entry = _CACHE.get(conv)
        if entry is None or entry[0] != state:
            entry = (state, collections.OrderedDict())
            _CACHE[conv] = entry
        results = entry[1]
        results[what] = result
        results.move_to_end(what)
        while len(results) > max(INPUT_SIZES_KEPT, 0) + 1:
            results.popitem(last=False)
    return result


def fold_conv_bn(conv: nn.Conv2d, weight: torch.Tensor, gamma: Optional[torch.Tensor],
                 beta: Optional[torch.Tensor], running_mean: torch.Tensor,
                 running_var: torch.Tensor, eps: float, dtype: torch.dtype, flavor: Hashable,
                 prepare: Callable[[torch.Tensor, torch.Tensor], FoldedConv]) -> FoldedConv:
    """The folded convolution of ``conv`` and its BatchNorm, from the cache when still valid.

    Args:
        conv: the unit's convolution module (the cache key; its weight is ``weight``'s source).
        weight: [Cout, Cin/groups, kh, kw] conv weight (``conv.weight``).
        gamma, beta: [Cout] or None (1 and 0); running_mean, running_var: [Cout]; eps: > 0.
        dtype: the activation dtype the folded weight must have.
        flavor: names the backend's layout of the result (part of the cache key), with the
            input size where ``prepare`` chooses the layout for it.
        prepare: ``prepare(folded_weight, bias) -> FoldedConv`` in the backend's layout, with
            folded_weight in ``dtype`` and bias in the statistics dtype.

    Returns:
        The FoldedConv.
    """
    def compute() -> FoldedConv:
        with torch.no_grad():
            scale, shift = eval_coefficients(gamma, beta, running_mean, running_var, eps, dtype)
            folded_weight = (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(dtype)
            return prepare(folded_weight, shift)

    state = _unit_state(conv, weight, (gamma, beta, running_mean, running_var), eps)
    return _cached(conv, state, ("fold", flavor, dtype), compute)


def folds_finite(conv: nn.Conv2d, weight: torch.Tensor, gamma: Optional[torch.Tensor],
                 beta: Optional[torch.Tensor], running_mean: torch.Tensor,
                 running_var: torch.Tensor, eps: float) -> bool:
    """Whether folding BN into ``conv`` gives finite weights and bias: no NaN or inf in the
    unit's tensors and ``running_var + eps > 0`` everywhere. Cached as the fold is: it reads
    every weight (about 37 ms of a resnet50 eval call at batch 8, 112x112 whenever a new input
    size made its plans, on a 2-core AMD EPYC).

    Args:
        conv, weight, gamma, beta, running_mean, running_var, eps: as :func:`fold_conv_bn`'s.
    """
    def compute() -> bool:
        tensors = [t for t in (weight, gamma, beta, running_mean, running_var) if t is not None]
        return (all(bool(torch.isfinite(t).all()) for t in tensors)
                and bool(((running_var.float() + eps) > 0).all()))

    state = _unit_state(conv, weight, (gamma, beta, running_mean, running_var), eps)
    return _cached(conv, state, ("finite",), compute)


def geometry_lists(conv: ConvParams) -> tuple[list, list, list, int]:
    """(stride, padding, dilation, groups) as int lists, the form the convolution ops take."""
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups
