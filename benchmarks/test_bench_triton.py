"""Per-kernel benchmarks of the Triton backend against eager PyTorch, at ResNet-50 shapes.

One pytest-benchmark group per (op, shape) with the providers ``eager`` and ``triton``. Every
case reports in extra_info the bytes it must move at least (each input read once, each output
written once), the GB/s that makes, and for convolutions the TFLOP/s. Compare GB/s with the
device's copy bandwidth: a memory-bound kernel is done when it is near it.

    pytest benchmarks/test_bench_triton.py --benchmark-only --benchmark-group-by=group

Skipped without CUDA (the interpreter says nothing about speed). Shapes: batch 64, bf16,
channels_last (override the batch with FUSEDRES_BENCH_BATCH).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import record
from fusedres import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="Triton kernel benchmarks need a CUDA device")

BATCH = int(os.environ.get("FUSEDRES_BENCH_BATCH", "64"))
DTYPE = torch.bfloat16
# (name, Cin, H, W, Cout, kernel, stride): the ResNet-50 convolutions that dominate its time.
CONVS = [
    ("stem-7x7s2", 3, 224, 224, 64, 7, 2),
    ("l1-1x1", 64, 56, 56, 64, 1, 1),
    ("l1-3x3", 64, 56, 56, 64, 3, 1),
    ("l1-1x1-expand", 64, 56, 56, 256, 1, 1),
    ("l2-3x3s2", 128, 56, 56, 128, 3, 2),
    ("l3-3x3", 256, 14, 14, 256, 3, 1),
    ("l4-1x1-expand", 512, 7, 7, 2048, 1, 1),
]
# (name, C, H, W): BatchNorm tensors (a conv output) of ResNet-50.
ACTIVATIONS = [("l1-256x56", 256, 56, 56), ("l2-512x28", 512, 28, 28),
               ("l3-1024x14", 1024, 14, 14), ("l4-2048x7", 2048, 7, 7)]
PROVIDERS = ["eager", "triton"]


def _run(benchmark, provider: str, fn, bytes_moved: int, flops: int = 0):
    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    record(benchmark, provider, bytes_moved, flops, device=torch.cuda.get_device_name(),
           dtype=str(DTYPE).removeprefix("torch."))


def _act(c, h, w):
    return torch.randn(BATCH, c, h, w, device="cuda", dtype=DTYPE).to(
        memory_format=torch.channels_last)


def _channel(c, lo=0.5, hi=1.5):
    return torch.empty(c, device="cuda").uniform_(lo, hi)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_bn_stats(benchmark, shape, provider):
    from fusedres.kernels import bn
    name, c, h, w = shape
    benchmark.group = f"bn_stats-{name}"
    z = _act(c, h, w)
    fn = (lambda: bn.bn_stats(z)) if provider == "triton" else \
        (lambda: reference.bn_stats(z, upcast=False))
    _run(benchmark, provider, fn, z.numel() * z.element_size())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_bn_act_fwd(benchmark, shape, provider):
    from fusedres.kernels import bn
    name, c, h, w = shape
    benchmark.group = f"bn_act_fwd-{name}"
    z, res = _act(c, h, w), _act(c, h, w)
    scale, shift = _channel(c), _channel(c, -0.5, 0.5)
    impl = bn.bn_act_fwd if provider == "triton" else \
        (lambda *a: reference.bn_act_fwd(*a, upcast=False))
    _run(benchmark, provider, lambda: impl(z, scale, shift, res, True), 3 * z.numel() * z.element_size())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_bn_act_bwd(benchmark, shape, provider):
    from fusedres.kernels import bn
    name, c, h, w = shape
    benchmark.group = f"bn_act_bwd-{name}"
    z, dy = _act(c, h, w), _act(c, h, w)
    y = torch.relu(_act(c, h, w))
    mean, invstd, gamma = _channel(c, -0.1, 0.1), _channel(c), _channel(c)
    impl = bn.bn_act_bwd if provider == "triton" else \
        (lambda *a: reference.bn_act_bwd(*a, upcast=False))
    # read dy, y, z; write dz, dresidual
    _run(benchmark, provider, lambda: impl(dy, y, z, mean, invstd, gamma, True, True, True),
         5 * z.numel() * z.element_size())


def _conv_case(case):
    name, cin, h, w, cout, k, stride = case
    x = _act(cin, h, w)
    weight = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(DTYPE)
    weight = weight.contiguous(memory_format=torch.channels_last)
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    flops = 2 * BATCH * ho * wo * cout * cin * k * k
    out_bytes = BATCH * cout * ho * wo * x.element_size()
    return name, x, weight, (stride, stride), (pad, pad), flops, out_bytes


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CONVS, ids=[c[0] for c in CONVS])
def test_conv_train_forward(benchmark, case, provider):
    """Training forward of a unit: conv + batch statistics (F1) + scale/shift/residual/ReLU (F2)."""
    from fusedres.backend import ConvParams, get_backend
    name, x, weight, stride, pad, flops, out_bytes = _conv_case(case)
    benchmark.group = f"conv_train_fwd-{name}"
    cout = weight.shape[0]
    gamma, beta = _channel(cout), _channel(cout, -0.5, 0.5)
    res = torch.randn(x.shape[0], cout, *_out_hw(x, weight, stride, pad), device="cuda",
                      dtype=DTYPE).to(memory_format=torch.channels_last)
    backend = get_backend("triton" if provider == "triton" else "eager")
    params = ConvParams(stride, pad, (1, 1), 1)
    fn = lambda: backend.forward_train(x, weight, gamma, beta, res, True, 1e-5, params)  # noqa: E731
    # read x, w, residual; write z and y
    moved = x.numel() * x.element_size() + weight.numel() * weight.element_size() + 3 * out_bytes
    _run(benchmark, provider, fn, moved, flops)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CONVS, ids=[c[0] for c in CONVS])
def test_conv_eval_forward(benchmark, case, provider):
    """Eval forward of a unit: conv with the folded-BN + residual + ReLU epilogue (F2)."""
    from fusedres.kernels import conv
    name, x, weight, stride, pad, flops, out_bytes = _conv_case(case)
    benchmark.group = f"conv_eval_fwd-{name}"
    cout = weight.shape[0]
    scale, shift = _channel(cout), _channel(cout, -0.5, 0.5)
    res = torch.randn(x.shape[0], cout, *_out_hw(x, weight, stride, pad), device="cuda",
                      dtype=DTYPE).to(memory_format=torch.channels_last)
    if provider == "triton":
        def fn():
            conv.conv2d(x, weight, stride, pad, (1, 1), 1, scale=scale, shift=shift,
                        residual=res, relu=True)
    else:
        def fn():
            z = F.conv2d(x, weight, None, stride, pad)
            reference.bn_act_fwd(z, scale, shift, res, True, upcast=False)
    moved = x.numel() * x.element_size() + weight.numel() * weight.element_size() + 2 * out_bytes
    _run(benchmark, provider, fn, moved, flops)


def _out_hw(x, weight, stride, pad):
    k = weight.shape[-1]
    return tuple((x.shape[2 + i] + 2 * pad[i] - k) // stride[i] + 1 for i in range(2))
