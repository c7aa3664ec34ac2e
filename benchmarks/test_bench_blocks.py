"""Blocks at every distinct ResNet-18 and ResNet-50 block shape, training and eval.

Per stage: the first block (with its downsample where torchvision has one) and a plain block.
Training = forward with batch statistics + backward of the input and every parameter
(``torch.autograd.grad``, so no gradient accumulation is timed); eval = forward under
inference_mode. One pytest-benchmark group per (block, mode); see _providers for the providers,
sizes and extra_info (images/s, GB/s and the bytes ratio to eager from fusedres.traffic,
TFLOP/s, memory). On a GPU the blocks run at batch 128 in bf16 channels_last, the setting of the
Bottleneck targets (fusedres.report.BOTTLENECK_TARGETS); torch.compile needs
FUSEDRES_BENCH_COMPILE=1 here (scripts/gpu_validate.sh selects the ResNet-50 training cases).

    pytest benchmarks/test_bench_blocks.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres import reference, traffic

from _providers import (DEVICE, SIZES, autocast, compiled, make_provider, measure_memory,
                        provider_params, publish_case, rounds, timed, warmup)
from conftest import call_once

# (name, kind, inplanes, planes, stride, input spatial size at 224x224 images)
CASES = [
    ("r18.layer1", "basic", 64, 64, 1, 56),
    ("r18.layer2.0", "basic", 64, 128, 2, 56),
    ("r18.layer2.1", "basic", 128, 128, 1, 28),
    ("r18.layer3.0", "basic", 128, 256, 2, 28),
    ("r18.layer3.1", "basic", 256, 256, 1, 14),
    ("r18.layer4.0", "basic", 256, 512, 2, 14),
    ("r18.layer4.1", "basic", 512, 512, 1, 7),
    ("r50.layer1.0", "bottleneck", 64, 64, 1, 56),
    ("r50.layer1.1", "bottleneck", 256, 64, 1, 56),
    ("r50.layer2.0", "bottleneck", 256, 128, 2, 56),
    ("r50.layer2.1", "bottleneck", 512, 128, 1, 28),
    ("r50.layer3.0", "bottleneck", 512, 256, 2, 28),
    ("r50.layer3.1", "bottleneck", 1024, 256, 1, 14),
    ("r50.layer4.0", "bottleneck", 1024, 512, 2, 14),
    ("r50.layer4.1", "bottleneck", 2048, 512, 1, 7),
]


def make_block(kind: str, inplanes: int, planes: int, stride: int) -> nn.Module:
    """torchvision's block (fusedres.reference), with a downsample where torchvision adds one."""
    cls = reference.BasicBlock if kind == "basic" else reference.Bottleneck
    out = planes * cls.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(reference.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    return cls(inplanes, planes, stride, downsample)


def _prepare(case, mode: str, name: str) -> dict:
    """The provider's block, input and timed step (not yet called)."""
    provider = make_provider(name)
    _, kind, inplanes, planes, stride, full = case
    size = max(1, full * SIZES.block_image // 224)
    n, training = SIZES.block_batch, mode == "train"
    torch.manual_seed(0)
    block = make_block(kind, inplanes, planes, stride)
    if provider.backend != "eager":
        block = fusedres.convert(block, provider.backend)
    block = block.to(DEVICE).train(training)
    fmt = torch.channels_last if provider.channels_last else torch.contiguous_format
    block = block.to(memory_format=fmt)
    params = list(block.parameters())
    module = compiled(block) if provider.compiled else block
    # Inside a network a block's input is already in the compute dtype (bf16 on GPU).
    x = torch.randn(n, inplanes, size, size, device=DEVICE, dtype=SIZES.dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(training)

    def forward():
        with autocast(DEVICE, SIZES.dtype):
            return module(x)

    if training:
        gy = torch.randn_like(forward().detach())

        def step():
            torch.autograd.grad(forward(), [x, *params], gy)
    else:
        def step():
            with torch.inference_mode():
                forward()

    return {"step": timed(step), "params": params,
            "forward": None if (provider.compiled or not training) else forward}


@pytest.mark.parametrize("provider", provider_params("blocks"))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block(benchmark, request, interleaved, case, mode, provider):
    name, kind, inplanes, planes, stride, full = case
    size = max(1, full * SIZES.block_image // 224)
    n, training = SIZES.block_batch, mode == "train"
    benchmark.group = f"block {name} {kind} {inplanes}->{planes} s{stride} {size}px {mode}"

    def build(names):
        blocks = {p: _prepare(case, mode, p) for p in names}
        first = call_once({p: b["step"] for p, b in blocks.items()}, DEVICE)
        for p, b in blocks.items():
            b["first_call_s"] = first[p]
        return {p: b["step"] for p, b in blocks.items()}, blocks

    mine = interleaved(request, benchmark, build, device=DEVICE, rounds=rounds(SIZES.rounds),
                       warmup=warmup(SIZES.warmup))[provider]
    units = traffic.block_units(kind, n, inplanes, planes, size, size, stride)
    publish_case(benchmark, make_provider(provider), first_call_s=mine["first_call_s"],
                 images=n, blocks=[units], training=training,
                 memory=measure_memory(mine["step"], mine["forward"], mine["params"]),
                 block=name, kind=kind, mode=mode)


def test_cases_cover_every_distinct_block_shape():
    # The distinct (inplanes, planes, stride, size) of ResNet-18/50 blocks, from the traffic
    # model's enumeration (checked against the modules in tests/test_traffic.py).
    for arch, prefix in (("resnet18", "r18"), ("resnet50", "r50")):
        distinct = {(b[0].cin, b[-1].cout, max(u.stride for u in b), b[0].h)
                    for b in traffic.model_blocks(arch, 1, 224)[1:]}
        ours = {(c[2], c[3] * (1 if c[1] == "basic" else 4), c[4], c[5])
                for c in CASES if c[0].startswith(prefix)}
        assert ours == distinct
