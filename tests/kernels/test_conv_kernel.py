"""The implicit-GEMM convolution (fusedres.kernels.conv) and its epilogues vs the fp64 oracle.

Each geometry exercises one structural path of the kernel: FLAT_K (channels per group not a
multiple of 64), tap-by-tap (64 channels), POINTWISE (1x1 stride 1), strided and padded gathers,
groups, dilation, and output tiles that overhang M and Cout. Which path each geometry takes is
asserted too, and the compiled kernel's address arithmetic (TTIR for sm_90, no GPU needed) is
checked to be int64 where N*H*W*C may pass 2^31.
"""

import functools
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_oracle_close
from fusedres import reference

from .conftest import DEVICE, DTYPES, INTERPRETING

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")

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
    "3x3-groups2-c64-taps": (2, 128, 4, 3, 24, 3, 1, 1, 2, 1),
    "1x1-groups4-pointwise": (2, 8, 5, 4, 12, 1, 1, 0, 4, 1),
    "1x1-groups2-c64-pointwise": (1, 128, 3, 5, 40, 1, 1, 0, 2, 1),
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
@pytest.mark.parametrize("has_residual,relu",
                         [(True, True), (True, False), (False, True), (False, False)],
                         ids=["res-relu", "res-norelu", "relu", "affine-only"])
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


# -- F3: the previous unit's BatchNorm + ReLU in the prologue ----------------------------------


def _prologue_inputs(geom, dtype):
    """(z, in_scale, in_shift): z of a previous unit and its per-channel scale/shift. Shifts are
    mostly positive, so that relu(shift) != 0 and a padding tap that took the prologue (instead
    of being a zero of y) would show."""
    z, w = _inputs(geom, dtype)
    cin = z.shape[1]
    in_scale = (torch.empty(cin).uniform_(0.5, 1.5) * torch.where(torch.rand(cin) < 0.2, -1, 1))
    in_shift = torch.empty(cin).uniform_(-0.3, 1.0)
    return z, w, in_scale.to(DEVICE), in_shift.to(DEVICE)


def _prologue_refs(z, w, in_scale, in_shift, geom, dtype):
    """(eager, exact): the unfused composition in ``dtype`` (y stored, then convolved) and the
    fp64 oracle, each as the convolution's output."""
    stride, pad, dil, groups = _args(geom)
    y_eager = reference.bn_act_fwd(z, in_scale, in_shift, None, True, upcast=False)
    y_exact = reference.bn_act_fwd(z.double(), in_scale, in_shift, None, True)
    exact = F.conv2d(y_exact, w.double(), None, stride, pad, dil, groups)
    return _eager_conv(y_eager, w, geom, dtype), exact


def _padding_applied_to_z(z, w, in_scale, in_shift, geom):
    """The wrong F3: zero padding applied to z before the prologue (taps = relu(shift))."""
    stride, pad, dil, groups = _args(geom)
    zp = F.pad(z.double(), (pad[1], pad[1], pad[0], pad[0]))
    yp = reference.bn_act_fwd(zp, in_scale, in_shift, None, True)
    return F.conv2d(yp, w.double(), None, stride, (0, 0), dil, groups)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("epilogue", ["stats", "eval"])
def test_conv_with_prologue(dtype, geom, epilogue):
    """F3: conv2d(relu(z*in_scale + in_shift)) with the previous unit's y never materialised,
    on every path (the geometries cover POINTWISE, tap by tap, FLAT_K, stride 2, groups,
    dilation), with the training epilogue (statistics, F1) or the eval one (F2, residual, ReLU)."""
    z, w, in_scale, in_shift = _prologue_inputs(geom, dtype)
    stride, pad, dil, groups = _args(geom)
    eager, exact = _prologue_refs(z, w, in_scale, in_shift, geom, dtype)
    if pad[0]:
        # These inputs tell zeros of y from zeros of z at the image border: the wrong F3
        # (out-of-image taps adding relu(in_shift)) fails the check the kernel's z must pass.
        wrong = _padding_applied_to_z(z, w, in_scale, in_shift, geom).to(dtype)
        with pytest.raises(AssertionError, match="exceeds"):
            assert_oracle_close(wrong.cpu(), eager.cpu(), exact.cpu(), name="z")
    conv = _conv()
    if epilogue == "stats":
        out, pmean, pm2, rows = conv.conv2d(z, w, stride, pad, dil, groups, stats=True,
                                            in_scale=in_scale, in_shift=in_shift)
        assert_oracle_close(out.cpu(), eager.cpu(), exact.cpu(), name="z")
        from fusedres.kernels import bn
        mean, var = bn.stats_from_partials(pmean, pm2, out.numel() // out.shape[1], rows)
        ex_mean, ex_var = reference.bn_stats(out, upcast=True)
        eager_mean, eager_var = reference.bn_stats(out, upcast=False)
        assert_oracle_close(mean.cpu(), eager_mean.cpu(), ex_mean.double().cpu(), "mean",
                            atol=1e-6)
        assert_oracle_close(var.cpu(), eager_var.cpu(), ex_var.double().cpu(), "var", atol=1e-6)
    else:
        cout = w.shape[0]
        scale = torch.empty(cout).uniform_(0.5, 1.5).to(DEVICE)
        shift = torch.empty(cout).uniform_(-0.5, 0.5).to(DEVICE)
        res = torch.randn(exact.shape).to(dtype).to(DEVICE)
        out = conv.conv2d(z, w, stride, pad, dil, groups, scale=scale, shift=shift, residual=res,
                          relu=True, in_scale=in_scale, in_shift=in_shift)
        assert_oracle_close(out.cpu(), reference.bn_act_fwd(eager, scale, shift, res, True,
                                                            upcast=False).cpu(),
                            reference.bn_act_fwd(exact, scale, shift, res, True).cpu(), name="y")
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not INTERPRETING, reason="bitwise only where no FMA contraction can differ "
                                             "between the two kernels (the interpreter)")
@pytest.mark.parametrize("geom", [GEOMETRIES["3x3-groups2-c64-taps"], GEOMETRIES["3x3-odd-flat"]],
                         ids=["taps", "flat"])
def test_prologue_equals_the_unfused_path_bitwise(geom):
    """The prologue rebuilds y exactly as bn_act_fwd stores it (fp32 math, one rounding to
    fp16), so the convolution of z with the prologue is the convolution of the stored y, bit
    for bit, in the same config."""
    from fusedres.kernels import bn
    z, w, in_scale, in_shift = _prologue_inputs(geom, torch.float16)
    stride, pad, dil, groups = _args(geom)
    y = bn.bn_act_fwd(z, in_scale, in_shift, None, True)
    fused = _conv().conv2d(z, w, stride, pad, dil, groups, in_scale=in_scale, in_shift=in_shift)
    unfused = _conv().conv2d(y, w, stride, pad, dil, groups)
    assert torch.equal(fused, unfused)


def test_prologue_arguments_are_checked():
    geom = GEOMETRIES["3x3-odd-flat"]
    z, w, in_scale, in_shift = _prologue_inputs(geom, torch.float32)
    stride, pad, dil, groups = _args(geom)
    with pytest.raises(ValueError, match="go together"):
        _conv().conv2d(z, w, stride, pad, dil, groups, in_scale=in_scale)
    with pytest.raises(ValueError, match="one per input channel"):
        _conv().conv2d(z, w, stride, pad, dil, groups, in_scale=in_scale[:-1],
                       in_shift=in_shift[:-1])


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


# -- which k-walk each geometry takes --------------------------------------------------------

# name -> (FLAT_K, POINTWISE) for GEOMETRIES, and for ResNet-50 / ResNeXt-50's units
# (N, Cin, H, W, Cout, kernel, stride, padding, groups, dilation) at a small H, W: the path
# depends on the channels per group and the filter, not on the image size.
PATHS = {
    "3x3-odd-flat": (True, False),
    "3x3s2-c64-taps": (False, False),
    "7x7s2-stem": (True, False),
    "1x1-odd-pointwise": (True, True),
    "1x1-c64-pointwise": (False, True),
    "1x1s2-downsample": (False, False),
    "3x3-groups4": (True, False),
    "3x3s2-groups2": (True, False),
    "3x3-dilation2": (True, False),
    "3x3-groups2-c64-taps": (False, False),
    "1x1-groups4-pointwise": (True, True),
    "1x1-groups2-c64-pointwise": (False, True),
}
RESNET_GEOMETRIES = {
    "resnet50-stem-7x7s2": ((1, 3, 20, 20, 64, 7, 2, 3, 1, 1), (True, False)),
    "resnet50-1x1-reduce": ((1, 256, 4, 4, 64, 1, 1, 0, 1, 1), (False, True)),
    "resnet50-1x1-expand": ((1, 64, 4, 4, 256, 1, 1, 0, 1, 1), (False, True)),
    "resnet50-3x3": ((1, 64, 4, 4, 64, 3, 1, 1, 1, 1), (False, False)),
    "resnet50-3x3s2": ((1, 128, 4, 4, 128, 3, 2, 1, 1, 1), (False, False)),
    "resnet50-downsample-1x1s2": ((1, 256, 4, 4, 512, 1, 2, 0, 1, 1), (False, False)),
    "resnext50-3x3-g32": ((1, 128, 4, 4, 128, 3, 1, 1, 32, 1), (True, False)),
}
PATH_CASES = {**{name: (GEOMETRIES[name], path) for name, path in PATHS.items()},
              **RESNET_GEOMETRIES}


@pytest.mark.parametrize("name", PATH_CASES)
def test_conv_path_selection(monkeypatch, name):
    """1x1 stride-1 unpadded convolutions run as a plain GEMM (POINTWISE), channels per group
    that are a multiple of 64 walk k tap by tap, everything else (the 3-channel stem, narrow
    groups) decodes k per element (FLAT_K), each with its own config table.

    conv.py has no path-selection function of its own: the launch is intercepted (and not run)
    to read the constexprs the launcher chose.
    """
    assert PATHS.keys() == GEOMETRIES.keys(), "every geometry states the path it takes"
    conv = _conv()
    geom, (flat_k, pointwise) = PATH_CASES[name]
    launches = []

    def record(kernel, grid, args, *, table, interp_config, **kwargs):
        launches.append(dict(kwargs, table=table))
        return interp_config

    monkeypatch.setattr(conv, "launch", record)
    x, w = _inputs(geom, torch.float32)
    conv.conv2d(x, w, *_args(geom))
    assert len(launches) == 1
    chosen = launches[0]
    assert (chosen["FLAT_K"], chosen["POINTWISE"]) == (flat_k, pointwise), chosen
    assert chosen["table"] is conv._conv_table(torch.float32, flat_k, chosen["DOT_PRECISION"])
    assert (chosen["KH"], chosen["KW"]) == (geom[5], geom[5])


# (dtype, TF32 allowed) -> (precision, table names for tap-by-tap/POINTWISE and for FLAT_K).
OPERAND_TABLES = {
    (torch.float16, False): ("tf32", "CONV_CONFIGS", "CONV_FLAT_CONFIGS"),
    (torch.bfloat16, True): ("tf32", "CONV_CONFIGS", "CONV_FLAT_CONFIGS"),
    (torch.float32, True): ("tf32", "CONV_TF32_CONFIGS", "CONV_TF32_FLAT_CONFIGS"),
    (torch.float32, False): ("ieee", "CONV_IEEE_CONFIGS", "CONV_IEEE_FLAT_CONFIGS"),
}


# The same with the F3 prologue: where a prologue variant spilled in a base table's config, its
# operand kind has a table of its own.
PROLOGUE_TABLES = {
    (torch.float16, False): ("tf32", "CONV_PROLOGUE_CONFIGS", "CONV_FLAT_CONFIGS"),
    (torch.bfloat16, True): ("tf32", "CONV_PROLOGUE_CONFIGS", "CONV_FLAT_CONFIGS"),
    (torch.float32, True): ("tf32", "CONV_TF32_CONFIGS", "CONV_TF32_FLAT_PROLOGUE_CONFIGS"),
    (torch.float32, False): ("ieee", "CONV_IEEE_PROLOGUE_CONFIGS",
                             "CONV_IEEE_FLAT_PROLOGUE_CONFIGS"),
}


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("dtype,allow_tf32", OPERAND_TABLES, ids=str)
@pytest.mark.parametrize("name", ["3x3s2-c64-taps", "7x7s2-stem"])
def test_conv_config_table_per_operand(monkeypatch, name, dtype, allow_tf32, prologue):
    """Each kind of operand autotunes over its own tables (scripts/check_triton_compile.py
    checks each table against the variants that use it): 16-bit operands always run on tensor
    cores, fp32 on them only when TF32 is allowed, else as FMA ("ieee") with smaller k slices."""
    conv = _conv()
    tables = PROLOGUE_TABLES if prologue else OPERAND_TABLES
    precision, table, flat_table = tables[dtype, allow_tf32]
    launches = []

    def record(kernel, grid, args, *, table, interp_config, **kwargs):
        launches.append(dict(kwargs, table=table))
        return interp_config

    monkeypatch.setattr(conv, "launch", record)
    monkeypatch.setattr(conv, "_conv_allows_tf32", lambda: allow_tf32)
    geom = GEOMETRIES[name]
    x, w = _inputs(geom, dtype)
    ones, zeros = torch.ones(x.shape[1], device=DEVICE), torch.zeros(x.shape[1], device=DEVICE)
    conv.conv2d(x, w, *_args(geom), in_scale=ones if prologue else None,
                in_shift=zeros if prologue else None)
    (chosen,) = launches
    assert chosen["DOT_PRECISION"] == precision
    expected = flat_table if PATHS[name][0] else table
    assert chosen["table"] is getattr(conv, expected), f"{name} {dtype}: expected conv.{expected}"


def test_runner_reads_the_tf32_switch_at_each_call(monkeypatch):
    """conv2d_runner decides its launch once, but whether fp32 products may take TF32 at each
    call, as conv2d does: a program may turn cuDNN's TF32 off after its first inference call."""
    conv = _conv()
    launches = []

    def record(kernel, grid, args, *, table, interp_config, **kwargs):
        launches.append(dict(kwargs, table=table))
        return interp_config

    allowed = [True]
    monkeypatch.setattr(conv, "launch", record)
    monkeypatch.setattr(conv, "_conv_allows_tf32", lambda: allowed[0])
    geom = GEOMETRIES["3x3s2-c64-taps"]
    x, w = _inputs(geom, torch.float32)
    cout = w.shape[0]
    run = conv.conv2d_runner(x, w, *_args(geom), scale=torch.ones(cout, device=DEVICE),
                             shift=torch.zeros(cout, device=DEVICE), has_residual=False,
                             relu=True)
    run(x, None)
    allowed[0] = False
    run(x, None)
    allowed[0] = True
    run(x, None)
    assert [launch["DOT_PRECISION"] for launch in launches] == ["tf32", "ieee", "tf32"]
    assert launches[1]["table"] is conv.CONV_IEEE_CONFIGS
    assert launches[0]["table"] is launches[2]["table"] is conv.CONV_TF32_CONFIGS


# -- int64 offsets in the compiled kernel ----------------------------------------------------

# Compiles kernel variants to TTIR for sm_90 in a subprocess (this process may be interpreting,
# and triton fixes that mode at import) and prints {label: ttir} as JSON: the conv kernel's three
# k-walks with the prologue and every epilogue on, and the BN kernels that touch [N, C, H, W]
# tensors in both layouts, fp16, with the first config of each table. Pointer element types come
# from the kernels' argument comments (``# *T``, ``# *fp32``); pointers and channel counts get
# triton's divisible-by-16 hint, as real launches give them.
_TTIR_SCRIPT = r"""
import inspect, json, re
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from fusedres.kernels import bn, conv
from fusedres.kernels._launch import arch_configs

ARG_COMMENT = re.compile(r"^\s*(\w+),?\s*#\s*\*(\w+)")


def source(kernel, constexprs):
    pointers = {}
    for line in inspect.getsource(kernel.fn).splitlines():
        m = ARG_COMMENT.match(line)
        if m and m.group(1).endswith("_ptr"):
            pointers[m.group(1)] = "*" + ("fp16" if m.group(2) == "T" else m.group(2))
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
            if name in ("C", "Cin", "Cout"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
epilogue = dict(PROLOGUE=True, AFFINE=True, HAS_RESIDUAL=True, RELU=True, STATS=True,
                DOT_PRECISION="tf32", w_stride_ci=1)
variants = {
    "conv-taps-3x3": (conv._conv_fwd_kernel, conv.CONV_CONFIGS,
                      dict(epilogue, KH=3, KW=3, FLAT_K=False, POINTWISE=False)),
    "conv-flat-7x7": (conv._conv_fwd_kernel, conv.CONV_FLAT_CONFIGS,
                      dict(epilogue, KH=7, KW=7, FLAT_K=True, POINTWISE=False)),
    "conv-pointwise-1x1": (conv._conv_fwd_kernel, conv.CONV_CONFIGS,
                           dict(epilogue, KH=1, KW=1, FLAT_K=False, POINTWISE=True)),
}
for cl in (True, False):
    layout = "nhwc" if cl else "nchw"
    variants.update({
        f"bn-stats-{layout}": (bn._bn_stats_partial_kernel, bn.REDUCE_CONFIGS,
                               dict(CHANNELS_LAST=cl)),
        f"bn-fwd-{layout}": (bn._bn_act_fwd_kernel, bn.ELEMENTWISE_CONFIGS,
                             dict(HAS_RESIDUAL=True, RELU=True, CHANNELS_LAST=cl)),
        f"bn-bwd-reduce-{layout}": (bn._bn_act_bwd_reduce_kernel, bn.REDUCE_CONFIGS,
                                    dict(RELU=True, HAS_RESIDUAL=True, NEED_DWEIGHT=True,
                                         WRITE_DZ=True, CHANNELS_LAST=cl)),
        f"bn-bwd-dz-{layout}": (bn._bn_act_bwd_dz_kernel, bn.ELEMENTWISE_CONFIGS,
                                dict(RELU=True, G_FROM_DRES=False, CHANNELS_LAST=cl)),
    })
out = {}
for label, (kernel, table, constexprs) in variants.items():
    config = arch_configs(table, 90)[0]
    src = source(kernel, dict(config.kwargs, **constexprs))
    options = backend.parse_options({"num_warps": config.num_warps,
                                     "num_stages": config.num_stages})
    stages = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                         backend.get_module_map(), context)
    out[label] = str(stages["ttir"](module, {"hash": label, "target": target, **options.__dict__}))
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def kernel_ttir() -> dict:
    """{variant label: TTIR text for sm_90} of the conv and BN kernels (see _TTIR_SCRIPT)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TTIR_SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


# `%name = op operands : types loc(...)`; a name may carry a `_<n>` suffix per SSA value.
_TTIR_OP = re.compile(r"^\s*(%[\w.]+) = ([\w.]+) (.*)$")
_FOLLOW = ("tt.splat", "tt.broadcast", "tt.expand_dims")


def offset_types_by_pointer(ttir: str) -> list:
    """[(kernel argument, op, offset integer types)] for every tt.load and tt.store.

    Follows each accessed pointer back through tt.addptr (collecting the offset operand's integer
    type: "i32" or "i64"), splat, broadcast and expand_dims to the kernel argument it starts from.
    """
    defs = {}
    for line in ttir.splitlines():
        m = _TTIR_OP.match(line)
        if m:
            defs[m.group(1)] = (m.group(2), m.group(3))
    accesses = []
    for line in ttir.splitlines():
        m = re.search(r"\b(tt\.load|tt\.store) (%[\w.]+)", line)
        if not m:
            continue
        name, types = m.group(2), []
        while name in defs and defs[name][0] in ("tt.addptr",) + _FOLLOW:
            op, rest = defs[name]
            operands = re.findall(r"%[\w.]+", rest.split(" : ")[0])
            if op == "tt.addptr":
                offset_type = rest.split(" : ")[1].split(", ")[1]
                types.append(re.match(r"(?:tensor<(?:\d+x)*)?(i\d+)", offset_type).group(1))
            name = operands[0]
        accesses.append((name, m.group(1), types))
    return accesses


def integer_arith_types(ttir: str, variables) -> dict:
    """{variable: [result types]} of the integer arithmetic (muli, addi, subi, divsi) whose TTIR
    values carry the name of one of the kernel's ``variables`` (triton 3.9 names a value after
    the variable it is assigned to, with a ``_<n>`` suffix per further value).

    Skips the calling test when the TTIR carries no such names (another triton version).
    """
    types = {}
    for line in ttir.splitlines():
        m = _TTIR_OP.match(line)
        if not m or m.group(2) not in ("arith.muli", "arith.addi", "arith.subi", "arith.divsi"):
            continue
        var = re.match(r"%(\w+?)(?:_\d+)?$", m.group(1)).group(1)
        if var in variables:
            types.setdefault(var, []).append(m.group(3).split(" : ")[-1].split(" loc(")[0])
    if not types:
        pytest.skip("this triton does not name TTIR values after the kernel's variables")
    return types


def assert_int64(types: dict, expected, what: str) -> None:
    """Every variable of ``expected`` has integer arithmetic in ``types``, and all of it is i64."""
    assert set(expected) <= set(types), f"{what}: no arithmetic found for {set(expected) - set(types)}"
    for var, result_types in types.items():
        assert all(t == "i64" or t.endswith("xi64>") for t in result_types), \
            f"{what}: {var} computed in {result_types}"


@pytest.mark.parametrize("variant", ["taps-3x3", "flat-7x7", "pointwise-1x1"])
def test_compiled_conv_addresses_activations_with_int64(variant):
    """N*H*W*C passes 2^31 at ResNet batch sizes: in the compiled kernel (TTIR for sm_90, no GPU
    needed) every load and store of x, the output and the residual adds an i64 offset. (The
    weights, per-channel vectors and [M / BLOCK_M, Cout] statistics partials are small enough
    for i32.)"""
    accesses = offset_types_by_pointer(kernel_ttir()[f"conv-{variant}"])
    by_pointer = {}
    for pointer, op, types in accesses:
        by_pointer.setdefault(pointer, []).append((op, types))
    large = {"%x_ptr": "tt.load", "%out_ptr": "tt.store", "%res_ptr": "tt.load"}
    for pointer, op in large.items():
        assert any(o == op for o, _ in by_pointer.get(pointer, [])), \
            f"{variant}: no {op} of {pointer} found in the TTIR: {sorted(by_pointer)}"
        for o, types in by_pointer[pointer]:
            assert "i64" in types, f"{variant}: a {o} of {pointer} has only {types} offsets"


@pytest.mark.parametrize("variant", ["taps-3x3", "flat-7x7", "pointwise-1x1"])
def test_compiled_conv_row_and_image_offsets_are_int64_throughout(variant):
    """An i64 offset is not enough when it was multiplied out in i32 and widened afterwards:
    the arithmetic of the row index, the image base, the input row (POINTWISE) and the output
    offsets (the kernel's variables offs_m, img_base, a_row, out_offs, whose names triton 3.9
    keeps on the TTIR values) runs in i64 from the start."""
    types = integer_arith_types(kernel_ttir()[f"conv-{variant}"],
                                ("offs_m", "img_base", "a_row", "out_offs"))
    assert_int64(types, {"offs_m", "out_offs", "a_row" if "pointwise" in variant else "img_base"},
                 variant)


# -- weights in the kernel's layout, once per weight version ---------------------------------


def _launched_weights(monkeypatch, conv):
    """Intercepts the conv launches (not run): the weight tensor each one passes the kernel."""
    weights = []

    def record(kernel, grid, args, *, interp_config, **kwargs):
        weights.append(args[1])
        return interp_config

    monkeypatch.setattr(conv, "launch", record)
    return weights


def test_weights_reach_the_kernel_channels_last_once_per_version(monkeypatch):
    """A default-layout 3x3 weight is converted to channels_last (k contiguous) on the first
    call only; an in-place update (an optimizer step) makes the next call convert again, and
    the kernel sees the new values."""
    conv = _conv()
    geom = GEOMETRIES["3x3s2-c64-taps"]
    x, w = _inputs(geom, torch.float32)
    w = torch.nn.Parameter(w)
    assert not w.is_contiguous(memory_format=torch.channels_last)
    weights = _launched_weights(monkeypatch, conv)
    for _ in range(3):
        conv.conv2d(x, w, *_args(geom))
    first = weights[0]
    assert all(t is first for t in weights), "converted again although the weight did not change"
    assert first.is_contiguous(memory_format=torch.channels_last) and first.stride()[1] == 1
    assert torch.equal(first, w.detach()) and not first.requires_grad
    with torch.no_grad():
        w.mul_(2.0)
    conv.conv2d(x, w, *_args(geom))
    assert weights[-1] is not first and torch.equal(weights[-1], w.detach())
    # `.data` assignment swaps the storage without a version bump of its own.
    w.data = torch.randn_like(w)
    conv.conv2d(x, w, *_args(geom))
    assert torch.equal(weights[-1], w.detach())
    # A new storage at the old one's address, as an allocator may hand freed memory out again
    # (here over the same memory, given new values behind torch's back): only the storage's
    # identity tells.
    same_memory = torch.from_numpy(w.detach().numpy())
    assert same_memory.data_ptr() == w.data_ptr()
    same_memory.numpy()[...] = torch.randn_like(w).numpy()
    w.data = same_memory
    conv.conv2d(x, w, *_args(geom))
    assert torch.equal(weights[-1], w.detach())


def test_channels_last_and_1x1_weights_pass_through_uncopied(monkeypatch):
    conv = _conv()
    weights = _launched_weights(monkeypatch, conv)
    geom = GEOMETRIES["3x3s2-c64-taps"]
    x, w = _inputs(geom, torch.float16)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    conv.conv2d(x, w_cl, *_args(geom))
    geom = GEOMETRIES["1x1-c64-pointwise"]
    x1, w1 = _inputs(geom, torch.float16)
    assert w1.is_contiguous()
    conv.conv2d(x1, w1, *_args(geom))
    assert weights[0] is w_cl and weights[1] is w1


def test_converted_weights_go_with_their_parameter():
    import gc
    conv = _conv()
    # Earlier tests' garbage (modules in reference cycles, their weights' entries) goes first:
    # only this weight's entry may go below.
    gc.collect()
    w = torch.randn(8, 4, 3, 3)
    conv.prepared_weight(w)
    count = len(conv._PREPARED)
    del w
    gc.collect()
    assert len(conv._PREPARED) == count - 1


def test_inference_mode_weights_are_converted_uncached():
    conv = _conv()
    with torch.inference_mode():
        w = torch.randn(8, 4, 3, 3)
        prepared = conv.prepared_weight(w)
    assert prepared.is_contiguous(memory_format=torch.channels_last) and torch.equal(prepared, w)
    assert w not in conv._PREPARED


@pytest.mark.parametrize("dtype", [torch.float16] + [torch.bfloat16] * (DEVICE == "cuda"),
                         ids=str)
def test_float32_master_weight_under_autocast(monkeypatch, dtype):
    """Autocast hands the conv a fresh 16-bit cast of the weight on every call, which no cache
    can reuse; the launcher takes the float32 parameter itself and casts it (with the layout
    change, one copy) once per version: the result is the convolution with the cast weight."""
    conv = _conv()
    geom = GEOMETRIES["3x3s2-c64-taps"]
    x, w = _inputs(geom, dtype)
    w32 = w.float()
    out = conv.conv2d(x, w32, *_args(geom))
    torch.testing.assert_close(out, conv.conv2d(x, w, *_args(geom)), rtol=0, atol=0)
    assert conv.prepared_weight(w32, dtype) is conv.prepared_weight(w32, dtype)
    assert conv.prepared_weight(w32, dtype).dtype == dtype
    with pytest.raises(TypeError, match="does not match"):
        conv.conv2d(x.float(), w, *_args(geom))  # a 16-bit weight is never upcast


# -- the autotune key -------------------------------------------------------------------------


def test_conv_autotune_key_buckets_the_row_count(monkeypatch):
    """Batch sizes whose N*Ho*Wo fall in one power-of-two bucket share the tuned config; the
    kernel still gets the exact row count."""
    conv = _conv()
    launches = []

    def record(kernel, grid, args, *, key, interp_config, **kwargs):
        launches.append((key, args[list(inspect.signature(kernel.fn).parameters).index("M")]))
        return interp_config

    monkeypatch.setattr(conv, "launch", record)
    geom = GEOMETRIES["1x1-c64-pointwise"]  # 3x5 pixels per image
    for n in (5, 6, 9):
        x, w = _inputs((n, *geom[1:]), torch.float32)
        conv.conv2d(x, w, *_args(geom))
    (k5, m5), (k6, m6), (k9, m9) = launches
    assert (m5, m6, m9) == (75, 90, 135)
    assert k5 == k6 and k5["M"] == 128 and k9["M"] == 256
