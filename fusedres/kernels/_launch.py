"""What every launcher shares: interpreter detection, per-arch configs, autotuned dispatch.

Triton is imported by this package only, and this package is imported only by the Triton backend
when it is used, so ``import fusedres`` never imports triton.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.autotune`` cannot run: its benchmarking needs a
GPU driver. :func:`launch` therefore calls the plain ``@triton.jit`` kernel with one fixed config
there, and wraps it in ``triton.autotune`` (once per kernel, lazily) on a GPU.

Environment switches, read at call time:

- ``FUSEDRES_TRITON_CONFIG=i`` runs config ``i`` of each kernel's table for this GPU (its last
  when the table is shorter) instead of autotuning. The GPU tests use it: tuning every case of
  their matrix compiles and times every config for every new shape, minutes on an H100; one test
  runs every config, and one runs the autotuner. Under
  ``torch.use_deterministic_algorithms(True)`` config 0 is the default, so that results are
  bitwise reproducible from run to run.
- ``FUSEDRES_INTERPRET_ARCH=80`` (or 90): under the interpreter, run the configs of that GPU's
  tables (config ``FUSEDRES_TRITON_CONFIG``, 0 when unset) instead of the small interpreter
  config, so that the real tile sizes run on the CPU too (tests/kernels/test_all_configs.py).
- ``FUSEDRES_POISON_OUTPUTS=1`` fills kernel outputs with NaN before the launch, so an element a
  kernel fails to write shows up in the tests (which set it) instead of as stale memory. Off by
  default: it costs one extra write of every output.
"""

from __future__ import annotations

import functools
import os
import threading
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


def cfg(num_warps: int, num_stages: int, maxnreg: int | None = None, **meta) -> triton.Config:
    """A ``triton.Config`` written compactly: ``cfg(4, 3, BLOCK_M=128)``.

    ``maxnreg`` caps registers per thread (ptxas ``.maxnreg``); see the conv tables for why a
    config would set it.
    """
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


def arch_configs(table: dict, arch: int) -> list:
    """The configs of ``table`` ({80: [...], 90: [...]}) for ``arch``: the newest at or below."""
    usable = [a for a in table if a <= arch] or [min(table)]
    return table[max(usable)]


def forced_config_index():
    """The config index set by ``FUSEDRES_TRITON_CONFIG``, or None to autotune.

    Under ``torch.use_deterministic_algorithms(True)`` the default is 0: the autotuner picks by
    timing, so two runs could pick configs with different tile sizes, and tile sizes decide the
    order of the conv's and the statistics' fp32 sums, so results would differ in their last
    bits from run to run.
    """
    value = os.environ.get("FUSEDRES_TRITON_CONFIG", "")
    if value == "":
        return 0 if torch.are_deterministic_algorithms_enabled() else None
    if not value.isdigit():
        raise ValueError(f"FUSEDRES_TRITON_CONFIG must be a config index (0, 1, ...), got {value!r}")
    return int(value)


def interpreted_arch():
    """The compute capability set by ``FUSEDRES_INTERPRET_ARCH``, or None.

    Under the interpreter, :func:`launch` then runs that GPU's configs instead of the small
    interpreter config.
    """
    value = os.environ.get("FUSEDRES_INTERPRET_ARCH", "")
    if value == "":
        return None
    if not value.isdigit():
        raise ValueError(f"FUSEDRES_INTERPRET_ARCH must be a compute capability (80, 90, ...), "
                         f"got {value!r}")
    return int(value)


def new_output(*size, **kwargs) -> torch.Tensor:
    """``torch.empty(*size, **kwargs)``, NaN-filled under ``FUSEDRES_POISON_OUTPUTS=1``."""
    out = torch.empty(*size, **kwargs)
    if os.environ.get("FUSEDRES_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out


def on_tensor_device(fn: Callable) -> Callable:
    """Runs ``fn`` with the current CUDA device set to its first argument's device.

    Triton launches (and the autotuner's timing runs) go to the *current* device and its current
    stream, not to the tensors' device: without this, tensors on ``cuda:1`` would be read by a
    kernel running on ``cuda:0``.
    """

    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return wrapper


def compile_options(config: triton.Config) -> dict:
    """The launch keywords that carry ``config``'s compile options (warps, stages, maxnreg)."""
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return options


def _run(kernel, grid: Callable, args: Sequence, config: triton.Config, constexprs: dict):
    meta = dict(config.kwargs, **constexprs)
    kernel[grid(meta)](*args, **meta, **compile_options(config))


_TUNED: dict = {}
_AUTOTUNER_LOCK = threading.Lock()


def launch(kernel, grid: Callable, args: Sequence, *, table: dict, key: Sequence[str],
           interp_config: triton.Config, device: torch.device, **constexprs) -> triton.Config:
    """Runs ``kernel`` autotuned over ``table`` on a GPU, or with ``interp_config`` interpreted.

    ``FUSEDRES_TRITON_CONFIG`` (or deterministic mode) forces one config of ``table`` instead of
    autotuning; ``FUSEDRES_INTERPRET_ARCH`` runs ``table``'s configs under the interpreter.

    Args:
        kernel: a ``@triton.jit`` function.
        grid: ``grid(meta) -> tuple``, meta holding the chosen config's constexprs.
        args: the kernel's runtime arguments, in order.
        table: {arch: [triton.Config]}, see :func:`arch_configs`.
        key: argument names whose values re-trigger tuning (``triton.autotune``'s ``key``).
        interp_config: the config used under the interpreter (unless FUSEDRES_INTERPRET_ARCH
            asks for a GPU's).
        device: the tensors' device (picks the arch's table).
        **constexprs: the non-tuned constexpr arguments (feature flags).

    Returns:
        The config that ran (launchers whose buffers depend on tile sizes read it).
    """
    if interpreting():
        arch = interpreted_arch()
        if arch is None:
            _run(kernel, grid, args, interp_config, constexprs)
            return interp_config
        forced = forced_config_index() or 0  # the autotuner cannot run here
    else:
        arch = device_arch(device)
        forced = forced_config_index()
    if forced is not None:
        configs = arch_configs(table, arch)
        config = configs[min(forced, len(configs) - 1)]
        _run(kernel, grid, args, config, constexprs)
        return config
    # One autotuner per (kernel, arch, table): a kernel may be tuned over different tables for
    # different constexpr variants (e.g. the conv's FLAT_K path).
    cache_key = (kernel, arch, id(table))
    tuned = _TUNED.get(cache_key)
    if tuned is None:
        tuned = triton.autotune(configs=arch_configs(table, arch), key=list(key))(kernel)
        _TUNED[cache_key] = tuned
    # Triton's Autotuner keeps per-call state on itself (the arguments, then best_config, read
    # here after the launch): threads launching through one autotuner (nn.DataParallel's
    # replicas) would read each other's config, and the statistics partials be merged with the
    # wrong row count. The lock costs an uncontended acquire per launch.
    with _AUTOTUNER_LOCK:
        tuned[grid](*args, **constexprs)
        return tuned.best_config
