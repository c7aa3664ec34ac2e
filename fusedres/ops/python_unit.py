"""Unit-level ops implemented in Python (the Triton backend; the tests' reference backend).

:func:`define_unit_ops` defines ``<namespace>::unit_train``, ``unit_eval`` and
``unit_backward`` with the schemas of :mod:`fusedres.ops.unit_schema` (the C++ ops' very
contract), registers a backend's phase implementations for CPU and CUDA tensors, their fake
kernels, and an autograd kernel on the ops themselves (``Autograd`` dispatch key), so that a unit
is one op call forward and one backward for these backends too, and ``torch.compile`` and
``torch.export`` see one opaque op per phase.

``torch.library.register_autograd`` refuses ops that mutate inputs (unit_train updates the
running statistics), so the autograd kernel is registered directly, as that function does
internally: an ``autograd.Function`` whose forward runs the op below the autograd keys.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from fusedres.ops import unit_schema
from fusedres.reference import stats_dtype

__all__ = ["PhaseImpls", "UnitOps", "bump_versions", "conv_backward", "define_unit_ops",
           "eval_coefficients", "update_running_stats"]


class PhaseImpls(NamedTuple):
    """A backend's implementations of the three phases, with the op schemas' arguments.

    ``train`` must update the running statistics it is given in place (see
    :func:`update_running_stats`) and return ``(y, z, mean, invstd)`` as separate tensors (op
    outputs may not alias one another).
    """

    train: Callable
    eval: Callable
    backward: Callable


class UnitOps(NamedTuple):
    """The OpOverloads of one namespace's unit ops."""

    train: Callable
    eval: Callable
    backward: Callable


def update_running_stats(mean: torch.Tensor, var: torch.Tensor, count: int,
                         running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         num_batches_tracked: Optional[torch.Tensor],
                         momentum: Optional[float]) -> None:
    """nn.BatchNorm2d's update of the tracked statistics, in place, with no host synchronisation.

    Args:
        mean, var: [C] batch mean and biased variance.
        count: N*H*W of the batch.
        running_mean, running_var: [C] or None; num_batches_tracked: [] int64 or None.
        momentum: the factor, or None for the cumulative average 1/num_batches_tracked.
    """
    with torch.no_grad():
        cumulative = momentum is None and num_batches_tracked is not None
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            _bump(num_batches_tracked)
        if running_mean is None:
            return
        unbiased = var * (count / (count - 1))
        for running, stat in ((running_mean, mean), (running_var, unbiased)):
            if cumulative:
                # 1/num_batches_tracked on the device (no .item()), in the statistics' dtype.
                factor = num_batches_tracked.to(running.dtype).reciprocal()
            else:
                # nn without a counter and momentum=None leaves the statistics as they are.
                factor = momentum if momentum is not None else 0.0
            running.lerp_(stat.to(running.dtype), factor)
            _bump(running)


def _bump(t: torch.Tensor) -> None:
    # The ops run below ADInplaceOrView, where in-place ops leave the version counter alone;
    # autograd's saved-tensor checks and the fold cache (fusedres.ops.fold) read it.
    if not t.is_inference():
        torch.autograd.graph.increment_version(t)


def bump_versions(*tensors: Optional[torch.Tensor]) -> None:
    """Marks tensors a phase implementation changed in place (e.g. inside a kernel) as changed:
    see :func:`_bump`. None entries are skipped."""
    for t in tensors:
        if t is not None:
            _bump(t)


def eval_coefficients(gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                      running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] in the statistics dtype of activations of ``dtype``."""
    sdt = stats_dtype(dtype)
    scale = torch.rsqrt(running_var.to(sdt) + eps)
    if gamma is not None:
        scale = scale * gamma.to(sdt)
    shift = -running_mean.to(sdt) * scale
    if beta is not None:
        shift = shift + beta.to(sdt)
    return scale, shift


def conv_backward(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding,
                  dilation, groups: int, need_dx: bool, need_dw: bool):
    """(dx or None, dw or None) of ``conv2d(x, weight)`` for the gradient dz (ATen: cuDNN/oneDNN)."""
    if not (need_dx or need_dw):
        return None, None
    dx, dw, _ = torch.ops.aten.convolution_backward.default(
        dz, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_dx, need_dw, False])
    return dx, None if dw is None else strided_like(dw, weight)


def strided_like(dw: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dw in weight's strides (size-1 dimensions aside), copied only where they differ.

    ATen's weight gradient is channels_last for a channels_last input; a FusedResNet built NCHW
    trains channels_last activations with NCHW weights, and AccumulateGrad would copy each such
    gradient into its parameter's layout every step (csrc/unit_ops.cpp does the same)."""
    strides = zip(weight.shape, dw.stride(), weight.stride())
    if all(size == 1 or a == b for size, a, b in strides):
        return dw
    return torch.empty_like(weight, dtype=dw.dtype).copy_(dw)


def _differentiable_backward(ctx, dy, x, weight, y, gamma, beta, running_mean, running_var,
                             training: bool):
    """First-order gradients built from differentiable ops, for double backward: the ReLU mask
    is fixed by the saved y, so v = bn(conv(x, w)) is recomputed and g = dy*mask pulled back."""
    # threshold_backward (as ReLU's own backward) keeps y in the graph: nn's second derivatives
    # reach every input through it, if only with zeros.
    g = torch.ops.aten.threshold_backward.default(dy, y, 0) if ctx.relu else dy
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        z = F.conv2d(x, weight, None, ctx.stride, ctx.padding, ctx.dilation, ctx.groups)
        v = F.batch_norm(z, running_mean, running_var, gamma, beta, training, 0.0, ctx.eps)
        candidates = (x, weight, gamma, beta)
        inputs = [t for t, need in zip(candidates, needs[:4]) if need]
        grads = iter(torch.autograd.grad(v, inputs, g.to(v.dtype), create_graph=True,
                                         allow_unused=True) if inputs else ())
    out = [next(grads) if need else None for need in needs[:4]]
    return (*out, g if needs[4] else None)


def _first_order(ctx, backward_op, dy, x, weight, y, z, mean, invstd, gamma, training):
    mask = list(ctx.needs_input_grad[:5])
    grads = backward_op(dy, x, weight, y, z, mean, invstd, gamma, ctx.stride, ctx.padding,
                        ctx.dilation, ctx.groups, ctx.relu, training, mask)
    return tuple(g if need else None for g, need in zip(grads, mask))


def _cast_affine(grads, gamma, beta):
    dgamma = grads[2].to(gamma.dtype) if grads[2] is not None else None
    dbeta = grads[3].to(beta.dtype) if grads[3] is not None else None
    return grads[0], grads[1], dgamma, dbeta, grads[4]


def define_unit_ops(namespace: str, impls: PhaseImpls, layout: unit_schema.Layout) -> UnitOps:
    """Defines ``<namespace>::unit_{train,eval,backward}`` on CPU and CUDA tensors.

    Args:
        namespace: the torch.library namespace (must be new).
        impls: the backend's phase implementations.
        layout: where the backend keeps z and y (for the fake kernels).

    Returns:
        The three OpOverloads.
    """
    lib = torch.library.Library(namespace, "FRAGMENT")
    for name, schema in unit_schema.SCHEMAS.items():
        lib.define(name + schema)
    for name in ("unit_train", "unit_eval", "unit_backward"):
        impl = getattr(impls, name[len("unit_"):])
        for key in ("CPU", "CUDA"):
            lib.impl(name, impl, key)
    unit_schema.register_fakes(namespace, layout)
    ns = getattr(torch.ops, namespace)
    ops = UnitOps(ns.unit_train.default, ns.unit_eval.default, ns.unit_backward.default)

    class TrainFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, gamma, beta, residual, running_mean, running_var,
                    num_batches_tracked, stride, padding, dilation, groups, relu, momentum, eps):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                y, z, mean, invstd = ops.train(x, weight, gamma, beta, residual, running_mean,
                                               running_var, num_batches_tracked, stride, padding,
                                               dilation, groups, relu, momentum, eps)
            # y is kept only for the ReLU mask (the next convolution keeps it anyway).
            ctx.save_for_backward(x, weight, y if relu else None, z, mean, invstd, gamma, beta)
            ctx.stride, ctx.padding, ctx.dilation, ctx.groups = stride, padding, dilation, groups
            ctx.relu, ctx.eps = relu, eps
            ctx.mark_non_differentiable(z, mean, invstd)
            # Their gradients are never used: without this, autograd would allocate a zero
            # tensor the size of z for every unit's backward.
            ctx.set_materialize_grads(False)
            return y, z, mean, invstd

        @staticmethod
        def backward(ctx, dy, _dz, _dmean, _dinvstd):
            if dy is None:  # y took no part in the loss (gradients are not materialised)
                return (None,) * 15
            x, weight, y, z, mean, invstd, gamma, beta = ctx.saved_tensors
            if torch.is_grad_enabled():
                grads = _differentiable_backward(ctx, dy, x, weight, y, gamma, beta, None, None,
                                                 training=True)
            else:
                grads = _first_order(ctx, ops.backward, dy, x, weight, y, z, mean, invstd, gamma,
                                     training=True)
            return (*_cast_affine(grads, gamma, beta), *([None] * 10))

    class EvalFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, gamma, beta, residual, running_mean, running_var, stride,
                    padding, dilation, groups, relu, eps):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                y = ops.eval(x, weight, gamma, beta, residual, running_mean, running_var, stride,
                             padding, dilation, groups, relu, eps)
            ctx.save_for_backward(x, weight, y if relu else None, gamma, beta, running_mean,
                                  running_var)
            ctx.stride, ctx.padding, ctx.dilation, ctx.groups = stride, padding, dilation, groups
            ctx.relu, ctx.eps = relu, eps
            return y

        @staticmethod
        def backward(ctx, dy):
            x, weight, y, gamma, beta, running_mean, running_var = ctx.saved_tensors
            if torch.is_grad_enabled():
                grads = _differentiable_backward(ctx, dy, x, weight, y, gamma, beta,
                                                 running_mean, running_var, training=False)
            else:
                sdt = stats_dtype(dy.dtype)
                invstd = torch.rsqrt(running_var.to(sdt) + ctx.eps)
                grads = _first_order(ctx, ops.backward, dy, x, weight, y, None,
                                     running_mean.to(sdt), invstd, gamma, training=False)
            return (*_cast_affine(grads, gamma, beta), *([None] * 8))

    def wants_graph(*tensors) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def train_autograd(x, weight, gamma, beta, residual, *rest):
        if not wants_graph(x, weight, gamma, beta, residual):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                return ops.train(x, weight, gamma, beta, residual, *rest)
        return TrainFn.apply(x, weight, gamma, beta, residual, *rest)

    def eval_autograd(x, weight, gamma, beta, residual, *rest):
        if not wants_graph(x, weight, gamma, beta, residual):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                return ops.eval(x, weight, gamma, beta, residual, *rest)
        return EvalFn.apply(x, weight, gamma, beta, residual, *rest)

    lib.impl("unit_train", train_autograd, "Autograd")
    lib.impl("unit_eval", eval_autograd, "Autograd")
    # The Library object unregisters its kernels when collected: keep it for the process.
    _LIBRARIES.append(lib)
    return ops


_LIBRARIES: list = []
