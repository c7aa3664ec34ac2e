"""Shared helpers of the block and model benchmark suites: providers, sizes, timing, extra_info.

Providers (one pytest-benchmark group per case): ``eager`` (NCHW), ``eager_cl`` (channels_last),
``compile`` (torch.compile of the eager module, channels_last) and every fused backend (``cpu``
in NCHW and ``cpu_cl`` in channels_last on CPU; ``triton`` and ``cuda``, channels_last, on GPU).
Unusable ones are skipped with the reason.

Environment:

- ``FUSEDRES_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: cuda when available).
- ``FUSEDRES_BENCH_COMPILE``: ``1`` adds torch.compile everywhere, ``0`` nowhere. Unset: on a
  GPU for the whole models only (a compile of each of the 30 block cases would cost minutes), on
  CPU nowhere (inductor's C++ compile of a block takes longer than the whole CPU suite).
- ``FUSEDRES_BENCH_LOG`` and ``FUSEDRES_DEVICE_PEAKS``: see benchmarks/conftest.py.

Sizes adapt to the device: small on CPU so the whole suite runs in minutes on 2 cores, real
ResNet sizes in bf16 autocast and channels_last on a GPU. Every timed function synchronises the
device before it returns, so a host timer measures the kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from conftest import publish
from fusedres import traffic
from fusedres.report import (Provider, autocast, make_provider, peak_memory, provider_status,
                             saved_bytes, sync)

DEVICE = torch.device(os.environ.get("FUSEDRES_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
GPU = DEVICE.type == "cuda"


@dataclass(frozen=True)
class Sizes:
    """Per-device sizes: blocks run at image_size/224 of their real spatial size."""

    dtype: torch.dtype
    block_batch: int
    block_image: int
    model_batch: dict
    model_image: int
    rounds: int
    warmup: int


# CPU: blocks at their real ResNet stage shapes (56/28/14/7 px) with a small batch; whole models
# at 64 px, where a resnet50 train step takes about 0.1 s on 2 cores.
SIZES = (Sizes(torch.bfloat16, block_batch=64, block_image=224,
               model_batch={"resnet18": 256, "resnet50": 256}, model_image=224, rounds=10,
               warmup=3)
         if GPU else
         Sizes(torch.float32, block_batch=4, block_image=224,
               model_batch={"resnet18": 4, "resnet50": 4}, model_image=64, rounds=10, warmup=2))


def _compile_wanted(scope: str) -> bool:
    env = os.environ.get("FUSEDRES_BENCH_COMPILE")
    if env is not None:
        return env == "1"
    return GPU and scope == "models"


def provider_params(scope: str) -> list:
    """pytest params of every provider name for ``scope`` (``"blocks"`` or ``"models"``).

    Names rather than :class:`Provider` objects, so that the saved benchmark JSON records them
    (pytest-benchmark stores a param it cannot serialise as its repr); the tests rebuild the
    Provider with ``make_provider``.
    """
    names = ["eager", "eager_cl", "compile", "cpu", "cpu_cl", "triton", "cuda"]
    params = []
    for name in names:
        p = make_provider(name)
        if name == "compile" and not _compile_wanted(scope):
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(
                reason="torch.compile not benchmarked here: set FUSEDRES_BENCH_COMPILE=1")))
            continue
        ok, why = provider_status(p, DEVICE)
        marks = () if ok else pytest.mark.skip(reason=f"{name} unusable on {DEVICE}: {why}")
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def timed(fn):
    """``fn`` followed by a device synchronisation (what the benchmark times)."""
    def run():
        fn()
        sync(DEVICE)
    return run


def run_benchmark(benchmark, provider: Provider, fn, *, images: int, bytes_moved,
                  flops: int, forward, params) -> None:
    """Times ``fn`` with fixed rounds and records extra_info.

    Args:
        fn: the timed function (it synchronises the device itself).
        images: images per call (the batch), for images/s.
        bytes_moved: the traffic model's bytes per call, or None (torch.compile: not modelled).
        flops: convolution FLOPs per call, for TFLOP/s.
        forward: a forward pass with autograd recording, for the saved-activation bytes
            (None for compiled modules, whose saved tensors the hooks cannot see).
        params: the module's parameters (not counted as saved activations).
    """
    info = {"provider": provider.name, "backend": provider.backend,
            "channels_last": provider.channels_last, "compiled": provider.compiled,
            "device": torch.cuda.get_device_name(DEVICE) if GPU else "cpu",
            "dtype": str(SIZES.dtype).removeprefix("torch."), "images": images,
            "bytes_moved": bytes_moved, "conv_flops": flops,
            # other processes' load: CPU timings on a shared machine need it beside them
            "load_average_1min": os.getloadavg()[0]}
    benchmark.pedantic(fn, rounds=SIZES.rounds, warmup_rounds=SIZES.warmup, iterations=1)
    # Memory after timing: the warm-up has already paid for autotuning and compilation.
    info["peak_allocated_bytes"] = peak_memory(fn, DEVICE)
    info["saved_activation_bytes"] = (saved_bytes(forward, exclude=tuple(params))
                                      if forward is not None else None)
    stats = benchmark.stats
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        info["images/s"] = images / median
        info["TFLOP/s"] = flops / median / 1e12
        info["GB/s"] = bytes_moved / median / 1e9 if bytes_moved is not None else None
    publish(benchmark, info)


def bytes_for(provider: Provider, blocks, training: bool) -> int | None:
    """Traffic-model bytes of ``blocks`` (lists of units; a one-unit list is a lone unit)."""
    if provider.compiled or provider.backend not in traffic.FUSIONS:
        return None
    itemsize = torch.empty((), dtype=SIZES.dtype).element_size()
    total = 0
    for units in blocks:
        if len(units) == 1:
            total += traffic.unit_traffic(units[0], provider.backend, training, itemsize).total
        else:
            total += traffic.block_traffic(units, provider.backend, training, itemsize).total
    return total


__all__ = ["DEVICE", "GPU", "SIZES", "autocast", "bytes_for", "make_provider", "provider_params",
           "run_benchmark", "timed"]
