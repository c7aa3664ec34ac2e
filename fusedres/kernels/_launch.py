"""What every launcher shares: interpreter detection, per-arch configs, autotuned dispatch.

Triton is imported by this package only, and this package is imported only by the Triton backend
when it is used, so ``import fusedres`` never imports triton.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.autotune`` cannot run: its benchmarking needs a
GPU driver. :func:`launch` therefore calls the plain ``@triton.jit`` kernel with one fixed config
there, and autotunes on a GPU (once per key, see below).

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
- ``FUSEDRES_AUTOTUNE_CACHE_DIR``: where tuned configs persist across processes (see below);
  default ``<triton's cache dir>/fusedres_autotune``, set to the empty string to keep them in
  memory only.

Autotuning (:func:`launch`): the launcher names what the best config depends on as a dict of
key values, the row count bucketed to a power of two (:func:`row_bucket`) so that a new batch
size re-tunes only when it crosses a bucket; the kernel still gets the exact row count. The first
launch of a (kernel, constexpr flags, tensor dtypes, key values, device, config table) runs
``triton.autotune`` over the table once; the winner is kept in memory and written to a small
JSON file, and every later launch with that key, in this process or a later one, runs the kernel
with that config directly. Triton's own on-disk autotune cache (``cache_results=True`` or
``TRITON_CACHE_AUTOTUNING=1``, in triton 3.6 through 3.9) is not used: its key is the autotuner's
``key`` argument names, which must be kernel arguments (bucketing would need a dummy kernel
argument), it does not tell GPU models of one arch apart, triton 3.6 benchmarks even a one-config
table, and a cache hit still goes through the Autotuner's per-call argument handling.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
import warnings
from typing import Callable, Optional, Sequence

import torch
import triton


# ``@triton.jit`` makes a kernel interpreted or compiled from TRITON_INTERPRET as it is when the
# kernel is defined, i.e. when the kernel modules import this one; changing the variable later
# changes no kernel. So it is read once, here, rather than at each of the 24 times a Bottleneck
# block's training step asks (one read of an unset variable: 0.7 us on a 2-core AMD EPYC).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton runs the kernels in its CPU interpreter (``TRITON_INTERPRET=1`` when
    they were defined)."""
    return _INTERPRETING


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# Per CUDA device index: its compute capability (80, 90, ...) and its multiprocessor count.
# torch.cuda's queries cost a few microseconds each, and launches ask on every call.
_DEVICE_ARCH: dict = {}
_DEVICE_SMS: dict = {}


def device_arch(device: torch.device) -> int:
    """The compute capability as an int (80, 90, ...); 0 under the interpreter."""
    if device.type != "cuda":
        return 0
    index = _device_index(device)
    arch = _DEVICE_ARCH.get(index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(index)
        arch = _DEVICE_ARCH[index] = 10 * major + minor
    return arch


def multiprocessor_count(device: torch.device) -> int:
    """The CUDA device's streaming multiprocessor count."""
    index = _device_index(device)
    sms = _DEVICE_SMS.get(index)
    if sms is None:
        sms = _DEVICE_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms


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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host's grid and buffer sizes.

    Plain integer arithmetic instead of ``triton.cdiv``: in triton 3.6 to 3.9 that is a
    ``ConstexprFunction`` whose host call costs 2-4 microseconds, and a unit makes a dozen or
    more on a path the H200 showed host-bound (docs/design.md section 4).
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1); see :func:`cdiv` for why not triton's."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def row_bucket(rows: int) -> int:
    """The autotune key of a row count: ``rows`` rounded up to a power of two.

    Tile choice depends on how many row tiles there are (wave quantisation over the SMs), which
    changes little within a factor of two; keying on the exact count would re-tune every kernel
    for every new batch size (and every new image size).
    """
    return next_power_of_2(int(rows))


def autotune_cache_dir() -> Optional[str]:
    """The directory tuned configs persist in, or None (``FUSEDRES_AUTOTUNE_CACHE_DIR=""``)."""
    value = os.environ.get("FUSEDRES_AUTOTUNE_CACHE_DIR")
    if value is not None:
        return value or None
    try:
        from triton import knobs
        base = knobs.cache.dir
    except (ImportError, AttributeError):
        base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(base, "fusedres_autotune")


def _config_dict(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "maxnreg": config.maxnreg}


_DEVICE_NAMES: dict = {}


def _device_name(device: torch.device) -> str:
    """The GPU's model name (tuned configs differ between models of one arch, e.g. H100 and
    H200); "" off CUDA."""
    if device.type != "cuda":
        return ""
    index = _device_index(device)
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


def _disk_key(kernel, arch: int, device: torch.device, configs: list, constexprs: dict,
              key: dict, dtypes: tuple) -> dict:
    """Everything a persisted config is valid for: the kernel's source (triton's hash of it and
    of the functions it calls), the variant's constexprs, the argument dtypes, the key values, the
    GPU, the triton version and the config table."""
    fn = getattr(kernel, "fn", kernel)
    return {"kernel": f"{fn.__module__}.{fn.__name__}",
            "source": getattr(kernel, "cache_key", ""),
            "constexprs": sorted((k, v) for k, v in constexprs.items()),
            "dtypes": list(dtypes), "key": sorted((k, v) for k, v in key.items()),
            "arch": arch, "device": _device_name(device), "triton": triton.__version__,
            "configs": [_config_dict(c) for c in configs]}


def _disk_path(directory: str, disk_key: dict) -> str:
    digest = hashlib.sha256(json.dumps(disk_key, sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(directory, f"{disk_key['kernel'].rsplit('.', 1)[-1]}-{digest}.json")


def _load_tuned(path: str, configs: list) -> Optional[triton.Config]:
    """The config persisted at ``path``, if it is there, readable and still one of ``configs``."""
    try:
        with open(path) as f:
            stored = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for config in configs:
        if _config_dict(config) == stored:
            return config
    return None


_WARNED_UNWRITABLE: set = set()


def _store_tuned(path: str, disk_key: dict, config: triton.Config, timings: dict) -> None:
    """Writes the tuned config atomically (a temporary file renamed into place), so that a
    process reading it meanwhile sees the whole file or none; warns once per directory when it
    cannot be written (the config stays tuned in memory)."""
    directory = os.path.dirname(path)
    record = {"key": disk_key, "config": _config_dict(config),
              "timings_ms": [[_config_dict(c), t] for c, t in timings.items()]}
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, path)
    except OSError as e:
        if directory not in _WARNED_UNWRITABLE:
            _WARNED_UNWRITABLE.add(directory)
            warnings.warn(f"fusedres: tuned Triton configs cannot be saved in {directory} ({e}); "
                          "they are kept for this process only (FUSEDRES_AUTOTUNE_CACHE_DIR "
                          "moves them)", stacklevel=3)


#: {(kernel, arch, device, table, constexprs, key values, dtypes): the config tuned for them}.
_TUNED: dict = {}
# Held while tuning (the autotuner times every config on the GPU, and two threads tuning at once
# would time each other's kernels), never on the path of an already tuned launch.
_TUNE_LOCK = threading.Lock()


def launch(kernel, grid: Callable, args: Sequence, *, table: dict, key: dict,
           interp_config: triton.Config, device: torch.device, **constexprs) -> triton.Config:
    """Runs ``kernel`` autotuned over ``table`` on a GPU, or with ``interp_config`` interpreted.

    ``FUSEDRES_TRITON_CONFIG`` (or deterministic mode) forces one config of ``table`` instead of
    autotuning; ``FUSEDRES_INTERPRET_ARCH`` runs ``table``'s configs under the interpreter.

    Args:
        kernel: a ``@triton.jit`` function.
        grid: ``grid(meta) -> tuple``, meta holding the chosen config's constexprs.
        args: the kernel's runtime arguments, in order.
        table: {arch: [triton.Config]}, see :func:`arch_configs`.
        key: {name: value} of what the best config depends on besides the constexprs and the
            tensors' dtypes (which are always part of the key): sizes, with row counts passed
            through :func:`row_bucket`. Values must be hashable and JSON-serialisable.
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
    configs = arch_configs(table, arch)
    if forced is not None or len(configs) == 1:
        config = configs[min(forced or 0, len(configs) - 1)]
        _run(kernel, grid, args, config, constexprs)
        return config
    dtypes = tuple(str(a.dtype).removeprefix("torch.") for a in args
                   if isinstance(a, torch.Tensor))
    memory_key = (kernel, arch, _device_name(device), id(table),
                  tuple(sorted(constexprs.items())), tuple(sorted(key.items())), dtypes)
    config = _TUNED.get(memory_key)
    if config is None:
        with _TUNE_LOCK:
            config = _TUNED.get(memory_key)
            if config is None:
                config, launched = _tune(kernel, grid, args, configs, constexprs, arch, device,
                                         key, dtypes)
                _TUNED[memory_key] = config
                if launched:
                    return config
    _run(kernel, grid, args, config, constexprs)
    return config


def _tune(kernel, grid: Callable, args: Sequence, configs: list, constexprs: dict, arch: int,
          device: torch.device, key: dict, dtypes: tuple) -> tuple[triton.Config, bool]:
    """(config, whether this call launched the kernel already) for a key not tuned in memory.

    Reads the persisted config if there is one; else runs ``triton.autotune`` over ``configs``
    (it times each, then launches the kernel with the fastest) and persists the winner. A fresh
    autotuner per key: ours decides when to tune, so its own key is empty.
    """
    directory = autotune_cache_dir()
    path = disk_key = None
    if directory is not None:
        disk_key = _disk_key(kernel, arch, device, configs, constexprs, key, dtypes)
        path = _disk_path(directory, disk_key)
        config = _load_tuned(path, configs)
        if config is not None:
            return config, False
    tuner = triton.autotune(configs=configs, key=[])(kernel)
    tuner[grid](*args, **constexprs)
    config = tuner.best_config
    if path is not None:
        _store_tuned(path, disk_key, config, getattr(tuner, "configs_timings", None) or {})
    return config, True
