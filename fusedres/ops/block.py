"""The block-level op: a ResNet block's training forward and backward as one autograd node.

Inside a Bottleneck (conv1 -> BN -> ReLU -> conv2 -> BN -> ReLU -> conv3 -> BN -> + identity ->
ReLU) and a BasicBlock, the normalised activations y1 (and y2) feed only the next convolution.
The per-unit path keeps them for backward all the same (they are that convolution's input);
this op does not. Its forward runs each unit's ``unit_train`` op with no per-unit autograd and
keeps the block input, each unit's z and batch statistics (mean, invstd), and the block's
output (its ReLU mask). Backward rebuilds y_k = act(z_k*scale_k + shift_k) (scale = gamma*invstd,
shift = beta - mean*scale) with the backend's ``bn_act_fwd`` right before conv_{k+1}'s backward,
the first consumer of y_k as that convolution's input (its weight gradient), reuses it for unit
k's ReLU mask, and calls ``unit_backward`` unit by unit (:func:`backward_units`; on backends with
``BlockOps.block_backward``, ``cpu`` and ``cuda``, the same loop runs as one C++ op). The
downsample branch (1x1 conv + BN, no ReLU) is a unit of the same op. Per Bottleneck eager keeps
z1, y1, z2, y2, z3 and y3 (12 x planes channels at the output resolution); this op keeps 10 of
them.

Recomputation modes (a block's ``recompute`` attribute, else ``FUSEDRES_BLOCK_RECOMPUTE``):

- ``"bn_act"`` (the default; ``1``): the above. Rebuilding y_k costs one memory-bound pass
  over z_k per inner unit in backward.
- ``"conv1"``: also recomputes a Bottleneck's cheap 1x1 conv1 in backward, so z1 is not kept
  either (9 of 12). A BasicBlock's conv1 is a 3x3, not cheap: there this mode is ``"bn_act"``.
- ``"off"`` (``0``): the per-unit path, which keeps y1 and y2 and supports double backward.

The rebuilt y_k matches the forward's to the rounding of the coefficients (backends compute
scale and shift inside the training op, some in float64); a pre-activation within that rounding
of zero may land on the other side of the ReLU kink in backward, where either side is a valid
subgradient.

The op runs only where it reproduces the per-unit semantics exactly: training with batch
statistics in every unit, nn.BatchNorm2d, bias-free zero-padded convolutions, no downsample or
torchvision's conv1x1 + BatchNorm2d pair, a backend with :meth:`fusedres.backend.Backend.block_ops`,
and a gradient to compute. Otherwise (eval, frozen BatchNorm, other norm layers, a custom
downsample, no gradient wanted) blocks keep the per-unit path.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from fusedres.backend import BlockOps, get_backend, memory_format_of, resolve
from fusedres.fusability import unfusable_reason
from fusedres.ops.unit import _autocast_dtype, _check_norm, check_unit_inputs, uses_batch_stats

__all__ = ["DOUBLE_BACKWARD_ERROR", "RECOMPUTE_ENV", "RECOMPUTE_MODES", "BlockCall", "Unit",
           "backward_units", "bn_act_coefficients", "prepare_block_train", "recompute_mode",
           "unit_geometry"]

RECOMPUTE_ENV = "FUSEDRES_BLOCK_RECOMPUTE"
RECOMPUTE_MODES = ("off", "bn_act", "conv1")
_ENV_ALIASES = {"0": "off", "1": "bn_act"}
#: The mode of blocks whose ``recompute`` is None and with FUSEDRES_BLOCK_RECOMPUTE unset.
DEFAULT_RECOMPUTE = "bn_act"

DOUBLE_BACKWARD_ERROR = (
    "fusedres: the block-level op does not support double backward (create_graph=True): its "
    "backward rebuilds activations it did not keep, outside autograd. Run such blocks on the "
    "per-unit path, which does: set FUSEDRES_BLOCK_RECOMPUTE=0, or block.recompute = 'off' on "
    "each FusedBottleneck / FusedBasicBlock.")


def recompute_mode(requested: Optional[str] = None) -> str:
    """The recomputation mode in force: ``requested``, else ``FUSEDRES_BLOCK_RECOMPUTE``, else
    ``"bn_act"``.

    Args:
        requested: one of RECOMPUTE_MODES, or None.

    Raises:
        ValueError: an unknown mode, naming where it came from.
    """
    if requested is not None:
        if requested not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES} or None, "
                             f"got {requested!r}")
        return requested
    env = os.environ.get(RECOMPUTE_ENV)
    if not env:
        return DEFAULT_RECOMPUTE
    mode = _ENV_ALIASES.get(env, env)
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"the environment variable {RECOMPUTE_ENV} must be one of "
                         f"{tuple(_ENV_ALIASES) + RECOMPUTE_MODES}, got {env!r}")
    return mode


class Unit(NamedTuple):
    """One unit of a block, as the module holds it.

    Attributes:
        name: the unit's name in error messages (e.g. ``"FusedBottleneck.conv2"``).
        conv: its nn.Conv2d; bn: its BatchNorm; relu: whether it ends in ReLU.
    """

    name: str
    conv: nn.Module
    bn: nn.Module
    relu: bool


class _UnitSpec(NamedTuple):
    """The non-tensor arguments of one unit's ops (hashable: a constant for torch.compile)."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    relu: bool
    momentum: Optional[float]
    eps: float


class _BlockSpec(NamedTuple):
    """What the autograd Function needs besides tensors.

    ``units`` holds the main chain in order, then the downsample unit when ``downsample``.
    """

    backend: str
    units: tuple
    downsample: bool
    recompute_conv1: bool


#: Tensors per unit passed to the Function: weight, gamma, beta, running_mean, running_var,
#: num_batches_tracked (the last five may be None).
_PER_UNIT = 6


def bn_act_coefficients(gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                        mean: torch.Tensor, invstd: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] of a training forward: ``gamma*invstd``, ``beta - mean*scale``.

    Args:
        gamma, beta: [C] or None (``affine=False``: 1 and 0).
        mean, invstd: [C] batch statistics in the statistics dtype, which the results take.
    """
    scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
    shift = -mean * scale if beta is None else beta.to(mean.dtype) - mean * scale
    return scale, shift


def _unit_train(ops: BlockOps, x, tensors, u: _UnitSpec, residual):
    weight, gamma, beta, running_mean, running_var, num_batches_tracked = tensors
    return ops.train(x, weight, gamma, beta, residual, running_mean, running_var,
                     num_batches_tracked, u.stride, u.padding, u.dilation, u.groups, u.relu,
                     u.momentum, u.eps)


def _rebuild(ops: BlockOps, z, scale, shift, relu: bool) -> torch.Tensor:
    """A unit's output y from its z and BN coefficients (the forward's apply, no residual)."""
    return ops.bn_act_fwd(z, scale, shift, None, relu)


class _BackwardConstants(NamedTuple):
    """What a block's backward passes on that depends only on its _BlockSpec."""

    needs_index: tuple  # into needs_input_grad: x, then weight, gamma, beta per unit
    geometry: list  # fusedres::block_backward's: stride, padding, dilation, groups per unit
    unit_geometry: list  # backward_units': (stride, padding, dilation, groups) per unit
    relus: list


# Looked up where a block is called, outside the autograd Function. A plain dict rather than
# functools.lru_cache, which torch.compile traces through (and warns about); cleared when full,
# since a spec holds momentum and eps, which a schedule may vary.
_BACKWARD_CONSTANTS: dict = {}
_BACKWARD_CONSTANTS_MAX = 256


def _backward_constants(spec: _BlockSpec) -> _BackwardConstants:
    const = _BACKWARD_CONSTANTS.get(spec)
    if const is None:
        if len(_BACKWARD_CONSTANTS) >= _BACKWARD_CONSTANTS_MAX:
            _BACKWARD_CONSTANTS.clear()
        const = _BACKWARD_CONSTANTS[spec] = _compute_backward_constants(spec)
    return const


def _compute_backward_constants(spec: _BlockSpec) -> _BackwardConstants:
    m = len(spec.units)
    # needs_input_grad is (spec, constants, x, then _PER_UNIT per unit: weight, gamma, beta,
    # buffers).
    index = (2,) + tuple(3 + _PER_UNIT * k + i for k in range(m) for i in range(3))
    return _BackwardConstants(
        index, [v for u in spec.units for v in (*u.stride, *u.padding, *u.dilation, u.groups)],
        [(u.stride, u.padding, u.dilation, u.groups) for u in spec.units],
        [u.relu for u in spec.units])


class _BlockFunction(torch.autograd.Function):
    """The block's units forward and backward; see the module docstring.

    ``apply(spec, _backward_constants(spec), x, *tensors)`` with ``_PER_UNIT`` tensors per unit
    of ``spec.units``. The constants come in as an argument, looked up outside: torch.compile
    traces forward and backward as a higher-order op, where a cache cannot be written.
    """

    @staticmethod
    def forward(ctx, spec: _BlockSpec, constants: _BackwardConstants, x: torch.Tensor, *tensors):
        ops = get_backend(spec.backend).block_ops()
        units = [tensors[i:i + _PER_UNIT] for i in range(0, len(tensors), _PER_UNIT)]
        n = len(units) - spec.downsample
        identity, ds_saved = x, []
        if spec.downsample:
            identity, *ds_saved = _unit_train(ops, x, units[n], spec.units[n], None)
        h, zs, means, invstds = x, [], [], []
        # F3: the coefficients each inner unit's successor applied, kept for backward's rebuild.
        coefficients = []
        scale = shift = None
        for k in range(n):
            last = k == n - 1
            residual = identity if last else None
            u, (weight, gamma, beta, rm, rv, nbt) = spec.units[k], units[k]
            if ops.train_from_z is not None:
                # F3: unit k's convolution applies unit k-1's scale/shift + ReLU while loading
                # z_{k-1}, so only the block output is written as a y.
                h, z, mean, invstd, scale, shift = ops.train_from_z(
                    zs[-1] if k else x, scale, shift, weight, gamma, beta, residual, rm, rv, nbt,
                    u.stride, u.padding, u.dilation, u.groups, u.relu, u.momentum, u.eps, last)
                if not last:
                    coefficients += [scale, shift]
            else:
                h, z, mean, invstd = _unit_train(ops, h, units[k], u, residual)
            zs.append(z)
            means.append(mean)
            invstds.append(invstd)
        if ops.train_from_z is not None:
            h = h.contiguous(memory_format=memory_format_of(x))  # as the per-unit path returns it
        if spec.recompute_conv1:
            zs[0] = None  # backward convolves x again
        weights = [t[0] for t in units]
        gammas = [t[1] for t in units]
        betas = [t[2] for t in units]
        # Per unit, the main chain's then the downsample's: the lists backward passes on.
        if spec.downsample:
            zs.append(ds_saved[0])
            means.append(ds_saved[1])
            invstds.append(ds_saved[2])
        ctx.save_for_backward(x, h, *weights, *gammas, *betas, *zs, *means, *invstds,
                              *coefficients)
        ctx.spec = spec
        ctx.constants = constants
        return h

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        spec: _BlockSpec = ctx.spec
        ops = get_backend(spec.backend).block_ops()
        m = len(spec.units)
        saved = ctx.saved_tensors
        x, y_last = saved[:2]
        # weights, gammas, betas, zs, means, invstds: m each.
        lists = [saved[2 + i * m:2 + (i + 1) * m] for i in range(6)]
        coefficients = saved[2 + 6 * m:]  # F3's (scale, shift) per inner unit, else none
        const: _BackwardConstants = ctx.constants
        needs = [ctx.needs_input_grad[i] for i in const.needs_index]
        # Under the batched gradients of torch.autograd.grad(..., is_grads_batched=True) (and
        # jacobian(vectorize=True)) dy is a legacy batched tensor: the block op, with tensor-list
        # arguments, has no batching rule there, where the per-unit ops get the generated one.
        # (A graph torch.compile traces never sees one, and dynamo cannot trace the question.)
        if (ops.block_backward is not None and not coefficients
                and (torch.compiler.is_compiling()
                     or not torch._C._functorch.is_legacy_batchedtensor(dy))):
            dx, unit_grads = ops.block_backward(dy, x, y_last, *lists, const.geometry,
                                                const.relus, spec.downsample, needs)
            # [0] placeholders where a gradient was not asked for.
            dx = dx if needs[0] else None
            unit_grads = [g if need else None for g, need in zip(unit_grads, needs[1:])]
        else:
            dx, unit_grads = backward_units(ops, dy, x, y_last, *lists, const.unit_geometry,
                                            const.relus, spec.downsample, needs, coefficients)
        # _PER_UNIT gradients per unit: the weight's, gamma's and beta's, then the buffers' None.
        buffer_grads = [None] * (_PER_UNIT - 3)
        return (None, None, dx, *[g for k in range(m) for g in (*unit_grads[3 * k:3 * k + 3],
                                                           *buffer_grads)])


def unit_geometry(geometry: Sequence[int]) -> list:
    """(stride, padding, dilation, groups) per unit from ``fusedres::block_backward``'s flat
    geometry (7 values per unit), as :func:`backward_units` takes it."""
    return [(geometry[i:i + 2], geometry[i + 2:i + 4], geometry[i + 4:i + 6], geometry[i + 6])
            for i in range(0, len(geometry), 7)]


def backward_units(ops: BlockOps, dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   weights: Sequence[torch.Tensor], gammas: Sequence[Optional[torch.Tensor]],
                   betas: Sequence[Optional[torch.Tensor]], zs: Sequence[Optional[torch.Tensor]],
                   means: Sequence[torch.Tensor], invstds: Sequence[torch.Tensor],
                   geometry: Sequence[tuple], relus: Sequence[bool], downsample: bool,
                   needs: Sequence[bool], coefficients: Sequence[torch.Tensor] = ()
                   ) -> tuple[Optional[torch.Tensor], list]:
    """The block op's backward, unit by unit over the backend's ``backward`` and ``bn_act_fwd``
    ops (the ``fusedres::block_backward`` op computes the same in C++; this is also its fake).

    Args:
        dy: [N, C, Ho, Wo] gradient of the block output y (the last unit's ReLU mask).
        x: [N, Cin, H, W] the block input.
        weights, gammas, betas, zs, means, invstds: per unit, the main chain in order, then the
            downsample unit where ``downsample``; gammas and betas None without affine, zs[0]
            None where conv1 is convolved again from x.
        geometry: per unit, (stride, padding, dilation, groups).
        relus: per unit, whether it ends in ReLU.
        needs: whether x, then each unit's weight, gamma and beta take a gradient.
        coefficients: F3's (scale, shift) per inner unit, or none (computed from the statistics).

    Returns:
        (dx or None, [dweight, dgamma, dbeta] per unit, None where not needed), each gradient in
        its tensor's dtype.
    """
    m = len(weights)
    n = m - downsample
    zs = list(zs)

    def need(k: int, i: int) -> bool:
        return needs[1 + 3 * k + i]

    # Whether anything at or before unit k (or x, or the downsample, through the residual)
    # takes a gradient: unit k's dx is needed when something before it does.
    before = [needs[0]]
    for k in range(n):
        before.append(before[-1] or need(k, 0) or need(k, 1) or need(k, 2))
    need_ds = downsample and any(need(n, i) for i in range(3))
    need_res = needs[0] or need_ds

    grads: list = [None] * (3 * m)
    y_k = y
    for k in reversed(range(n)):
        if k > 0:
            if k == 1 and zs[0] is None:
                zs[0] = ops.conv(x, weights[0], *geometry[0])
            if coefficients:
                scale, shift = coefficients[2 * (k - 1):2 * k]
            else:
                scale, shift = bn_act_coefficients(gammas[k - 1], betas[k - 1],
                                                   means[k - 1], invstds[k - 1])
            x_k = _rebuild(ops, zs[k - 1], scale, shift, relus[k - 1])
        else:
            x_k = x
        mask = [before[k], need(k, 0), need(k, 1) and gammas[k] is not None,
                need(k, 2) and betas[k] is not None, k == n - 1 and need_res]
        dx, dw, dgamma, dbeta, dres_k = ops.backward(
            dy, x_k, weights[k], y_k if relus[k] else None, zs[k], means[k], invstds[k],
            gammas[k], *geometry[k], relus[k], True, mask)
        grads[3 * k:3 * k + 3] = _cast((dw, dgamma, dbeta), mask[1:4],
                                       (weights[k], gammas[k], betas[k]))
        if k == n - 1:
            dres = dres_k
        if not before[k]:
            break  # nothing before this unit takes a gradient
        # y_k is dropped here: its only other use, conv_{k+1}'s backward, has run.
        dy, y_k, zs[k] = dx, x_k, None
    dx = dy if needs[0] else None
    if downsample and (needs[0] or need_ds):
        mask = [needs[0], need(n, 0), need(n, 1) and gammas[n] is not None,
                need(n, 2) and betas[n] is not None, False]
        dx_ds, dw, dgamma, dbeta, _ = ops.backward(
            dres, x, weights[n], None, zs[n], means[n], invstds[n], gammas[n], *geometry[n],
            False, True, mask)
        grads[3 * n:3 * n + 3] = _cast((dw, dgamma, dbeta), mask[1:4],
                                       (weights[n], gammas[n], betas[n]))
        if needs[0]:
            dx.add_(dx_ds)  # dx is conv1's fresh input gradient: no new block-sized tensor
    elif needs[0]:
        dx.add_(dres)
    return dx, grads


def _cast(grads: Sequence[torch.Tensor], mask: Sequence[bool], like: Sequence) -> list:
    """The op's gradients with None where not asked for ([0] placeholders), each in the dtype
    of its tensor (dgamma/dbeta come in the statistics dtype)."""
    return [(g if g.dtype == t.dtype else g.to(t.dtype)) if need else None
            for g, need, t in zip(grads, mask, like)]


def _fits(unit: Unit) -> bool:
    # A FrozenBatchNorm2d is fusable but never uses batch statistics.
    return unfusable_reason(unit.conv, unit.bn) is None and uses_batch_stats(unit.bn)


class BlockCall(NamedTuple):
    """A block's training forward as :func:`prepare_block_train` decided it, for one kind of
    call: the op's constants and the tensors it reads (the modules' own, the convolution weights
    in their parameter dtype).

    Attributes:
        spec: the autograd Function's non-tensor arguments.
        cast: the dtype autocast runs the convolutions in (x and the weights are cast to it on
            every call: the weights change between steps), or None without autocast.
        tensors: ``_PER_UNIT`` per unit of ``spec.units``: weight, gamma, beta, running_mean,
            running_var, num_batches_tracked (None where the module has none or does not
            track them).
    """

    spec: _BlockSpec
    cast: Optional[torch.dtype]
    tensors: tuple

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The block output [N, Cout, Ho, Wo] for x [N, Cin, H, W] of the signature the call was
        prepared for; updates the running statistics in place."""
        cast, tensors = self.cast, self.tensors
        if cast is not None:
            # What autocast does to the eager units: convolution operands in the autocast dtype,
            # BatchNorm parameters and statistics left in float32.
            x = x.to(cast)
            tensors = [t.to(cast) if i % _PER_UNIT == 0 else t for i, t in enumerate(tensors)]
        return _BlockFunction.apply(self.spec, _backward_constants(self.spec), x, *tensors)


def prepare_block_train(x: torch.Tensor, units: Sequence[Unit], downsample: Optional[Unit],
                        backend: Optional[str], recompute: Optional[str]) -> Optional[BlockCall]:
    """Checks a block's training forward and prepares its call of the block-level op, or returns
    None where the op does not apply.

    Call it after the block's own pre-check (``fusedres.modules``), which covers the inner
    units; None means the caller runs the per-unit path, which has the same semantics unit by
    unit. Nothing runs here: every check is done before any running statistic changes.

    Args:
        x: the block input [N, Cin, H, W].
        units: the main chain in order (conv1, conv2[, conv3]); the last adds the identity.
        downsample: the identity branch's conv1x1 + BatchNorm2d unit (relu False), or None for
            an identity shortcut (a custom downsample module: do not call this).
        backend: the block's backend name, or None for the global choice.
        recompute: the block's ``recompute`` attribute (see :func:`recompute_mode`).

    Returns:
        The call; its ``run(x)`` returns the block output [N, Cout, Ho, Wo] in x's dtype (the
        autocast dtype under autocast). None where the op does not apply.
    """
    mode = recompute_mode(recompute)
    # Cheapest first: an inference forward (no grad) returns here, before the fusability checks.
    if mode == "off" or not (isinstance(x, torch.Tensor) and torch.is_grad_enabled()):
        return None
    chain = list(units) + ([downsample] if downsample is not None else [])
    if not all(_fits(u) for u in chain):
        return None
    if not (x.requires_grad or any(p.requires_grad for u in chain for p in _params(u))):
        return None  # nothing to differentiate: the per-unit path keeps nothing either
    # The per-unit path's checks of the units that read x, in its order (downsample first);
    # the block's pre-check has covered the inner units' shapes.
    if downsample is not None:
        check_unit_inputs(x, downsample.conv, downsample.bn, None, downsample.name)
    check_unit_inputs(x, units[0].conv, units[0].bn, None, units[0].name)
    for u in units[1:]:
        # The inner units' BatchNorm state (eps, its tensors' shapes, devices and dtypes), which
        # the per-unit path checks only once the units before have run; x's device and dtype
        # stand for those of the unit's input.
        _check_norm(x, u.bn, u.conv.out_channels, u.name)
    if x.shape[0] == 0:
        return None  # nn's empty-batch behaviour lives in the per-unit path
    autocast = (torch.get_autocast_dtype(x.device.type)
                if torch.is_autocast_enabled(x.device.type) else None)
    dtype = _autocast_dtype(x.dtype, autocast)
    be = resolve(backend, x.device, dtype)
    ops = None if getattr(be, "uses_reference_composition", False) else be.block_ops()
    if ops is None:
        return None
    tensors = []
    specs = []
    for u in chain:
        conv, bn = u.conv, u.bn
        track = bn.training and bn.track_running_stats
        tensors += [conv.weight, bn.weight, bn.bias, bn.running_mean if track else None,
                    bn.running_var if track else None, bn.num_batches_tracked if track else None]
        specs.append(_UnitSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
                               conv.groups, u.relu, bn.momentum, bn.eps))
    # conv1 is recomputed only where it is a 1x1 (a Bottleneck's), the cheap convolution.
    conv1_1x1 = tuple(units[0].conv.kernel_size) == (1, 1) and len(units) > 1
    spec = _BlockSpec(be.name, tuple(specs), downsample is not None,
                      mode == "conv1" and conv1_1x1)
    return BlockCall(spec, None if autocast is None else dtype, tuple(tensors))


def _params(u: Unit):
    return [t for t in (u.conv.weight, u.bn.weight, u.bn.bias) if t is not None]
