"""A bytes-moved model of ResNet units and blocks, for eager PyTorch and each fused backend.

The memory-bound part of a block's time is proportional to the bytes it moves through device
memory (DESIGN.md section 2), so the benchmarks and ``python -m fusedres`` divide these counts by
measured times (GB/s) and print the ratio fused / eager beside the timings.

Counting rules (``S`` = elements of the unit's output [N, Cout, Ho, Wo], ``X`` = elements of its
input [N, Cin, H, W], ``K`` = elements of the conv weight; every element costs ``itemsize`` bytes):

1. Every kernel reads each of its input tensors once and writes each output once (compulsory
   traffic: the best any implementation of that kernel can do). Re-reads a kernel makes from
   cache, im2col buffers and a convolution's re-reading of its operands between tiles are not
   counted, for eager and fused alike, so the model compares kernel *sequences*, not kernels.
2. Per-channel vectors (mean, var, invstd, scale, shift, dgamma, dbeta, BN parameters and
   running statistics, per-tile partial sums) are O(C) and not counted.
3. The convolution: forward reads x and w and writes z (``X + K`` read, ``S`` written); backward
   dgrad reads dz and w and writes dx (skipped when the input needs no gradient, e.g. the stem's
   image); wgrad reads x and dz and writes dw.
4. Eager PyTorch (one kernel per op, as cuDNN/oneDNN/ATen run them; ``torch.compile`` is not
   modelled):

   - training forward: BN statistics read z; BN normalise reads z, writes t; ``+ residual``
     reads t and the residual, writes s; ReLU reads s, writes y;
   - training backward: ReLU backward reads dy and y, writes g; the add's backward passes g on
     (no kernel); BN backward reads g and z twice (reduction, then dz) and writes dz;
   - eval forward: normalise (read z, write t), add, ReLU as above, no statistics.

5. Fused backends, by the fusion points (DESIGN.md) their kernels implement (:data:`FUSIONS`):

   - F1 (statistics in the conv epilogue): no statistics pass over z;
   - F2 (scale/shift + residual + ReLU in one pass): reads z (and the residual), writes y; in eval
     a backend whose conv kernel has the F2 epilogue (``eval_epilogue``) writes y from the conv
     directly, z never exists;
   - B1 (fused backward): pass 1 reads dy, y (for the ReLU mask) and z, writes dresidual when the
     unit has a residual; pass 2 (training only) reads g back (dresidual if written, else dy and
     y) and z, writes dz. In eval with running statistics pass 1 writes dz and is the only pass.
   - F3 (the next conv's prologue applies this unit's BN) and B2 (dz computed while loading the
     dgrad/wgrad operands) are implemented by no backend yet and not modelled.

6. Triton counts assume channels_last activations (its kernels' native layout, and what the GPU
   benchmarks use); contiguous NCHW tensors add layout copies that are not counted.
7. A block adds, in its backward, autograd's sum of the two gradients of its input (conv1's dx
   and the identity branch's): read 2X, write X, the same for every backend. A whole model is its
   units (stem included) and blocks; the max-pool, average pool and fc run the same kernels for
   every backend and are left out, so model ratios cover the part fusion can change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

__all__ = [
    "FUSIONS", "Fusion", "Traffic", "Unit", "block_traffic", "block_units", "model_blocks",
    "model_traffic", "unit_flops", "unit_traffic",
]


class Fusion(NamedTuple):
    """Which fusion points a backend's kernels implement (see the module docstring)."""

    stats_in_conv: bool     # F1
    fused_apply: bool       # F2 as one elementwise pass
    eval_epilogue: bool     # F2 in the conv epilogue (eval)
    fused_backward: bool    # B1


FUSIONS = {
    "eager": Fusion(False, False, False, False),
    # cpu and cuda: ATen/cuDNN convolutions + C++ kernels for statistics, apply, backward.
    "cpu": Fusion(False, True, False, True),
    "cuda": Fusion(False, True, False, True),
    # triton: implicit-GEMM conv writing per-tile statistics (F1) and the eval epilogue (F2).
    "triton": Fusion(True, True, True, True),
}


class Traffic(NamedTuple):
    """Bytes read from and written to device memory."""

    read: int
    write: int

    @property
    def total(self) -> int:
        return self.read + self.write

    def __add__(self, other: "Traffic") -> "Traffic":  # type: ignore[override]
        return Traffic(self.read + other.read, self.write + other.write)


ZERO = Traffic(0, 0)


@dataclass(frozen=True)
class Unit:
    """One unit ``act(bn(conv(x)) + residual)``: input [n, cin, h, w] -> output [n, cout, ho, wo].

    Attributes:
        kernel, stride, padding, groups: the square convolution's geometry.
        residual: a residual is added before the activation.
        relu: the unit ends in ReLU.
        needs_dx: backward computes the input gradient (False for the stem: the image).
    """

    name: str
    n: int
    cin: int
    h: int
    w: int
    cout: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    residual: bool = False
    relu: bool = True
    needs_dx: bool = True

    @property
    def ho(self) -> int:
        return (self.h + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def wo(self) -> int:
        return (self.w + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def x_elems(self) -> int:
        return self.n * self.cin * self.h * self.w

    @property
    def out_elems(self) -> int:
        return self.n * self.cout * self.ho * self.wo

    @property
    def w_elems(self) -> int:
        return self.cout * (self.cin // self.groups) * self.kernel * self.kernel


def unit_flops(unit: Unit, training: bool) -> int:
    """Convolution FLOPs (2 per multiply-add) of one unit: forward, plus dgrad and wgrad."""
    fwd = 2 * unit.out_elems * (unit.cin // unit.groups) * unit.kernel * unit.kernel
    if not training:
        return fwd
    return fwd * (3 if unit.needs_dx else 2)


def unit_traffic(unit: Unit, backend: str, training: bool, itemsize: int = 4) -> Traffic:
    """Bytes moved by one unit: training = forward with batch statistics + backward; else eval.

    Args:
        unit: the unit's shapes.
        backend: ``"eager"`` or a fused backend name in :data:`FUSIONS`.
        training: count the training forward and the backward (else the eval forward only).
        itemsize: bytes per activation/weight element (4 fp32, 2 bf16/fp16).

    Returns:
        Traffic in bytes.
    """
    f = FUSIONS[backend]
    S, X, K = unit.out_elems, unit.x_elems, unit.w_elems
    res = S if unit.residual else 0
    r = w = 0

    # -- forward ------------------------------------------------------------------------------
    if not training and f.eval_epilogue:
        r += X + K + res
        w += S
    else:
        r += X + K                       # conv
        w += S
        if training and not f.stats_in_conv:
            r += S                       # statistics pass over z
        if f.fused_apply:
            r += S + res                 # one pass: scale/shift + residual + ReLU
            w += S
        else:
            r += S                       # normalise
            w += S
            if unit.residual:
                r += 2 * S               # + residual
                w += S
            if unit.relu:
                r += S                   # ReLU
                w += S
    if not training:
        return Traffic(r * itemsize, w * itemsize)

    # -- backward (batch statistics) ----------------------------------------------------------
    mask = S if unit.relu else 0         # y, read for the ReLU mask
    if f.fused_backward:
        r += S + mask + S                # pass 1: dy, y, z
        w += res                         # dresidual
        r += (S if unit.residual else S + mask) + S  # pass 2: g (dres, or dy and y), z
        w += S                           # dz
    else:
        if unit.relu:
            r += 2 * S                   # ReLU backward: dy, y
            w += S                       # g
        r += 2 * S + 2 * S               # BN backward: (g, z) for the sums, (g, z) for dz
        w += S
    if unit.needs_dx:
        r += S + K                       # dgrad: dz, w
        w += X
    r += X + S                           # wgrad: x, dz
    w += K
    return Traffic(r * itemsize, w * itemsize)


def block_units(kind: str, n: int, inplanes: int, planes: int, h: int, w: int, stride: int = 1,
                groups: int = 1, base_width: int = 64, prefix: str = "") -> list[Unit]:
    """The units of one torchvision block (downsample when stride != 1 or channels change).

    Args:
        kind: ``"basic"`` (BasicBlock) or ``"bottleneck"`` (Bottleneck v1.5).
        n, inplanes, h, w: the block's input [n, inplanes, h, w].
        planes, stride, groups, base_width: torchvision's block arguments.

    Returns:
        Units in execution order (downsample first, as the blocks run it).
    """
    expansion = 1 if kind == "basic" else 4
    out = planes * expansion
    units = []
    if stride != 1 or inplanes != out:
        units.append(Unit(f"{prefix}downsample", n, inplanes, h, w, out, 1, stride, 0,
                          relu=False))
    if kind == "basic":
        ho = (h + 2 - 3) // stride + 1
        wo = (w + 2 - 3) // stride + 1
        units += [Unit(f"{prefix}conv1", n, inplanes, h, w, planes, 3, stride, 1),
                  Unit(f"{prefix}conv2", n, planes, ho, wo, planes, 3, 1, 1, residual=True)]
    elif kind == "bottleneck":
        width = int(planes * (base_width / 64.0)) * groups
        ho = (h + 2 - 3) // stride + 1
        wo = (w + 2 - 3) // stride + 1
        units += [Unit(f"{prefix}conv1", n, inplanes, h, w, width, 1),
                  Unit(f"{prefix}conv2", n, width, h, w, width, 3, stride, 1, groups),
                  Unit(f"{prefix}conv3", n, width, ho, wo, out, 1, residual=True)]
    else:
        raise ValueError(f"kind must be 'basic' or 'bottleneck', got {kind!r}")
    return units


def block_traffic(units: Iterable[Unit], backend: str, training: bool,
                  itemsize: int = 4) -> Traffic:
    """Bytes moved by one block (its units plus the input-gradient sum of rule 7)."""
    units = list(units)
    total = ZERO
    for u in units:
        total = total + unit_traffic(u, backend, training, itemsize)
    if training:
        x = units[0].x_elems
        total = total + Traffic(2 * x * itemsize, x * itemsize)
    return total


_ARCHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}


def model_blocks(arch: str, n: int, image_size: int) -> list[list[Unit]]:
    """The stem unit (as a one-unit list) and every block's units of a torchvision ResNet.

    Args:
        arch: one of resnet18, resnet34, resnet50, resnet101, resnet152.
        n, image_size: the input [n, 3, image_size, image_size].
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    kind, layers = _ARCHS[arch]
    expansion = 1 if kind == "basic" else 4
    stem = Unit("conv1", n, 3, image_size, image_size, 64, 7, 2, 3, needs_dx=False)
    size = (stem.ho + 2 - 3) // 2 + 1    # 3x3/2 max-pool, padding 1
    blocks, inplanes = [[stem]], 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
        for i in range(count):
            stride = 2 if (stage > 0 and i == 0) else 1
            blocks.append(block_units(kind, n, inplanes, planes, size, size, stride,
                                      prefix=f"layer{stage + 1}.{i}."))
            size = (size + 2 - 3) // stride + 1
            inplanes = planes * expansion
    return blocks


def model_traffic(arch: str, n: int, image_size: int, backend: str, training: bool,
                  itemsize: int = 4) -> Traffic:
    """Bytes moved by a whole model's units and blocks (rule 7: pooling and fc left out)."""
    blocks = model_blocks(arch, n, image_size)
    total = unit_traffic(blocks[0][0], backend, training, itemsize)
    for units in blocks[1:]:
        total = total + block_traffic(units, backend, training, itemsize)
    return total
