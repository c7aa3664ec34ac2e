"""A bytes-moved model of ResNet units and blocks, for eager PyTorch and each fused backend.

The memory-bound part of a block's time is proportional to the bytes it moves through device
memory (docs/design.md section 2), so the benchmarks and ``python -m fusedres`` divide these counts by
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

5. Fused backends, by the fusion points (docs/design.md) their kernels implement (:data:`FUSIONS`):

   - F1 (statistics in the conv epilogue): no statistics pass over z;
   - F2 (scale/shift + residual + ReLU in one pass): reads z (and the residual), writes y; in eval
     a backend whose conv kernel has the F2 epilogue (``eval_epilogue``) writes y from the conv
     directly, z never exists;
   - B1 (fused backward): pass 1 reads dy, y (for the ReLU mask) and z, writes dresidual when the
     unit has a residual; pass 2 (training only) reads g back (dresidual if written, else dy and
     y) and z, writes dz. In eval with running statistics pass 1 writes dz and is the only pass.
   - F3 (``prologue``: the next convolution applies this unit's scale/shift + ReLU while loading
     z) applies to the *inner* units of a block, whose y feeds only the next convolution
     (Bottleneck conv1 and conv2, BasicBlock conv1; :attr:`Unit.inner`): their forward has no
     apply pass, and the next convolution reads z where it read y (the same bytes). In eval a
     backend with ``eval_epilogue`` already writes y once, from the conv epilogue, so F3 moves
     nothing there: it is a training fusion.
   - Rebuilding inner y in backward (``rebuild``; a training variant, needed with F3 since y was
     never written, and a memory saving without it since y is not kept): B1 of an inner unit
     takes its ReLU mask from z (``z*scale + shift > 0``, z being read anyway), so neither pass
     reads y; the next convolution's wgrad still needs y as its input operand, rebuilt by
     ``"pass"``: an elementwise pass before that convolution's backward (reads z, writes y);
     ``"bn_backward"``: this unit's B1 pass 1, which reads z anyway, also writes y (the next
     convolution's dgrad, which B1 needs, runs first and its wgrad after); ``"wgrad"``: the next
     convolution's wgrad applies the prologue to z while loading it (no extra bytes; needs a
     wgrad kernel of ours, cuDNN's takes y).
   - B2 (dz computed while loading the dgrad/wgrad operands) is implemented by no backend yet and
     not modelled.

6. Triton counts assume channels_last activations (its kernels' native layout, and what the GPU
   benchmarks use); contiguous NCHW tensors add layout copies that are not counted.
7. A block adds, in its backward, autograd's sum of the two gradients of its input (conv1's dx
   and the identity branch's): read 2X, write X, the same for every backend. A whole model is its
   units (stem included) and blocks; the max-pool, average pool and fc run the same kernels for
   every backend and are left out, so model ratios cover the part fusion can change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

__all__ = [
    "FUSIONS", "Fusion", "Traffic", "Unit", "block_traffic", "block_units", "model_blocks",
    "model_traffic", "ratios_to_eager", "unit_flops", "unit_traffic",
]


class Fusion(NamedTuple):
    """Which fusion points a backend's kernels implement (see the module docstring)."""

    stats_in_conv: bool     # F1
    fused_apply: bool       # F2 as one elementwise pass
    eval_epilogue: bool     # F2 in the conv epilogue (eval)
    fused_backward: bool    # B1
    prologue: bool = False  # F3: inner y never written in forward
    rebuild: Optional[str] = None  # inner y not kept; rebuilt by "pass", "bn_backward", "wgrad"


FUSIONS = {
    "eager": Fusion(False, False, False, False),
    # cpu and cuda: ATen/cuDNN convolutions + C++ kernels for statistics, apply, backward.
    "cpu": Fusion(False, True, False, True),
    "cuda": Fusion(False, True, False, True),
    # triton: implicit-GEMM conv writing per-tile statistics (F1) and the eval epilogue (F2).
    "triton": Fusion(True, True, True, True),
    # Block-level variants (fusedres/kernels/conv.py has the F3 prologue; the block ops that use
    # it, and any rebuild but "pass" with cuDNN's wgrad, are not built yet). triton-f3: F3 in
    # forward, inner y rebuilt by a separate pass before cuDNN's conv backward; -bn: rebuilt by
    # the BN backward pass that reads z; -wgrad: rebuilt inside a Triton wgrad's operand load.
    "triton-f3": Fusion(True, True, True, True, prologue=True, rebuild="pass"),
    "triton-f3-bn": Fusion(True, True, True, True, prologue=True, rebuild="bn_backward"),
    "triton-f3-wgrad": Fusion(True, True, True, True, prologue=True, rebuild="wgrad"),
    # cpu with inner y not kept (ATen's conv needs y in forward, so it is still written there)
    # and rebuilt by a pass before the conv backward: the memory saving of block-level recompute.
    "cpu-recompute": Fusion(False, True, False, True, rebuild="pass"),
}
_REBUILDS = (None, "pass", "bn_backward", "wgrad")


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
        inner: the unit's output feeds only the next convolution of its block (Bottleneck conv1
            and conv2, BasicBlock conv1), so F3 and rebuilding in backward apply to it.
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
    inner: bool = False

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
    if f.rebuild not in _REBUILDS or (f.rebuild and not f.fused_backward) or (
            f.prologue and not f.rebuild) or (f.rebuild == "wgrad" and not f.prologue):
        raise ValueError(f"{backend}: inconsistent fusions {f}: a rebuild needs B1, F3 needs a "
                         "rebuild, and only an F3 conv rebuilds y in its wgrad")
    S, X, K = unit.out_elems, unit.x_elems, unit.w_elems
    res = S if unit.residual else 0
    # y = relu(z*scale + shift) feeding only the next convolution: what F3 and rebuilds act on.
    inner = unit.inner and unit.relu and not unit.residual
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
        if f.prologue and inner:
            pass                         # F3: the next convolution applies it to z
        elif f.fused_apply:
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
    rebuilt = inner and f.rebuild is not None
    mask = S if unit.relu and not rebuilt else 0  # y, read for the ReLU mask (else it is z's)
    if rebuilt and f.rebuild == "pass":
        r += S                           # rebuild y for the next conv's wgrad: read z
        w += S                           # write y
    elif rebuilt and f.rebuild == "bn_backward":
        w += S                           # B1 pass 1 writes y from the z it reads
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
        units += [Unit(f"{prefix}conv1", n, inplanes, h, w, planes, 3, stride, 1, inner=True),
                  Unit(f"{prefix}conv2", n, planes, ho, wo, planes, 3, 1, 1, residual=True)]
    elif kind == "bottleneck":
        width = int(planes * (base_width / 64.0)) * groups
        ho = (h + 2 - 3) // stride + 1
        wo = (w + 2 - 3) // stride + 1
        units += [Unit(f"{prefix}conv1", n, inplanes, h, w, width, 1, inner=True),
                  Unit(f"{prefix}conv2", n, width, h, w, width, 3, stride, 1, groups,
                       inner=True),
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


def ratios_to_eager(arch: str = "resnet50", n: int = 256, image_size: int = 224,
                    itemsize: int = 2) -> dict:
    """{backend: (training bytes / eager's, eval bytes / eager's)} for a whole model."""
    eager = {t: model_traffic(arch, n, image_size, "eager", t, itemsize).total
             for t in (True, False)}
    return {backend: tuple(model_traffic(arch, n, image_size, backend, t, itemsize).total
                           / eager[t] for t in (True, False))
            for backend in FUSIONS}


def main(argv=None) -> int:
    """Prints each backend's bytes against eager for a model's training step and eval."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", default="resnet50", choices=sorted(_ARCHS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--itemsize", type=int, default=2, help="bytes per element (2: bf16)")
    args = parser.parse_args(argv)
    table = ratios_to_eager(args.arch, args.batch, args.image_size, args.itemsize)
    gb = {t: model_traffic(args.arch, args.batch, args.image_size, "eager", t,
                           args.itemsize).total / 1e9 for t in (True, False)}
    print(f"{args.arch}, batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"{args.itemsize}-byte elements; eager moves {gb[True]:.1f} GB per training step, "
          f"{gb[False]:.1f} GB per eval forward")
    print(f"{'backend':<16} {'train/eager':>11} {'eager/train':>11} {'eval/eager':>10} "
          f"{'eager/eval':>10}")
    for backend, (train, evaluation) in table.items():
        print(f"{backend:<16} {train:>11.3f} {1 / train:>10.2f}x {evaluation:>10.3f} "
              f"{1 / evaluation:>9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
