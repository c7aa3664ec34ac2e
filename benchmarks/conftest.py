"""Generic helpers shared by the benchmark suites (pytest-benchmark): device sync and bandwidth.

Every suite reports ``benchmark.extra_info["GB/s"]`` from the bytes a perfectly fused
implementation must move, so providers are compared by the memory traffic they make useful.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

# glibc malloc serves big blocks (a [8, 256, 56, 56] activation is 25 MB) with mmap and unmaps them
# on free, so every op that allocates its outputs pays first-touch page faults again each call
# (measured here: ~6200 faults, ~30 ms, for two 12.8 MB outputs, ten times the kernel). That is
# allocator policy, not kernel work, and it hits providers by accident of heap state. Keeping
# freed memory in the heap (what jemalloc/tcmalloc, which PyTorch's CPU tuning guide recommends,
# do anyway) makes every provider measure its kernels. FUSEDRES_BENCH_GLIBC_DEFAULTS=1 opts out.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_memory() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("FUSEDRES_BENCH_GLIBC_DEFAULTS") == "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


#: Whether glibc was told to keep freed memory (recorded in each benchmark's extra_info).
MALLOC_TUNED = _keep_freed_memory()


def sync(device: torch.device | str | None = None) -> None:
    """Waits for the device's queued work, so a host timer measures the kernels (no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second) of moving ``nbytes`` in ``seconds``."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def record(benchmark, provider: str, nbytes: float) -> None:
    """Stores the provider name, the byte count and the GB/s of the mean time in extra_info.

    Call after the benchmark ran (``benchmark.stats`` holds the timings then).
    """
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["bytes"] = int(nbytes)
    benchmark.extra_info["GB/s"] = round(gbps(nbytes, mean), 2)
    benchmark.extra_info["malloc_keeps_freed_memory"] = MALLOC_TUNED
