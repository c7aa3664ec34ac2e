"""BatchNorm kernels: statistics, scale/shift + residual + ReLU forward, fused backward.

Every kernel sees an activation as a matrix [M, C] with M = N*H*W rows, tiled
[BLOCK_M, BLOCK_C]. Element (m, c) lives at ``m*C + c`` for channels_last (NHWC, the fast layout,
coalesced along C) and at ``(n*C + c)*HW + hw`` for contiguous NCHW (``m = n*HW + hw``), chosen by
the CHANNELS_LAST constexpr. Offsets are int64: N*C*H*W may pass 2^31.

Statistics (F1 when fed by the convolution epilogue, see conv.py) are two-level: each program
reduces its rows to a (mean, M2) pair per channel, merging tiles with Chan's parallel update (no
sum-of-squares cancellation), and :func:`_bn_stats_finalize_kernel` merges the partials in fp32.
Partials instead of atomics keep the result deterministic and autotuning harmless.

Backward (B1) is two passes: pass 1 masks dy with the ReLU (from the saved y), writes dresidual
and reduces dbeta = sum g and sum g*(z - mean) per channel; pass 2 writes dz (reading g back from
dresidual when it exists: one tensor instead of dy and y). With running statistics (eval) dz needs
no reduction, so pass 1 writes it directly and pass 2 is skipped.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusedres.kernels._launch import (arch_configs, cdiv, cfg, compile_options, device_arch,
                                      interpreted_arch, interpreting, launch,
                                      multiprocessor_count, new_output, on_tensor_device,
                                      row_bucket)


# -- kernels ---------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(offs_m, offs_c, C, HW, CHANNELS_LAST: tl.constexpr):
    """int64 element offsets [BLOCK_M, BLOCK_C] of rows offs_m (int64) and channels offs_c."""
    if CHANNELS_LAST:
        offs = offs_m[:, None] * C + offs_c[None, :]
    else:
        n = offs_m // HW
        hw = offs_m - n * HW
        offs = (n * C)[:, None] * HW + offs_c[None, :].to(tl.int64) * HW + hw[:, None]
    return offs


@triton.jit
def _bn_stats_partial_kernel(
    z_ptr,          # *T    z [N, C, H, W]: NHWC or contiguous NCHW (CHANNELS_LAST)
    pmean_ptr,      # *fp32 [P, C] out: mean of the rows of program p (row-major, stride C)
    pm2_ptr,        # *fp32 [P, C] out: sum of squared deviations from that mean
    M, C, HW,       # rows N*H*W, channels, H*W
    ROWS_PER_PROG,  # program p reduces rows [p*ROWS_PER_PROG, (p+1)*ROWS_PER_PROG); % BLOCK_M == 0
    CHANNELS_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    row0 = pid_p.to(tl.int64) * ROWS_PER_PROG
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = 0.0
    for r in range(0, ROWS_PER_PROG, BLOCK_M):
        offs_m = row0 + r + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask = mask_m[:, None] & mask_c[None, :]
        x = tl.load(z_ptr + _tile_offsets(offs_m, offs_c, C, HW, CHANNELS_LAST), mask=mask,
                    other=0.0).to(tl.float32)
        # Centre each tile on its own mean, then merge (Chan et al.): exact up to rounding even
        # when |mean| >> std, where sum/sum-of-squares would cancel.
        tile_count = tl.sum(mask_m.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(tile_count, 1.0)
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        new_count = count + tile_count
        w = tile_count / tl.maximum(new_count, 1.0)
        delta = tile_mean - mean
        mean += delta * w
        m2 += tile_m2 + delta * delta * count * w
        count = new_count
    out = pid_p.to(tl.int64) * C + offs_c
    tl.store(pmean_ptr + out, mean, mask=mask_c)
    tl.store(pm2_ptr + out, m2, mask=mask_c)


@triton.jit
def _bn_stats_finalize_kernel(
    pmean_ptr,      # *fp32 [P, C]: per-partial means (stride C)
    pm2_ptr,        # *fp32 [P, C]: per-partial sums of squared deviations
    mean_ptr,       # *fp32 [C] out: batch mean ([S, C] chunk means with PARTIAL)
    var_ptr,        # *fp32 [C] out: biased batch variance ([S, C] chunk M2 sums with PARTIAL)
    gamma_ptr,      # *fp32 [C]: BN weight (read when HAS_AFFINE)
    beta_ptr,       # *fp32 [C]: BN bias (read when HAS_AFFINE)
    invstd_ptr,     # *fp32 [C] out: 1/sqrt(var + eps) (HAS_AFFINE)
    scale_ptr,      # *fp32 [C] out: gamma*invstd (HAS_AFFINE)
    shift_ptr,      # *fp32 [C] out: beta - mean*scale (HAS_AFFINE)
    running_mean_ptr,  # *T [C] in/out: nn.BatchNorm2d's running mean (UPDATE_RUNNING)
    running_var_ptr,   # *T [C] in/out: its running (unbiased) variance (UPDATE_RUNNING)
    counter_ptr,    # *int64 []: num_batches_tracked, already counting this batch (CUMULATIVE)
    P, C, M,        # partials, channels, rows of the whole batch
    ROWS,           # rows per partial: partial p covers min(ROWS, M - p*ROWS) rows
    P_CHUNK,        # partials merged per program along axis 1 (P when there is one chunk)
    eps,            # BN epsilon (HAS_AFFINE)
    momentum,       # the running statistics' update factor (UPDATE_RUNNING, not CUMULATIVE)
    HAS_AFFINE: tl.constexpr,
    PARTIAL: tl.constexpr,  # write each chunk's (mean, M2), the input of a second finalize
    UPDATE_RUNNING: tl.constexpr,  # lerp the running statistics towards this batch's
    CUMULATIVE: tl.constexpr,  # momentum=None: the factor is 1/num_batches_tracked
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    chunk = tl.program_id(1)
    p_begin = chunk * P_CHUNK
    p_end = tl.minimum(p_begin + P_CHUNK, P)
    rows = tl.minimum(M - p_begin.to(tl.int64) * ROWS,
                      (p_end - p_begin).to(tl.int64) * ROWS).to(tl.float32)
    # Two passes over the chunk's partials: its mean first, then M2 = sum(M2_p + n_p*(mean_p -
    # mean)^2). A chunk is at most a few BLOCK_P tiles, so re-reading them costs nothing.
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < p_end)[:, None] & mask_c[None, :]
        cnt = tl.minimum(M - offs_p.to(tl.int64) * ROWS, ROWS).to(tl.float32)
        pm = tl.load(pmean_ptr + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :], mask=mask,
                     other=0.0)
        total += tl.sum(pm * cnt[:, None], axis=0)
    mean = total / rows
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < p_end)[:, None] & mask_c[None, :]
        cnt = tl.minimum(M - offs_p.to(tl.int64) * ROWS, ROWS).to(tl.float32)
        offs = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
        pm = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        pm2 = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        d = pm - mean[None, :]
        m2 += tl.sum(tl.where(mask, pm2 + cnt[:, None] * d * d, 0.0), axis=0)
    if PARTIAL:
        tl.store(mean_ptr + chunk * C + offs_c, mean, mask=mask_c)
        tl.store(var_ptr + chunk * C + offs_c, m2, mask=mask_c)
    else:
        var = m2 / rows
        tl.store(mean_ptr + offs_c, mean, mask=mask_c)
        tl.store(var_ptr + offs_c, var, mask=mask_c)
        if HAS_AFFINE:
            invstd = 1.0 / tl.sqrt_rn(var + eps)
            scale = tl.load(gamma_ptr + offs_c, mask=mask_c) * invstd
            shift = tl.load(beta_ptr + offs_c, mask=mask_c) - mean * scale
            tl.store(invstd_ptr + offs_c, invstd, mask=mask_c)
            tl.store(scale_ptr + offs_c, scale, mask=mask_c)
            tl.store(shift_ptr + offs_c, shift, mask=mask_c)
        if UPDATE_RUNNING:
            # nn.BatchNorm2d's update, read and written in the buffers' own dtype with fp32
            # math; the counter is read here, on the device, so no host sync is needed.
            if CUMULATIVE:
                factor = 1.0 / tl.load(counter_ptr).to(tl.float32)
            else:
                factor = momentum
            unbiased = var * (rows / (rows - 1.0))
            r_mean = tl.load(running_mean_ptr + offs_c, mask=mask_c).to(tl.float32)
            r_var = tl.load(running_var_ptr + offs_c, mask=mask_c).to(tl.float32)
            tl.store(running_mean_ptr + offs_c, r_mean + factor * (mean - r_mean), mask=mask_c)
            tl.store(running_var_ptr + offs_c, r_var + factor * (unbiased - r_var), mask=mask_c)


@triton.jit
def _bn_act_fwd_kernel(
    z_ptr,          # *T    z [N, C, H, W] (layout: CHANNELS_LAST)
    res_ptr,        # *T    residual, same shape and layout (read when HAS_RESIDUAL)
    y_ptr,          # *T    y out, same shape and layout
    scale_ptr,      # *fp32 [C]
    shift_ptr,      # *fp32 [C]
    M, C, HW,       # rows N*H*W, channels, H*W
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    offs = _tile_offsets(offs_m, offs_c, C, HW, CHANNELS_LAST)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c)
    v = tl.load(z_ptr + offs, mask=mask).to(tl.float32) * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        v += tl.load(res_ptr + offs, mask=mask).to(tl.float32)
    if RELU:
        # NaN stays NaN, as in torch.relu (the default lets the hardware max drop it).
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_grad(dy, y):
    """g = dy masked by the ReLU, as the reference writes it (y <= 0 -> 0; NaN y passes dy)."""
    return tl.where(y <= 0.0, 0.0, dy)


@triton.jit
def _bn_act_bwd_reduce_kernel(
    dy_ptr,         # *T    dy [N, C, H, W] (layout: CHANNELS_LAST, as every tensor argument)
    y_ptr,          # *T    saved output y (read when RELU: the mask)
    z_ptr,          # *T    saved conv output z (read when NEED_DWEIGHT)
    dres_ptr,       # *T    dresidual out = g (written when HAS_RESIDUAL)
    dz_ptr,         # *T    dz out (written when WRITE_DZ: running statistics, dz = gamma*invstd*g)
    mean_ptr,       # *fp32 [C]: mean used in forward
    invstd_ptr,     # *fp32 [C]: invstd used in forward (WRITE_DZ)
    weight_ptr,     # *fp32 [C]: gamma (WRITE_DZ)
    psum_g_ptr,     # *fp32 [P, C] out: per-program sum of g
    psum_gz_ptr,    # *fp32 [P, C] out: per-program sum of g*(z - mean) (NEED_DWEIGHT)
    M, C, HW,       # rows N*H*W, channels, H*W
    ROWS_PER_PROG,  # rows per program, a multiple of BLOCK_M
    RELU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NEED_DWEIGHT: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    if WRITE_DZ:
        coef = (tl.load(weight_ptr + offs_c, mask=mask_c)
                * tl.load(invstd_ptr + offs_c, mask=mask_c))
    row0 = pid_p.to(tl.int64) * ROWS_PER_PROG
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gz = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(0, ROWS_PER_PROG, BLOCK_M):
        offs_m = row0 + r + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_c[None, :]
        offs = _tile_offsets(offs_m, offs_c, C, HW, CHANNELS_LAST)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            g = _relu_grad(g, tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        if HAS_RESIDUAL:
            tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)
        acc_g += tl.sum(g, axis=0)
        if NEED_DWEIGHT:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc_gz += tl.sum(tl.where(mask, g * (z - mean[None, :]), 0.0), axis=0)
        if WRITE_DZ:
            tl.store(dz_ptr + offs, (g * coef[None, :]).to(dz_ptr.dtype.element_ty), mask=mask)
    out = pid_p.to(tl.int64) * C + offs_c
    tl.store(psum_g_ptr + out, acc_g, mask=mask_c)
    if NEED_DWEIGHT:
        tl.store(psum_gz_ptr + out, acc_gz, mask=mask_c)


@triton.jit
def _bn_bwd_finalize_kernel(
    psum_g_ptr,     # *fp32 [P, C]: partial sums of g
    psum_gz_ptr,    # *fp32 [P, C]: partial sums of g*(z - mean) (NEED_DWEIGHT)
    invstd_ptr,     # *fp32 [C]
    dbias_ptr,      # *fp32 [C] out: sum g
    dweight_ptr,    # *fp32 [C] out: invstd * sum g*(z - mean) (NEED_DWEIGHT; else zeros)
    P, C,           # partials, channels
    NEED_DWEIGHT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gz = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < P)[:, None] & mask_c[None, :]
        offs = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
        acc_g += tl.sum(tl.load(psum_g_ptr + offs, mask=mask, other=0.0), axis=0)
        if NEED_DWEIGHT:
            acc_gz += tl.sum(tl.load(psum_gz_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(dbias_ptr + offs_c, acc_g, mask=mask_c)
    if NEED_DWEIGHT:
        acc_gz *= tl.load(invstd_ptr + offs_c, mask=mask_c)
    # Zeros without NEED_DWEIGHT: every element of the op's output is defined, run to run.
    tl.store(dweight_ptr + offs_c, acc_gz, mask=mask_c)


@triton.jit
def _bn_act_bwd_dz_kernel(
    dy_ptr,         # *T    dy [N, C, H, W] (layout: CHANNELS_LAST, as every tensor argument)
    y_ptr,          # *T    saved output y (RELU and not G_FROM_DRES)
    g_ptr,          # *T    dresidual = masked dy from pass 1 (read when G_FROM_DRES)
    z_ptr,          # *T    saved conv output z
    dz_ptr,         # *T    dz out
    mean_ptr,       # *fp32 [C]
    invstd_ptr,     # *fp32 [C]
    weight_ptr,     # *fp32 [C]: gamma
    dbias_ptr,      # *fp32 [C]: sum g (from the finalize)
    dweight_ptr,    # *fp32 [C]: sum g*xhat (from the finalize)
    M, C, HW,       # rows N*H*W (the BN count), channels, H*W
    RELU: tl.constexpr,
    G_FROM_DRES: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    offs = _tile_offsets(offs_m, offs_c, C, HW, CHANNELS_LAST)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c)
    coef = tl.load(weight_ptr + offs_c, mask=mask_c) * invstd
    mean_dbias = tl.load(dbias_ptr + offs_c, mask=mask_c) / M
    mean_dweight = tl.load(dweight_ptr + offs_c, mask=mask_c) / M
    if G_FROM_DRES:
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    else:
        g = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
        if RELU:
            g = _relu_grad(g, tl.load(y_ptr + offs, mask=mask).to(tl.float32))
    xhat = (tl.load(z_ptr + offs, mask=mask).to(tl.float32) - mean[None, :]) * invstd[None, :]
    dz = coef[None, :] * (g - mean_dbias[None, :] - xhat * mean_dweight[None, :])
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# -- configs ---------------------------------------------------------------------------------

# Elementwise kernels (fwd, dz) are autotuned: they write only their outputs, so benchmarking
# re-runs are harmless. 16-byte vectors along C want BLOCK_C >= 8 fp16 lanes; rows fill the
# rest of a ~4-8K element tile. sm_90 has more bandwidth per SM: larger tiles, more warps.
ELEMENTWISE_CONFIGS = {
    80: [cfg(4, 1, BLOCK_M=64, BLOCK_C=64), cfg(4, 1, BLOCK_M=128, BLOCK_C=32),
         cfg(8, 1, BLOCK_M=128, BLOCK_C=64)],
    90: [cfg(4, 1, BLOCK_M=64, BLOCK_C=64), cfg(8, 1, BLOCK_M=128, BLOCK_C=64),
         cfg(8, 1, BLOCK_M=64, BLOCK_C=128)],
}
# Row-reductions (stats, bwd pass 1) use one config per arch: their partial buffers are sized by
# the rows per program, which must be known before launch, so they are not autotuned. On sm_80
# too 128x64 tiles with 8 warps: 64x64 ones spill a few bytes (4 warps: the fp32 NCHW
# statistics; 8 warps: the fp32 eval backward) in scripts/check_triton_compile.py. On sm_90,
# triton 3.7 and 3.8 hold the fp16 channels_last backward reduction to 80 registers (three
# blocks per SM) and spill 8 bytes; maxnreg (see the conv tables) stops that.
REDUCE_CONFIGS = {80: [cfg(8, 1, BLOCK_M=128, BLOCK_C=64)],
                  90: [cfg(8, 1, maxnreg=255, BLOCK_M=128, BLOCK_C=64)]}
# The finalize runs one program per channel tile and chunk of partials; the conv epilogue writes
# one partial per 64-128 rows (6272 for ResNet-50's stem at batch 64), so wide P tiles keep
# the serial loop of each program short.
FINALIZE_CONFIGS = {80: [cfg(8, 1, BLOCK_P=256, BLOCK_C=32)],
                    90: [cfg(8, 1, BLOCK_P=256, BLOCK_C=32)]}
# Under the interpreter every program is a Python step: few, large tiles run fastest.
_INTERP = cfg(1, 1, BLOCK_M=64, BLOCK_C=16)
_INTERP_FINALIZE = cfg(1, 1, BLOCK_P=16, BLOCK_C=16)
# Rows per reduction program under the interpreter (fewer programs = faster); on a GPU the rows
# are spread so that about _PROGRAMS_PER_SM programs per SM run.
_INTERP_ROWS = 1024
_PROGRAMS_PER_SM = 4
# BLOCK_P tiles of partials one statistics-finalize program merges before a second level takes
# over: each tile is a dependent load, so a program's latency grows with this.
_FINALIZE_TILES_PER_PROGRAM = 4


def _fixed_config(table: dict, interp_config: triton.Config,
                  device: torch.device) -> triton.Config:
    """The one config of a table that is not autotuned, for ``device``'s arch; under the
    interpreter its own small config, or FUSEDRES_INTERPRET_ARCH's."""
    if interpreting():
        arch = interpreted_arch()
        return interp_config if arch is None else arch_configs(table, arch)[0]
    return arch_configs(table, device_arch(device))[0]


def _reduce_config(device: torch.device) -> triton.Config:
    return _fixed_config(REDUCE_CONFIGS, _INTERP, device)


def _finalize_config(device: torch.device) -> triton.Config:
    return _fixed_config(FINALIZE_CONFIGS, _INTERP_FINALIZE, device)


def _rows_per_program(M: int, c_blocks: int, block_m: int, device: torch.device) -> int:
    """Rows each reduction program covers: enough programs to fill the GPU, no more."""
    if interpreting():
        target = _INTERP_ROWS
    else:
        sms = multiprocessor_count(device)
        programs = max(1, _PROGRAMS_PER_SM * sms // c_blocks)
        target = cdiv(M, programs)
    return max(block_m, cdiv(target, block_m) * block_m)


# -- launchers -------------------------------------------------------------------------------


def _layout(z: torch.Tensor) -> tuple[bool, torch.memory_format]:
    """(CHANNELS_LAST flag, memory format) the kernels use for tensors shaped like ``z``."""
    if z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous():
        return True, torch.channels_last
    return False, torch.contiguous_format


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` in the dense layout ``fmt`` (no copy when it already is)."""
    return t.contiguous(memory_format=fmt)


def _new_like(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return new_output(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)


def _check(z: torch.Tensor) -> None:
    if z.dim() != 4:
        raise ValueError(f"triton BN kernels take [N, C, H, W] tensors, got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend supports float16, bfloat16 and float32, got "
                        f"{z.dtype}; use backend='eager' (or 'cpu') for float64")


@on_tensor_device
def stats_from_partials(pmean: torch.Tensor, pm2: torch.Tensor, M: int, rows: int,
                        gamma: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None,
                        eps: float = 0.0, running_mean: Optional[torch.Tensor] = None,
                        running_var: Optional[torch.Tensor] = None,
                        counter: Optional[torch.Tensor] = None, momentum: float = 0.0):
    """Merges per-tile (mean, M2) partials into batch statistics (the finalize of F1), and
    updates nn.BatchNorm2d's running statistics in the same launch.

    The launch has a fixed config (never autotuned), so the in-place update runs exactly once.

    Args:
        pmean, pm2: [P, C] fp32, partial p covering rows [p*rows, min((p+1)*rows, M)).
        M: rows in the batch (N*H*W).
        gamma, beta: [C] fp32, or None: also return invstd, scale, shift.
        eps: BatchNorm's epsilon (with gamma).
        running_mean, running_var: [C] (any float dtype), or None: lerped in place towards the
            batch mean and unbiased variance by ``momentum``, or by ``1/counter`` when
            ``counter`` is given.
        counter: [] int64 num_batches_tracked, already incremented for this batch, or None.
        momentum: the update factor without ``counter``.

    Returns:
        [2, C] fp32 rows (mean, var), or [5, C] rows (mean, var, invstd, scale, shift) when
        gamma is given: one tensor, so that callers may unpack it or keep it whole.
    """
    P, C = pmean.shape
    dev = pmean.device
    has_affine = gamma is not None
    # rows: mean, var, invstd, scale, shift (the last three written only with HAS_AFFINE).
    out = new_output((5 if has_affine else 2, C), dtype=torch.float32, device=dev)
    if has_affine:
        gamma, beta = gamma.float().contiguous(), beta.float().contiguous()
        invstd, scale, shift = out[2], out[3], out[4]
    else:
        gamma = beta = invstd = scale = shift = out[0]  # unused: HAS_AFFINE is off
    conf = _finalize_config(dev)
    launch_conf = dict(**conf.kwargs, **compile_options(conf))
    c_blocks = cdiv(C, conf.kwargs["BLOCK_C"])
    p_chunk = _FINALIZE_TILES_PER_PROGRAM * conf.kwargs["BLOCK_P"]
    if P > p_chunk:
        # The convolution's epilogue leaves one partial per 64-128 rows: 25088 for ResNet-50's
        # stem at batch 256. One program per channel tile would walk them all serially, so
        # first merge chunks of p_chunk partials in parallel, one (mean, M2) pair per chunk.
        chunks = new_output((2, cdiv(P, p_chunk), C), dtype=torch.float32, device=dev)
        _bn_stats_finalize_kernel[(c_blocks, chunks.shape[1])](
            pmean, pm2, chunks[0], chunks[1], gamma, beta, invstd, scale, shift, pmean, pmean,
            pmean, P, C, M, rows, p_chunk, eps, 0.0, HAS_AFFINE=False, PARTIAL=True,
            UPDATE_RUNNING=False, CUMULATIVE=False, **launch_conf)
        pmean, pm2, P, rows = chunks[0], chunks[1], chunks.shape[1], rows * p_chunk
    update = running_mean is not None
    if update and M < 2:
        raise ValueError("stats_from_partials: the unbiased variance needs at least 2 rows")
    _bn_stats_finalize_kernel[(c_blocks, 1)](
        pmean, pm2, out[0], out[1], gamma, beta, invstd, scale, shift,
        running_mean if update else out[0], running_var if update else out[0],
        counter if counter is not None else pmean, P, C, M, rows, P, eps, float(momentum),
        HAS_AFFINE=has_affine, PARTIAL=False, UPDATE_RUNNING=update,
        CUMULATIVE=counter is not None, **launch_conf)
    return out


@on_tensor_device
def bn_stats(z: torch.Tensor):
    """Per-channel batch mean and biased variance.

    Args:
        z: [N, C, H, W] fp16/bf16/fp32, channels_last (fast) or contiguous NCHW (other layouts
            are copied to NCHW first).

    Returns:
        [2, C] float32: rows mean and var (unpacks as ``mean, var = bn_stats(z)``).
    """
    _check(z)
    cl, fmt = _layout(z)
    z = _dense(z, fmt)
    N, C, H, W = z.shape
    M = N * H * W
    conf = _reduce_config(z.device)
    bm, bc = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_C"]
    c_blocks = cdiv(C, bc)
    rows = _rows_per_program(M, c_blocks, bm, z.device)
    P = cdiv(M, rows)
    partial = new_output((2, P, C), dtype=torch.float32, device=z.device)
    _bn_stats_partial_kernel[(P, c_blocks)](
        z, partial[0], partial[1], M, C, H * W, rows, CHANNELS_LAST=cl, BLOCK_M=bm, BLOCK_C=bc,
        **compile_options(conf))
    return stats_from_partials(partial[0], partial[1], M, rows)


@on_tensor_device
def bn_act_fwd(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """``y = act(z*scale + shift + residual)`` in one pass (F2).

    Args:
        z: [N, C, H, W]; scale, shift: [C] float32; residual: like z, or None.

    Returns:
        y: [N, C, H, W] in z's dtype and memory format.
    """
    _check(z)
    cl, fmt = _layout(z)
    z = _dense(z, fmt)
    N, C, H, W = z.shape
    M = N * H * W
    y = _new_like(z, fmt)
    res = _dense(residual.to(z.dtype), fmt) if residual is not None else z
    launch(_bn_act_fwd_kernel,
           lambda m: (cdiv(M, m["BLOCK_M"]), cdiv(C, m["BLOCK_C"])),
           (z, res, y, scale.float().contiguous(), shift.float().contiguous(), M, C, H * W),
           table=ELEMENTWISE_CONFIGS, key=dict(M=row_bucket(M), C=C), interp_config=_INTERP,
           device=z.device, HAS_RESIDUAL=residual is not None, RELU=relu, CHANNELS_LAST=cl)
    return y


def bn_act_bwd(dy: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor], mean: torch.Tensor,
               invstd: torch.Tensor, weight: torch.Tensor, relu: bool, has_residual: bool,
               training: bool, need_dweight: bool = True):
    """Backward of :func:`bn_act_fwd` with batch (training) or running (eval) statistics (B1).

    Args:
        dy, y: [N, C, H, W] output gradient and saved output (any dense layout; converted to z's).
        z: [N, C, H, W] saved conv output; may be None only when ``need_dweight`` is False and
            not ``training``.
        mean, invstd, weight: [C] statistics used in forward and gamma (float32).
        relu, has_residual, training: the unit's switches.
        need_dweight: compute dweight (always done in training, where dz needs it).

    Returns:
        (dz, dweight or None, dbias, dresidual or None): dz and dresidual [N, C, H, W] in z's
        (or dy's) dtype and memory format; dweight, dbias [C] float32.
    """
    need_dweight = need_dweight or training
    dz, sums, dres = bn_act_bwd_packed(dy, y, z, mean, invstd, weight, relu, has_residual,
                                       training, need_dweight)
    return dz, (sums[1] if need_dweight else None), sums[0], dres


@on_tensor_device
def bn_act_bwd_packed(dy: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor],
                      mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor, relu: bool,
                      has_residual: bool, training: bool, need_dweight: bool = True):
    """:func:`bn_act_bwd` with the per-channel sums in one tensor (the registered op's form).

    Returns:
        (dz, sums [2, C] float32 with rows dbias and dweight (zeros unless ``need_dweight`` or
        ``training``), dresidual or None).
    """
    ref = z if z is not None else dy
    _check(ref)
    need_dweight = need_dweight or training
    if need_dweight and z is None:
        raise ValueError("bn_act_bwd: z is required for dweight and for batch statistics")
    cl, fmt = _layout(ref)
    dy = _dense(dy.to(ref.dtype), fmt)
    y = _dense(y, fmt) if relu else dy  # dy: a placeholder the kernels never read
    z = _dense(z, fmt) if z is not None else dy
    N, C, H, W = dy.shape
    M = N * H * W
    dev = dy.device
    mean, invstd, weight = (t.float().contiguous() for t in (mean, invstd, weight))
    dz = _new_like(dy, fmt)
    dres = _new_like(dy, fmt) if has_residual else dz

    conf = _reduce_config(dev)
    bm, bc = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_C"]
    c_blocks = cdiv(C, bc)
    rows = _rows_per_program(M, c_blocks, bm, dev)
    P = cdiv(M, rows)
    partial = new_output((2, P, C), dtype=torch.float32, device=dev)
    _bn_act_bwd_reduce_kernel[(P, c_blocks)](
        dy, y, z, dres, dz, mean, invstd, weight, partial[0], partial[1], M, C, H * W, rows,
        RELU=relu, HAS_RESIDUAL=has_residual, NEED_DWEIGHT=need_dweight, WRITE_DZ=not training,
        CHANNELS_LAST=cl, BLOCK_M=bm, BLOCK_C=bc, **compile_options(conf))

    sums = new_output((2, C), dtype=torch.float32, device=dev)
    fconf = _finalize_config(dev)
    _bn_bwd_finalize_kernel[(cdiv(C, fconf.kwargs["BLOCK_C"]),)](
        partial[0], partial[1], invstd, sums[0], sums[1], P, C, NEED_DWEIGHT=need_dweight,
        **fconf.kwargs, **compile_options(fconf))

    if training:
        launch(_bn_act_bwd_dz_kernel,
               lambda m: (cdiv(M, m["BLOCK_M"]), cdiv(C, m["BLOCK_C"])),
               (dy, y, dres, z, dz, mean, invstd, weight, sums[0], sums[1], M, C, H * W),
               table=ELEMENTWISE_CONFIGS, key=dict(M=row_bucket(M), C=C), interp_config=_INTERP,
               device=dev, RELU=relu, G_FROM_DRES=has_residual, CHANNELS_LAST=cl)
    return dz, sums, (dres if has_residual else None)
