"""Shared helpers of the benchmark suites: providers, sizes, rounds, interleaved groups, extra_info.

Providers (one pytest-benchmark group per case, its providers timed in the same rounds: see
conftest.Interleaved): ``eager`` (NCHW), ``eager_cl`` (channels_last), ``compile``
(torch.compile of the eager module, channels_last) and every fused backend (``cpu`` in NCHW and
``cpu_cl`` in channels_last on CPU; ``triton`` and ``cuda``, channels_last, on GPU); the model
suite adds ``onnxruntime``. Unusable ones are skipped with the reason.

Environment:

- ``FUSEDRES_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: cuda when available).
- ``FUSEDRES_BENCH_COMPILE``: ``1`` adds torch.compile everywhere, ``0`` (or anything else)
  nowhere. Unset: the whole models and the kernel suites, not the 30 block cases (a compile
  each would cost minutes). On the 2-core CPU machine (load ~6) inductor compiled resnet18's
  train step in 69 s and its eval forward in 26 s, resnet50's train step in 107 s.
- ``FUSEDRES_BENCH_ROUNDS``, ``FUSEDRES_BENCH_WARMUP``: timed and warm-up rounds of every
  group, instead of each suite's default.
- ``FUSEDRES_BENCH_LOG`` and ``FUSEDRES_DEVICE_PEAKS``: see benchmarks/conftest.py.

Sizes adapt to the device: small blocks on CPU so the suite runs in minutes on 2 cores, real
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
from fusedres.report import (Provider, autocast, make_provider, native_bf16, peak_memory,
                             provider_status, saved_bytes, sync)

DEVICE = torch.device(os.environ.get("FUSEDRES_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
GPU = DEVICE.type == "cuda"
#: The device's name in extra_info: the GPU's, or "cpu" (the CPU model is recorded beside it).
DEVICE_NAME = torch.cuda.get_device_name(DEVICE) if GPU else "cpu"


@dataclass(frozen=True)
class Sizes:
    """Per-device sizes: blocks run at block_image/224 of their real spatial size."""

    dtype: torch.dtype
    block_batch: int
    block_image: int
    model_batch: int
    model_image: int
    rounds: int
    warmup: int
    model_rounds: int
    model_warmup: int


# GPU: blocks at batch 128 (the batch of the Bottleneck targets), models at 256. CPU: blocks at
# their real ResNet stage shapes (56/28/14/7 px) with a small batch; whole models at batch 8,
# 112x112, the size of issue 13's targets (a resnet50 train step takes about 1 s on 2 cores).
SIZES = (Sizes(torch.bfloat16, block_batch=128, block_image=224, model_batch=256,
               model_image=224, rounds=10, warmup=3, model_rounds=10, model_warmup=3)
         if GPU else
         Sizes(torch.float32, block_batch=4, block_image=224, model_batch=8, model_image=112,
               rounds=10, warmup=2, model_rounds=7, model_warmup=1))


def rounds(default: int) -> int:
    """Timed rounds of a group: ``FUSEDRES_BENCH_ROUNDS``, else the suite's default."""
    return int(os.environ.get("FUSEDRES_BENCH_ROUNDS", default))


def warmup(default: int) -> int:
    """Warm-up rounds of a group: ``FUSEDRES_BENCH_WARMUP``, else the suite's default."""
    return int(os.environ.get("FUSEDRES_BENCH_WARMUP", default))


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


def provider_params(scope: str, names=("eager", "eager_cl", "compile", "cpu", "cpu_cl",
                                       "triton", "cuda")) -> list:
    """pytest params of the providers ``names`` for ``scope``, unusable ones marked skip with
    the reason (see :func:`compile_skip_reason` for torch.compile).

    Names rather than :class:`Provider` objects, so that the saved benchmark JSON records them
    (pytest-benchmark stores a param it cannot serialise as its repr); the tests rebuild the
    Provider with ``make_provider``.
    """
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


def dtype_params() -> list:
    """The whole-model dtypes: on CPU float32 and bfloat16 autocast (skipped without native
    bf16 matrix instructions); bfloat16 on a GPU."""
    if GPU:
        return ["bfloat16"]
    ok, why = native_bf16()
    return ["float32", pytest.param("bfloat16", marks=() if ok else pytest.mark.skip(
        reason=f"no native bf16 matrix instructions on this CPU: {why}"))]


def timed(fn):
    """``fn`` followed by a device synchronisation (what the benchmark times)."""
    def run():
        fn()
        sync(DEVICE)
    return run


def interleave_functions(request, benchmark, interleaved, make_fn, *, n_rounds: int,
                         n_warmup: int, calls: int = 1, host: bool = False) -> float:
    """Times a group whose providers are independent functions, in the same rounds.

    Args:
        make_fn: ``make_fn(provider name) -> function`` (the timed call; it synchronises the
            device itself unless ``host``).
        n_rounds, n_warmup, calls, host: as for fusedres.report.time_interleaved.

    Returns:
        This provider's ``make_fn`` and first call in seconds (compiles, autotuning).
    """
    def build(names):
        fns, first = {}, {}
        for name in names:
            t0 = time.perf_counter()
            fns[name] = make_fn(name)
            fns[name]()
            sync(DEVICE)
            first[name] = time.perf_counter() - t0
        return fns, first

    first = interleaved(request, benchmark, build, device=DEVICE, rounds=n_rounds,
                        warmup=n_warmup, calls=calls, host=host)
    return first[request.node.callspec.params["provider"]]


def measure_memory(fn, forward, params) -> tuple:
    """(peak bytes of a call of ``fn`` (:func:`fusedres.report.peak_memory`), bytes a call of
    ``forward`` saves for backward, ``params`` excluded; None without ``forward``).

    Call after the timing: the warm-up has paid for autotuning and compilation by then.
    """
    return (peak_memory(fn, DEVICE),
            saved_bytes(forward, exclude=tuple(params)) if forward is not None else None)


def publish_case(benchmark, provider: Provider, *, first_call_s: float, images: int, blocks,
                 training: bool, memory: tuple, dtype: torch.dtype = SIZES.dtype,
                 **labels) -> None:
    """Records a block or model case's extra_info.

    extra_info: the provider, images/s, GB/s of the provider's own traffic-model bytes,
    ``traffic_ratio_vs_eager`` (bytes the eager sequence moves / bytes this provider moves; None
    for torch.compile and onnxruntime, whose kernels the model does not describe), conv TFLOP/s,
    the first call's seconds (``first_call_s``: torch.compile's compile or Triton's autotuning
    included), the call's peak memory and the bytes saved for backward.

    Args:
        images: images per call (the batch), for images/s.
        blocks: the traffic model's units of what the case runs (lists of units, a one-unit
            list for a lone unit, as :func:`fusedres.traffic.model_blocks` gives them).
        training: the case is a training step (forward with batch statistics and backward).
        memory: (peak bytes, saved bytes), None where not measured (:func:`measure_memory`).
        dtype: the compute dtype (autocast's in 16 bits), for the bytes.
        **labels: more extra_info (the block, the mode), logged with the case.
    """
    bytes_moved = bytes_for(provider, blocks, training, dtype)
    eager_bytes = bytes_for(make_provider("eager"), blocks, training, dtype)
    flops = sum(traffic.unit_flops(u, training) for units in blocks for u in units)
    info = {"provider": provider.name, "backend": provider.backend,
            "channels_last": provider.channels_last, "compiled": provider.compiled,
            "device": DEVICE_NAME, "dtype": str(dtype).removeprefix("torch."),
            "images": images, "bytes_moved": bytes_moved, "conv_flops": flops,
            "first_call_s": first_call_s,
            "traffic_ratio_vs_eager": eager_bytes / bytes_moved if bytes_moved else None,
            "peak_allocated_bytes": memory[0], "saved_activation_bytes": memory[1], **labels}
    stats = benchmark.stats
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        info["images/s"] = images / median
        info["TFLOP/s"] = flops / median / 1e12
        info["GB/s"] = bytes_moved / median / 1e9 if bytes_moved is not None else None
    publish(benchmark, info)


def bytes_for(provider: Provider, blocks, training: bool, dtype: torch.dtype):
    """Traffic-model bytes of ``blocks`` (lists of units; a one-unit list is a lone unit) with
    ``dtype`` activations."""
    if provider.compiled or provider.onnx or provider.backend not in traffic.FUSIONS:
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for units in blocks:
        if len(units) == 1:
            total += traffic.unit_traffic(units[0], provider.backend, training, itemsize).total
        else:
            total += traffic.block_traffic(units, provider.backend, training, itemsize).total
    return total


__all__ = ["DEVICE", "DEVICE_NAME", "GPU", "SIZES", "autocast", "bytes_for",
           "compile_skip_reason", "compiled", "dtype_params", "interleave_functions",
           "make_provider", "measure_memory", "provider_params", "publish_case", "rounds",
           "timed", "warmup"]
