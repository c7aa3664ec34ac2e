"""The implicit-GEMM convolution (fusedres.kernels.conv) and its epilogues vs the fp64 oracle.

Each geometry exercises one structural path of the kernel: FLAT_K (channels per group not a
multiple of 64), tap-by-tap (64 channels), POINTWISE (1x1 stride 1), strided and padded gathers,
groups, dilation, and output tiles that overhang M and Cout.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_oracle_close
from fusedres import reference

from .conftest import DEVICE, DTYPES

# (N, Cin, H, W, Cout, kernel, stride, padding, groups, dilation)
GEOMETRIES = {
    "3x3-odd-flat": (2, 5, 9, 7, 6, 3, 1, 1, 1, 1),
    "3x3s2-c64-taps": (2, 64, 7, 5, 20, 3, 2, 1, 1, 1),
    "7x7s2-stem": (2, 3, 11, 10, 8, 7, 2, 3, 1, 1),
    "1x1-odd-pointwise": (2, 7, 5, 5, 9, 1, 1, 0, 1, 1),
    "1x1-c64-pointwise": (2, 64, 3, 5, 17, 1, 1, 0, 1, 1),
    "1x1s2-downsample": (2, 64, 5, 4, 16, 1, 2, 0, 1, 1),
    "3x3-groups4": (2, 8, 6, 5, 12, 3, 1, 1, 4, 1),
    "3x3s2-groups2": (1, 16, 7, 7, 10, 3, 2, 1, 2, 1),
    "3x3-dilation2": (2, 6, 8, 8, 5, 3, 1, 2, 1, 2),
}


def _conv():
    from fusedres.kernels import conv  # after conftest has set TRITON_INTERPRET
    return conv


def _inputs(geom, dtype, fmt=torch.channels_last):
    n, cin, h, w, cout, k, stride, pad, groups, dil = geom
    x = torch.randn(n, cin, h, w, dtype=torch.float64).to(dtype)
    fan_in = cin // groups * k * k
    wt = (torch.randn(cout, cin // groups, k, k, dtype=torch.float64) / fan_in ** 0.5).to(dtype)
    return x.to(DEVICE).contiguous(memory_format=fmt), wt.to(DEVICE)


def _args(geom):
    *_, k, stride, pad, groups, dil = geom
    return (stride, stride), (pad, pad), (dil, dil), groups


def _eager_conv(x, w, geom, dtype):
    stride, pad, dil, groups = _args(geom)
    if x.device.type == "cpu" and dtype == torch.float16:
        # CPU fp16 convolution accumulates in fp32 and rounds once, like a GPU's: emulate it.
        return F.conv2d(x.float(), w.float(), None, stride, pad, dil, groups).to(dtype)
    return F.conv2d(x, w, None, stride, pad, dil, groups)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_conv_with_stats_epilogue(dtype, geom):
    """F1: z, and the batch statistics merged from the epilogue's per-tile partials."""
    x, w = _inputs(geom, dtype)
    stride, pad, dil, groups = _args(geom)
    z, pmean, pm2, rows = _conv().conv2d(x, w, stride, pad, dil, groups, stats=True)
    assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), w.double(), None, stride, pad, dil, groups)
    assert_oracle_close(z.cpu(), _eager_conv(x, w, geom, dtype).cpu(), exact.cpu(), name="z")

    from fusedres.kernels import bn
    mean, var = bn.stats_from_partials(pmean, pm2, z.numel() // z.shape[1], rows)
    # The statistics describe the stored z exactly (up to fp32 rounding of the reduction).
    ex_mean, ex_var = reference.bn_stats(z, upcast=True)
    eager_mean, eager_var = reference.bn_stats(z, upcast=False)
    assert_oracle_close(mean.cpu(), eager_mean.cpu(), ex_mean.double().cpu(), "mean", atol=1e-6)
    assert_oracle_close(var.cpu(), eager_var.cpu(), ex_var.double().cpu(), "var", atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("has_residual,relu", [(True, True), (False, True), (False, False)],
                         ids=["res-relu", "relu", "affine-only"])
def test_conv_with_eval_epilogue(dtype, geom, has_residual, relu):
    """F2 in eval: y = act(conv(x)*scale + shift + residual) in the conv's epilogue."""
    x, w = _inputs(geom, dtype)
    stride, pad, dil, groups = _args(geom)
    cout = w.shape[0]
    scale = torch.empty(cout).uniform_(0.5, 1.5).to(DEVICE)
    shift = torch.empty(cout).uniform_(-0.5, 0.5).to(DEVICE)
    z_exact = F.conv2d(x.double(), w.double(), None, stride, pad, dil, groups)
    res = torch.randn(z_exact.shape).to(dtype).to(DEVICE) if has_residual else None
    y = _conv().conv2d(x, w, stride, pad, dil, groups, scale=scale, shift=shift, residual=res,
                       relu=relu)
    exact = reference.bn_act_fwd(z_exact, scale, shift, res, relu)
    eager = reference.bn_act_fwd(_eager_conv(x, w, geom, dtype), scale, shift, res, relu,
                                 upcast=False)
    assert_oracle_close(y.cpu(), eager.cpu(), exact.cpu(), name="y")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geom", [GEOMETRIES["3x3-odd-flat"], GEOMETRIES["3x3s2-c64-taps"]],
                         ids=["flat", "taps"])
def test_conv_accepts_both_layouts(fmt, geom):
    """x and the weight in either layout (the weight is read in place through its strides)."""
    x, w = _inputs(geom, torch.float32, fmt)
    w = w.contiguous(memory_format=fmt)
    stride, pad, dil, groups = _args(geom)
    z = _conv().conv2d(x, w, stride, pad, dil, groups)
    exact = F.conv2d(x.double(), w.double(), None, stride, pad, dil, groups)
    assert_oracle_close(z.cpu(), _eager_conv(x, w, geom, torch.float32).cpu(), exact.cpu(), "z")
    # A weight view with no dense layout at all (every other output channel).
    w_view = torch.stack([w, w], 1).flatten(0, 1)[::2]
    assert not w_view.is_contiguous()
    z_view = _conv().conv2d(x, w_view, stride, pad, dil, groups)
    torch.testing.assert_close(z_view, z, rtol=0, atol=0)


def test_conv_rejects_mismatched_groups():
    x = torch.randn(1, 6, 4, 4, device=DEVICE)
    w = torch.randn(4, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        _conv().conv2d(x, w, (1, 1), (1, 1), (1, 1), 1)


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"),
                    reason="this torch has no per-operator TF32 flags")
def test_tf32_choice_reads_the_per_operator_flag():
    """Reading the legacy cudnn.allow_tf32 raises once the newer per-operator flags disagree
    (conv "ieee", RNN "tf32"); the conv then follows the conv flag, and still runs."""
    flags = torch.backends.cudnn.conv
    saved = flags.fp32_precision
    try:
        flags.fp32_precision = "ieee"
        assert _conv()._conv_allows_tf32() is False
        geom = GEOMETRIES["3x3-odd-flat"]
        x, w = _inputs(geom, torch.float32)
        stride, pad, dil, groups = _args(geom)
        z = _conv().conv2d(x, w, stride, pad, dil, groups)
        exact = F.conv2d(x.double(), w.double(), None, stride, pad, dil, groups)
        assert_oracle_close(z.cpu(), _eager_conv(x, w, geom, torch.float32).cpu(), exact.cpu(), "z")
        flags.fp32_precision = "tf32"
        assert _conv()._conv_allows_tf32() is True
    finally:
        flags.fp32_precision = saved
