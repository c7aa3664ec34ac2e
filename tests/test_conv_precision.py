"""bfloat16 and float16 convolutions in float32 where this CPU's oneDNN has no kernels for them
(csrc/cpu/conv_precision.h).

There ATen's own convolution of such a dtype runs generic code about 15x slower than float32, so
the cpu backend widens x and the weight (exactly), convolves in float32 and rounds each result
once. The tests set the switch both ways on any CPU and check the op's results bit for bit
against the float32 unit op's (and inference's float32 plan) on the same values rounded once;
with the switch off the convolution is ATen's in the dtype itself. Whole models under autocast
are checked against the oracle by tests/test_autocast.py and the model tests, on whichever path
this CPU takes.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CPU_FUSED_BACKENDS
import fusedres
from fusedres._ext import _C

pytestmark = list(CPU_FUSED_BACKENDS[1].marks)

DTYPES = [torch.bfloat16, torch.float16]
# (N, Cin, H, W, Cout, kernel, stride, padding, groups): a 3x3, a strided one with odd sizes, a
# grouped one, a 1x1, a small map (the last two take the GEMM path where it is on).
SHAPES = [(2, 8, 6, 6, 12, 3, 1, 1, 1), (3, 6, 7, 5, 10, 3, 2, 1, 1),
          (2, 8, 5, 5, 8, 3, 1, 1, 4), (2, 16, 4, 4, 24, 1, 1, 0, 1),
          (2, 8, 4, 4, 24, 3, 1, 1, 1)]


@pytest.fixture
def widen():
    """``widen(bfloat16, float16)`` sets the switch for one test, the GEMM path off (every
    convolution ATen's) unless the test turns it on (``_C.set_cpu_gemm_conv``), with the AMX
    rule (the widest) and bfloat16 allowed; the process's settings come back after it."""
    before = (_C.cpu_conv_in_float32(True), _C.cpu_conv_in_float32(False), _C.cpu_gemm_conv(),
              _C.cpu_gemm_conv_float32_amx_rule(), _C.cpu_gemm_conv_bfloat16())
    _C.set_cpu_gemm_conv(False)
    _C.set_cpu_gemm_conv_float32_amx_rule(True)
    _C.set_cpu_gemm_conv_bfloat16(True)
    yield _C.set_cpu_conv_in_float32
    _C.set_cpu_conv_in_float32(before[0], before[1])
    _C.set_cpu_gemm_conv(before[2])
    _C.set_cpu_gemm_conv_float32_amx_rule(before[3])
    _C.set_cpu_gemm_conv_bfloat16(before[4])


def _inputs(shape, dtype, channels_last):
    n, cin, h, w, cout, k, stride, padding, groups = shape
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin // groups, k, k) / (cin // groups * k * k) ** 0.5).to(dtype)
    return x, weight, [stride] * 2, [padding] * 2, [1, 1], groups


def test_switch_follows_onednn():
    """Set at load: on exactly where this CPU's oneDNN runs no kernels for the dtype."""
    out = subprocess.run([sys.executable, "-c", "import torch; from fusedres._ext import _C; "
                          "print(_C.cpu_conv_in_float32(True), _C.cpu_conv_in_float32(False), "
                          "torch.ops.mkldnn._is_mkldnn_bf16_supported(), "
                          "torch.ops.mkldnn._is_mkldnn_fp16_supported())"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(out[2] == "False") and out[1] == str(out[3] == "False"), out
    widened = [name for name, on in (("bfloat16", out[0]), ("float16", out[1])) if on == "True"]
    info = subprocess.run([sys.executable, "-m", "fusedres.info"], capture_output=True, text=True,
                          check=True).stdout
    assert ("computed in float32 (no oneDNN kernels for the dtype here; "
            f"csrc/cpu/conv_precision.h): {', '.join(widened) or 'none'}") in info


@pytest.mark.parametrize("gemm", [False, True], ids=["aten", "gemm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_convolution_is_float32_rounded_once(widen, dtype, shape, channels_last, gemm):
    """With the switch on, unit_train's z and unit_backward's dx and dweight are the float32 unit
    op's (ATen's convolution or the GEMM path, by float32's rule) on the same values, rounded
    once; with it off, ATen's convolution in the dtype itself (the GEMM path then off: it takes
    bfloat16 only where oneDNN runs it). In eval without ReLU, gamma, mean 0 and invstd 1, dz is
    dy."""
    x, weight, stride, padding, dilation, groups = _inputs(shape, dtype, channels_last)
    geometry = (stride, padding, dilation, groups)
    mean, invstd = torch.zeros(shape[4]), torch.ones(shape[4])
    dy = torch.randn(x.shape[0], shape[4], *F.conv2d(x.float(), weight.float(), None,
                                                      *geometry).shape[2:]).to(dtype)

    def run(x, weight, dy):
        _, z, _, _ = torch.ops.fusedres.unit_train(x, weight, None, None, None, None, None, None,
                                                   *geometry, False, 0.1, 1e-5)
        dx, dw, _, _, _ = torch.ops.fusedres.unit_backward(
            dy, x, weight, None, None, mean, invstd, None, *geometry, False, False,
            [True, True, False, False, False])
        return z, dx, dw

    _C.set_cpu_gemm_conv(gemm)
    if shape[5] == 1 or shape == SHAPES[-1]:  # the path the test means is the one taken
        assert _C.cpu_gemm_conv_applies(x.float(), weight.float(), *geometry) == (
            gemm and channels_last)
    widen(dtype == torch.bfloat16, dtype == torch.float16)
    got = run(x, weight, dy)
    want = run(x.float(), weight.float(), dy.float())
    for name, g, w in zip(("z", "dx", "dweight"), got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g, w.to(dtype), rtol=0, atol=0, msg=name)

    widen(False, False)
    _C.set_cpu_gemm_conv(False)
    z, dx, dw = run(x, weight, dy)
    torch.testing.assert_close(z, F.conv2d(x, weight, None, *geometry), rtol=0, atol=0)
    dx_own, dw_own, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, *geometry[:3], False, [0, 0], groups, [True, True, False])
    torch.testing.assert_close(dx, dx_own, rtol=0, atol=0)
    torch.testing.assert_close(dw, dw_own, rtol=0, atol=0)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inference_under_autocast_is_the_float32_unit_rounded_once(widen, dtype, shape,
                                                                   residual):
    """A unit's folded inference under autocast with the switch on: the same module's float32
    inference on the input rounded to the dtype (its folded, prepacked float32 runner), and y
    rounded once."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available: inference runs the unfolded op")
    n, cin, h, w, cout, k, stride, padding, groups = shape
    widen(dtype == torch.bfloat16, dtype == torch.float16)
    torch.manual_seed(0)
    unit = fusedres.FusedConvBNReLU(cin, cout, k, stride, padding, groups=groups,
                                    backend="cpu").eval()
    with torch.no_grad():
        unit.bn.running_mean.uniform_(-0.5, 0.5)
        unit.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    r = torch.randn(n, cout, ho, wo).contiguous(memory_format=torch.channels_last) if residual \
        else None
    with torch.no_grad():
        with torch.autocast("cpu", dtype):
            y = unit(x, r)
        twin = fusedres.FusedConvBNReLU(cin, cout, k, stride, padding, groups=groups,
                                        backend="cpu").eval()
        twin.load_state_dict(unit.state_dict())
        want = twin(x.to(dtype).float(), None if r is None else r.to(dtype).float())
    assert y.dtype == dtype
    torch.testing.assert_close(y, want.to(dtype), rtol=0, atol=0)
