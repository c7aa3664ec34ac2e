"""Whole models, resnet18 and resnet50: a training step and an eval forward per provider.

Issue 13's targets are measured here and in the main job (``python -m fusedres --arch
resnet50,resnet18``) the same way, by fusedres.report.ModelGroup: every provider of a group
(architecture, dtype, mode) on the same weights and input, checked against eager and a float64
oracle (extra_info ``check``), then timed in the same rounds. On CPU: batch 8 at 112x112, float32
and, where the CPU has native bf16 matrix instructions, bfloat16 autocast; providers eager
(NCHW), eager_cl, torch.compile (train: default inductor; eval: inductor with freezing), the
fused cpu backend in NCHW and channels_last, onnxruntime (eval, float32). On a GPU: batch 256 at
224x224, bfloat16.

Training step = forward + cross-entropy + backward + SGD (momentum) step, the unit of images/s
in training; eval = forward under no_grad. extra_info carries images/s, GB/s (the
fusedres.traffic bytes of the units and blocks) and the bytes ratio to eager, conv TFLOP/s and
memory: the step's peak allocation beyond weights and optimizer state
(fusedres.report.peak_memory, on CPU from torch.profiler's allocator record) and the bytes saved
for backward (fusedres.report.saved_bytes). torch.compile runs unless FUSEDRES_BENCH_COMPILE=0
(on 2 CPU cores its compiles take minutes: see _providers).

    pytest benchmarks/test_bench_models.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch

from fusedres import traffic
from fusedres.report import (DTYPES, ModelGroup, as_input, build_model, largest_batch,
                             make_base, make_train_step, provider_status)

from _providers import (DEVICE, GPU, SIZES, dtype_params, make_provider, provider_params,
                        publish_case, rounds, warmup)

PROVIDERS = ("eager", "eager_cl", "compile", "cpu", "cpu_cl", "cpu_per_unit", "cpu_conv1", "triton",
             "cuda", "onnxruntime")


@pytest.mark.parametrize("provider", provider_params("models", PROVIDERS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("dtype", dtype_params())
def test_model(benchmark, request, interleaved, dtype, arch, mode, provider):
    p, dt = make_provider(provider), DTYPES[dtype]
    ok, why = provider_status(p, DEVICE, mode, dt)
    if not ok:
        pytest.skip(f"{provider} in {dtype} {mode}: {why}")
    n, size, training = SIZES.model_batch, SIZES.model_image, mode == "train"
    benchmark.group = f"model {arch} {dtype} batch {n} {size}px {mode}"

    def build(names):
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        usable = [q for q in map(make_provider, names) if provider_status(q, DEVICE, mode, dt)[0]]
        group = ModelGroup(arch, mode, dt, make_base(arch, x), x, usable)
        group.prepare()
        group.check()
        return group.steps, group

    group = interleaved(request, benchmark, build, device=DEVICE,
                        rounds=rounds(SIZES.model_rounds), warmup=warmup(SIZES.model_warmup))
    if provider in group.failed:
        pytest.fail(f"{provider} raised: {group.failed[provider]}")
    chk = group.checks[provider]
    publish_case(benchmark, p, first_call_s=group.first_call_s[provider], images=n,
                 blocks=traffic.model_blocks(arch, n, size), training=training,
                 memory=group.memory(provider), dtype=dt, arch=arch, mode=mode,
                 check="ok" if chk["ok"] else f"FAIL ({chk['worst']})")


# The largest batch in a memory budget: what leaner saved activations buy a user.
BUDGET_PROVIDERS = ("eager", "eager_cl", "cpu", "cpu_cl", "cpu_per_unit", "cpu_conv1", "triton",
                    "cuda")


@pytest.mark.parametrize("provider", provider_params("budget", BUDGET_PROVIDERS))
def test_largest_batch_in_budget(benchmark, provider):
    """ResNet-50 training at the suite's image size and dtype: the largest batch whose step's
    peak memory (activations, gradients, workspaces; not weights or optimizer state) fits in
    ``FUSEDRES_BENCH_BUDGET_MIB`` (default 1024 on CPU, 16384 on a GPU), found by
    fusedres.report.largest_batch; timed at that batch, so images/s sits beside it."""
    p = make_provider(provider)
    ok, why = provider_status(p, DEVICE, "train", SIZES.dtype)
    if not ok:
        pytest.skip(f"{provider}: {why}")
    budget_mib = int(os.environ.get("FUSEDRES_BENCH_BUDGET_MIB", 16384 if GPU else 1024))
    size = SIZES.model_image
    benchmark.group = f"largest resnet50 batch in {budget_mib} MiB, {size}px train"
    found = largest_batch("resnet50", p, DEVICE, SIZES.dtype, size, budget_mib << 20)
    if found["batch"] == 0:
        pytest.skip(f"{provider}: not one image fits in {budget_mib} MiB")
    n = found["batch"]
    g = torch.Generator().manual_seed(0)
    model = build_model("resnet50", p, DEVICE)
    x = as_input(torch.randn(n, 3, size, size, generator=g).to(DEVICE), p)
    step = make_train_step(model, x, torch.randint(0, 1000, (n,), generator=g).to(DEVICE),
                           SIZES.dtype)
    benchmark.pedantic(step, rounds=rounds(3), warmup_rounds=warmup(1))
    benchmark.extra_info.update(
        provider=provider, batch=n, budget_mib=budget_mib, peak_mib=found["peak_bytes"] / 2**20,
        mib_per_image=found["bytes_per_image"] / 2**20,
        images_per_s=n / benchmark.stats.stats.median)
