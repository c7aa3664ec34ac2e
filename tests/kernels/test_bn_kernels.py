"""BatchNorm kernels (fusedres.kernels.bn) against the fp64 oracle of fusedres.reference.

Shapes are small (the CPU interpreter runs every program in Python) but cover the structure:
odd channel counts (partial channel tiles), M not a multiple of BLOCK_M, several reduction
programs (M > rows per program under the interpreter), both layouts, every flag.
"""

import pytest
import torch

from conftest import assert_oracle_close
from fusedres import reference

from .conftest import DEVICE, DTYPES

# Imported here, after tests/kernels/conftest.py has chosen interpreter or GPU, for the test
# kernel below (without triton the conftest skips this directory's tests with the reason).
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from fusedres.kernels.bn import _tile_offsets  # noqa: E402

# [N, C, H, W]: odd C (partial channel tile), M = 2*7*9 = 126 (partial row tile);
# 5*3*15*17 = 1275 rows (several reduction programs, 3 channel tiles under the interpreter).
SHAPES = [(2, 13, 7, 9), (5, 35, 15, 17)]
LAYOUTS = [torch.channels_last, torch.contiguous_format]
_IDS = {torch.channels_last: "nhwc", torch.contiguous_format: "nchw"}


def _bn():
    from fusedres.kernels import bn  # after conftest has set TRITON_INTERPRET
    return bn


def _rand(shape, dtype, fmt, scale=1.0, offset=0.0):
    t = torch.randn(shape, dtype=torch.float64) * scale + offset
    return t.to(dtype).to(DEVICE).contiguous(memory_format=fmt)


def _channel(c, lo, hi):
    return torch.empty(c, dtype=torch.float32).uniform_(lo, hi).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_stats(dtype, fmt, shape):
    # A mean far from 0 relative to the spread is where sum/sum-of-squares would cancel.
    z = _rand(shape, dtype, fmt, scale=0.5, offset=3.0)
    mean, var = _bn().bn_stats(z)
    assert mean.dtype == var.dtype == torch.float32
    exact = reference.bn_stats(z, upcast=True)
    eager = reference.bn_stats(z, upcast=False)
    for name, got, ref, ex in zip(("mean", "var"), (mean, var), eager, exact):
        assert_oracle_close(got.cpu(), ref.cpu(), ex.cpu().double(), name=name, atol=1e-6)


def _finalize_chunk() -> int:
    """Partials one first-level finalize program merges on this device."""
    bn = _bn()
    return bn._FINALIZE_TILES_PER_PROGRAM * bn._finalize_config(torch.device(DEVICE)).kwargs["BLOCK_P"]


@pytest.mark.parametrize("partials", ["one", "chunk", "chunk+1", "3chunks-7", "chunk*(chunk+2)"])
def test_stats_from_partials(partials):
    """The statistics finalize against float64, from one tile of partials up to more chunks than
    one second-level tile holds; the last partial (and chunk) covers fewer rows than the rest."""
    chunk = _finalize_chunk()
    p = {"one": 5, "chunk": chunk, "chunk+1": chunk + 1, "3chunks-7": 3 * chunk - 7,
         "chunk*(chunk+2)": chunk * (chunk + 2)}[partials]
    rows, c = 3, 5
    m = rows * p - 2
    z = torch.randn(m, c, dtype=torch.float64) * torch.linspace(0.1, 4.0, c) + 3.0
    padded = torch.cat([z, z.new_zeros(rows * p - m, c)]).view(p, rows, c)
    counts = torch.full((p, 1), float(rows), dtype=torch.float64)
    counts[-1] = rows - 2
    pmean = padded.sum(1) / counts
    centred = (padded - pmean[:, None]) * (torch.arange(rows)[None, :, None] < counts[:, None])
    pm2 = (centred ** 2).sum(1)
    gamma, beta = _channel(c, 0.5, 1.5), _channel(c, -0.5, 0.5)
    got = _bn().stats_from_partials(pmean.float().to(DEVICE), pm2.float().to(DEVICE), m, rows,
                                    gamma, beta, 1e-5).cpu()
    var, mean = torch.var_mean(z, dim=0, correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    scale = gamma.cpu().double() * invstd
    exact = torch.stack([mean, var, invstd, scale, beta.cpu().double() - mean * scale])
    var32, mean32 = torch.var_mean(z.float(), dim=0, correction=0)
    invstd32 = torch.rsqrt(var32 + 1e-5)
    scale32 = gamma.cpu() * invstd32
    eager = torch.stack([mean32, var32, invstd32, scale32, beta.cpu() - mean32 * scale32])
    for name, g, e, x in zip(("mean", "var", "invstd", "scale", "shift"), got, eager, exact):
        assert_oracle_close(g, e, x, name=name, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=_IDS.get)
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_bn_act_fwd(dtype, fmt, has_residual, relu):
    shape = SHAPES[0]
    z = _rand(shape, dtype, fmt)
    scale, shift = _channel(shape[1], 0.5, 1.5), _channel(shape[1], -0.5, 0.5)
    res = _rand(shape, dtype, fmt) if has_residual else None
    y = _bn().bn_act_fwd(z, scale, shift, res, relu)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    exact = reference.bn_act_fwd(z, scale, shift, res, relu, upcast=True)
    eager = reference.bn_act_fwd(z, scale, shift, res, relu, upcast=False)
    assert_oracle_close(y.cpu(), eager.cpu(), exact.cpu().double(), name="y")


# (shape, has_residual, relu, training): every flag combination on the small shape; the large
# one (several reduction programs) with all flags on, in both modes (interpreter time).
BWD_CASES = [(SHAPES[0], res, relu, training) for res in (True, False) for relu in (True, False)
             for training in (True, False)] + [(SHAPES[1], True, True, True),
                                               (SHAPES[1], True, True, False)]


def _bwd_id(case):
    shape, res, relu, training = case
    return "-".join(["x".join(map(str, shape)), "res" if res else "nores",
                     "relu" if relu else "norelu", "train" if training else "eval"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=_IDS.get)
@pytest.mark.parametrize("case", BWD_CASES, ids=_bwd_id)
def test_bn_act_bwd(dtype, fmt, case):
    shape, has_residual, relu, training = case
    c = shape[1]
    z = _rand(shape, dtype, fmt, offset=0.2)
    dy = _rand(shape, dtype, fmt)
    mean, var = reference.bn_stats(z)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = _channel(c, 0.5, 1.5)
    # y from the fp64 forward: the mask is the same bits for the kernel and both references.
    y = reference.bn_act_fwd(z, gamma * invstd, _channel(c, -0.5, 0.5) - mean * gamma * invstd,
                             None, relu)
    got = _bn().bn_act_bwd(dy, y, z, mean, invstd, gamma, relu, has_residual, training)
    exact = reference.bn_act_bwd(dy, y, z, mean, invstd, gamma, relu, has_residual, training,
                                 upcast=True)
    eager = reference.bn_act_bwd(dy, y, z, mean, invstd, gamma, relu, has_residual, training,
                                 upcast=False)
    for name, g, r, e in zip(("dz", "dweight", "dbias", "dresidual"), got, eager, exact):
        if e is None:
            assert g is None, f"{name} should be None without a residual"
            continue
        assert g.dtype == r.dtype, f"{name}: dtype {g.dtype} != {r.dtype}"
        if g.dim() == 4:
            assert g.is_contiguous(memory_format=fmt), f"{name} lost z's memory format"
        assert_oracle_close(g.cpu(), r.cpu(), e.cpu().double(), name=name)


def test_bn_bwd_eval_without_z_skips_dweight():
    """Eval backward with frozen gamma reads neither z nor computes dweight."""
    shape = SHAPES[0]
    dy = _rand(shape, torch.float32, torch.channels_last)
    y = _rand(shape, torch.float32, torch.channels_last)
    mean, invstd, gamma = _channel(13, -1, 1), _channel(13, 0.5, 2), _channel(13, 0.5, 1.5)
    dz, dweight, dbias, dres = _bn().bn_act_bwd(dy, y, None, mean, invstd, gamma, True, False,
                                                training=False, need_dweight=False)
    assert dweight is None and dres is None
    exact = reference.bn_act_bwd(dy, y, y, mean, invstd, gamma, True, False, False)
    assert_oracle_close(dz.cpu(), exact[0].float().cpu(), exact[0].cpu().double(), name="dz")
    assert_oracle_close(dbias.cpu(), exact[2].cpu(), exact[2].cpu().double(), name="dbias")


def test_float64_is_refused_with_a_clear_error():
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        _bn().bn_stats(z)


@triton.jit
def _tile_offsets_kernel(out_ptr, first_row, first_channel, C, HW, CHANNELS_LAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stores bn._tile_offsets [BLOCK_M, BLOCK_C] of rows and channels from the first ones on."""
    # Rows and channels as the BN kernels form them: an int64 row base plus an int32 range.
    offs_m = first_row.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_c = first_channel + tl.arange(0, BLOCK_C)
    offs = _tile_offsets(offs_m, offs_c, C, HW, CHANNELS_LAST)
    tl.store(out_ptr + tl.arange(0, BLOCK_M)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :],
             offs)


@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("c,hw,limit", [(64, 56 * 56, 2**31), (13, 7 * 9, 2**31),
                                        (2048, 7 * 7, 2**32)],
                         ids=["c64-past-2^31", "c13-past-2^31", "c2048-past-2^32"])
def test_tile_offsets_are_int64(cl, c, hw, limit):
    """Every BN kernel addresses elements through bn._tile_offsets: for rows whose offsets cross
    2^31 (and 2^32) elements they are exact, as Python integers compute them; 32-bit arithmetic
    anywhere on the way would wrap. The rows: in NHWC those around limit / C (the offsets cross
    the limit inside the tile), in NCHW those around the first image whose base passes it; the
    channels are the last tile's (the largest offsets)."""
    block_m, block_c = 32, 16
    if cl:
        first_row = limit // c - block_m // 2
    else:
        first_row = (limit // (c * hw) + 1) * hw - block_m // 2
    first_channel = max(0, c - block_c)
    out = torch.empty(block_m, block_c, dtype=torch.int64, device=DEVICE)
    _tile_offsets_kernel[(1,)](out, first_row, first_channel, c, hw, CHANNELS_LAST=cl,
                               BLOCK_M=block_m, BLOCK_C=block_c)
    expected = []
    for m in range(first_row, first_row + block_m):
        n, pixel = divmod(m, hw)
        expected.append([m * c + ch if cl else (n * c + ch) * hw + pixel
                         for ch in range(first_channel, first_channel + block_c)])
    expected = torch.tensor(expected, dtype=torch.int64)
    assert expected.max() >= limit and (expected.min() < limit or not cl)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


# The [N, C, H, W] tensors each kernel reads (tt.load) and writes (tt.store).
_ACTIVATION_ACCESSES = {
    "bn-stats": {("%z_ptr", "tt.load")},
    "bn-fwd": {("%z_ptr", "tt.load"), ("%res_ptr", "tt.load"), ("%y_ptr", "tt.store")},
    "bn-bwd-reduce": {("%dy_ptr", "tt.load"), ("%y_ptr", "tt.load"), ("%z_ptr", "tt.load"),
                      ("%dres_ptr", "tt.store"), ("%dz_ptr", "tt.store")},
    "bn-bwd-dz": {("%dy_ptr", "tt.load"), ("%y_ptr", "tt.load"), ("%z_ptr", "tt.load"),
                  ("%dz_ptr", "tt.store")},
}


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("kernel", _ACTIVATION_ACCESSES)
def test_compiled_bn_kernels_address_activations_with_int64(kernel, layout):
    """Beyond bn._tile_offsets, the rows fed to it must be int64 too: in the compiled kernels
    (TTIR for sm_90, no GPU needed) every load and store of an [N, C, H, W] tensor adds an i64
    offset, and the rows (offs_m, row0), the NCHW image index (n, hw) and the offsets (offs) are
    computed in i64 throughout (an i32 product widened afterwards would have wrapped already)."""
    from .test_conv_kernel import (assert_int64, integer_arith_types, kernel_ttir,
                                   offset_types_by_pointer)
    ttir = kernel_ttir()[f"{kernel}-{layout}"]
    found = set()
    for pointer, op, types in offset_types_by_pointer(ttir):
        if (pointer, op) in _ACTIVATION_ACCESSES[kernel]:
            found.add((pointer, op))
            assert "i64" in types, f"{kernel}-{layout}: a {op} of {pointer} has {types} offsets"
    missing = _ACTIVATION_ACCESSES[kernel] - found
    assert not missing, f"{kernel}-{layout}: not found in the TTIR: {missing}"
    row_variables = {"offs_m", "offs"}
    if kernel in ("bn-stats", "bn-bwd-reduce"):
        row_variables.add("row0")  # the row reductions walk their rows from row0 on
    if layout == "nchw":
        row_variables |= {"n", "hw"}
    assert_int64(integer_arith_types(ttir, ("offs_m", "row0", "offs", "n", "hw")), row_variables,
                 f"{kernel}-{layout}")
