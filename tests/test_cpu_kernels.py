"""The C++ CPU kernels (torch.ops.fusedres.*, csrc/cpu) against the fp64 oracle.

Each op is compared with ``fusedres.reference`` in float64 (the oracle) under docs/design.md's rule:
error <= 2 x the error of the same reference run in the activations' own precision
(``upcast=False``: float32 math for float32/bfloat16 inputs, rounded once, i.e. what eager
PyTorch's fused CPU BatchNorm does) + the dtype's atol from conftest.py.

The ops allocate their outputs themselves, so there is nothing to pre-poison; instead every output
element is compared with the oracle (an unwritten element would have to equal it by chance), NaN
positions must match the oracle's, and the tests feed NaN on purpose.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_oracle_close
from fusedres import _ext, reference

if not _ext.extension_loaded():
    if os.environ.get("FUSEDRES_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"FUSEDRES_REQUIRE_EXTENSION=1 but {_ext.EXTENSION_ERROR}")
    pytest.skip(f"C++ extension not built: {_ext.EXTENSION_ERROR}", allow_module_level=True)

import fusedres.ops.library  # noqa: E402,F401  (fake kernels; also checks the module imports)

ops = torch.ops.fusedres
EPS = 1e-5

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FORMATS = ["contiguous", "channels_last"]
# ResNet-real, odd, tiny, and a non-contiguous view ("view": sliced out of a bigger tensor).
SHAPES = [(2, 64, 56, 56), (4, 256, 14, 14), (3, 7, 5, 9), (1, 3, 1, 2), ("view", 2, 5, 3, 3)]
SHAPE_IDS = ["2x64x56x56", "4x256x14x14", "3x7x5x9", "1x3x1x2", "view2x5x3x3"]


def _memory_format(name):
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def make_act(shape, dtype, fmt, offset=0.5, scale=2.0):
    """A random [N, C, H, W] activation in ``fmt``; ``("view", N, C, H, W)`` gives a strided slice.

    The non-zero mean (``offset``) makes the variance computation and the dz formula face some
    cancellation, as real conv outputs do.
    """
    if shape[0] == "view":
        n, c, h, w = shape[1:]
        big = torch.randn(n + 1, 2 * c + 1, h + 2, w + 3, dtype=torch.float64) * scale + offset
        big = big.to(dtype).contiguous(memory_format=_memory_format(fmt))
        t = big[1:, 1::2, 1:h + 1, 2:w + 2]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
        return t
    t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    return t.contiguous(memory_format=_memory_format(fmt))


def stat_vec(c, dtype, lo=-1.5, hi=1.5):
    """A random [C] vector in the statistics dtype of ``dtype`` activations."""
    return (torch.rand(c, dtype=torch.float64) * (hi - lo) + lo).to(reference.stats_dtype(dtype))


def expected_format(z):
    """The output layout rule (checks.h / library.py): channels_last only for channels_last-dense z."""
    return fusedres.ops.library.output_memory_format(z)


def assert_layout(t, z, name):
    assert t.dtype == z.dtype, f"{name}: dtype {t.dtype} != z's {z.dtype}"
    assert t.shape == z.shape, f"{name}: shape {tuple(t.shape)} != {tuple(z.shape)}"
    assert t.is_contiguous(memory_format=expected_format(z)), \
        f"{name}: strides {t.stride()} are not dense in {expected_format(z)}"


def _switch_cases(with_training):
    """(shape, residual, relu[, training]) cases: every switch combination on the small shapes;
    on the two big ones (whose value is tiling and threading) the full unit and the bare one."""
    cases = []
    for shape, sid in zip(SHAPES, SHAPE_IDS):
        big = shape[0] != "view" and shape[0] * shape[1] * shape[2] * shape[3] > 100_000
        for residual in (True, False):
            for relu in (True, False):
                for training in ((True, False) if with_training else (None,)):
                    if big and residual != relu:
                        continue
                    switches = [residual, relu] + ([training] if with_training else [])
                    ids = [sid, "res" if residual else "nores", "relu" if relu else "norelu"]
                    if with_training:
                        ids.append("train" if training else "eval")
                    cases.append(pytest.param(shape, *switches, id="-".join(ids)))
    return cases


def assert_matches_oracle(actual, eager, oracle, name):
    """conftest's rule on NCHW-contiguous copies: the layout is checked apart, and the rule's
    elementwise work runs several times faster on contiguous tensors."""
    assert_oracle_close(actual.contiguous(), eager.contiguous(), oracle.contiguous(), name)


# ---------------------------------------------------------------------------------------------
# bn_stats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(1, 4, 1, 1)], ids=SHAPE_IDS + ["M1"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats(dtype, fmt, shape):
    z = make_act(shape, dtype, fmt, offset=3.0)
    mean, var = ops.bn_stats(z)
    sdt = reference.stats_dtype(dtype)
    assert mean.dtype == sdt and var.dtype == sdt and mean.shape == (z.shape[1],) == var.shape
    o_mean, o_var = reference.bn_stats(z)
    e_mean, e_var = reference.bn_stats(z, upcast=False)
    assert_oracle_close(mean, e_mean, o_mean, "mean")
    assert_oracle_close(var, e_var, o_var, "var")
    assert (var >= 0).all()


def test_bn_stats_large_mean_is_stable():
    """A mean 1e4 times the spread: a one-pass sum-of-squares in float32 would lose the variance."""
    z = torch.randn(4, 8, 32, 32, dtype=torch.float64) + 1e4
    for fmt in FORMATS:
        z32 = z.float().contiguous(memory_format=_memory_format(fmt))
        mean, var = ops.bn_stats(z32)
        o_mean, o_var = reference.bn_stats(z32)
        torch.testing.assert_close(var.double(), o_var.double(), rtol=1e-3, atol=0)
        torch.testing.assert_close(mean.double(), o_mean.double(), rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom")
def test_bn_stats_nan_and_empty():
    z = make_act((2, 4, 3, 5), torch.float32, "contiguous")
    z[1, 2, 0, 3] = float("nan")
    mean, var = ops.bn_stats(z)
    assert mean[2].isnan() and var[2].isnan()
    assert not mean[[0, 1, 3]].isnan().any() and not var[[0, 1, 3]].isnan().any()
    for fmt in FORMATS:
        empty = torch.empty(0, 6, 4, 4).contiguous(memory_format=_memory_format(fmt))
        mean, var = ops.bn_stats(empty)
        o_var, o_mean = torch.var_mean(empty, dim=(0, 2, 3), correction=0)
        assert mean.shape == (6,) and mean.isnan().all() and o_mean.isnan().all()
        assert var.shape == (6,) and var.isnan().all() and o_var.isnan().all()


# ---------------------------------------------------------------------------------------------
# bn_act_fwd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,residual,relu", _switch_cases(with_training=False))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_fwd(dtype, fmt, shape, residual, relu):
    z = make_act(shape, dtype, fmt)
    c = z.shape[1]
    scale, shift = stat_vec(c, dtype, 0.2, 2.0), stat_vec(c, dtype)
    res = make_act(shape, dtype, fmt, offset=0.0, scale=1.0) if residual else None
    y = ops.bn_act_fwd(z, scale, shift, res, relu)
    assert_layout(y, z, "y")
    oracle = reference.bn_act_fwd(z, scale, shift, res, relu)
    eager = reference.bn_act_fwd(z, scale, shift, res, relu, upcast=False)
    assert_matches_oracle(y, eager, oracle, "y")
    if relu:
        assert (y >= 0).all()


def test_bn_act_fwd_residual_in_other_layout():
    z = make_act((2, 16, 6, 10), torch.float32, "channels_last")
    res = make_act((2, 16, 6, 10), torch.float32, "contiguous")
    scale, shift = stat_vec(16, torch.float32), stat_vec(16, torch.float32)
    y = ops.bn_act_fwd(z, scale, shift, res, True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, reference.bn_act_fwd(z, scale, shift, res, True))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_fwd_propagates_nan(dtype, fmt):
    # 37 channels / 11 columns put NaNs in both the vector body and the scalar tails.
    z = make_act((2, 37, 3, 11), dtype, fmt)
    z[0, 5, 1, 2] = float("nan")
    z[1, 36, 2, 10] = float("nan")
    scale, shift = stat_vec(37, dtype), stat_vec(37, dtype)
    y = ops.bn_act_fwd(z, scale, shift, None, True)
    assert y[0, 5, 1, 2].isnan() and y[1, 36, 2, 10].isnan()
    assert y.isnan().sum() == 2
    assert torch.equal(y.isnan(), torch.relu(z).isnan())


@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_act_fwd_empty(fmt):
    z = torch.empty(0, 8, 5, 5).contiguous(memory_format=_memory_format(fmt))
    y = ops.bn_act_fwd(z, torch.ones(8), torch.zeros(8), torch.empty_like(z), True)
    assert y.shape == z.shape and y.dtype == z.dtype


# ---------------------------------------------------------------------------------------------
# bn_act_bwd
# ---------------------------------------------------------------------------------------------


def make_bwd_inputs(shape, dtype, fmt, residual, relu, dy_fmt=None):
    """Realistic backward inputs: batch statistics of z, and y = the oracle forward of z."""
    z = make_act(shape, dtype, fmt)
    c = z.shape[1]
    mean, var = reference.bn_stats(z)
    invstd = torch.rsqrt(var + EPS)
    weight, bias = stat_vec(c, dtype, 0.2, 2.0), stat_vec(c, dtype)
    scale = weight * invstd
    res = make_act(shape, dtype, fmt, offset=0.0, scale=1.0) if residual else None
    y = reference.bn_act_fwd(z, scale, bias - mean * scale, res, relu)
    dy = make_act(shape, dtype, dy_fmt or fmt, offset=0.0, scale=1.0)
    return dy, y, z, mean, invstd, weight


def check_bwd(dy, y, z, mean, invstd, weight, relu, residual, training):
    out = ops.bn_act_bwd(dy, y, z, mean, invstd, weight, relu, residual, training)
    oracle = reference.bn_act_bwd(dy, y, z, mean, invstd, weight, relu, residual, training)
    eager = reference.bn_act_bwd(dy, y, z, mean, invstd, weight, relu, residual, training,
                                 upcast=False)
    dz, dweight, dbias, dres = out
    assert_layout(dz, z, "dz")
    sdt = reference.stats_dtype(z.dtype)
    assert dweight.dtype == sdt and dbias.dtype == sdt
    assert dweight.shape == dbias.shape == (z.shape[1],)
    assert_matches_oracle(dz, eager[0], oracle[0], "dz")
    assert_oracle_close(dweight, eager[1], oracle[1], "dweight")
    assert_oracle_close(dbias, eager[2], oracle[2], "dbias")
    if residual:
        assert_layout(dres, z, "dresidual")
        assert_matches_oracle(dres, eager[3], oracle[3], "dresidual")
    else:
        assert dres.numel() == 0 and dres.shape == (0,)
    return out


@pytest.mark.parametrize("shape,residual,relu,training", _switch_cases(with_training=True))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_bwd(dtype, fmt, shape, residual, relu, training):
    check_bwd(*make_bwd_inputs(shape, dtype, fmt, residual, relu), relu, residual, training)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_act_bwd_dy_in_other_layout(fmt):
    other = "contiguous" if fmt == "channels_last" else "channels_last"
    inputs = make_bwd_inputs((2, 24, 7, 9), torch.float32, fmt, True, True, dy_fmt=other)
    assert inputs[0].is_contiguous(memory_format=_memory_format(other))
    check_bwd(*inputs, True, True, True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_act_bwd_nan(fmt, training):
    """A NaN output passes its gradient (threshold_backward's y <= 0 rule); a NaN dy spreads
    through its channel's sums (and, in training, the channel's dz) exactly as in the oracle."""
    dy, y, z, mean, invstd, weight = make_bwd_inputs((2, 37, 3, 11), torch.float32, fmt, True, True)
    y[0, 3, 1, 1] = float("nan")
    dy[1, 20, 2, 10] = float("nan")
    dz, dweight, dbias, dres = check_bwd(dy, y, z, mean, invstd, weight, True, True, training)
    assert dbias[20].isnan() and dweight[20].isnan()
    assert dres[0, 3, 1, 1] == dy[0, 3, 1, 1]
    assert dz[:, 20].isnan().all() == training


@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_act_bwd_empty(fmt, residual):
    z = torch.empty(0, 8, 5, 5).contiguous(memory_format=_memory_format(fmt))
    ones = torch.ones(8)
    dz, dweight, dbias, dres = ops.bn_act_bwd(z, z, z, ones, ones, ones, True, residual, True)
    assert dz.shape == z.shape
    assert torch.equal(dweight, torch.zeros(8)) and torch.equal(dbias, torch.zeros(8))
    assert dres.shape == (z.shape if residual else (0,))


# ---------------------------------------------------------------------------------------------
# the ReLU bit mask: bn_act_fwd_mask / bn_act_bwd_mask
# ---------------------------------------------------------------------------------------------


def assert_same(actual, expected, name):
    """Bitwise equality, NaN positions included."""
    assert actual.shape == expected.shape and actual.stride() == expected.stride(), name
    assert torch.equal(actual.isnan(), expected.isnan()) and \
        torch.equal(actual.nan_to_num(), expected.nan_to_num()), f"{name} differs"


# Tails of every kind: numel % 8 of 401408, 50176, 945, 6, 50 is 0, 0, 1, 6, 2; C % 8 of 64, 256,
# 7, 3, 5 is 0, 0, 7, 3, 5; H*W % 8 of 3136, 196, 45, 2, 9 is 0, 4, 5, 2, 1.
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_fwd_mask(dtype, fmt, residual, shape):
    z = make_act(shape, dtype, fmt)
    z[0, 0, 0, 0] = float("nan")  # a NaN output passes its gradient: its bit is 1
    c = z.shape[1]
    scale, shift = stat_vec(c, dtype, 0.2, 2.0), stat_vec(c, dtype)
    res = make_act(shape, dtype, fmt, offset=0.0, scale=1.0) if residual else None
    y, mask = ops.bn_act_fwd_mask(z, scale, shift, res)
    assert_layout(y, z, "y")
    # The same y as bn_act_fwd, bit for bit (so the oracle tests of bn_act_fwd cover it) ...
    assert_same(y, ops.bn_act_fwd(z, scale, shift, res, True), "y")
    assert_matches_oracle(y, reference.bn_act_fwd(z, scale, shift, res, True, upcast=False),
                          reference.bn_act_fwd(z, scale, shift, res, True), "y")
    # ... and exactly its gates, in y's memory order.
    assert mask.dtype == torch.uint8 and mask.shape == (fusedres.ops.library.relu_mask_bytes(z.numel()),)
    assert torch.equal(mask, fusedres.ops.library.pack_relu_mask(y, expected_format(z)))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_bwd_mask(dtype, fmt, residual, shape):
    dy, _, z, mean, invstd, weight = make_bwd_inputs(shape, dtype, fmt, False, True)
    scale = weight * invstd
    y, mask = ops.bn_act_fwd_mask(z, scale, -mean * scale, None)
    if dtype == torch.float32:
        y[0, 0, 0, 0] = float("nan")  # a NaN output passes its gradient: the mask's bit is 1
        mask = fusedres.ops.library.pack_relu_mask(y, expected_format(z))
    for training in (True, False):
        dz, dweight, dbias, dres = ops.bn_act_bwd_mask(dy, mask, z, mean, invstd, weight, residual, training)
        oracle = reference.bn_act_bwd(dy, y, z, mean, invstd, weight, True, residual, training)
        eager = reference.bn_act_bwd(dy, y, z, mean, invstd, weight, True, residual, training, upcast=False)
        assert_layout(dz, z, "dz")
        assert_matches_oracle(dz, eager[0], oracle[0], f"dz (training={training})")
        assert_oracle_close(dweight, eager[1], oracle[1], "dweight")
        assert_oracle_close(dbias, eager[2], oracle[2], "dbias")
        if residual:
            # g = gate ? dy : 0 is exact, so the mask gated exactly the elements y does.
            assert_layout(dres, z, "dresidual")
            assert_same(dres, oracle[3], "dresidual")
        else:
            assert dres.shape == (0,)
        # The y variant on the same inputs: the gate is the only difference. Equal up to the host
        # compiler's freedom to contract a*b + c differently in the two instantiations' scalar tails.
        for name, a, b in zip(("dz", "dweight", "dbias", "dresidual"), (dz, dweight, dbias, dres),
                              ops.bn_act_bwd(dy, y, z, mean, invstd, weight, True, residual, training)):
            tol = 1e-12 if dtype == torch.float64 else 0.0
            scale = max(1.0, b.abs().nan_to_num().max().item()) if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, equal_nan=True, msg=name)


def test_bn_act_mask_ops_empty():
    z = torch.empty(0, 8, 5, 5)
    ones = torch.ones(8)
    y, mask = ops.bn_act_fwd_mask(z, ones, ones, None)
    assert y.shape == z.shape and mask.shape == (0,) and mask.dtype == torch.uint8
    dz, dweight, dbias, dres = ops.bn_act_bwd_mask(z, mask, z, ones, ones, ones, True, True)
    assert dz.shape == dres.shape == z.shape and torch.equal(dbias, torch.zeros(8))


def test_bn_act_bwd_mask_argument_checks_name_the_mask():
    z = torch.randn(2, 4, 3, 3)
    v = torch.ones(4)
    mask = torch.zeros(9, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"fusedres::bn_act_bwd_mask: mask must be a \[ceil\(numel\(z\) / 8\)\] = \[9\]"):
        ops.bn_act_bwd_mask(z, mask[:8], z, v, v, v, False, True)
    with pytest.raises(RuntimeError, match="fusedres::bn_act_bwd_mask: mask must be uint8, got Int"):
        ops.bn_act_bwd_mask(z, mask.int(), z, v, v, v, False, True)
    with pytest.raises(RuntimeError, match="fusedres::bn_act_bwd_mask: dy must have the shape of z"):
        ops.bn_act_bwd_mask(z[:1], mask, z, v, v, v, False, True)
    with pytest.raises(RuntimeError, match="fusedres::bn_act_fwd_mask: scale must be a \\[C\\] vector"):
        ops.bn_act_fwd_mask(z, v[:3], v, None)


# ---------------------------------------------------------------------------------------------
# argument checks, float16, the portable kernel build
# ---------------------------------------------------------------------------------------------


def test_argument_checks_name_the_argument():
    z = torch.randn(2, 4, 3, 3)
    v = torch.ones(4)
    with pytest.raises(RuntimeError, match="z must be a rank-4"):
        ops.bn_stats(torch.randn(4, 3, 3))
    with pytest.raises(RuntimeError, match="z must be float32, float64, bfloat16 or float16"):
        ops.bn_stats(torch.ones(2, 4, 3, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="scale must be a \\[C\\] vector with C = z.size\\(1\\) = 4"):
        ops.bn_act_fwd(z, torch.ones(5), v, None, True)
    with pytest.raises(RuntimeError, match="shift must be in the statistics dtype"):
        ops.bn_act_fwd(z, v, v.double(), None, True)
    with pytest.raises(RuntimeError, match="residual must have the shape of z"):
        ops.bn_act_fwd(z, v, v, torch.randn(2, 4, 3, 4), True)
    with pytest.raises(RuntimeError, match="dy must have the dtype of z"):
        ops.bn_act_bwd(z.double(), z, z, v, v, v, True, False, True)
    with pytest.raises(RuntimeError, match="weight must be in the statistics dtype"):
        ops.bn_act_bwd(z.bfloat16(), z.bfloat16(), z.bfloat16(), v, v, v.bfloat16(), True, False, True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_float16(fmt):
    dy, y, z, mean, invstd, weight = make_bwd_inputs((2, 19, 5, 7), torch.float16, fmt, True, True)
    m, v = ops.bn_stats(z)
    eager_mean, eager_var = reference.bn_stats(z, upcast=False)
    exact_mean, exact_var = reference.bn_stats(z)
    assert_oracle_close(m, eager_mean, exact_mean, "mean")
    assert_oracle_close(v, eager_var, exact_var, "var")
    scale, shift = stat_vec(19, torch.float16), stat_vec(19, torch.float16)
    assert_oracle_close(ops.bn_act_fwd(z, scale, shift, y, True),
                        reference.bn_act_fwd(z, scale, shift, y, True, upcast=False),
                        reference.bn_act_fwd(z, scale, shift, y, True), "y")
    check_bwd(dy, y, z, mean, invstd, weight, True, True, True)


# The kernel builds in the order of ATen's CPU capabilities, each with the ATEN_CPU_CAPABILITY
# value that selects it.
_KERNEL_BUILDS = (("default", "DEFAULT"), ("avx2", "AVX2"), ("avx512", "AVX512"))


@pytest.mark.parametrize("capability,variant", _KERNEL_BUILDS, ids=[v for _, v in _KERNEL_BUILDS])
def test_each_kernel_build_matches_oracle(capability, variant):
    """Each kernel build this CPU can run, selected like ATen's own with ATEN_CPU_CAPABILITY (the
    rest of the suite runs only the one ATen picks here). Channel counts 21 (tails only) and 70
    (two whole bfloat16 vectors of the AVX512 build, and a tail); the BatchNorm kernels, the max
    pool and the Winograd transforms."""
    from fusedres import _C

    compiled = _C.build_info().split("cpu kernels compiled: ")[1].split(";")[0].split(", ")
    if variant not in compiled:
        pytest.skip(f"the {variant} kernels are not compiled into this build ({compiled})")
    names = [v for _, v in _KERNEL_BUILDS]
    aten = torch.backends.cpu.get_cpu_capability()
    if names.index(variant) > (names.index(aten) if aten in names else 0):
        pytest.skip(f"this CPU cannot run the {variant} kernels (ATen capability {aten})")
    script = textwrap.dedent("""
        import sys
        import torch
        from fusedres import _C, reference as R
        from fusedres.ops.library import pack_relu_mask
        assert f"in use: {sys.argv[1]}" in _C.build_info(), _C.build_info()
        ops = torch.ops.fusedres
        torch.manual_seed(0)
        for fmt, dt, C in ((f, d, c) for f in (torch.contiguous_format, torch.channels_last)
                           for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
                           for c in (21, 70)):
            z = (torch.randn(3, C, 5, 7) + 1).to(dt).contiguous(memory_format=fmt)
            sdt = R.stats_dtype(dt)
            tol = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
                   torch.float16: dict(rtol=2e-3, atol=2e-3)}.get(dt, {})
            for got, want in zip(ops.bn_stats(z), R.bn_stats(z, upcast=False)):
                torch.testing.assert_close(got, want, **tol)
            sc, sh = torch.randn(C, dtype=sdt), torch.randn(C, dtype=sdt)
            res, dy = torch.randn_like(z), torch.randn_like(z)
            y = ops.bn_act_fwd(z, sc, sh, res, True)
            torch.testing.assert_close(y, R.bn_act_fwd(z, sc, sh, res, True, upcast=False), **tol)
            m, v = R.bn_stats(z)
            inv = torch.rsqrt(v + 1e-5)
            for training in (True, False):
                got = ops.bn_act_bwd(dy, y, z, m, inv, sc, True, True, training)
                want = R.bn_act_bwd(dy, y, z, m, inv, sc, True, True, training, upcast=False)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, **tol)
                # The mask variants: y and the gradients bit for bit those of the y variants.
                ym, mask = ops.bn_act_fwd_mask(z, sc, sh, res)
                assert torch.equal(ym, y) and torch.equal(mask, pack_relu_mask(y, fmt))
                for g, w in zip(ops.bn_act_bwd_mask(dy, mask, z, m, inv, sc, True, training), got):
                    torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
            if fmt == torch.channels_last and dt != torch.float64:
                x = torch.randn(2, C, 9, 8).to(dt).contiguous(memory_format=fmt)
                torch.testing.assert_close(ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False),
                                           torch.nn.functional.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)
        # The Winograd transforms (float32), odd H and W, undilated and dilated: the convolution
        # they make with the channel sums done in float64 against float64's, with bias,
        # residual and ReLU.
        cl = torch.channels_last
        for C, dilation in ((21, [1, 1]), (70, [1, 1]), (70, [2, 3])):
            cout = C + 3
            x = torch.randn(2, C, 5, 7).contiguous(memory_format=cl)
            w, bias = torch.randn(cout, C, 3, 3) * 0.2, torch.randn(cout)
            res = torch.randn(2, cout, 5, 7).contiguous(memory_format=cl)
            v = _C.cpu_winograd_input(x, dilation)  # [1, 16*C, T, 1], memory [T][16][C]
            t = v.shape[2]
            u = _C.cpu_winograd_weight(w).view(16, cout, C).double()
            m = torch.einsum("tpc,poc->tpo", v.permute(0, 2, 3, 1).reshape(t, 16, C).double(), u)
            m = m.float().reshape(1, t, 1, 16 * cout).permute(0, 3, 1, 2)
            out = torch.empty(2, cout, 5, 7).contiguous(memory_format=cl)
            _C.cpu_winograd_output(m, bias, res, True, out, dilation)
            want = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), bias.double(),
                                                         padding=dilation, dilation=dilation)
                              + res.double())
            torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "FUSEDRES_CPU_KERNELS"}
    env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, "-c", script, variant], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _kernels_in_use(env: dict) -> tuple[str, str, str]:
    """(kernel build in use, ATen's CPU capability, stderr) of a fresh process under ``env``
    (added to os.environ without its FUSEDRES_CPU_KERNELS and ATEN_CPU_CAPABILITY)."""
    script = textwrap.dedent("""
        import torch
        from fusedres import _C
        info = _C.build_info()
        print(info.split("cpu kernels in use: ")[1].split(" ")[0])
        print(torch.backends.cpu.get_cpu_capability())
    """)
    base = {k: v for k, v in os.environ.items()
            if k not in ("FUSEDRES_CPU_KERNELS", "ATEN_CPU_CAPABILITY")}
    proc = subprocess.run([sys.executable, "-c", script], env={**base, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    in_use, aten = proc.stdout.split()[-2:]
    return in_use, aten, proc.stderr


def test_fusedres_cpu_kernels_caps_the_build_below_atens():
    """FUSEDRES_CPU_KERNELS lowers the kernel build alone (ATen's capability unchanged), never
    raises it above ATen's, and an unknown value warns and leaves ATen's choice."""
    from fusedres import _C

    names = [v for _, v in _KERNEL_BUILDS]
    compiled = _C.build_info().split("cpu kernels compiled: ")[1].split(";")[0].split(", ")
    natural, aten, _ = _kernels_in_use({})
    aten_level = names.index(aten) if aten in names else 0  # other ISAs: the portable build

    def best_compiled(level: int) -> str:
        return max((v for v in compiled if names.index(v) <= level), key=names.index)

    assert natural == best_compiled(aten_level)
    for value, want in (("default", "DEFAULT"), ("AVX2", "AVX2"), ("avx512", "AVX512")):
        # The build asked for, capped by ATen's capability and by what is compiled in.
        in_use, aten_now, _ = _kernels_in_use({"FUSEDRES_CPU_KERNELS": value})
        assert aten_now == aten, "the variable must not change ATen's own capability"
        assert in_use == best_compiled(min(names.index(want), aten_level))
    in_use, _, stderr = _kernels_in_use({"FUSEDRES_CPU_KERNELS": "sse9"})
    assert in_use == natural and "FUSEDRES_CPU_KERNELS=sse9 is not one of" in stderr


def test_build_info():
    """The binary's own account of its build agrees with the record setup.py wrote."""
    from fusedres import _C, _ext

    info = _C.build_info()
    assert "cpu kernels in use: " in info and "openmp" in info
    built = _C.cuda_kernels_built()
    assert built == bool(_ext.BUILD_INFO.get("cuda"))
    assert info.endswith(f"cuda kernels: {'yes' if built else 'no'}")
