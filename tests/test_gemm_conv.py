"""The cpu backend's GEMM convolution path (csrc/cpu/gemm_conv.h): when it applies, and units on
it against the float64 oracle, with the path on and off.

The path runs a unit's convolution, data gradient and weight gradient as matrix products over an
im2col of the input (x itself for a 1x1); it applies to float32 and bfloat16 channels_last inputs
without groups, for every 1x1 without padding and for convolutions with at most 2*Cout output
rows (N*Ho*Wo); in float32 on a CPU without AMX only with at most Cout/4 output rows or for an
unpadded 1x1 with at most max(Cin, Cout)/2, and bfloat16 only where oneDNN runs it (the tests set
the AMX rule, the widest, and bfloat16 on, except where they test those). The unit cases below are the
geometries it takes, awkward ones included (stride 2 with odd H and W, dilation, padding wider
than the kernel's half, H or W of 1, N=1, odd channel counts), each checked with the tolerance
rule on y, every gradient and the running statistics.
A FusedResNet trains channels_last inside whatever its input's layout, so that the path applies
to NCHW users too.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CPU_FUSED_BACKENDS, assert_oracle_close, onednn_takes
import fusedres
from fusedres import FusedConvBNReLU, reference
from fusedres import _ext
from fusedres._ext import _C
from fusedres.backends import extension
from fusedres.ops import block as block_module
from test_unit import away_from_kink, randomize_bn, run

# The cpu backend's skip (or, under FUSEDRES_REQUIRE_EXTENSION=1, failure) without the extension.
pytestmark = list(CPU_FUSED_BACKENDS[1].marks)

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation)
GEMM_SHAPES = [
    (2, 24, 4, 4, 40, 3, 1, 1, 1),    # layer4-like 3x3: N*Ho*Wo = 32 <= 2*Cout
    (2, 16, 7, 9, 48, 3, 2, 1, 1),    # 3x3 stride 2, odd H and W
    (2, 8, 5, 5, 40, 3, 1, 2, 2),     # dilation 2 (a dilated backbone's layer4)
    (1, 6, 3, 1, 12, 3, 1, 1, 1),     # W of 1, N=1: most taps fall in the padding
    (2, 10, 4, 5, 32, 3, 1, 0, 1),    # no padding: Ho, Wo = 2, 3
    (3, 7, 9, 9, 5, 1, 1, 0, 1),      # 1x1, odd channels, rows >> Cout (1x1s always apply)
    (2, 12, 9, 7, 20, 1, 2, 0, 1),    # the downsample's 1x1 stride 2, odd H and W
    (2, 24, 1, 1, 40, 3, 1, 1, 1),    # one pixel in and out (layer4 at 32x32): both layouts
    (2, 8, 5, 6, 16, 1, 2, 1, 1),     # a padded 1x1 with stride 2: outputs that read only the
                                      # padding, input pixels that no output reads
]


@pytest.fixture
def gemm_switch():
    """Sets the path on or off for one test and restores the process's settings after it; the
    float32 rule is the AMX one (the widest) inside, and bfloat16 takes the path, on any CPU."""
    before = (_C.cpu_gemm_conv(), _C.cpu_gemm_conv_float32_amx_rule(), _C.cpu_gemm_conv_bfloat16())
    _C.set_cpu_gemm_conv_float32_amx_rule(True)
    _C.set_cpu_gemm_conv_bfloat16(True)
    yield _C.set_cpu_gemm_conv
    _C.set_cpu_gemm_conv(before[0])
    _C.set_cpu_gemm_conv_float32_amx_rule(before[1])
    _C.set_cpu_gemm_conv_bfloat16(before[2])


def _applies(x, weight, stride=1, padding=0, dilation=1, groups=1):
    return _C.cpu_gemm_conv_applies(x, weight, [stride] * 2, [padding] * 2, [dilation] * 2, groups)


def _cl(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def test_applies_to_channels_last_float32_and_bfloat16_without_groups(gemm_switch):
    gemm_switch(True)
    x, w1, w3 = _cl(2, 16, 4, 4), torch.randn(32, 16, 1, 1), torch.randn(32, 16, 3, 3)
    assert _applies(x, w1)
    assert _applies(x, w3, padding=1)                       # 32 rows <= 2*32
    assert _applies(x.bfloat16(), w1.bfloat16())
    assert not _applies(x.contiguous(), w1)                 # NCHW: ATen's convolution
    assert not _applies(x.double(), w1.double())            # float64 and float16: ATen's
    assert not _applies(x.half(), w1.half())
    assert not _applies(x, torch.randn(32, 8, 3, 3), padding=1, groups=2)
    assert not _applies(_cl(8, 16, 14, 14), w3, padding=1)  # 1568 rows > 2*32: ATen's
    assert _applies(_cl(8, 16, 14, 14), w1)                 # a 1x1 applies at any size
    assert not _applies(_cl(8, 16, 14, 14), w1, padding=1)  # a padded 1x1 follows the size rule
    # A dense one-pixel map is channels_last memory too (fusedres.backend.one_pixel_map); other
    # ambiguous layouts count as contiguous, the unit ops' layout rule.
    assert _applies(torch.randn(2, 16, 1, 1), w1)
    assert _applies(torch.randn(2, 16, 1, 1), w3, padding=1)
    assert not _applies(torch.randn(2, 16, 1, 1), w1, padding=1)  # 3x3 out: NCHW for ATen
    assert not _applies(torch.randn(2, 1, 4, 4), torch.randn(32, 1, 1, 1))  # C = 1
    gemm_switch(False)
    assert not _applies(x, w1)


def test_float32_rule_without_amx(gemm_switch):
    """Without AMX, float32 takes the path only with at most Cout/4 output rows (ResNet-50's
    layer4 at batch 8, 112x112) or for an unpadded 1x1 with at most max(Cin, Cout)/2 rows
    (layer3's 1x1s); bfloat16 keeps the rule above. Set at load from the CPU."""
    gemm_switch(True)
    assert _C.cpu_gemm_conv_float32_amx_rule() is True  # the fixture's
    _C.set_cpu_gemm_conv_float32_amx_rule(False)
    layer4_1x1, layer4_3x3 = torch.randn(2048, 512, 1, 1), torch.randn(512, 512, 3, 3)
    assert _applies(_cl(8, 512, 4, 4), layer4_1x1)                   # 128 rows <= 2048/4
    assert _applies(_cl(8, 512, 4, 4), layer4_3x3, padding=1)        # 128 rows <= 512/4
    assert _applies(_cl(8, 512, 7, 7), layer4_3x3, stride=2, padding=1)
    assert not _applies(_cl(8, 256, 7, 7), torch.randn(256, 256, 3, 3), padding=1)  # layer3
    assert _applies(_cl(8, 256, 7, 7), torch.randn(1024, 256, 1, 1))      # 392 rows <= 1024/2
    assert _applies(_cl(8, 1024, 7, 7), torch.randn(256, 1024, 1, 1))     # 392 rows <= 1024/2
    assert _applies(_cl(8, 512, 14, 14), torch.randn(1024, 512, 1, 1), stride=2)  # downsample
    assert not _applies(_cl(8, 256, 7, 7), torch.randn(1024, 256, 1, 1), padding=1)  # padded
    assert not _applies(_cl(8, 256, 14, 14), torch.randn(1024, 256, 1, 1))  # 1568 > 1024/2
    assert not _applies(_cl(8, 512, 14, 14), torch.randn(128, 512, 1, 1))   # layer2's 1x1
    assert not _applies(_cl(8, 64, 28, 28), torch.randn(256, 64, 1, 1))   # layer1's 1x1
    assert _applies(_cl(8, 64, 28, 28).bfloat16(), torch.randn(256, 64, 1, 1).bfloat16())
    assert _applies(_cl(8, 256, 7, 7).bfloat16(), torch.randn(256, 256, 3, 3).bfloat16(),
                    padding=1)                                        # 392 rows <= 2*256
    _C.set_cpu_gemm_conv_float32_amx_rule(True)
    assert _applies(_cl(8, 64, 28, 28), torch.randn(256, 64, 1, 1))


def test_float32_rule_follows_the_cpu():
    """The rules in force from load are this CPU's (torch's AMX and AVX512 probes)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert _ext.CPU_HAS_AMX == bool(probe())
    assert extension._MATMUL_REPEATING_COLUMNS == _ext.CPU_HAS_AMX
    avx512 = getattr(torch.cpu, "_is_avx512_supported",
                     lambda: torch.backends.cpu.get_cpu_capability() == "AVX512")
    assert _ext.CPU_HAS_AVX512 == bool(avx512())
    assert extension._MATMUL_MULTI_PIXEL_MAPS == _ext.CPU_HAS_AVX512
    out = subprocess.run([sys.executable, "-c", "from fusedres._ext import _C; "
                          "print(_C.cpu_gemm_conv_float32_amx_rule())"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(_ext.CPU_HAS_AMX)


def test_bfloat16_only_where_onednn_runs_it(gemm_switch):
    """bfloat16 takes the path only where this CPU's oneDNN runs bfloat16 (at::mm's matmul);
    on an AVX2 CPU it stays on ATen's convolution, float32 unchanged. Set at load."""
    gemm_switch(True)
    x, w1 = _cl(2, 16, 4, 4), torch.randn(32, 16, 1, 1)
    assert _applies(x.bfloat16(), w1.bfloat16())  # the fixture's: on, whatever the CPU
    _C.set_cpu_gemm_conv_bfloat16(False)
    assert not _applies(x.bfloat16(), w1.bfloat16())
    assert _applies(x, w1)
    out = subprocess.run([sys.executable, "-c", "import torch; from fusedres._ext import _C; "
                          "print(_C.cpu_gemm_conv_bfloat16(), "
                          "torch.ops.mkldnn._is_mkldnn_bf16_supported())"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1], out


def _units(shape, dtype, relu, weight_layout):
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    eager = reference.ConvBNAct(cin, cout, k, stride, padding, dilation, relu=relu)
    randomize_bn(eager.bn)
    eager = eager.to(dtype).to(memory_format=torch.channels_last)
    fused = FusedConvBNReLU(cin, cout, k, stride, padding, dilation, relu=relu, backend="cpu")
    fused = fused.to(dtype).to(memory_format=weight_layout)
    fused.load_state_dict(eager.state_dict())
    return eager, fused, reference.upcast(eager)


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("weight_layout", [torch.channels_last, torch.contiguous_format],
                         ids=["cl_weight", "nchw_weight"])
def test_unit_on_the_gemm_path(gemm_switch, gemm, dtype, shape, training, has_residual,
                               weight_layout):
    """Channels_last input, the weight in either layout (a FusedResNet built NCHW trains its
    channels_last activations with NCHW weights)."""
    gemm_switch(gemm)
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    relu = True
    eager, fused, oracle = _units(shape, dtype, relu, weight_layout)
    for m in (eager, fused, oracle):
        m.train(training)
    x = _cl(n, cin, h, w, dtype=dtype)
    assert _applies(x, fused.conv.weight, stride, padding, dilation) == gemm
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    res = _cl(n, cout, ho, wo, dtype=dtype) if has_residual else None
    res64 = None if res is None else res.double()
    dy64 = away_from_kink(torch.randn(n, cout, ho, wo, dtype=dtype).double(), oracle, x.double(),
                          res64, dtype)
    got = run(fused, x, res, dy64.to(dtype))
    ref = run(eager, x, res, dy64.to(dtype))
    exact = run(oracle, x.double(), res64, dy64)
    assert got.keys() == exact.keys()
    for key in exact:
        if key == "num_batches_tracked":
            assert torch.equal(got[key], exact[key]), key
            continue
        assert got[key].dtype == ref[key].dtype, key
        assert_oracle_close(got[key], ref[key], exact[key], name=key)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)
    assert got["dx"].is_contiguous(memory_format=torch.channels_last)


def _profiled(fn):
    """``fn()`` and the names of every op it dispatched (C++ calls inside the unit ops too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {event.name for event in prof.events()}


# torch.backends.mkldnn.flags sets oneDNN's TF32 switch too, which warns on a CPU-only torch.
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mkldnn_disabled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matrix_products_of_the_gemm_path(gemm_switch, onednn, dtype):
    """float32 products over im2col run oneDNN's matmul (mkldnn::_linear_pointwise: MKL's
    sgemm, what at::mm runs, is slower on these shapes) unless oneDNN is disabled, then
    at::mm; bfloat16 runs at::mm (oneDNN's matmul inside ATen), or float32's products where
    this CPU's oneDNN runs no bfloat16 and the unit ops widen it (csrc/cpu/conv_precision.h).
    Forward, data and weight gradients follow the oracle either way."""
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch is built without oneDNN")
    gemm_switch(True)
    shape = GEMM_SHAPES[4]  # unpadded: one product each (padded ones may go tap by tap, below)
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    eager, fused, oracle = _units(shape, dtype, True, torch.channels_last)
    x = _cl(n, cin, h, w, dtype=dtype)
    assert _applies(x, fused.conv.weight, stride, padding, dilation)
    dy64 = away_from_kink(torch.randn(n, cout, h - 2, w - 2, dtype=dtype).double(), oracle,
                          x.double(), None, dtype)
    with torch.backends.mkldnn.flags(enabled=onednn):
        got, names = _profiled(lambda: run(fused, x, None, dy64.to(dtype)))
    products_in_float32 = dtype == torch.float32 or _C.cpu_conv_in_float32(True)
    linear = products_in_float32 and onednn
    assert ("mkldnn::_linear_pointwise" in names) == linear, sorted(names)
    assert ("aten::mm" in names) != linear, sorted(names)
    ref = run(eager, x, None, dy64.to(dtype))
    exact = run(oracle, x.double(), None, dy64)
    assert got.keys() == exact.keys()
    for key in exact:
        assert_oracle_close(got[key].double(), ref[key].double(), exact[key], name=key)


def _tap_rows(size, kernel, stride, padding, dilation):
    """Per tap along one dimension, how many output positions read inside [0, size)."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return [sum(0 <= o * stride - padding + i * dilation < size for o in range(out))
            for i in range(kernel)]


@pytest.mark.parametrize("shape", [GEMM_SHAPES[0], GEMM_SHAPES[1], GEMM_SHAPES[7]],
                         ids=["3x3_at_4x4", "stride2_3x3", "3x3_on_one_pixel"])
def test_padded_float32_convolution_multiplies_each_tap_where_it_reads_x(gemm_switch, shape):
    """Where at least a quarter of im2col's entries would be padding, a float32 unit with a
    channels_last weight runs its forward, data gradient and weight gradient as matrix products
    per kernel tap over the output positions where that tap reads x (at::mm, which reads the
    tap's block of the weight in place; csrc/cpu/gemm_conv.cpp): 31% fewer multiplies for a 3x3
    at 4x4 (ResNet's layer4 at 112x112), 89% on a one-pixel map, where the centre tap's products
    alone remain. The results follow the oracle on every shape (test_unit_on_the_gemm_path);
    this checks the products' shapes."""
    gemm_switch(True)
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    _, fused, _ = _units(shape, torch.float32, True, torch.channels_last)
    x = _cl(n, cin, h, w).requires_grad_()
    assert _applies(x, fused.conv.weight, stride, padding, dilation)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fused(x).sum().backward()
    products = [tuple(map(tuple, e.input_shapes[:2])) for e in prof.events()
                if e.name in ("aten::mm", "mkldnn::_linear_pointwise")]
    per_tap = sorted(n * a * b for a in _tap_rows(h, k, stride, padding, dilation)
                     for b in _tap_rows(w, k, stride, padding, dilation) if a * b)
    forward = sorted(a[0] for a, b in products if a[1:] == (cin,) and b == (cin, cout))
    data_gradient = sorted(a[0] for a, b in products if a[1:] == (cout,) and b == (cout, cin))
    weight_gradient = sorted(a[1] for a, b in products if a[0] == cout and b[1:] == (cin,))
    assert forward == per_tap, products
    assert data_gradient == per_tap, products
    assert weight_gradient == per_tap, products
    assert len(products) == 3 * len(per_tap), products


# Inference (no gradients, frozen statistics) convolves output maps of at most 16 pixels, and
# unpadded stride-1 1x1s up to 7x7, as oneDNN's prepacked linear over the im2col rows; on a CPU
# without AMX only those whose columns hold each input pixel once (one tap reading the input, or
# one output position, along each dimension), and without AVX512 only those of them with a
# one-pixel output and at least four images (fusedres/backends/extension.py). (shape, takes the
# matrix product with AMX, without; without AVX512 follows from the shape).
INFERENCE_SHAPES = [
    ((2, 24, 4, 4, 40, 3, 1, 1, 1), True, False),    # layer4-like 3x3 at 4x4
    ((2, 16, 7, 7, 48, 3, 2, 1, 1), True, False),    # stride 2 into 4x4
    ((2, 8, 4, 4, 12, 3, 1, 2, 2), True, False),     # dilation 2
    ((1, 6, 3, 1, 12, 3, 1, 1, 1), True, False),     # W of 1, N=1: three taps along H
    ((2, 10, 7, 7, 32, 1, 1, 0, 1), True, True),     # a 1x1 at 7x7: its rows are x
    ((2, 12, 7, 8, 20, 1, 2, 0, 1), True, True),     # the downsample's 1x1 stride 2, into 4x4
    ((2, 24, 1, 1, 40, 3, 1, 1, 1), True, True),     # one pixel in and out (x contiguous too):
                                                     # the centre tap alone reads the input
    ((2, 16, 2, 2, 24, 3, 2, 1, 1), True, True),     # 2x2 to one pixel: taps 1-2 of each row
    ((4, 24, 1, 1, 40, 3, 1, 1, 1), True, True),     # four one-pixel maps: the centre tap
    ((5, 16, 2, 2, 24, 3, 2, 1, 1), True, True),     # five 2x2 maps to one pixel each
    ((4, 10, 2, 2, 32, 1, 1, 0, 1), True, True),     # a 1x1 at 2x2, four images
    ((2, 8, 1, 3, 12, 3, 1, 1, 1), True, False),     # H of 1: the middle row of taps, three
                                                     # along W
    ((1, 4, 1, 1, 6, 3, 1, 2, 2), True, True),       # dilated on one pixel: the centre tap
    ((2, 8, 7, 7, 16, 3, 1, 1, 1), False, False),    # a 3x3 at 7x7: oneDNN's convolution
    ((2, 8, 8, 8, 16, 1, 1, 0, 1), False, False),    # a 1x1 at 8x8
]


@pytest.fixture(params=["amx", "avx512", "avx2"], ids=lambda rule: f"{rule}_rule")
def matmul_rule(request, monkeypatch):
    """The three CPUs' rules, whatever this CPU is (the rule is read when a plan is built)."""
    monkeypatch.setattr(extension, "_MATMUL_REPEATING_COLUMNS", request.param == "amx")
    monkeypatch.setattr(extension, "_MATMUL_MULTI_PIXEL_MAPS", request.param != "avx2")
    return request.param


class _OpRecorder(TorchDispatchMode):
    """Names of the ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, matmul_amx, matmul_no_amx", INFERENCE_SHAPES,
                         ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else str(s))
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_inference_of_small_maps_as_a_matrix_product(gemm_switch, matmul_rule, gemm, dtype,
                                                     shape, matmul_amx, matmul_no_amx,
                                                     has_residual, relu):
    """Eval without gradients: the small maps (with the switch on) run oneDNN's linear, never
    its convolution, and every unit follows the oracle, channels_last out. Where oneDNN does not
    take the dtype, neither runs: the unfolded op does."""
    gemm_switch(gemm)
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    eager, fused, oracle = _units(shape, dtype, relu, torch.channels_last)
    for m in (eager, fused, oracle):
        m.eval()
    x = _cl(n, cin, h, w, dtype=dtype)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    res = _cl(n, cout, ho, wo, dtype=dtype) if has_residual else None
    with torch.no_grad():
        with _OpRecorder() as recorder:
            got = fused(x, res)
        expected = eager(x, res)
        exact = oracle(x.double(), None if res is None else res.double())
    linear = "mkldnn::_linear_pointwise" in recorder.names
    onednn_convolution = bool({"mkldnn::_convolution_pointwise",
                               "mkldnn::_convolution_pointwise_"} & recorder.names)
    matmul = {"amx": matmul_amx, "avx512": matmul_no_amx,
              "avx2": matmul_no_amx and ho * wo == 1 and n >= 4}[matmul_rule]
    onednn = onednn_takes(dtype)
    assert linear == (onednn and gemm and matmul), sorted(recorder.names)
    assert (linear or onednn_convolution) == onednn, sorted(recorder.names)
    assert not (linear and onednn_convolution), sorted(recorder.names)
    assert_oracle_close(got, expected, exact, name="y")
    if ho * wo > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_inference_matrix_product_follows_parameter_changes(gemm_switch, monkeypatch):
    """The prepacked linear weight is cached per parameter version like every fold: changing the
    conv weight or a running statistic changes the output as the oracle's."""
    gemm_switch(True)
    monkeypatch.setattr(extension, "_MATMUL_REPEATING_COLUMNS", True)
    monkeypatch.setattr(extension, "_MATMUL_MULTI_PIXEL_MAPS", True)
    shape = INFERENCE_SHAPES[0][0]
    eager, fused, oracle = _units(shape, torch.float32, True, torch.channels_last)
    for m in (eager, fused, oracle):
        m.eval()
    x = _cl(*shape[:4])
    for change in (lambda m: m.conv.weight.mul_(-0.5), lambda m: m.bn.running_mean.add_(0.7)):
        with torch.no_grad():
            before = fused(x)
            for m in (eager, fused, oracle):
                change(m)
            with _OpRecorder() as recorder:
                got = fused(x)
            assert_oracle_close(got, eager(x), oracle(x.double()), name="y")
        assert "mkldnn::_linear_pointwise" in recorder.names, sorted(recorder.names)
        assert not torch.equal(got, before)


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_block_recomputes_the_units_convolution(gemm_switch, shape, dtype, gemm):
    """The convolution the block op's Python loop recomputes a Bottleneck's conv1 with
    (BlockOps.conv) is bitwise unit_train's z, on the GEMM path or off it: the C++ block
    backward recomputes with the unit ops' own convolution, and the two must agree."""
    gemm_switch(gemm)
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    x = _cl(n, cin, h, w, dtype=dtype)
    weight = torch.randn(cout, cin, k, k, dtype=dtype).contiguous(memory_format=torch.channels_last)
    assert _applies(x, weight, stride, padding, dilation) == gemm
    geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, 1)
    z = torch.ops.fusedres.unit_train(x, weight, None, None, None, None, None, None, *geometry,
                                      False, 0.1, 1e-5)[1]
    conv = extension.CpuBackend().block_ops().conv
    assert torch.equal(conv(x, weight, *geometry), z)


@pytest.mark.parametrize("weight_layout", [torch.channels_last, torch.contiguous_format],
                         ids=["cl_weight", "nchw_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [GEMM_SHAPES[1], GEMM_SHAPES[6], GEMM_SHAPES[7]],
                         ids=lambda s: "x".join(map(str, s)))
def test_opcheck_on_the_gemm_path(gemm_switch, shape, dtype, weight_layout):
    """The three unit ops on the path against their schemas and fake kernels: the outputs'
    strides must be what the fakes tell torch.compile (ATen's layouts: channels_last for a
    channels_last input; dW in the weight's layout, so that AccumulateGrad keeps it)."""
    gemm_switch(True)
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    x = _cl(n, cin, h, w, dtype=dtype)
    weight = torch.randn(cout, cin, k, k, dtype=dtype).contiguous(memory_format=weight_layout)
    assert _applies(x, weight, stride, padding, dilation)
    gamma, beta = torch.rand(cout) + 0.5, torch.randn(cout)
    geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, 1)
    ops = torch.ops.fusedres
    running = (torch.randn(cout), torch.rand(cout) + 0.5, torch.tensor(3))
    torch.library.opcheck(ops.unit_train.default,
                          (x, weight, gamma, beta, None, *running, *geometry, True, 0.1, 1e-5))
    torch.library.opcheck(ops.unit_eval.default,
                          (x, weight, gamma, beta, None, *running[:2], *geometry, True, 1e-5))
    y, z, mean, invstd = ops.unit_train(x, weight, gamma, beta, None, None, None, None, *geometry,
                                        True, 0.1, 1e-5)
    dy = torch.randn_like(y)
    args = (dy, x, weight, y, z, mean, invstd, gamma, *geometry, True, True, [True] * 4 + [False])
    torch.library.opcheck(ops.unit_backward.default, args)
    dx, dweight = ops.unit_backward(*args)[:2]
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert dweight.is_contiguous(memory_format=weight_layout)


def test_nchw_model_trains_channels_last_inside(monkeypatch):
    """A FusedResNet given NCHW input trains in channels_last inside (where the GEMM path
    applies), unless a hook could see its activations: then they keep the input's layout."""
    model = fusedres.models.resnet18(backend="cpu").train()
    x = torch.randn(2, 3, 64, 64)  # 64x64: layer4 at 2x2, no layout-ambiguous activations
    layouts = []
    real_unit_train = block_module._unit_train

    def spy(ops, h, tensors, u, residual):
        layouts.append(h.is_contiguous(memory_format=torch.channels_last))
        return real_unit_train(ops, h, tensors, u, residual)

    monkeypatch.setattr(block_module, "_unit_train", spy)
    model(x).sum().backward()
    assert len(layouts) == 8 * 2 + 3 and all(layouts)  # 8 blocks x 2 units, 3 downsamples
    seen = []
    model.layer1[0].register_forward_hook(lambda m, args, out: seen.append(out))
    layouts.clear()
    model(x).sum().backward()
    assert seen[0].is_contiguous() and not any(layouts)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "aten"])
@pytest.mark.parametrize("kernel, size", [(3, 4), (3, 14), (1, 7)],
                         ids=["3x3_4px", "3x3_14px", "1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient_comes_in_the_weight_layout(gemm_switch, backend, gemm, kernel, size,
                                                    dtype):
    """A channels_last input with an NCHW weight (a FusedResNet built NCHW trains so): the
    unit's weight gradient reaches the parameter NCHW, as AccumulateGrad keeps it without a copy
    (ATen's own gradient is channels_last there), on the GEMM path and ATen's alike."""
    gemm_switch(gemm)
    unit = FusedConvBNReLU(16, 32, kernel, padding=kernel // 2, backend=backend).to(dtype).train()
    x = _cl(2, 16, size, size, dtype=dtype)
    seen = []
    unit.conv.weight.register_hook(lambda g: seen.append(g))
    unit(x).sum().backward()
    assert seen[0].is_contiguous(), seen[0].stride()
    assert unit.conv.weight.grad.is_contiguous()


def info_with(variable: str, value) -> str:
    """``python -m fusedres.info``'s output in a fresh process with the environment variable
    set to ``value`` (unset for None)."""
    environ = {k: v for k, v in os.environ.items() if k != variable}
    if value is not None:
        environ[variable] = value
    return subprocess.run([sys.executable, "-m", "fusedres.info"], capture_output=True,
                          text=True, check=True, env=environ).stdout


@pytest.mark.parametrize("env, expected", [(None, "on"), ("0", "off"), ("1", "on")])
def test_environment_variable_sets_the_path_at_load(env, expected):
    assert ("GEMM convolutions (with gradients, and small maps in inference; "
            f"csrc/cpu/gemm_conv.h): {expected}") in info_with("FUSEDRES_CPU_GEMM_CONV", env)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inference_honours_onednn_disabled(dtype):
    """An eval resnet18 whose plans are built with oneDNN disabled calls no oneDNN op of its own
    (the fold, the prepacked convolutions, the matrix products and Winograd all call
    torch.ops.mkldnn directly, past ATen's own check of the switch); its logits follow eager
    and the oracle."""
    torch.manual_seed(0)
    model = fusedres.models.resnet18(backend="cpu").eval().to(memory_format=torch.channels_last)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            randomize_bn(bn)
    eager = fusedres.to_eager(copy.deepcopy(model))
    x = _cl(2, 3, 64, 64)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.backends.mkldnn.flags(enabled=False), torch.no_grad(), autocast:
        model(x)  # builds the plans
        got, names = _profiled(lambda: model(x))
        expected = eager(x)
    assert not [n for n in names if n.startswith("mkldnn::")], sorted(names)
    exact = reference.upcast(eager)(x.double())
    assert_oracle_close(got.double(), expected.double(), exact, name="logits")
