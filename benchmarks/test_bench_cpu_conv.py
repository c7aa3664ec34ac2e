"""A training unit (conv -> BN -> ReLU, forward and backward) at every ResNet-50 convolution
geometry, on the cpu backend with and without its GEMM convolutions, beside eager's modules; and
an eval unit (no gradients) at every stride-1 3x3 of ResNet-18/50, with and without its float32
Winograd convolutions (csrc/cpu/winograd_conv.h).

The cpu backend runs a unit's convolution as one GEMM where the weights outweigh the activations
(csrc/cpu/gemm_conv.h: every 1x1, and at most 2*Cout output rows; in float32 without AMX at most
Cout/4 output rows); this group shows, layer by layer, where that beats oneDNN's convolution and
where the rule keeps oneDNN. Shapes: batch 8 at
112x112, the main job's size, so layer4 runs at 4x4. Everything channels_last.

Providers, timed in the same rounds (conftest.Interleaved): ``eager`` (``nn.Conv2d`` +
``nn.BatchNorm2d`` + ``nn.ReLU``), ``cpu_onednn`` (FusedConvBNReLU on ``cpu`` with the GEMM path
off: ATen's convolution, as eager's) and ``cpu`` (as shipped). extra_info ``gemm_path``: whether
the rule takes the GEMM path for the case.

Eval providers: ``eager`` (the modules in eval, no_grad), ``cpu_direct`` (FusedConvBNReLU on
``cpu`` with Winograd off: oneDNN's prepacked fused convolution) and ``cpu`` (as shipped).

    pytest benchmarks/test_bench_cpu_conv.py --benchmark-only
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

from fusedres import FusedConvBNReLU
from fusedres.report import make_provider, provider_status

from _providers import DEVICE, dtype_params, interleave_functions, rounds, warmup
from conftest import publish

# (Cin, H, W, Cout, kernel, stride) of ResNet-50 at batch 8, 112x112 (v1.5: stride on the 3x3).
GEOMETRIES = [
    (64, 28, 28, 64, 1, 1), (64, 28, 28, 64, 3, 1), (64, 28, 28, 256, 1, 1),
    (256, 28, 28, 64, 1, 1), (256, 28, 28, 128, 1, 1), (128, 28, 28, 128, 3, 2),
    (128, 14, 14, 512, 1, 1), (256, 28, 28, 512, 1, 2), (512, 14, 14, 128, 1, 1),
    (128, 14, 14, 128, 3, 1), (512, 14, 14, 256, 1, 1), (256, 14, 14, 256, 3, 2),
    (256, 7, 7, 1024, 1, 1), (512, 14, 14, 1024, 1, 2), (1024, 7, 7, 256, 1, 1),
    (256, 7, 7, 256, 3, 1), (1024, 7, 7, 512, 1, 1), (512, 7, 7, 512, 3, 2),
    (512, 4, 4, 2048, 1, 1), (1024, 7, 7, 2048, 1, 2), (2048, 4, 4, 512, 1, 1),
    (512, 4, 4, 512, 3, 1),
]
BATCH = 8


# (C, H, W) of the stride-1 3x3s (C in and out) of ResNet-18/50 at batch 8, 112x112.
EVAL_3X3 = [(64, 28, 28), (128, 14, 14), (256, 7, 7), (512, 4, 4)]


def _providers(fused_names=("cpu_onednn", "cpu")) -> list:
    params = [pytest.param("eager", id="eager")]
    ok, why = provider_status(make_provider("cpu"), DEVICE)
    for name in fused_names:
        marks = () if ok and DEVICE.type == "cpu" else pytest.mark.skip(
            reason=f"the cpu backend runs here only on the CPU with the extension: {why}")
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _step_fn(provider: str, geometry: tuple, dtype: torch.dtype):
    """One training forward + backward of the unit per call (BN in training)."""
    cin, h, w, cout, k, stride = geometry
    torch.manual_seed(0)
    if provider == "eager":
        unit = nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())
    else:
        unit = FusedConvBNReLU(cin, cout, k, stride, backend="cpu")
    unit = unit.to(memory_format=torch.channels_last).train()
    x = torch.randn(BATCH, cin, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)  # inside a network the input carries a gradient

    def step():
        with contextlib.nullcontext() if provider == "eager" else _gemm_conv(provider == "cpu"):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                y = unit(x)
            y.backward(torch.ones_like(y))

    return step


@contextlib.contextmanager
def _switch(name: str, enabled: bool):
    """The cpu backend's switch ``_C.set_<name>`` on or off inside, restored after."""
    from fusedres._ext import _C

    before = getattr(_C, name)()
    getattr(_C, f"set_{name}")(enabled)
    try:
        yield
    finally:
        getattr(_C, f"set_{name}")(before)


def _gemm_conv(enabled: bool):
    return _switch("cpu_gemm_conv", enabled)


def _eval_fn(provider: str, shape: tuple):
    """One float32 eval forward (no gradients) of a 3x3 unit per call; a fused unit's plan is
    built on its first call, with Winograd as the provider says."""
    c, h, w = shape
    torch.manual_seed(0)
    if provider == "eager":
        unit = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
    else:
        unit = FusedConvBNReLU(c, c, 3, 1, backend="cpu")
    unit = unit.to(memory_format=torch.channels_last).eval()
    x = torch.randn(BATCH, c, h, w).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad(), (contextlib.nullcontext() if provider == "eager"
                               else _switch("cpu_winograd", provider == "cpu")):
            unit(x)

    return forward


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_cpu_conv_unit(benchmark, request, interleaved, geometry, dtype, provider):
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend's convolutions: CPU only")
    dt = getattr(torch, dtype)
    benchmark.group = f"cpu conv unit train {dtype} {BATCH}x{'x'.join(map(str, geometry))}"
    first_call_s = interleave_functions(
        request, benchmark, interleaved, lambda name: _step_fn(name, geometry, dt),
        n_rounds=rounds(10), n_warmup=warmup(2))
    info = {"provider": provider, "dtype": dtype, "geometry": geometry, "batch": BATCH,
            "first_call_s": first_call_s}
    if provider != "eager":
        from fusedres._ext import _C

        cin, h, w, cout, k, stride = geometry
        x = torch.empty(BATCH, cin, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
        weight = torch.empty(cout, cin, k, k, dtype=dt)
        info["gemm_path"] = provider == "cpu" and _C.cpu_gemm_conv_applies(
            x, weight, [stride] * 2, [k // 2] * 2, [1, 1], 1)
    publish(benchmark, info)


@pytest.mark.parametrize("provider", _providers(("cpu_direct", "cpu")))
@pytest.mark.parametrize("shape", EVAL_3X3, ids=lambda s: "x".join(map(str, s)))
def test_cpu_conv_unit_eval(benchmark, request, interleaved, shape, provider):
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend's convolutions: CPU only")
    c, h, w = shape
    benchmark.group = f"cpu 3x3 unit eval float32 {BATCH}x{c}x{h}x{w}"
    first_call_s = interleave_functions(
        request, benchmark, interleaved, lambda name: _eval_fn(name, shape),
        n_rounds=rounds(20), n_warmup=warmup(3))
    info = {"provider": provider, "dtype": "float32", "shape": shape, "batch": BATCH,
            "first_call_s": first_call_s}
    if provider != "eager":
        from fusedres._ext import _C

        x = torch.empty(BATCH, c, h, w).contiguous(memory_format=torch.channels_last)
        info["winograd"] = provider == "cpu" and _C.cpu_winograd_applies(
            x, torch.empty(c, c, 3, 3), [1, 1], [1, 1], [1, 1], 1)
    publish(benchmark, info)
