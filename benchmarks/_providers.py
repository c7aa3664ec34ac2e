"""Shared helpers of the block and model benchmark suites: providers, sizes, timing, extra_info.

Providers (one pytest-benchmark group per case): ``eager`` (NCHW), ``eager_cl`` (channels_last),
``compile`` (torch.compile of the eager module, channels_last) and every fused backend (``cpu``
in NCHW and ``cpu_cl`` in channels_last on CPU; ``triton`` and ``cuda``, channels_last, on GPU).
Unusable ones are skipped with the reason.

Environment:

- ``FUSEDRES_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: cuda when available).
- ``FUSEDRES_BENCH_COMPILE``: ``1`` adds torch.compile everywhere, ``0`` (or anything else)
  nowhere. Unset: the whole models and the kernel suites, not the 30 block cases (a compile
  each would cost minutes). On the 2-core CPU machine (load ~6) inductor compiled resnet18's
  train step in 69 s and its eval forward in 26 s, resnet50's train step in 107 s.
- ``FUSEDRES_BENCH_LOG`` and ``FUSEDRES_DEVICE_PEAKS``: see benchmarks/conftest.py.

Sizes adapt to the device: small on CPU so the whole suite runs in minutes on 2 cores, real
ResNet sizes in bf16 autocast and channels_last on a GPU. Every timed function synchronises the
device before it returns, so a host timer measures the kernels.
"""

from __future__ import annotations

import os
import time
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


# GPU: blocks at batch 128 (the batch of the Bottleneck targets), models at 256. CPU: blocks at
# their real ResNet stage shapes (56/28/14/7 px) with a small batch; whole models at 64 px, where
# a resnet50 train step takes about 0.1 s on 2 cores.
SIZES = (Sizes(torch.bfloat16, block_batch=128, block_image=224,
               model_batch={"resnet18": 256, "resnet50": 256}, model_image=224, rounds=10,
               warmup=3)
         if GPU else
         Sizes(torch.float32, block_batch=4, block_image=224,
               model_batch={"resnet18": 4, "resnet50": 4}, model_image=64, rounds=10, warmup=2))


def compile_skip_reason(scope: str) -> str | None:
    """Why torch.compile is not benchmarked in ``scope`` (``"kernels"``, ``"blocks"`` or
    ``"models"``), or None when it is."""
    env = os.environ.get("FUSEDRES_BENCH_COMPILE")
    if env is not None:
        return None if env == "1" else f"torch.compile switched off (FUSEDRES_BENCH_COMPILE={env})"
    if scope == "blocks":
        return ("torch.compile of each of the 30 block cases would cost minutes: set "
                "FUSEDRES_BENCH_COMPILE=1")
    return None


def compiled(module):
    """torch.compile of ``module`` with static shapes, after a reset of dynamo's caches.

    Every case compiles the same ``forward`` code again: without the reset, dynamo's per-code
    recompile limit (8) would silently run later cases eagerly, and a second shape would
    recompile with dynamic sizes.
    """
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False)


def provider_params(scope: str) -> list:
    """pytest params of every provider name for ``scope`` (see :func:`compile_skip_reason`).

    Names rather than :class:`Provider` objects, so that the saved benchmark JSON records them
    (pytest-benchmark stores a param it cannot serialise as its repr); the tests rebuild the
    Provider with ``make_provider``.
    """
    names = ["eager", "eager_cl", "compile", "cpu", "cpu_cl", "triton", "cuda"]
    params = []
    for name in names:
        p = make_provider(name)
        ok, why = provider_status(p, DEVICE)
        reason = None if ok else f"{name} unusable on {DEVICE}: {why}"
        if reason is None and p.compiled:
            reason = compile_skip_reason(scope)
        marks = pytest.mark.skip(reason=reason) if reason else ()
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def timed(fn):
    """``fn`` followed by a device synchronisation (what the benchmark times)."""
    def run():
        fn()
        sync(DEVICE)
    return run


def run_benchmark(benchmark, provider: Provider, fn, *, images: int, blocks, training: bool,
                  forward, params, **labels) -> None:
    """Times ``fn`` with fixed rounds and records extra_info.

    extra_info: the provider, images/s, GB/s of the provider's own traffic-model bytes,
    ``traffic_ratio_vs_eager`` (bytes the eager sequence moves / bytes this provider moves; None
    for torch.compile, whose kernels the model does not describe), conv TFLOP/s, the first call's
    seconds (``first_call_s``: torch.compile's compile or Triton's autotuning included), the
    call's peak memory (:func:`fusedres.report.peak_memory`) and the bytes saved for backward.

    Args:
        fn: the timed function (it synchronises the device itself).
        images: images per call (the batch), for images/s.
        blocks: the traffic model's units of what ``fn`` runs (lists of units, a one-unit list
            for a lone unit, as :func:`fusedres.traffic.model_blocks` gives them).
        training: ``fn`` is a training step (forward with batch statistics and backward).
        forward: a forward pass with autograd recording, for the saved-activation bytes
            (None for compiled modules, whose saved tensors the hooks cannot see).
        params: the module's parameters (not counted as saved activations).
        **labels: more extra_info (the block, the mode), logged with the case.
    """
    bytes_moved = bytes_for(provider, blocks, training)
    eager_bytes = bytes_for(make_provider("eager"), blocks, training)
    flops = sum(traffic.unit_flops(u, training) for units in blocks for u in units)
    info = {"provider": provider.name, "backend": provider.backend,
            "channels_last": provider.channels_last, "compiled": provider.compiled,
            "device": torch.cuda.get_device_name(DEVICE) if GPU else "cpu",
            "dtype": str(SIZES.dtype).removeprefix("torch."), "images": images,
            "bytes_moved": bytes_moved, "conv_flops": flops,
            "traffic_ratio_vs_eager": eager_bytes / bytes_moved if bytes_moved else None,
            # other processes' load: CPU timings on a shared machine need it beside them
            "load_average_1min": os.getloadavg()[0], **labels}
    t0 = time.perf_counter()
    fn()
    info["first_call_s"] = time.perf_counter() - t0
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


__all__ = ["DEVICE", "GPU", "SIZES", "autocast", "bytes_for", "compile_skip_reason", "compiled",
           "make_provider", "provider_params", "run_benchmark", "timed"]
