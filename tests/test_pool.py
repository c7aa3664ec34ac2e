"""The inference max pool (``torch.ops.fusedres.max_pool2d``, fusedres/ops/pool.py) against ATen's.

A max picks one of its inputs, so eager's result is exact and the op must equal it bit for bit,
NaN positions included (the tolerance rule with eager's error 0). The cases cover the kernel's
three channel loops (four register pairs, one pair, the scalar tail), windows cut by the padding,
dilation, ceil_mode, every layout and dtype, and the model-level use: a FusedResNet's eval forward
runs it instead of ATen's max_pool2d_with_indices, and training still runs nn.MaxPool2d.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import CPU_FUSED_BACKENDS
import fusedres
from fusedres.models import resnet as resnet_module
from fusedres.ops.pool import inference_max_pool

# The cpu backend's skip (or, under FUSEDRES_REQUIRE_EXTENSION=1, failure) without the extension.
pytestmark = list(CPU_FUSED_BACKENDS[1].marks)

ops = torch.ops.fusedres

# (kernel_size, stride, padding, dilation)
GEOMETRIES = [
    (3, 2, 1, 1),              # the ResNet stem's pool
    (2, 2, 0, 1),
    (3, 1, 1, 1),
    ((3, 2), (2, 1), (1, 0), (1, 2)),
    (3, 2, 1, 2),              # dilation: windows cut on both sides
    (1, 1, 0, 1),              # a copy
]
# 1 and 3: the scalar tail only; 17: one float pair and a tail; 64: four bf16 pairs (AVX2); 70.
CHANNELS = [1, 3, 17, 64, 70]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _input(n, c, h, w, dtype, layout):
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    # Ties, infinities and NaN: NaN must win as in ATen, -inf must not be taken for padding.
    flat = x.view(-1)
    flat[::7] = 0.5
    flat[3::11] = float("-inf")
    flat[5::13] = float("inf")
    flat[2::97] = float("nan")
    x = x.to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


def _assert_equal(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
def test_max_pool2d_equals_aten(channels, geometry, ceil_mode):
    kernel, stride, padding, dilation = (list(nn.modules.utils._pair(v)) for v in geometry)
    for dtype in DTYPES:
        for layout in ("channels_last", "contiguous", "strided"):
            x = _input(2, channels, 9, 8, dtype, layout)
            got = ops.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
            expected = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
            _assert_equal(got, expected)
            assert got.is_contiguous(memory_format=torch.channels_last)


def test_max_pool2d_of_one_pixel_and_of_an_empty_batch():
    x = _input(3, 5, 1, 1, torch.float32, "channels_last")
    _assert_equal(ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False),
                  F.max_pool2d(x, 3, 2, 1))
    empty = torch.randn(0, 4, 6, 6)
    assert ops.max_pool2d(empty, [3, 3], [2, 2], [1, 1], [1, 1], False).shape == (0, 4, 3, 3)


@pytest.mark.parametrize("args,error,match", [
    (([3, 3], [2, 2], [2, 2], [1, 1]), ValueError, "padding must be between 0 and half"),
    (([3, 3], [0, 2], [1, 1], [1, 1]), ValueError, "kernel_size, stride and dilation must be positive"),
    (([9, 9], [1, 1], [0, 0], [1, 1]), ValueError, "input of 5x5 pixels is too small"),
], ids=["padding", "stride", "too_small"])
def test_max_pool2d_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=f"fusedres::max_pool2d: {match}"):
        ops.max_pool2d(torch.randn(1, 2, 5, 5), *args, False)


def test_max_pool2d_rejects_bad_inputs():
    geometry = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.max_pool2d(torch.randn(2, 5, 5), *geometry)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        ops.max_pool2d(torch.ones(1, 2, 5, 5, dtype=torch.int32), *geometry)


def test_inference_max_pool_leaves_what_it_cannot_run_to_the_module():
    """return_indices, integer input and input ATen refuses go to nn.MaxPool2d itself, which
    returns what it returns or raises its own error."""
    x = torch.randn(1, 2, 5, 5)
    values, indices = inference_max_pool(nn.MaxPool2d(3, 2, 1, return_indices=True), x)
    expected_values, expected_indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
    ints = torch.arange(25, dtype=torch.int64).view(1, 1, 5, 5)
    assert torch.equal(inference_max_pool(nn.MaxPool2d(2), ints), F.max_pool2d(ints, 2))
    with pytest.raises(RuntimeError, match="pad should be"):
        inference_max_pool(nn.MaxPool2d(3, 2, 2), x)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        inference_max_pool(nn.MaxPool2d(7), x)


def _ops_run(model, x):
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = model(x)
    return out, {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_resnet_eval_pools_without_indices_and_training_keeps_aten(monkeypatch, dtype):
    torch.manual_seed(0)
    model = fusedres.models.resnet18(num_classes=10, backend="cpu").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out, names = _ops_run(model, x)
        assert "fusedres::max_pool2d" in names
        assert "aten::max_pool2d_with_indices" not in names
        # The same inference plan with nn's pool: everything else runs the same kernels, so the
        # outputs are equal.
        monkeypatch.setattr(resnet_module, "inference_max_pool", lambda pool, x: pool(x))
        ref, ref_names = _ops_run(model, x)
    assert "fusedres::max_pool2d" not in ref_names
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    model.train()
    with torch.profiler.profile() as prof:
        model(x).sum().backward()
    assert "aten::max_pool2d_with_indices" in {e.name for e in prof.events()}
