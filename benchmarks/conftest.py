"""Generic helpers shared by the benchmark suites (pytest-benchmark): device sync and bandwidth.

Every suite reports ``benchmark.extra_info["GB/s"]``: the kernel suites from the bytes any
implementation must move (the same for every provider, an effective rate), the block and model
suites from each provider's own bytes by :mod:`fusedres.traffic`.

- ``FUSEDRES_DEVICE_PEAKS``: a JSON file ``{"copy_GBps": .., "matmul_TFLOPs": ..}`` measured on
  this device (scripts/gpu_validate.sh writes one); GB/s and TFLOP/s are then also reported as
  fractions of those peaks.
- ``FUSEDRES_BENCH_LOG``: a file to which every finished case appends one JSON line (group,
  name, median seconds, extra_info), so a run cut short by a timeout keeps what it measured
  (pytest-benchmark writes ``--benchmark-json`` only at the end).

At the end of a run the terminal summary prints, per group, each provider's median, GB/s,
images/s, speedup over eager and bytes ratio to eager (:func:`fusedres.report.format_bench_cases`).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

import torch

from fusedres.report import format_bench_cases

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
#: Every timed case of this session, as logged to FUSEDRES_BENCH_LOG (for the terminal summary).
TIMED_CASES: list = []


def sync(device: torch.device | str | None = None) -> None:
    """Waits for the device's queued work, so a host timer measures the kernels (no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second) of moving ``nbytes`` in ``seconds``."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def _peaks() -> dict:
    path = os.environ.get("FUSEDRES_DEVICE_PEAKS")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def publish(benchmark, info: dict) -> None:
    """Puts ``info`` in the case's extra_info, with GB/s and TFLOP/s as fractions of the device's
    measured peaks when known, and appends the case to ``FUSEDRES_BENCH_LOG``.
    """
    info["malloc_keeps_freed_memory"] = MALLOC_TUNED
    peaks = _peaks()
    if peaks.get("copy_GBps") and info.get("GB/s") is not None:
        info["GB/s_of_peak"] = info["GB/s"] / peaks["copy_GBps"]
    if peaks.get("matmul_TFLOPs") and info.get("TFLOP/s") is not None:
        info["TFLOP/s_of_peak"] = info["TFLOP/s"] / peaks["matmul_TFLOPs"]
    benchmark.extra_info.update(info)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    case = {"group": benchmark.group, "name": benchmark.name,
            "median_s": benchmark.stats.stats.median, "extra_info": info}
    TIMED_CASES.append(case)
    log = os.environ.get("FUSEDRES_BENCH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(case) + "\n")


def pytest_terminal_summary(terminalreporter):
    if TIMED_CASES:
        terminalreporter.write_sep("-", "fusedres: per group, median, GB/s, images/s, speedup "
                                        "over eager, bytes eager moves / bytes each moves")
        terminalreporter.write_line(format_bench_cases(TIMED_CASES))


def record(benchmark, provider: str, nbytes: float, flops: float = 0, **info) -> None:
    """Publishes the provider, the byte count and the GB/s (and TFLOP/s for ``flops``) of the
    median time, plus ``info``.

    Call after the benchmark ran (``benchmark.stats`` holds the timings then).
    """
    info.update(provider=provider, bytes=int(nbytes))
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        info["GB/s"] = round(gbps(nbytes, median), 2)
        if flops:
            info["TFLOP/s"] = flops / median / 1e12
    publish(benchmark, info)
