"""Implicit-GEMM NHWC convolution with fused BatchNorm epilogues.

The convolution is a GEMM per group: ``out[m, co] = sum_k A[m, k] * B[k, co]`` with
m = (n, oh, ow) over the N*Ho*Wo output pixels, k = (r, s, ci) over the filter taps and the
group's input channels, ``A[m, k] = x[n, oh*stride - pad + r*dil, ow*stride - pad + s*dil, ci]``
(zero outside the image; never materialised: the kernel gathers it while loading) and
``B[k, co] = weight[co, ci, r, s]``. Tiles [BLOCK_M, BLOCK_N] accumulate in fp32 with ``tl.dot``
(tensor cores) over BLOCK_K slices of k.

How k is walked (constexpr):

- default: tap by tap, BLOCK_K input channels at a time; the tap (r, s) is a scalar per step, so
  the gather costs one [BLOCK_M] bounds check per step (channels a multiple of 64: every ResNet
  convolution except the stem and ResNeXt's narrow groups).
- FLAT_K: k runs densely over (r, s, ci) and is decoded per element: no padding of k to
  BLOCK_K per tap, which is what small channel counts (the 3-channel stem, 4-channel groups) need.
- POINTWISE: a 1x1 stride-1 unpadded convolution is a plain GEMM on x viewed as [M, Cin].

Prologue (PROLOGUE, F3): x is z of the previous unit, and the A operand is
``relu(x*in_scale + in_shift)`` (that unit's BatchNorm + ReLU, per input channel), computed
while loading it, so the previous unit's y is never written. Out-of-image taps are zeros of y.

Epilogue (constexpr flags): AFFINE (eval BatchNorm: ``*scale + shift`` per channel, F2),
HAS_RESIDUAL (+ residual), RELU, STATS (F1: each [BLOCK_M] row tile writes the per-channel mean
and M2 of the values it stored; :func:`fusedres.kernels.bn.stats_from_partials` merges them).

Weights reach the kernel channels_last (k contiguous: vector loads through cp.async), converted
at most once per weight version by :func:`prepared_weight`.

Backward is not here: see fusedres/backends/triton.py for why it goes to ATen.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple, Optional

import torch
import torch.utils.weak
import triton
import triton.language as tl

from fusedres.backend import contents_key, conv_output_hw
from fusedres.kernels._launch import (cdiv, cfg, interpreting, launch, new_output,
                                      on_tensor_device, row_bucket)


@triton.jit
def _conv_fwd_kernel(
    x_ptr,          # *T    input [N, H, W, Cin] contiguous (= channels_last [N, Cin, H, W])
    w_ptr,          # *T    weight [Cout, CIN_G, KH, KW], any strides (channels_last: k contiguous)
    out_ptr,        # *T    output [N, Ho, Wo, Cout] contiguous (channels_last)
    res_ptr,        # *T    residual, like the output (read when HAS_RESIDUAL)
    scale_ptr,      # *fp32 [Cout] (AFFINE)
    shift_ptr,      # *fp32 [Cout] (AFFINE)
    in_scale_ptr,   # *fp32 [Cin] the previous unit's BN scale, applied to x (PROLOGUE)
    in_shift_ptr,   # *fp32 [Cin] the previous unit's BN shift, applied to x (PROLOGUE)
    pmean_ptr,      # *fp32 [>= cdiv(M, BLOCK_M), Cout] out: mean of each row tile's output (STATS)
    pm2_ptr,        # *fp32 like pmean_ptr, out: each row tile's sum of squared deviations (STATS)
    M,              # output rows N*Ho*Wo
    H, W, Cin,      # input height, width, channels (all groups)
    Ho, Wo, Cout,   # output height, width, channels (all groups)
    CIN_G, COUT_G,  # channels per group
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    w_stride_co, w_stride_ci, w_stride_r, w_stride_s,  # weight strides (elements)
    KH: tl.constexpr,
    KW: tl.constexpr,
    FLAT_K: tl.constexpr,
    POINTWISE: tl.constexpr,
    PROLOGUE: tl.constexpr,  # the operand is relu(x*in_scale + in_shift), not x (F3)
    AFFINE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 operands (16-bit ones ignore it)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Channel tiles vary fastest: the programs that share a row tile of x run together, so x
    # comes from DRAM once and from L2 for the other channel tiles (the weights stay in L2).
    num_n = tl.cdiv(COUT_G, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) - pid_m * num_n
    group = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT_G
    co = group * COUT_G + offs_n
    cin0 = group * CIN_G

    if POINTWISE:
        a_row = offs_m * Cin + cin0
    else:
        # Output pixel -> image and the top-left input pixel of its receptive field. Per-image
        # offsets fit in int32 (the launcher checks H*W*Cin < 2^31); the image base is int64.
        n_img = offs_m // (Ho * Wo)
        rem = (offs_m - n_img * (Ho * Wo)).to(tl.int32)
        oh = rem // Wo
        ow = rem - oh * Wo
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        img_base = n_img * H * W * Cin + cin0

    if FLAT_K:
        K = KH * KW * CIN_G
        num_k = tl.cdiv(K, BLOCK_K)
    else:
        ci_tiles = tl.cdiv(CIN_G, BLOCK_K)
        num_k = KH * KW * ci_tiles

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(num_k):
        if FLAT_K:
            k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = k < K
            rs = k // CIN_G
            ci = k - rs * CIN_G
            r = rs // KW
            s = rs - r * KW
            w_k = r * w_stride_r + s * w_stride_s + ci * w_stride_ci
            if POINTWISE:
                a_mask = mask_m[:, None] & mask_k[None, :]
                a_ptrs = x_ptr + a_row[:, None] + ci[None, :]
            else:
                ih = ih0[:, None] + (r * dil_h)[None, :]
                iw = iw0[:, None] + (s * dil_w)[None, :]
                a_mask = (mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H)
                          & (iw >= 0) & (iw < W))
                a_ptrs = x_ptr + img_base[:, None] + ((ih * W + iw) * Cin + ci[None, :])
        else:
            rs = kt // ci_tiles
            ci = (kt - rs * ci_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = ci < CIN_G
            r = rs // KW
            s = rs - r * KW
            w_k = r * w_stride_r + s * w_stride_s + ci * w_stride_ci
            if POINTWISE:
                a_mask = mask_m[:, None] & mask_k[None, :]
                a_ptrs = x_ptr + a_row[:, None] + ci[None, :]
            else:
                ih = ih0 + r * dil_h
                iw = iw0 + s * dil_w
                valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_mask = valid[:, None] & mask_k[None, :]
                a_ptrs = x_ptr + (img_base + (ih * W + iw) * Cin)[:, None] + ci[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if PROLOGUE:
            # F3: x is z of the previous unit; rebuild its y = relu(z*scale + shift) as that
            # unit would have stored it (fp32 math, rounded once to the storage dtype, which is
            # also the dtype tensor cores take). The zero padding belongs to y: taps outside the
            # image (and rows and k past the ends) are 0 after the prologue, not relu(shift).
            in_scale = tl.load(in_scale_ptr + cin0 + ci, mask=mask_k, other=0.0)
            in_shift = tl.load(in_shift_ptr + cin0 + ci, mask=mask_k, other=0.0)
            y_in = tl.maximum(a.to(tl.float32) * in_scale[None, :] + in_shift[None, :], 0.0)
            a = tl.where(a_mask, y_in, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + w_k[:, None] + (co * w_stride_co)[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # -- epilogue: everything per output element happens here, before the single store.
    mask = mask_m[:, None] & mask_n[None, :]
    out_offs = offs_m[:, None] * Cout + co[None, :]
    if AFFINE:
        scale = tl.load(scale_ptr + co, mask=mask_n)
        shift = tl.load(shift_ptr + co, mask=mask_n)
        acc = acc * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        # NaN stays NaN, as in torch.relu (the default lets the hardware max drop it).
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offs, out, mask=mask)
    if STATS:
        # Statistics of the stored (rounded) values, so they describe exactly the z that
        # bn_act_fwd and the backward read.
        v = out.to(tl.float32)
        count = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_mean = tl.sum(tl.where(mask, v, 0.0), axis=0) / count
        d = tl.where(mask, v - tile_mean[None, :], 0.0)
        part = pid_m.to(tl.int64) * Cout + co
        tl.store(pmean_ptr + part, tile_mean, mask=mask_n)
        tl.store(pm2_ptr + part, tl.sum(d * d, axis=0), mask=mask_n)


# -- configs ---------------------------------------------------------------------------------

# One pair of tables (tap by tap or POINTWISE; FLAT_K) per kind of operand, picked by
# _conv_table: fp16/bf16 and fp32 with TF32 run tl.dot on tensor cores (mma on sm_80, wgmma on
# sm_90); fp32 without TF32 ("ieee") multiplies on the FMA units with the product's operand
# slices in registers, so it takes BLOCK_K = 16. scripts/check_triton_compile.py compiles every
# config of each table for every variant the launcher produces (each prologue, epilogue and
# path) and fails on a spill; the register counts quoted are its worst variant's, triton 3.6
# and 3.9 (weights in either layout, before prepared_weight). ptxas allocates differently
# under each triton version (3.6 and 3.9 checked with every variant, 3.7 and 3.8 with
# --heaviest-epilogues): a tile clean under one can spill under another.
# Spills come in two kinds: tiles too big for 255 registers (fp32 64x64 FLAT_K tiles, ieee tiles
# with BLOCK_K = 32), and a few bytes where ptxas holds a kernel to 128 registers (8 warps: two
# blocks per SM) or fewer for occupancy and spills the rest. Those depend on the whole kernel
# and the version, so only the check can tell; the configs marked maxnreg=255 (the hardware's
# maximum) spilled so under some version, and the explicit cap makes ptxas allocate what the
# kernel needs instead (e.g. 160 registers where it had held 128 and spilled 8 bytes).
# Shared memory per stage is (BLOCK_M + BLOCK_N)*BLOCK_K*itemsize, within the 163 KB (sm_80)
# and 227 KB (sm_90) per block at every config. BLOCK_N = 64 tiles serve the 64-channel layers
# of ResNet's first stage.

# fp16/bf16, the fast path. 128x128 tiles take 8 warps (a 64-register fp32 accumulator per
# thread). sm_80: at most 233 registers; its 64x64 tile takes BLOCK_K = 64 (with 32 and 4 warps
# ptxas spills 4 bytes in the 1x1 statistics epilogue); its 128x128 tile spilled 8 bytes at 128
# registers under triton 3.6 (bf16 1x1 statistics, channels_last weights), so maxnreg. sm_90:
# at most 248; the 128x64 tile takes 8 warps (254 registers with 4).
CONV_CONFIGS = {
    80: [cfg(8, 3, maxnreg=255, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
         cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
         cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
         cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)],
    90: [cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
         cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
         cfg(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
         cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)],
}
# FLAT_K decodes (r, s, ci) per element of the A tile: [BLOCK_M, BLOCK_K] integer tensors that
# need registers of their own, so smaller tiles. Those convolutions (stem, narrow groups) are a
# small share of a ResNet's time. BLOCK_N = 16 is for ResNeXt's narrow groups (4-8 output
# channels per group), where a 64-wide tile would be mostly masked. At most 190 registers
# (sm_80) and 168 (sm_90).
CONV_FLAT_CONFIGS = {
    80: [cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
         cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
         cfg(4, 4, BLOCK_M=64, BLOCK_N=16, BLOCK_K=32)],
    90: [cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
         cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
         cfg(4, 4, BLOCK_M=64, BLOCK_N=16, BLOCK_K=32)],
}
# fp32 with TF32: twice the shared memory per stage, and on sm_80 more registers per mma
# operand. sm_80 runs 8 warps on every tile (4 warps: 254 registers at 64x128, a 4-8 byte
# spill at 64x64), and its 128x64 tile 4 stages (with 2 or 3, 8-16 bytes spill under triton
# 3.6) and maxnreg (triton 3.8 held it to 128 registers); at most 212 registers. sm_90: at
# most 243.
CONV_TF32_CONFIGS = {
    80: [cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
         cfg(8, 4, maxnreg=255, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
         cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)],
    90: [cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
         cfg(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
         cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)],
}
# sm_80 drops the 64x64 FLAT_K tile (255 registers with 4 warps, a spill with 8) and runs its
# 128x64 tile in 2 stages (with 3, 8 bytes spill under triton 3.6); at most 190 registers.
# sm_90 runs the 16-bit table (at most 168).
CONV_TF32_FLAT_CONFIGS = {
    80: [cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
         cfg(4, 4, BLOCK_M=64, BLOCK_N=16, BLOCK_K=32)],
    90: CONV_FLAT_CONFIGS[90],
}
# fp32 without TF32 (the GPU tests' setting): BLOCK_K = 16 keeps the operand slices in
# registers; the 128x64 tile with 8 warps and 2 stages is the one that spills in no variant on
# either arch; every other tap-by-tap tile tried spills a few bytes on sm_90. sm_80's smaller
# tile is 64x32: 64x64 spills 8-24 bytes (triton 3.6 and 3.9, 4 or 8 warps). sm_80's 128x64
# tile takes maxnreg: triton 3.7 held its 1x1 statistics kernels to 128 registers and spilled
# 8 bytes; with it, triton 3.6 allocates up to the full 255 (no spill). On sm_90 maxnreg makes
# that tile spill under 3.9 (8-16 bytes), and without it no version spills.
CONV_IEEE_CONFIGS = {
    80: [cfg(8, 2, maxnreg=255, BLOCK_M=128, BLOCK_N=64, BLOCK_K=16),
         cfg(4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=16)],
    90: [cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=16)],
}
# FLAT_K without TF32 (the stem and narrow groups in the GPU tests' setting, rarely run for
# speed): of the six tiles tried, 64x64 with 4 warps and 3 stages is the one clean on sm_80
# under all four triton versions; on sm_90 each spills under one version or another (8-24
# bytes; maxnreg makes the 128x64 tile spill more), so sm_90 keeps only the narrow tile.
CONV_IEEE_FLAT_CONFIGS = {
    80: [cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16),
         cfg(4, 3, BLOCK_M=64, BLOCK_N=16, BLOCK_K=16)],
    90: [cfg(4, 3, BLOCK_M=64, BLOCK_N=16, BLOCK_K=16)],
}
# The F3 prologue (PROLOGUE) puts a scale, shift, ReLU and cast between the A operand's load and
# the dot, so A goes through registers (mma/wgmma with A from registers) and ptxas allocates the
# kernel differently. Where a prologue variant spilled in scripts/check_triton_compile.py
# (triton 3.9 or 3.6, any epilogue) its operand kind gets a table of its own; the others run
# the base tables. 16-bit: sm_80's 64x128 tile was held to 128 registers and spilled 8 bytes
# (3x3, 3.9), so maxnreg (the 3x3 variants then take 184-187 registers; the 1x1 ones take
# 244-255 with or without it, the statistics one all 255, without a spill); sm_90's 128x128
# BLOCK_K = 64 tile needs more than 255 registers in the 1x1 variants (24 bytes of spill) and
# is dropped.
CONV_PROLOGUE_CONFIGS = {
    80: [CONV_CONFIGS[80][0], CONV_CONFIGS[80][1],
         cfg(4, 4, maxnreg=255, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
         CONV_CONFIGS[80][3]],
    90: CONV_CONFIGS[90][1:],
}
# fp32 with TF32, FLAT_K on sm_80: the narrow tile spilled 8 bytes at 168 registers (1x1 with
# statistics, 3.6); with maxnreg it takes up to 180.
CONV_TF32_FLAT_PROLOGUE_CONFIGS = {
    80: [CONV_TF32_FLAT_CONFIGS[80][0],
         cfg(4, 4, maxnreg=255, BLOCK_M=64, BLOCK_N=16, BLOCK_K=32)],
    90: CONV_TF32_FLAT_CONFIGS[90],
}
# fp32 without TF32. sm_80: the 64x32 tile was held to 96 registers (8 bytes, 3.6); with maxnreg
# it takes up to 214. sm_90: the 128x64 tile spills 8-40 bytes in every form tried (2 or 3
# stages, maxnreg or not, under 3.6 or 3.9), the 64x32 one under 3.9; 64x64 with 4 warps takes
# 168 registers under both. The narrow FLAT_K tile was held to 96 registers (8 bytes, 3.9);
# maxnreg lets it take 181.
CONV_IEEE_PROLOGUE_CONFIGS = {
    80: [CONV_IEEE_CONFIGS[80][0],
         cfg(4, 3, maxnreg=255, BLOCK_M=64, BLOCK_N=32, BLOCK_K=16)],
    90: [cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16)],
}
CONV_IEEE_FLAT_PROLOGUE_CONFIGS = {
    80: CONV_IEEE_FLAT_CONFIGS[80],
    90: [cfg(4, 3, maxnreg=255, BLOCK_M=64, BLOCK_N=16, BLOCK_K=16)],
}
# tl.dot needs every dimension >= 16; small tiles keep the interpreter's numpy work small.
_INTERP = cfg(1, 1, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)
# Channels per group at which FLAT_K stops paying: a multiple of the largest BLOCK_K wastes nothing.
_TAP_ALIGNED = 64


def _conv_allows_tf32() -> bool:
    """Whether fp32 convolutions may use TF32, by the flag cuDNN's convolutions follow.

    Reading the legacy ``torch.backends.cudnn.allow_tf32`` raises once a program has set the
    newer per-operator flags (``torch.backends.cudnn.conv.fp32_precision``) to disagree with
    the RNN ones; then the per-operator flag decides, ``"none"`` deferring to its parents.
    """
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        for flags in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
            precision = getattr(flags, "fp32_precision", "none")
            if precision != "none":
                return precision == "tf32"
        return True


def _conv_table(dtype: torch.dtype, flat_k: bool, precision: str, prologue: bool = False) -> dict:
    """The config table for operands of ``dtype`` multiplied at ``precision``, FLAT_K or not,
    with the F3 prologue or not."""
    if dtype != torch.float32:
        if flat_k:
            return CONV_FLAT_CONFIGS
        return CONV_PROLOGUE_CONFIGS if prologue else CONV_CONFIGS
    if precision == "tf32":
        if flat_k:
            return CONV_TF32_FLAT_PROLOGUE_CONFIGS if prologue else CONV_TF32_FLAT_CONFIGS
        return CONV_TF32_CONFIGS
    if flat_k:
        return CONV_IEEE_FLAT_PROLOGUE_CONFIGS if prologue else CONV_IEEE_FLAT_CONFIGS
    return CONV_IEEE_PROLOGUE_CONFIGS if prologue else CONV_IEEE_CONFIGS


def _min_block_m(table: dict) -> int:
    if interpreting():
        return _INTERP.kwargs["BLOCK_M"]
    return min(c.kwargs["BLOCK_M"] for configs in table.values() for c in configs)


# {weight tensor: {dtype: (identity, converted copy)}}: weak on the weight, so an entry goes
# with its parameter.
_PREPARED = torch.utils.weak.WeakIdKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def prepared_weight(weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``weight`` in ``dtype`` and the layout the conv kernel loads best, converted once per
    version of the weight.

    The kernel reads B[k, co] with k = (r, s, ci): channels_last weights ([Cout, KH, KW, CIN_G]
    in memory) are contiguous along k, so a tile loads with 16-byte vectors (cp.async on sm_80+);
    default-layout 3x3 weights are strided by KH*KW along ci, load element by element and take
    more registers. A weight already in dtype and channels_last (``model.to(memory_format=
    torch.channels_last)``, and every 1x1 weight) is returned as is; any other is copied, and
    the copy is kept, keyed weakly on the weight tensor, until the weight changes: an in-place
    update (optimizer step, ``load_state_dict``, ``copy_``) bumps the tensor's version counter,
    and ``.data`` assignments change its storage or strides, each of which makes the next call
    convert again. Memory cost: one copy of each such weight per dtype, freed with the weight.

    Autocast: the weight handed to a convolution is then a fresh cast each call, which no cache
    keyed on the tensor can reuse. Pass the parameter itself with ``dtype`` the compute dtype
    (:func:`conv2d` does this for a float32 weight with 16-bit x): the cast and the layout
    change happen in one copy, once per optimizer step, where autocast casts on every forward.
    A backward that needs the same weight (ATen's dgrad) gets the cached copy by calling this
    again.

    Args:
        weight: [Cout, CIN_G, KH, KW] floating point, any strides.
        dtype: the dtype wanted (default: the weight's).

    Returns:
        [Cout, CIN_G, KH, KW] in ``dtype``, channels_last; not tracked by autograd.
    """
    dtype = dtype or weight.dtype
    if weight.dtype == dtype and weight.is_contiguous(memory_format=torch.channels_last):
        return weight

    def convert():
        with torch.no_grad():
            return weight.detach().to(dtype=dtype, memory_format=torch.channels_last)

    if weight.is_inference():
        return convert()  # inference tensors have no version counter to key on
    identity = (*contents_key(weight), weight.dtype, weight.shape, weight.stride())
    with _PREPARED_LOCK:
        by_dtype = _PREPARED.get(weight)
        cached = by_dtype.get(dtype) if by_dtype is not None else None
    if cached is not None and cached[0] == identity:
        return cached[1]
    converted = convert()
    with _PREPARED_LOCK:
        _PREPARED.setdefault(weight, {})[dtype] = (identity, converted)
    return converted


def _check_dtypes(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    if x_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton conv supports float16, bfloat16 and float32, got {x_dtype}")
    if weight_dtype != x_dtype and not (weight_dtype == torch.float32
                                        and x_dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"weight dtype {weight_dtype} does not match input dtype {x_dtype}")


class _ConvLaunch(NamedTuple):
    """A convolution's launch as far as shapes, dtype and flags decide it (:func:`_conv_launch`):
    everything but the tensors."""

    out_size: tuple  # (N, Cout, Ho, Wo)
    rows: int  # output rows N*Ho*Wo, the GEMM's M
    sizes: tuple  # the kernel's arguments after its pointers, weight strides last
    grid: Callable
    table: dict
    key: dict
    constexprs: dict
    partial_rows: int  # rows of the statistics partials to allocate (1 without STATS)


def _dot_precision(dtype: torch.dtype) -> str:
    """The precision of the convolution's products for operands of ``dtype``: fp32 ones take
    TF32 where cuDNN's convolutions may (:func:`_conv_allows_tf32`, read at each call)."""
    return "tf32" if (dtype != torch.float32 or _conv_allows_tf32()) else "ieee"


def _conv_launch(x_shape: torch.Size, dtype: torch.dtype, weight: torch.Tensor, stride, padding,
                 dilation, groups: int, *, prologue: bool, affine: bool, has_residual: bool,
                 relu: bool, stats: bool, precision: str) -> _ConvLaunch:
    """Checks the geometry and decides the launch of :func:`conv2d` for an input of ``x_shape``
    and ``dtype``, the prepared ``weight`` (:func:`prepared_weight`) and products at
    ``precision`` (:func:`_dot_precision`)."""
    N, Cin, H, W = x_shape
    Cout, cin_g, KH, KW = weight.shape
    if Cin != cin_g * groups or Cout % groups:
        raise ValueError(f"conv2d: input channels {Cin} / weight {tuple(weight.shape)} do not fit "
                         f"groups={groups}")
    if H * W * Cin >= 2**31:
        raise ValueError("conv2d: one image of the input has more than 2^31 elements")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho, Wo = conv_output_hw((H, W), (KH, KW), stride, padding, dilation)
    M = N * Ho * Wo
    cout_g = Cout // groups
    flat_k = cin_g % _TAP_ALIGNED != 0
    table = _conv_table(dtype, flat_k, precision, prologue)
    pointwise = KH == 1 and KW == 1 and (sh, sw) == (1, 1) and (ph, pw) == (0, 0)
    return _ConvLaunch(
        out_size=(N, Cout, Ho, Wo),
        rows=M,
        sizes=(M, H, W, Cin, Ho, Wo, Cout, cin_g, cout_g, sh, sw, ph, pw, dh, dw,
               *weight.stride()),
        grid=lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(cout_g, m["BLOCK_N"]), groups),
        table=table,
        key=dict(M=row_bucket(M), Cin=Cin, Cout=Cout, groups=groups, KH=KH, KW=KW,
                 stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw)),
        constexprs=dict(KH=KH, KW=KW, FLAT_K=flat_k, POINTWISE=pointwise, PROLOGUE=prologue,
                        AFFINE=affine, HAS_RESIDUAL=has_residual, RELU=relu, STATS=stats,
                        DOT_PRECISION=precision),
        # Autotuning may pick any BLOCK_M: size the partials for the smallest, use the one that
        # ran.
        partial_rows=cdiv(M, _min_block_m(table)) if stats else 1)


@on_tensor_device
def conv2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int, *,
           scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None, relu: bool = False, stats: bool = False,
           in_scale: Optional[torch.Tensor] = None, in_shift: Optional[torch.Tensor] = None):
    """``act(conv2d(p(x), weight)*scale + shift + residual)`` with optional BN statistics (F1,
    F2), where ``p(x) = relu(x*in_scale + in_shift)`` per input channel (F3) or ``x``.

    Args:
        x: [N, Cin, H, W] fp16/bf16/fp32 (channels_last is used as is; other layouts are copied).
            With ``in_scale``, z of the previous unit.
        weight: [Cout, Cin/groups, KH, KW] in x's dtype, or float32 with 16-bit x (autocast's
            master weight); any layout. Passed through :func:`prepared_weight`: weights not
            already channels_last in x's dtype are converted once per weight version.
        stride, padding, dilation: pairs; groups: int.
        scale, shift: [Cout] float32, both or neither (AFFINE epilogue).
        residual: [N, Cout, Ho, Wo] or None.
        relu: apply ReLU last.
        stats: also return per-tile statistics partials of the output.
        in_scale, in_shift: [Cin] float32, both or neither: the previous unit's BatchNorm
            (gamma*invstd, beta - mean*gamma*invstd) and ReLU applied to x while loading it
            (PROLOGUE). Zero padding applies after it, as it would to the stored y.

    Returns:
        out [N, Cout, Ho, Wo] channels_last in x's dtype; with ``stats`` a tuple
        (out, pmean [P, Cout] fp32, pm2 [P, Cout] fp32, rows per partial).
    """
    _check_dtypes(x.dtype, weight.dtype)
    prologue = in_scale is not None
    if prologue != (in_shift is not None):
        raise ValueError("conv2d: in_scale and in_shift go together (the input's BN + ReLU)")
    cin = x.shape[1]
    if prologue and (in_scale.numel() != cin or in_shift.numel() != cin):
        raise ValueError(f"conv2d: in_scale and in_shift need {cin} values (one per input "
                         f"channel), got {in_scale.numel()} and {in_shift.numel()}")
    x = x.contiguous(memory_format=torch.channels_last)
    weight = prepared_weight(weight, x.dtype)
    plan = _conv_launch(x.shape, x.dtype, weight, stride, padding, dilation, groups,
                        prologue=prologue, affine=scale is not None,
                        has_residual=residual is not None, relu=relu, stats=stats,
                        precision=_dot_precision(x.dtype))
    out = new_output(plan.out_size, dtype=x.dtype, device=x.device,
                     memory_format=torch.channels_last)
    affine = scale is not None
    scale = scale.float().contiguous() if affine else out
    shift = shift.float().contiguous() if affine else out
    in_scale = in_scale.float().contiguous() if prologue else out
    in_shift = in_shift.float().contiguous() if prologue else out
    res = residual.contiguous(memory_format=torch.channels_last) if residual is not None else out
    partial = new_output((2, plan.partial_rows, plan.out_size[1]), dtype=torch.float32,
                         device=x.device)
    ran = launch(_conv_fwd_kernel, plan.grid,
                 (x, weight, out, res, scale, shift, in_scale, in_shift, partial[0], partial[1],
                  *plan.sizes),
                 table=plan.table, key=plan.key, interp_config=_INTERP, device=x.device,
                 **plan.constexprs)
    if not stats:
        return out
    rows = ran.kwargs["BLOCK_M"]
    P = cdiv(plan.rows, rows)
    return out, partial[0, :P], partial[1, :P], rows


def conv2d_runner(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
                  *, scale: torch.Tensor, shift: torch.Tensor, has_residual: bool,
                  relu: bool) -> Callable:
    """:func:`conv2d` with the AFFINE epilogue, without statistics or prologue, for repeated
    calls on inputs like ``x``: its checks, the weight's layout and the launch's decisions are
    made once, here (an inference plan's runner, fusedres/backends/triton.py).

    Args:
        x: an example input [N, Cin, H, W]; the runner takes inputs of its shape, dtype and
            device only, channels_last. It is not kept.
        weight: [Cout, Cin/groups, KH, KW] as :func:`conv2d` takes it, prepared once here: its
            values must not change while the runner lives (a folded weight, which the fold
            cache owns).
        stride, padding, dilation: pairs; groups: int.
        scale, shift: [Cout], converted to float32 once.
        has_residual: whether every call passes a residual; relu: apply ReLU last.

    Returns:
        ``run(x, residual, out=None) -> out``: residual [N, Cout, Ho, Wo] channels_last or None;
        out [N, Cout, Ho, Wo] channels_last, allocated when None. ``out`` may be the residual
        itself: the program that writes an output element has read its residual element
        before.
    """
    _check_dtypes(x.dtype, weight.dtype)
    weight = prepared_weight(weight, x.dtype)
    dtype, device, shape = x.dtype, x.device, x.shape
    # By precision: whether fp32 products may take TF32 is read at each call, as conv2d reads
    # it (a program may turn cuDNN's TF32 off after its first inference call).
    plans = {}

    def plan_at(precision: str) -> _ConvLaunch:
        plan = plans.get(precision)
        if plan is None:
            plan = plans[precision] = _conv_launch(
                shape, dtype, weight, stride, padding, dilation, groups, prologue=False,
                affine=True, has_residual=has_residual, relu=relu, stats=False,
                precision=precision)
        return plan

    cout = plan_at(_dot_precision(dtype)).out_size[1]  # checks the geometry here, once
    scale = scale.float().contiguous()
    shift = shift.float().contiguous()
    # Never written without STATS. The unused pointers get what conv2d passes for them (out,
    # a float32 buffer): pointer dtypes specialise the compiled kernel and key its tuned config.
    unused_partial = torch.empty((1, cout), dtype=torch.float32, device=device)

    @on_tensor_device
    def run(x: torch.Tensor, residual: Optional[torch.Tensor],
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        plan = plan_at(_dot_precision(dtype))
        if out is None:
            out = new_output(plan.out_size, dtype=dtype, device=device,
                             memory_format=torch.channels_last)
        launch(_conv_fwd_kernel, plan.grid,
               (x, weight, out, out if residual is None else residual, scale, shift, out, out,
                unused_partial, unused_partial, *plan.sizes),
               table=plan.table, key=plan.key, interp_config=_INTERP, device=device,
               **plan.constexprs)
        return out
    return run
