"""Per-module caches of inference plans, one plan per input signature, a few signatures each.

An inference plan (:mod:`fusedres.ops.unit`, :mod:`fusedres.modules`,
:mod:`fusedres.models.resnet`) is made for one input signature (shape, strides, dtype, device).
Inputs whose size changes from call to call (multi-scale inference, a detection backbone fed
images of a few sizes, an eval loop's smaller last batch) would make a cache of one plan per
module rebuild it at every change: the checks, the keys and the runners (docs/design.md section 4).
So each module keeps the plans of its :data:`fusedres.ops.fold.INPUT_SIZES_KEPT` most recently
used signatures, all made from the module state of the newest plan: a plan made from an older
state can never match again, and would keep that state's folded weights alive.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Hashable

import torch.nn as nn

from fusedres.ops import fold

__all__ = ["PlanCache"]


class PlanCache:
    """module -> its plans by input signature, weak-keyed by the module (a plan dies with it),
    cleared by :func:`fusedres.ops.fold.clear_fold_cache` with the folded weights."""

    def __init__(self) -> None:
        # module -> (state, OrderedDict{signature: plan}), least recently used first.
        self._entries: "weakref.WeakKeyDictionary[nn.Module, tuple]" = (
            weakref.WeakKeyDictionary())
        # Threads may run one model's inference at once: a lookup and its reordering, or an
        # insertion and its evictions, must not interleave with another thread's (a thread
        # switch between them, or free-threaded Python).
        self._lock = threading.Lock()
        fold.clear_with_fold_cache(self)

    def get(self, module: nn.Module, signature: Hashable):
        """The plan ``module`` keeps for ``signature``, or None; marks it the most recently
        used."""
        with self._lock:
            entry = self._entries.get(module)
            if entry is None:
                return None
            plans = entry[1]
            plan = plans.get(signature)
            if plan is not None:
                plans.move_to_end(signature)
            return plan

    def put(self, module: nn.Module, signature: Hashable, state: Hashable, plan) -> None:
        """Keeps ``plan``, made for ``signature`` from the module state ``state`` (its key
        without the signature), as the most recently used; drops the plans made from another
        state, and the least recently used beyond :data:`fusedres.ops.fold.INPUT_SIZES_KEPT`."""
        with self._lock:
            entry = self._entries.get(module)
            if entry is None or entry[0] != state:
                entry = (state, collections.OrderedDict())
                self._entries[module] = entry
            plans = entry[1]
            plans[signature] = plan
            plans.move_to_end(signature)
            while len(plans) > max(fold.INPUT_SIZES_KEPT, 0):
                plans.popitem(last=False)

    def plans(self, module: nn.Module) -> list:
        """The plans ``module`` keeps, least recently used first."""
        with self._lock:
            entry = self._entries.get(module)
            return [] if entry is None else list(entry[1].values())

    def clear(self) -> None:
        """Drops every plan."""
        with self._lock:
            self._entries.clear()
