"""Whole models, resnet18 and resnet50: a training step and an eval forward per provider.

Training step = forward + cross-entropy + backward + SGD (momentum) step, the unit of images/s
in training; eval = forward under inference_mode. extra_info carries images/s, GB/s (the
fusedres.traffic bytes of the units and blocks) and the bytes ratio to eager, conv TFLOP/s and
memory: the step's peak allocation beyond weights and optimizer state
(fusedres.report.peak_memory, on CPU from torch.profiler's allocator record) and the bytes saved
for backward (fusedres.report.saved_bytes). torch.compile runs unless FUSEDRES_BENCH_COMPILE=0
(on 2 CPU cores its compiles take minutes: see _providers).

    pytest benchmarks/test_bench_models.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres import traffic
from fusedres.report import build_model, make_eval_step, make_train_step

from _providers import (DEVICE, SIZES, autocast, make_provider, provider_params, run_benchmark,
                        timed)


@pytest.mark.parametrize("provider", provider_params("models"))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model(benchmark, arch, mode, provider):
    provider = make_provider(provider)
    n, size, training = SIZES.model_batch[arch], SIZES.model_image, mode == "train"
    benchmark.group = f"model {arch} batch {n} {size}px {mode}"
    torch.manual_seed(0)
    if provider.compiled:
        # A fresh dynamo cache per case: see _providers.compiled.
        torch._dynamo.reset()
    model = build_model(arch, provider, DEVICE, getattr(fusedres.models, arch)())
    fmt = torch.channels_last if provider.channels_last else torch.contiguous_format
    x = torch.randn(n, 3, size, size, device=DEVICE).contiguous(memory_format=fmt)
    if training:
        step = make_train_step(model, x, torch.randint(0, 1000, (n,), device=DEVICE),
                               SIZES.dtype)
    else:
        step = make_eval_step(model, x, SIZES.dtype)

    def forward():
        with autocast(DEVICE, SIZES.dtype):
            model(x)

    run_benchmark(benchmark, provider, timed(step), images=n,
                  blocks=traffic.model_blocks(arch, n, size), training=training,
                  forward=forward if (training and not provider.compiled) else None,
                  params=list(model.parameters()), arch=arch, mode=mode)
