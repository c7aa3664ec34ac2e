"""Generic helpers shared by the benchmark suites (pytest-benchmark): device sync and bandwidth.

Every suite reports ``benchmark.extra_info["GB/s"]`` from the bytes a perfectly fused
implementation must move, so providers are compared by the memory traffic they make useful.
"""

from __future__ import annotations

import torch


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
