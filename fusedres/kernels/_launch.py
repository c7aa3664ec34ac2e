"""What every launcher shares: interpreter detection, per-arch configs, autotuned dispatch.

Triton is imported by this package only, and this package is imported only by the Triton backend
when it is used, so ``import fusedres`` never imports triton.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.autotune`` cannot run: its benchmarking needs a
GPU driver. :func:`launch` therefore calls the plain ``@triton.jit`` kernel with one fixed config
there, and wraps it in ``triton.autotune`` (once per kernel, lazily) on a GPU.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_arch(device: torch.device) -> int:
    """The compute capability as an int (80, 90, ...); 0 under the interpreter."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def cfg(num_warps: int, num_stages: int, **meta) -> triton.Config:
    """A ``triton.Config`` written compactly: ``cfg(4, 3, BLOCK_M=128)``."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def arch_configs(table: dict, arch: int) -> list:
    """The configs of ``table`` ({80: [...], 90: [...]}) for ``arch``: the newest at or below."""
    usable = [a for a in table if a <= arch] or [min(table)]
    return table[max(usable)]


_TUNED: dict = {}


def launch(kernel, grid: Callable, args: Sequence, *, table: dict, key: Sequence[str],
           interp_config: triton.Config, device: torch.device, **constexprs) -> triton.Config:
    """Runs ``kernel`` autotuned over ``table`` on a GPU, or with ``interp_config`` interpreted.

    Args:
        kernel: a ``@triton.jit`` function.
        grid: ``grid(meta) -> tuple``, meta holding the chosen config's constexprs.
        args: the kernel's runtime arguments, in order.
        table: {arch: [triton.Config]}, see :func:`arch_configs`.
        key: argument names whose values re-trigger tuning (``triton.autotune``'s ``key``).
        interp_config: the config used under the interpreter.
        device: the tensors' device (picks the arch's table).
        **constexprs: the non-tuned constexpr arguments (feature flags).

    Returns:
        The config that ran (launchers whose buffers depend on tile sizes read it).
    """
    if interpreting():
        meta = dict(interp_config.kwargs, **constexprs)
        kernel[grid(meta)](*args, **meta, num_warps=interp_config.num_warps,
                           num_stages=interp_config.num_stages)
        return interp_config
    arch = device_arch(device)
    # One autotuner per (kernel, arch, table): a kernel may be tuned over different tables for
    # different constexpr variants (e.g. the conv's FLAT_K path).
    cache_key = (kernel, arch, id(table))
    tuned = _TUNED.get(cache_key)
    if tuned is None:
        tuned = triton.autotune(configs=arch_configs(table, arch), key=list(key))(kernel)
        _TUNED[cache_key] = tuned
    tuned[grid](*args, **constexprs)
    return tuned.best_config
