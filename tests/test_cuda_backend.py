"""The CUDA kernels (csrc/cuda, torch.ops.fusedres.* on CUDA tensors) against the fp64 oracle.

Marked ``cuda`` and skipped with a reason where torch sees no CUDA device. The rule of docs/design.md
section 6 applies: error <= 2 x the error of the same reference run in the activations' own
precision (``upcast=False``) + the dtype's atol from conftest.py. The ops allocate their outputs
themselves, so there is nothing to pre-poison; every output element is compared with the oracle
and NaN positions must match.

``FUSEDRES_CUDA_TEST_DEVICE=cpu`` runs the same tests against the CPU kernels behind the same ops:
a dry run of this file's logic on machines without a GPU (the tests are written once, blind, and
would otherwise first execute on a lent GPU).
"""

import os

import pytest
import torch

from conftest import assert_oracle_close
from fusedres import _ext, reference

DEVICE = torch.device(os.environ.get("FUSEDRES_CUDA_TEST_DEVICE", "cuda"))

pytestmark = pytest.mark.cuda
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)
if not _ext.extension_loaded():
    if os.environ.get("FUSEDRES_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"FUSEDRES_REQUIRE_EXTENSION=1 but {_ext.EXTENSION_ERROR}")
    pytest.skip(f"C++ extension not built: {_ext.EXTENSION_ERROR}", allow_module_level=True)
if DEVICE.type == "cuda" and not _ext.cuda_kernels_built():
    if os.environ.get("FUSEDRES_REQUIRE_EXTENSION") == "1":
        raise RuntimeError("FUSEDRES_REQUIRE_EXTENSION=1 but fusedres._C was built without the CUDA kernels")
    pytest.skip("fusedres._C was built without the CUDA kernels", allow_module_level=True)

import fusedres.ops.library  # noqa: E402  (fake kernels, for opcheck)

ops = torch.ops.fusedres

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
FORMATS = ["contiguous", "channels_last"]
# ResNet-50 sizes (layer1 output, layer4 output) where memory-bound kernels meet real traffic.
BIG_SHAPES = [(32, 256, 56, 56), (32, 2048, 7, 7)]
# Small and awkward: 16-bit vectors need C % 8 == 0, so C=12 takes the scalar path for fp16/bf16
# but the vector path for fp32; odd C; H*W = 2; a strided slice ("view").
SMALL_SHAPES = [(8, 64, 28, 28), (2, 12, 6, 6), (3, 7, 5, 9), (1, 3, 1, 2), ("view", 2, 40, 3, 3)]


def shape_id(shape):
    return "x".join(str(s) for s in shape)


def _fmt(name):
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def make_act(shape, dtype, fmt, offset=0.5, scale=2.0):
    """A random [N, C, H, W] activation on DEVICE in ``fmt``; ``("view", N, C, H, W)`` is a strided slice.

    The non-zero mean makes the variance and the dz formula face some cancellation, as real conv
    outputs do.
    """
    if shape[0] == "view":
        n, c, h, w = shape[1:]
        big = torch.randn(n + 1, 2 * c + 1, h + 2, w + 3, dtype=torch.float64, device=DEVICE) * scale + offset
        big = big.to(dtype).contiguous(memory_format=_fmt(fmt))
        t = big[1:, 1::2, 1:h + 1, 2:w + 2]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
        return t
    t = (torch.randn(shape, dtype=torch.float64, device=DEVICE) * scale + offset).to(dtype)
    return t.contiguous(memory_format=_fmt(fmt))


def stat_vec(c, dtype, lo=-1.5, hi=1.5):
    """A random [C] vector on DEVICE in the statistics dtype of ``dtype`` activations."""
    return (torch.rand(c, dtype=torch.float64, device=DEVICE) * (hi - lo) + lo).to(reference.stats_dtype(dtype))


def assert_layout(t, z, name):
    fmt = fusedres.ops.library.output_memory_format(z)
    assert t.device == z.device, f"{name}: on {t.device}, z on {z.device}"
    assert t.dtype == z.dtype, f"{name}: dtype {t.dtype} != z's {z.dtype}"
    assert t.shape == z.shape, f"{name}: shape {tuple(t.shape)} != {tuple(z.shape)}"
    assert t.is_contiguous(memory_format=fmt), f"{name}: strides {t.stride()} are not dense in {fmt}"


def check_stats(z):
    mean, var = ops.bn_stats(z)
    sdt = reference.stats_dtype(z.dtype)
    assert mean.dtype == var.dtype == sdt and mean.device == z.device
    o_mean, o_var = reference.bn_stats(z, upcast=True)
    e_mean, e_var = reference.bn_stats(z, upcast=False)
    assert_oracle_close(mean, e_mean, o_mean, "mean")
    assert_oracle_close(var, e_var, o_var, "var")


def check_fwd(z, residual, relu):
    c = z.shape[1]
    scale, shift = stat_vec(c, z.dtype), stat_vec(c, z.dtype)
    y = ops.bn_act_fwd(z, scale, shift, residual, relu)
    assert_layout(y, z, "y")
    oracle = reference.bn_act_fwd(z, scale, shift, residual, relu, upcast=True)
    eager = reference.bn_act_fwd(z, scale, shift, residual, relu, upcast=False)
    assert_oracle_close(y, eager, oracle, "y")


def check_bwd(z, relu, has_residual, training, dy_format=None):
    c = z.shape[1]
    mean, invstd, weight = stat_vec(c, z.dtype, -0.5, 0.5), stat_vec(c, z.dtype, 0.2, 2.0), stat_vec(c, z.dtype)
    # y from z, so that the ReLU mask is the one forward produced (about half the elements are 0).
    y = reference.bn_act_fwd(z, weight * invstd, -mean * weight * invstd, None, relu, upcast=False)
    dy = make_act(tuple(z.shape), z.dtype, dy_format or "contiguous", offset=0.0, scale=1.0)
    dz, dweight, dbias, dres = ops.bn_act_bwd(dy, y, z, mean, invstd, weight, relu, has_residual, training)
    assert_layout(dz, z, "dz")
    if has_residual:
        assert_layout(dres, z, "dresidual")
    else:
        assert dres.shape == (0,)
    sdt = reference.stats_dtype(z.dtype)
    assert dweight.dtype == dbias.dtype == sdt
    args = (dy, y, z, mean, invstd, weight, relu, has_residual, training)
    oracle = reference.bn_act_bwd(*args, upcast=True)
    eager = reference.bn_act_bwd(*args, upcast=False)
    for name, got, o, e in zip(("dz", "dweight", "dbias"), (dz, dweight, dbias), oracle, eager):
        assert_oracle_close(got, e, o, name)
    if has_residual:
        # g is dy or 0: exact in any dtype.
        assert torch.equal(dres, oracle[3].to(dres.dtype))


# ---------------------------------------------------------------------------------------------
# bn_stats


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", BIG_SHAPES + SMALL_SHAPES, ids=shape_id)
def test_bn_stats(shape, dtype, fmt):
    check_stats(make_act(shape, dtype, fmt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS[:3])
def test_bn_stats_large_mean_is_stable(dtype):
    # mean 256, std 1: fp32 sums of z and z^2 would cancel to noise; Welford/Chan keep the variance.
    z = (torch.randn(16, 64, 32, 32, dtype=torch.float64, device=DEVICE) + 256.0).to(dtype)
    z = z.contiguous(memory_format=torch.channels_last)
    _, var = ops.bn_stats(z)
    _, o_var = reference.bn_stats(z, upcast=True)
    torch.testing.assert_close(var.double(), o_var.double(), rtol=2e-3, atol=0)


def test_bn_stats_nan_and_empty():
    z = make_act((2, 16, 4, 4), torch.float32, "channels_last")
    z[1, 3, 2, 2] = float("nan")
    check_stats(z)
    mean, var = ops.bn_stats(torch.empty(0, 5, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last))
    assert mean.shape == var.shape == (5,) and mean.isnan().all() and var.isnan().all()


# ---------------------------------------------------------------------------------------------
# bn_act_fwd


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
def test_bn_act_fwd(shape, dtype, fmt, has_residual, relu):
    z = make_act(shape, dtype, fmt)
    residual = make_act(tuple(z.shape), dtype, fmt) if has_residual else None
    check_fwd(z, residual, relu)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", BIG_SHAPES, ids=shape_id)
def test_bn_act_fwd_resnet50(shape, dtype, fmt):
    z = make_act(shape, dtype, fmt)
    check_fwd(z, make_act(shape, dtype, fmt), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bn_act_fwd_residual_in_other_layout_and_nan(dtype):
    z = make_act((4, 32, 7, 7), dtype, "channels_last")
    z[0, 1, 2, 3] = float("nan")
    residual = make_act((4, 32, 7, 7), dtype, "contiguous")
    check_fwd(z, residual, True)


# ---------------------------------------------------------------------------------------------
# bn_act_bwd


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
def test_bn_act_bwd(shape, dtype, fmt, has_residual, relu, training):
    check_bwd(make_act(shape, dtype, fmt), relu, has_residual, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", BIG_SHAPES, ids=shape_id)
def test_bn_act_bwd_resnet50(shape, dtype, fmt, training):
    check_bwd(make_act(shape, dtype, fmt), True, True, training)


def test_bn_act_bwd_dy_in_other_layout():
    check_bwd(make_act((4, 64, 9, 9), torch.bfloat16, "channels_last"), True, True, True, dy_format="contiguous")


def test_bn_act_bwd_empty():
    z = torch.empty(0, 6, 4, 4, device=DEVICE)
    v = torch.ones(6, device=DEVICE)
    dz, dweight, dbias, dres = ops.bn_act_bwd(z, z, z, v, v, v, True, True, True)
    assert dz.shape == dres.shape == z.shape
    assert torch.equal(dweight, torch.zeros_like(v)) and torch.equal(dbias, torch.zeros_like(v))


# ---------------------------------------------------------------------------------------------
# the ReLU bit mask: bn_act_fwd_mask / bn_act_bwd_mask


def assert_same(actual, expected, name):
    """Bitwise equality, NaN positions included."""
    assert actual.shape == expected.shape and actual.stride() == expected.stride(), name
    assert torch.equal(actual.isnan(), expected.isnan()) and \
        torch.equal(actual.nan_to_num(), expected.nan_to_num()), f"{name} differs"


def check_fwd_mask(z, residual):
    c = z.shape[1]
    scale, shift = stat_vec(c, z.dtype), stat_vec(c, z.dtype)
    y, mask = ops.bn_act_fwd_mask(z, scale, shift, residual)
    assert_layout(y, z, "y")
    assert_oracle_close(y, reference.bn_act_fwd(z, scale, shift, residual, True, upcast=False),
                        reference.bn_act_fwd(z, scale, shift, residual, True, upcast=True), "y")
    fmt = fusedres.ops.library.output_memory_format(z)
    assert mask.dtype == torch.uint8 and mask.device == z.device
    assert torch.equal(mask, fusedres.ops.library.pack_relu_mask(y, fmt))
    return y, mask


def check_bwd_mask(z, has_residual, training):
    """bn_act_bwd_mask against the oracle and against bn_act_bwd on the same y."""
    c = z.shape[1]
    mean, invstd, weight = stat_vec(c, z.dtype, -0.5, 0.5), stat_vec(c, z.dtype, 0.2, 2.0), stat_vec(c, z.dtype)
    y, mask = ops.bn_act_fwd_mask(z, weight * invstd, -mean * weight * invstd, None)
    dy = make_act(tuple(z.shape), z.dtype, "contiguous", offset=0.0, scale=1.0)
    with_mask = ops.bn_act_bwd_mask(dy, mask, z, mean, invstd, weight, has_residual, training)
    args = (dy, y, z, mean, invstd, weight, True, has_residual, training)
    oracle, eager = reference.bn_act_bwd(*args, upcast=True), reference.bn_act_bwd(*args, upcast=False)
    assert_layout(with_mask[0], z, "dz")
    for name, got, o, e in zip(("dz", "dweight", "dbias"), with_mask, oracle, eager):
        assert_oracle_close(got, e, o, name)
    if has_residual:
        assert_layout(with_mask[3], z, "dresidual")
        assert_same(with_mask[3], oracle[3].to(z.dtype), "dresidual")  # g is dy or 0: exact
    # The y variant: the gate is the only difference, so they agree up to the compiler's freedom to
    # contract a*b + c differently in the two kernels (seen in fp64 on the CPU).
    tol = 1e-12 if z.dtype == torch.float64 else 0.0
    for name, a, b in zip(("dz", "dweight", "dbias", "dresidual"), with_mask, ops.bn_act_bwd(*args)):
        scale = max(1.0, b.abs().nan_to_num().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, equal_nan=True, msg=name)


# C=64 channels_last takes the vector mask kernel; C=12 and 7, NCHW and the view the flat one.
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES + BIG_SHAPES[:1], ids=shape_id)
def test_bn_act_fwd_mask(shape, dtype, fmt, has_residual):
    z = make_act(shape, dtype, fmt)
    check_fwd_mask(z, make_act(tuple(z.shape), dtype, fmt) if has_residual else None)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
def test_bn_act_bwd_mask_equals_bwd_with_y(shape, dtype, fmt, has_residual, training):
    check_bwd_mask(make_act(shape, dtype, fmt), has_residual, training)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_act_bwd_mask_resnet50(fmt):
    check_bwd_mask(make_act(BIG_SHAPES[0], torch.bfloat16, fmt), True, True)


# ---------------------------------------------------------------------------------------------
# launch plumbing: alignment fallback, streams, errors, 64-bit offsets, opcheck


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_misaligned_buffers_take_the_scalar_path(dtype):
    # A channels_last tensor whose data starts one element past a 16-byte boundary: C % 8 == 0,
    # but 16-byte vector accesses would fault, so the launchers must pick the scalar kernels.
    shape = (2, 64, 5, 5)
    n, c, h, w = shape
    flat = (torch.randn(n * c * h * w + 1, dtype=torch.float64, device=DEVICE) + 0.5).to(dtype)
    z = flat[1:].as_strided(shape, (h * w * c, 1, w * c, c))
    assert z.is_contiguous(memory_format=torch.channels_last) and z.data_ptr() % 16 != 0
    check_stats(z)
    check_fwd(z, None, True)
    check_bwd(z, True, True, True)
    check_fwd_mask(z, None)
    check_bwd_mask(z, False, True)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="streams are a CUDA matter")
def test_runs_on_the_current_stream():
    z = make_act((8, 64, 28, 28), torch.float16, "channels_last")
    c = z.shape[1]
    scale, shift = stat_vec(c, z.dtype), stat_vec(c, z.dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Launched behind a long kernel on `side`: results taken from the wrong stream would race.
        torch.cuda._sleep(10_000_000)
        y = ops.bn_act_fwd(z, scale, shift, None, True)
        mean, var = ops.bn_stats(z)
    side.synchronize()
    torch.testing.assert_close(y, reference.bn_act_fwd(z, scale, shift, None, True, upcast=False))
    torch.testing.assert_close(mean, reference.bn_stats(z, upcast=False)[0])
    torch.testing.assert_close(var, reference.bn_stats(z, upcast=False)[1])


@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_tensors_device():
    z = make_act((4, 32, 8, 8), torch.float32, "channels_last").to("cuda:1")
    with torch.cuda.device(0):
        mean, var = ops.bn_stats(z)
    assert mean.device == z.device
    torch.testing.assert_close(mean, reference.bn_stats(z, upcast=False)[0])


def test_argument_errors_match_the_cpu_messages():
    z = make_act((2, 8, 3, 3), torch.float32, "channels_last")
    if DEVICE.type == "cuda":
        with pytest.raises(RuntimeError, match="scale must be on the device of z"):
            ops.bn_act_fwd(z, torch.ones(8), torch.ones(8, device=DEVICE), None, True)
    with pytest.raises(RuntimeError, match="shift must be a \\[C\\] vector"):
        ops.bn_act_fwd(z, torch.ones(8, device=DEVICE), torch.ones(7, device=DEVICE), None, True)
    with pytest.raises(RuntimeError, match="must be float32, float64, bfloat16 or float16"):
        ops.bn_stats(z.to(torch.int32))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU's memory")
def test_offsets_past_2_pow_31_elements():
    # 8 x 16384 x 16385 fp16 = 2^31 + 131072 elements (4.3 GB). Each channel holds c/2, plus 2 in
    # the last 1/8 of its rows, which straddle element 2^31: 32-bit offsets would read the start
    # of the buffer there and miss the +2.
    free, _ = torch.cuda.mem_get_info(DEVICE)
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free device memory, {free / 2**30:.1f} GiB free")
    n, c, h, w = 1, 8, 16384, 16385
    assert n * c * h * w > 2**31
    z = torch.empty((n, c, h, w), dtype=torch.float16, device=DEVICE, memory_format=torch.channels_last)
    half = (torch.arange(c, device=DEVICE, dtype=torch.float16) * 0.5).view(1, c, 1, 1)
    z.copy_(half.expand(n, c, h, w))
    z[:, :, 14336:] += 2
    mean, var = ops.bn_stats(z)
    torch.testing.assert_close(mean, half.flatten().float() + 0.25, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, torch.full_like(var, 4 * (1 / 8) * (7 / 8)), rtol=1e-4, atol=1e-5)

    ones = torch.ones(c, device=DEVICE)
    y = ops.bn_act_fwd(z, ones, -(half.flatten().float() + 1), None, True)  # 0 before row 14336, 1 after
    assert y[:, :, :14336].max().item() == 0 and y[:, :, 14336:].min().item() == 1
    del z
    dy = torch.ones_like(y)
    dz, dweight, dbias, dres = ops.bn_act_bwd(dy, y, y, ones * 0, ones * 2, ones * 3, True, False, False)
    assert dres.shape == (0,)
    assert dz[:, :, :14336].max().item() == 0 and dz[:, :, 14336:].min().item() == 6  # gamma*invstd*g
    torch.testing.assert_close(dbias, torch.full_like(dbias, 2048.0 * w), rtol=1e-6, atol=0)
    torch.testing.assert_close(dweight, 2 * dbias, rtol=1e-6, atol=0)  # invstd * sum g*(y - 0), y = 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    z = make_act((2, 16, 5, 5), torch.float16, fmt)
    c = z.shape[1]
    f = reference.stats_dtype(z.dtype)
    scale, shift = stat_vec(c, z.dtype), stat_vec(c, z.dtype)
    residual = make_act((2, 16, 5, 5), torch.float16, fmt)
    torch.library.opcheck(ops.bn_stats.default, (z,))
    torch.library.opcheck(ops.bn_act_fwd.default, (z, scale, shift, residual, True))
    torch.library.opcheck(ops.bn_act_fwd.default, (z, scale, shift, None, False))
    y = ops.bn_act_fwd(z, scale, shift, None, True)
    mean, invstd, weight = torch.zeros(c, dtype=f, device=DEVICE), torch.ones(c, dtype=f, device=DEVICE), scale
    for has_residual, training in ((True, True), (False, False)):
        torch.library.opcheck(ops.bn_act_bwd.default,
                              (make_act(tuple(z.shape), z.dtype, fmt), y, z, mean, invstd, weight, True,
                               has_residual, training))
    torch.library.opcheck(ops.bn_act_fwd_mask.default, (z, scale, shift, residual))
    _, mask = ops.bn_act_fwd_mask(z, scale, shift, None)
    for has_residual, training in ((True, True), (False, False)):
        torch.library.opcheck(ops.bn_act_bwd_mask.default,
                              (make_act(tuple(z.shape), z.dtype, fmt), mask, z, mean, invstd, weight,
                               has_residual, training))
