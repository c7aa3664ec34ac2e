"""The cpu backend's float32 inference 3x3s as Winograd F(2x2, 3x3) (csrc/cpu/winograd_conv.h).

The transforms against the float64 oracle on awkward geometries (odd and one-pixel maps, odd
channel counts, N=1, every layout of x and residual, ReLU and residual on and off), their
argument checks, the rule, and the inference units and whole models that take it
(fusedres/backends/extension.py), with the fold following every parameter change.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import CPU_FUSED_BACKENDS, assert_oracle_close
import fusedres
from fusedres import reference
from fusedres._ext import _C
from fusedres.backends import extension
from test_gemm_conv import _cl, _units, info_with

pytestmark = list(CPU_FUSED_BACKENDS[1].marks)

# Winograd's G: the weight transform U = G g G^T.
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]],
                  dtype=torch.float64)


def test_weight_transform():
    """Group p = 4i + j of the [16*Cout, Cin, 1, 1] weight is (G g G^T)[i, j] [Cout, Cin],
    rounded once from float64."""
    g = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    expected = torch.einsum("ik,ockl,jl->ijoc", _G, g, _G).reshape(16 * 6, 5, 1, 1).float()
    for layout in (torch.contiguous_format, torch.channels_last):
        u = _C.cpu_winograd_weight(g.float().contiguous(memory_format=layout))
        assert u.shape == (96, 5, 1, 1) and u.is_contiguous()
        torch.testing.assert_close(u, expected, rtol=2e-7, atol=1e-7)


def _winograd(x, g, bias, residual, relu, dilation=(1, 1)):
    """The kernel's three steps as the inference runner takes them, the products through
    ATen's grouped convolution (the runner's is oneDNN's with the weight prepacked)."""
    v = _C.cpu_winograd_input(x, list(dilation))
    m = F.conv2d(v, _C.cpu_winograd_weight(g), groups=16).contiguous(
        memory_format=torch.channels_last)
    y = torch.full((x.shape[0], g.shape[0], *x.shape[2:]), float("nan")).contiguous(
        memory_format=torch.channels_last)
    _C.cpu_winograd_output(m, bias, residual, relu, y, list(dilation))
    return y


# (N, Cin, Cout, H, W), dilation (padding the same)
SHAPES = [
    ((2, 8, 16, 6, 6), (1, 1)),    # even map: whole tiles
    ((2, 5, 7, 5, 3), (1, 1)),     # odd H and W, odd channels: the last tiles half outside
    ((1, 16, 8, 1, 1), (1, 1)),    # one pixel: its tile reads padding but for the centre
    ((3, 3, 4, 1, 7), (1, 1)),     # H of 1
    ((2, 17, 33, 9, 2), (1, 1)),   # more output than input channels, W of 2
    ((1, 1, 1, 3, 3), (1, 1)),     # one channel
    # Dilated: each of the dilation's phases of the map tiled apart.
    ((2, 8, 16, 8, 8), (2, 2)),    # phases of 4x4: whole tiles
    ((2, 5, 7, 9, 6), (2, 2)),     # phases of 5 and 4 rows: the last tiles partly outside
    ((1, 8, 4, 14, 14), (4, 4)),   # a segmentation backbone's layer4 (14x14, dilation 4)
    ((2, 3, 5, 5, 7), (2, 3)),     # unequal dilations, odd map and channels
    ((1, 4, 6, 3, 3), (5, 5)),     # a map smaller than the dilation: every outer tap padding
    ((3, 6, 6, 1, 8), (1, 2)),     # H of 1, dilated along W only
]


@pytest.mark.parametrize("shape, dilation", SHAPES,
                         ids=lambda s: "x".join(map(str, s)) if len(s) > 2 else f"d{s[0]}{s[1]}")
@pytest.mark.parametrize("x_layout", ["channels_last", "contiguous", "strided_view"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_conv_against_the_oracle(shape, dilation, x_layout, has_residual, relu):
    n, cin, cout, h, w = shape
    x64 = torch.randn(n, cin, h, w, dtype=torch.float64)
    g64 = torch.randn(cout, cin, 3, 3, dtype=torch.float64) / (3 * cin ** 0.5)
    bias64 = torch.randn(cout, dtype=torch.float64)
    res64 = torch.randn(n, cout, h, w, dtype=torch.float64) if has_residual else None
    x = x64.float()
    if x_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif x_layout == "strided_view":
        x = torch.cat([x, x], dim=3)[..., ::2]  # every other column: a non-dense view
    res = None if res64 is None else res64.float().contiguous(memory_format=torch.channels_last)

    def direct(x, g, bias, res):
        z = F.conv2d(x, g, bias, padding=dilation, dilation=dilation)
        z = z if res is None else z + res
        return z.relu() if relu else z

    y = _winograd(x, g64.float(), bias64.float(), res, relu, dilation)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    eager = direct(x, g64.float(), bias64.float(), res)
    assert_oracle_close(y, eager, direct(x64, g64, bias64, res64), name="y")


def test_argument_errors_name_the_argument():
    x, g, bias = _cl(2, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(6)
    m = F.conv2d(_C.cpu_winograd_input(x), _C.cpu_winograd_weight(g), groups=16).contiguous(
        memory_format=torch.channels_last)
    out = _cl(2, 6, 5, 5)
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor"):
        _C.cpu_winograd_input(x.bfloat16())
    with pytest.raises(RuntimeError, match=r"weight must be \[Cout, Cin, 3, 3\]"):
        _C.cpu_winograd_weight(torch.randn(6, 4, 1, 1))
    with pytest.raises(RuntimeError, match=r"m must be the products \[1, 96, 24, 1\]"):
        _C.cpu_winograd_output(m, bias, None, True, _cl(2, 6, 7, 5))  # 4 tile rows, not 3
    # Dilation 2: 4 phases of at most 3x3 pixels, 2x2 tiles each: 16 tiles per image, not 9.
    with pytest.raises(RuntimeError, match=r"m must be the products \[1, 96, 32, 1\]"):
        _C.cpu_winograd_output(m, bias, None, True, out, [2, 2])
    for bad in ([0, 1], [1], [1, -2]):
        with pytest.raises(RuntimeError, match="dilation must be two positive ints"):
            _C.cpu_winograd_input(x, bad)
        with pytest.raises(RuntimeError, match="dilation must be two positive ints"):
            _C.cpu_winograd_output(m, bias, None, True, out, bad)
    with pytest.raises(RuntimeError, match=r"bias must be \[6\]"):
        _C.cpu_winograd_output(m, torch.randn(5), None, True, out)
    with pytest.raises(RuntimeError, match=r"residual must be \[2, 6, 5, 5\]"):
        _C.cpu_winograd_output(m, bias, torch.randn(2, 6, 5, 4), True, out)
    with pytest.raises(RuntimeError, match="out must be a non-empty dense channels_last"):
        _C.cpu_winograd_output(m, bias, None, True, torch.empty(2, 6, 5, 5))
    _C.cpu_winograd_output(m, bias, None, True, out)
    assert not out.isnan().any()


def _eval_units(shape, relu=True):
    """:func:`test_gemm_conv._units` in float32 with channels_last weights, all three in eval."""
    units = _units(shape, torch.float32, relu, torch.channels_last)
    for m in units:
        m.eval()
    return units


def _eval_models(arch, **kwargs):
    """A fused ``arch`` (fusedres.models, cpu backend, ``kwargs`` to its builder) in eval and
    channels_last with non-trivial running statistics, and an eager copy of it."""
    torch.manual_seed(0)
    model = getattr(fusedres.models, arch)(backend="cpu", **kwargs)
    model = model.eval().to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model, fusedres.to_eager(copy.deepcopy(model))


@pytest.fixture
def winograd_switch():
    """Sets the path on or off for one test and restores the process's setting after it."""
    before = _C.cpu_winograd()
    yield _C.set_cpu_winograd
    _C.set_cpu_winograd(before)


@pytest.fixture
def winograd_calls(monkeypatch, winograd_switch):
    """Counts the inference kernel's calls (its output transforms), the path on."""
    winograd_switch(True)
    calls = []
    output_transform = _C.cpu_winograd_output

    def counting(*args):
        calls.append(args[0].shape)
        return output_transform(*args)

    monkeypatch.setattr(_C, "cpu_winograd_output", counting)
    return calls


@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_inference_unit_follows_its_parameters(winograd_calls, has_residual, relu):
    """An eval unit without gradients runs the kernel on the folded weight and bias; changing
    the conv weight, gamma, beta or a running statistic changes the output as the oracle's."""
    shape = (2, 64, 16, 16, 72, 3, 1, 1, 1)
    eager, fused, oracle = _eval_units(shape, relu)
    x = _cl(2, 64, 16, 16)
    res = _cl(2, 72, 16, 16) if has_residual else None
    changes = [lambda m: None, lambda m: m.conv.weight.mul_(-0.5),
               lambda m: m.bn.weight.add_(0.3), lambda m: m.bn.bias.sub_(0.2),
               lambda m: m.bn.running_mean.add_(0.7), lambda m: m.bn.running_var.mul_(2.0)]
    before = None
    with torch.no_grad():
        for change in changes:
            for m in (eager, fused, oracle):
                change(m)
            got = fused(x, res)
            exact = oracle(x.double(), None if res is None else res.double())
            assert_oracle_close(got, eager(x, res), exact, name="y")
            assert got.is_contiguous(memory_format=torch.channels_last)
            if before is not None:
                assert not torch.equal(got, before)
            before = got
    assert len(winograd_calls) == len(changes)


def _applies(x, weight, stride=1, padding=1, dilation=1, groups=1):
    return _C.cpu_winograd_applies(x, weight, [stride] * 2, [padding] * 2, [dilation] * 2, groups)


def test_rule(winograd_switch):
    """Float32 channels_last 3x3s with stride 1, padding equal to the dilation, no groups, 64
    channels or more, at least 2^19 tiles * Cin * Cout and one image's larger transformed tensor
    within 16 MiB; bfloat16, NCHW, other geometries, fewer channels, less work and larger maps
    take oneDNN's convolution; the switch turns it off. (Dilated: test_rule_dilated.)"""
    winograd_switch(True)
    x, w = _cl(8, 64, 28, 28), torch.randn(64, 64, 3, 3)
    assert _applies(x, w)
    assert _applies(x, w.contiguous(memory_format=torch.channels_last))
    assert not _applies(x.bfloat16(), w.bfloat16())
    assert not _applies(x.contiguous(), w)
    assert not _applies(x, torch.randn(64, 64, 1, 1), padding=0)
    assert not _applies(x, w, stride=2)
    assert not _applies(x, w, padding=2)
    assert not _applies(x, w, padding=1, dilation=2)
    assert not _applies(x, torch.randn(64, 32, 3, 3), groups=2)
    assert not _applies(_cl(8, 32, 28, 28), torch.randn(64, 32, 3, 3))  # 32 input channels
    # Tiles (2x2 output blocks) * Cin * Cout: 2 * 8 * 8 * 64 * 64 = 2^19 (resnet18's every
    # stage at batch 2, 64x64), half of it at batch 1; 1 * 2 * 2 * 512 * 512 = 2^20.
    assert _applies(_cl(2, 64, 16, 16), w)
    assert not _applies(_cl(1, 64, 16, 16), w)
    assert not _applies(_cl(1, 128, 7, 7), torch.randn(128, 128, 3, 3))  # 16 * 128 * 128
    assert _applies(_cl(1, 512, 4, 4), torch.randn(512, 512, 3, 3))
    # 16 values per channel and 2x2 block, per image: 64 channels at 56x56 is 3 MiB; 256 at
    # 112x112 is 49 MiB; the products have Cout channels.
    assert _C.cpu_winograd_image_bytes(56, 56, 64) == 16 * 28 * 28 * 64 * 4
    assert _applies(_cl(8, 64, 56, 56), w)
    assert not _applies(_cl(1, 256, 112, 112), torch.randn(256, 256, 3, 3))
    assert not _applies(_cl(1, 64, 112, 112), torch.randn(256, 64, 3, 3))
    conv = fusedres.backend.ConvParams((1, 1), (1, 1), (1, 1), 1)
    assert extension._convolves_by_winograd(x, w, conv)
    winograd_switch(False)
    assert not _applies(x, w)
    assert not extension._convolves_by_winograd(x, w, conv)


def test_rule_dilated(winograd_switch):
    """A dilated 3x3 (padding equal to the dilation) is d*d phases of the map tiled apart, and
    takes the kernel where the direct convolution's multiplies over Winograd's (counting only
    the direct taps that read inside the map, and Winograd's tiles partly outside it) are at
    least 1.3: dilation 2 on a 14x14 map, 4 on 28x28, not 4 on 14x14 (a segmentation backbone's
    layer4 at 112x112) nor 2 on 7x7."""
    winograd_switch(True)
    assert _C.cpu_winograd_image_tiles(14, 14) == 49
    assert _C.cpu_winograd_image_tiles(14, 14, [2, 2]) == 4 * 4 * 4  # 4 phases of 7x7: 4x4 tiles
    assert _C.cpu_winograd_image_tiles(14, 14, [4, 4]) == 16 * 2 * 2  # phases of 4 and 3 rows
    assert _C.cpu_winograd_image_tiles(5, 7, [2, 3]) == 6 * 2 * 2
    assert _C.cpu_winograd_image_bytes(14, 14, 256, [2, 2]) == 16 * 64 * 256 * 4
    # Per dimension of a 14x14 map at dilation 2: the direct convolution reads inside the map
    # with (14 + 2 * 12) / 42 of its taps; Winograd's 2x2 tiles cover 2 * 2 * 4 = 16 of 14
    # outputs with 2/3 of the multiplies each.
    per_dim = (14 + 2 * 12) / 42 / (2 / 3 * 16 / 14)
    assert _C.cpu_winograd_dilated_gain(14, 14, [2, 2]) == pytest.approx(per_dim ** 2)
    assert _C.cpu_winograd_dilated_gain(28, 28, [2, 2]) == pytest.approx(
        ((28 + 2 * 26) / 84 / (2 / 3)) ** 2)
    w256 = torch.randn(256, 256, 3, 3)
    assert _applies(_cl(8, 256, 14, 14), w256, padding=2, dilation=2)
    assert _applies(_cl(2, 256, 28, 28), w256, padding=4, dilation=4)
    assert not _applies(_cl(8, 256, 14, 14), w256, padding=4, dilation=4)  # gain 1.13
    assert not _applies(_cl(8, 256, 7, 7), w256, padding=2, dilation=2)  # gain 1.13
    assert not _applies(_cl(8, 256, 14, 14), w256, padding=1, dilation=2)
    assert not _C.cpu_winograd_applies(_cl(8, 256, 14, 14), w256, [1, 1], [2, 1], [2, 2], 1)
    assert _C.cpu_winograd_dilated_gain(14, 14, [4, 4]) < _C.CPU_WINOGRAD_MIN_DILATED_GAIN
    assert _C.cpu_winograd_dilated_gain(14, 14, [2, 2]) >= _C.CPU_WINOGRAD_MIN_DILATED_GAIN
    winograd_switch(False)
    assert not _applies(_cl(8, 256, 14, 14), w256, padding=2, dilation=2)


@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
def test_dilated_inference_unit(winograd_calls, has_residual):
    """An eval unit with a dilated 3x3 (dilation 2, 14x14) runs the kernel on the folded weight,
    in chunks, against eager and the oracle."""
    shape = (8, 64, 14, 14, 64, 3, 1, 2, 2)
    eager, fused, oracle = _eval_units(shape)
    x = _cl(8, 64, 14, 14)
    res = _cl(8, 64, 14, 14) if has_residual else None
    with torch.no_grad():
        got = fused(x, res)
        exact = oracle(x.double(), None if res is None else res.double())
        assert_oracle_close(got, eager(x, res), exact, name="y")
    # 16 values per tile and channel, 64 tiles per image: 256 KiB an image, 8 in a chunk.
    assert winograd_calls == [torch.Size([1, 16 * 64, 8 * 64, 1])]
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_dilated_resnet50_eval_through_winograd(winograd_calls, monkeypatch):
    """A float32 channels_last resnet50 with layer3 and layer4 dilated instead of strided (a
    segmentation backbone), in eval: its undilated stride-1 3x3s and the dilation-2 ones take
    the kernel (at 64x64 layer3 and layer4 run on 8x8 maps: dilation 4 does not), against eager
    and the float64 oracle."""
    monkeypatch.setattr(extension, "_MATMUL_REPEATING_COLUMNS", False)  # AMX: not layer3-4
    model, eager = _eval_models("resnet50", replace_stride_with_dilation=[False, True, True])
    x = _cl(2, 3, 64, 64)
    applies = _C.cpu_winograd_applies
    dilations = []

    def recording(x, weight, stride, padding, dilation, groups):
        taken = applies(x, weight, stride, padding, dilation, groups)
        if taken:
            dilations.append(tuple(dilation))
        return taken

    monkeypatch.setattr(_C, "cpu_winograd_applies", recording)
    with torch.no_grad():
        got = model(x)
        expected = eager(x)
        exact = reference.upcast(eager)(x.double())
    # layer1's 3 and layer2's 3 undilated stride-1 3x3s, layer3's first (dilation 1, the stride
    # it replaced), its other 5 and layer4's first at dilation 2; layer4's other two at 4.
    assert dilations == [(1, 1)] * 7 + [(2, 2)] * 6
    assert len(winograd_calls) == 13
    assert_oracle_close(got, expected, exact, name="logits")


@pytest.mark.parametrize("n, h, chunks", [(8, 28, 4), (8, 14, 1), (3, 56, 3), (5, 28, 3)])
def test_inference_in_chunks_of_images(winograd_calls, n, h, chunks):
    """The runner transforms the batch in chunks of images within the cache budget (2 MiB: two
    64-channel 28x28 images, all of 14x14, one of 56x56; a last, smaller chunk too), every
    image's output against eager and the oracle."""
    shape = (n, 64, h, h, 64, 3, 1, 1, 1)
    eager, fused, oracle = _eval_units(shape)
    x, res = _cl(n, 64, h, h), _cl(n, 64, h, h)
    with torch.no_grad():
        got = fused(x, res)
        assert_oracle_close(got, eager(x, res), oracle(x.double(), res.double()), name="y")
    assert len(winograd_calls) == chunks
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n, c, h, images", [(5, 64, 28, [2, 2, 1]), (7, 128, 14, [4, 3])])
def test_chunks_run_one_tile_count(winograd_switch, monkeypatch, n, c, h, images):
    """The products' weights are laid out for a whole chunk's tile count, and oneDNN runs
    another count with them only by reordering them on every call (resnet18's eval at batch 8,
    144x144 took 8x as long): the chunks are as even as the batch allows (7 images within a
    budget of 5: 4 and 3, not 5 and 2) and the last, smaller one is padded to the others' tile
    count; every image's output against eager and the oracle."""
    winograd_switch(True)
    products = []  # (tiles output, tiles computed) per chunk
    output_transform = _C.cpu_winograd_output

    def recording(m, *args):
        products.append((m.shape[2], m.untyped_storage().nbytes() // (m.shape[1] * 4)))
        return output_transform(m, *args)

    monkeypatch.setattr(_C, "cpu_winograd_output", recording)
    eager, fused, oracle = _eval_units((n, c, h, h, c, 3, 1, 1, 1))
    x = _cl(n, c, h, h)
    with torch.no_grad():
        got = fused(x)
        assert_oracle_close(got, eager(x), oracle(x.double()), name="y")
    tiles = (h // 2) ** 2
    assert products == [(k * tiles, images[0] * tiles) for k in images]


def test_resnet18_eval_through_winograd(winograd_calls, monkeypatch):
    """A float32 channels_last resnet18 in eval, every stride-1 3x3 through the kernel, against
    eager and the float64 oracle."""
    monkeypatch.setattr(extension, "_MATMUL_REPEATING_COLUMNS", False)  # AMX: not layer3-4
    model, eager = _eval_models("resnet18")
    x = _cl(2, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
        expected = eager(x)
        exact = reference.upcast(eager)(x.double())
    assert len(winograd_calls) == 13  # 16 3x3s, less the three with stride 2
    assert_oracle_close(got, expected, exact, name="logits")


def test_block_output_written_into_its_dead_residual(winograd_switch, monkeypatch):
    """In a planned resnet18 eval, the last unit of each block without downsample (a Winograd
    3x3 with the block's input as residual, which the plan marks dead) writes y into the
    residual's memory; logits still match eager and the oracle, and the caller's input is
    untouched. (With a downsample, the downsample's unit adds the main path's output.)"""
    winograd_switch(True)
    monkeypatch.setattr(extension, "_MATMUL_REPEATING_COLUMNS", False)  # AMX: not layer3-4
    torch.manual_seed(0)
    model = fusedres.models.resnet18(backend="cpu").eval().to(memory_format=torch.channels_last)
    eager = fusedres.to_eager(copy.deepcopy(model))
    x = _cl(2, 3, 64, 64)
    kept = x.clone()
    writes = []  # per call with a residual: whether out is the residual's memory
    output_transform = _C.cpu_winograd_output

    def spy(m, bias, residual, relu, out, dilation):
        if residual is not None:
            writes.append(out.data_ptr() == residual.data_ptr())
        return output_transform(m, bias, residual, relu, out, dilation)

    with torch.no_grad():
        model(x)  # builds the plans
        monkeypatch.setattr(_C, "cpu_winograd_output", spy)
        got = model(x)
        expected = eager(x)
        exact = reference.upcast(eager)(x.double())
    assert writes == [True] * 5  # 8 blocks, 3 of them with a downsample
    assert torch.equal(x, kept)
    assert_oracle_close(got, expected, exact, name="logits")


@pytest.mark.parametrize("env, expected", [(None, "on"), ("0", "off"), ("1", "on")])
def test_environment_variable_sets_the_path_at_load(env, expected):
    assert ("Winograd F(2x2, 3x3) convolutions (float32 inference 3x3s; "
            f"csrc/cpu/winograd_conv.h): {expected}") in info_with("FUSEDRES_CPU_WINOGRAD", env)
