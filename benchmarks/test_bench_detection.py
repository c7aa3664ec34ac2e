"""fasterrcnn_resnet50_fpn's backbone: a training step and an eval forward, per provider.

The backbone as torchvision builds it for pretrained detection models (resnet50 body with
FrozenBatchNorm2d, trainable layers 3, FPN on layers 1-4): the frozen-statistics case of issue
15, where every unit is a conv with a fixed per-channel scale and shift. One pytest-benchmark
group per mode, so each fused provider's speedup is over eager on the same work. Training step =
forward (dict of five FPN maps) + the sum of their means + backward + SGD step; eval = forward
under inference_mode. extra_info has images/s and the fused units of the converted backbone
(``fusedres.fusion_summary``); no GB/s: fusedres.traffic models batch-statistics training and
plain ResNets, not frozen statistics and an FPN.

    pytest benchmarks/test_bench_detection.py --benchmark-only
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import fusedres
from conftest import publish
from fusedres.report import build_model

from _providers import DEVICE, GPU, SIZES, autocast, make_provider, provider_params, timed

torchvision = pytest.importorskip(
    "torchvision", reason="the detection backbone is torchvision's (pip install torchvision)")
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

# GPU: detection's usual 2-4 images per device at a COCO-like 800 x 1216; CPU: small enough for
# a round in about a second on 2 cores.
BATCH, HEIGHT, WIDTH = (4, 800, 1216) if GPU else (2, 128, 128)


def _frozen_backbone() -> torch.nn.Module:
    """resnet50 + FPN exactly as fasterrcnn_resnet50_fpn builds it with pretrained weights."""
    torch.manual_seed(0)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3)
    with torch.no_grad():  # non-trivial frozen statistics, as a checkpoint would have
        for m in backbone.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return backbone


@pytest.mark.parametrize("provider", provider_params("models"))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fasterrcnn_backbone(benchmark, mode, provider):
    provider = make_provider(provider)
    benchmark.group = (f"detection fasterrcnn_resnet50_fpn backbone (FrozenBN) batch {BATCH} "
                       f"{HEIGHT}x{WIDTH} {mode}")
    if provider.compiled:
        torch._dynamo.reset()  # a fresh dynamo cache per case: see _providers.compiled
    model = build_model("resnet50", provider, DEVICE, _frozen_backbone())
    fmt = torch.channels_last if provider.channels_last else torch.contiguous_format
    x = torch.randn(BATCH, 3, HEIGHT, WIDTH, device=DEVICE).contiguous(memory_format=fmt)
    if mode == "train":
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.9)

        def step():
            with autocast(DEVICE, SIZES.dtype):
                features = model(x)
            sum(f.float().mean() for f in features.values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast(DEVICE, SIZES.dtype):
                model(x)

    fn = timed(step)
    summary = fusedres.fusion_summary(getattr(model, "_orig_mod", model))
    info = {"provider": provider.name, "backend": provider.backend,
            "channels_last": provider.channels_last, "compiled": provider.compiled,
            "device": torch.cuda.get_device_name(DEVICE) if GPU else "cpu",
            "dtype": str(SIZES.dtype).removeprefix("torch."), "images": BATCH,
            "model": "fasterrcnn_resnet50_fpn backbone", "mode": mode,
            "fused_units": summary.fused, "units": len(summary.units),
            "load_average_1min": os.getloadavg()[0]}
    t0 = time.perf_counter()
    fn()
    info["first_call_s"] = time.perf_counter() - t0
    benchmark.pedantic(fn, rounds=SIZES.rounds, warmup_rounds=SIZES.warmup, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        info["images/s"] = BATCH / benchmark.stats.stats.median
    publish(benchmark, info)
