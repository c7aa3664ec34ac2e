"""One unit ``y = act(bn(conv(x)) + residual)``: input checks, the phase, one op call.

The flow (docs/design.md section 4): :func:`conv_bn_act` checks the inputs (naming the unit and
the argument), picks the backend and the phase, and makes ONE call of the backend's unit op for
it. The op runs the convolution, the statistics, the running-statistics update and the apply,
and carries its own autograd, so no Python runs between the kernels, forward or backward.

Phases, as nn.BatchNorm2d decides them:

- batch statistics (training, or no running statistics): ``unit_train``, which updates the
  running statistics in place when the module tracks them;
- running statistics (``eval()``, and every FrozenBatchNorm2d): ``unit_eval`` when a gradient is
  wanted (frozen-BN fine-tuning), else ``unit_infer``, BatchNorm folded into the convolution.

Inference (autograd off) repeats the same call with the same modules and input shapes, and the
checks, the backend choice and the module lookups cost more host time than the folded
convolution's launch on small inputs. So the decision made for an inference call is kept per
convolution module as a plan, under a key holding everything that decision read (the input's and
residual's type, shape, strides, dtype and device; the modules' types, geometry, eps, training
flag and hooks; their tensors' identities, versions, shapes, dtypes and devices; the autocast
state; the backend in force), and a call with the same key runs the plan directly. The versions
let a plan keep its folded weights (:mod:`fusedres.ops.fold`) without checking them per call: any
in-place change of a parameter or statistic misses the key and makes a new plan. A fused block
keeps its units' plans under one key of its own (:mod:`fusedres.modules`).

Calls with autograd on (training, frozen-BN fine-tuning) repeat too, and are kept the same way:
the ``unit_train`` or ``unit_eval`` call bound to the unit's tensors, under a key without the
versions (:func:`unit_train_key`: such a call reads the tensors' values when it runs) but with
every tensor's requires_grad, which decides between that call and the folded inference.
"""

from __future__ import annotations

import math
import operator
import weakref
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedres import _ext, reference
from fusedres.backend import (ConvParams, contents_key, conv_output_hw, current_backend_name,
                              explicit_padding, resolve)
from fusedres.fusability import (eager_only_reason, forward_replaced, is_frozen_norm,
                                 unfusable_reason)
from fusedres.ops.plans import PlanCache

__all__ = ["InferencePlan", "check_unit_inputs", "conv_bn_act", "conv_bn_act_with_plan",
           "conv_output_shape", "holds_nonfinite_on_cpu", "input_signature", "plan_context",
           "single_value_error", "unit_state_key", "unit_train_key", "uses_batch_stats"]


def conv_output_shape(shape: Sequence[int], conv: nn.Conv2d) -> torch.Size:
    """The output shape of ``conv`` for an input of ``shape`` [N, Cin, H, W]."""
    hw = conv_output_hw(shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return torch.Size([shape[0], conv.out_channels, *hw])


def holds_nonfinite_on_cpu(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an inference call on the CPU must take the eager composition because one of
    ``tensors`` (an input, a residual; None is skipped) holds a NaN or an inf.

    The cpu backend's fused inference does not keep eager's NaN: oneDNN's ReLU post-op (what
    inductor's CPU freezing path uses too) maps a NaN to 0, and Winograd's transforms spread one
    over whole output tiles, where eager has NaN at exactly the outputs whose receptive field
    holds it. A sum is non-finite when a tensor holds a NaN or an inf (or, harmlessly, when it
    overflows): one read of the tensor (1.4% of a resnet50 layer1 block's inference on the
    2-core EPYC). On other devices False: the answer would be a host synchronisation (their
    kernels keep NaN themselves). False in a graph torch.compile traces (it holds the traceable
    ``unit_eval`` op, not the runners) and where nothing runs fused anyway
    (:func:`eager_only_reason`: under vmap the answer would be a batched tensor).
    """
    if torch.compiler.is_compiling() or eager_only_reason() is not None:
        return False
    for t in tensors:
        if t is None or t.device.type != "cpu" or not t.is_floating_point():
            continue
        # In the tensor's dtype (ATen accumulates in float32 inside): asking for a float32 sum
        # copies a bfloat16 tensor whole first (4.8x the time at 8x256x28x28). Except float16,
        # whose sum of a ReLU's output overflows its range.
        total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
        if not math.isfinite(total.item()):
            return True
    return False


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with batch statistics (training, or no running statistics)."""
    if is_frozen_norm(bn):
        return False
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def single_value_error(out_size: Sequence[int]) -> ValueError:
    """nn.BatchNorm2d's error, word for word, for one value per channel in training."""
    return ValueError(f"Expected more than 1 value per channel when training, got input size "
                      f"{torch.Size(out_size)}")


def _nn_takes_zero_eps_with_running_stats() -> bool:
    try:
        F.batch_norm(torch.zeros(1, 1, 1, 1), torch.zeros(1), torch.ones(1), training=False,
                     eps=0.0)
    except ValueError:
        return False
    return True


#: Whether this torch's ``F.batch_norm`` accepts eps = 0 when it normalises with running
#: statistics: torch 2.11 refuses every eps <= 0, torch 2.12 on only with batch statistics. Asked
#: of nn itself, once at import (not in a cached function, which torch.compile would trace and
#: warn about), so that the fused modules refuse what the installed torch's do.
NN_TAKES_ZERO_EPS_WITH_RUNNING_STATS = _nn_takes_zero_eps_with_running_stats()


def _check_norm(x: torch.Tensor, bn: nn.Module, channels: int, name: str) -> None:
    """The BatchNorm's own state, checked before anything runs (nn checks some of it only after
    it has counted the batch)."""
    eps = bn.eps
    # nn.BatchNorm2d's rule and words: batch statistics need eps > 0, running ones eps >= 0
    # (eps > 0 too before torch 2.12; a frozen norm is no nn.BatchNorm2d and takes eps = 0).
    if not (isinstance(eps, (int, float)) and math.isfinite(eps)):
        raise ValueError(f"{name}: batch_norm eps must be a number, got {eps!r}")
    if uses_batch_stats(bn) and eps <= 0:
        raise ValueError(f"{name}: batch_norm eps must be positive during training, got {eps}")
    if eps < 0:
        raise ValueError(f"{name}: batch_norm eps must be non-negative, got {eps}")
    if eps == 0 and not is_frozen_norm(bn) and not NN_TAKES_ZERO_EPS_WITH_RUNNING_STATS:
        raise ValueError(f"{name}: batch_norm eps must be positive, got {eps}")
    for pname in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, pname, None)
        if t is None:
            continue
        if t.shape != (channels,):
            raise RuntimeError(f"{name}: BatchNorm {pname} has shape {tuple(t.shape)} but the "
                               f"convolution has {channels} output channels")
        if t.device != x.device:
            raise RuntimeError(f"{name}: BatchNorm {pname} is on {t.device} but the input is on "
                               f"{x.device}")
        if t.dtype not in (x.dtype, torch.float32, torch.float64):
            raise TypeError(f"{name}: BatchNorm {pname} has dtype {t.dtype}; it must match the input "
                            f"({x.dtype}) or be float32")
    if (getattr(bn, "running_mean", None) is None) != (getattr(bn, "running_var", None) is None):
        raise RuntimeError(f"{name}: BatchNorm has only one of running_mean and running_var")


def check_unit_inputs(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module,
                      residual: Optional[torch.Tensor], name: str) -> torch.Size:
    """Raises a clear error for input the unit cannot take; returns the conv output size.

    Everything a kernel or nn.BatchNorm2d would refuse is refused here, before any running
    statistic changes.

    Args:
        x: [N, Cin, H, W]; residual: [N, Cout, Ho, Wo] or None.
        name: how the unit is called in messages (e.g. ``"layer1.0.conv1"``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: input must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"{name}: input has {x.shape[1]} channels but the convolution expects "
                         f"in_channels={conv.in_channels} (input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor, got {x.dtype}")
    w = conv.weight
    if x.device != w.device:
        raise RuntimeError(f"{name}: input is on {x.device} but the convolution weight is on "
                           f"{w.device}; move the model or the input")
    autocast = torch.is_autocast_enabled(x.device.type)
    if x.dtype != w.dtype and not autocast:
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the convolution weight dtype "
                        f"{w.dtype}; cast the model (model.to(dtype)) or use autocast")
    if _is_batchnorm(bn):
        _check_norm(x, bn, conv.out_channels, name)
    out_size = conv_output_shape(x.shape, conv)
    if min(out_size[2:]) <= 0:
        raise ValueError(f"{name}: input spatial size {tuple(x.shape[2:])} is too small for the "
                         f"{tuple(conv.kernel_size)} convolution (output would be {tuple(out_size)})")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{name}: residual must be a torch.Tensor or None")
        if residual.shape != out_size:
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)} but the unit's "
                             f"output has shape {tuple(out_size)}")
        if residual.device != x.device or (residual.dtype != x.dtype and not autocast):
            raise TypeError(f"{name}: residual is {residual.dtype} on {residual.device} but the "
                            f"input is {x.dtype} on {x.device}; they must match")
    if (_is_batchnorm(bn) and uses_batch_stats(bn) and x.shape[0] > 0
            and out_size[0] * out_size[2] * out_size[3] == 1):
        raise single_value_error(out_size)
    return out_size


def _is_batchnorm(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) or is_frozen_norm(bn)


def _autocast_dtype(dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype autocast hands a convolution's ``dtype`` operand: float64 is left alone."""
    return dtype if autocast_dtype is None or dtype == torch.float64 else autocast_dtype


def _wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module,
                residual: Optional[torch.Tensor] = None, relu: bool = True,
                backend: Optional[str] = None, name: str = "unit") -> torch.Tensor:
    """``act(bn(conv(x)) + residual)`` with nn.BatchNorm2d semantics, on a fused backend.

    The modules hold their parameters in ``conv`` and ``bn`` (so state_dicts match torchvision);
    this reads them and, in training, the op updates ``bn``'s running statistics and
    ``num_batches_tracked`` in place, as nn.BatchNorm2d does. A call that fails leaves them
    untouched.

    Args:
        x: [N, Cin, H, W], contiguous or channels_last.
        conv: a bias-free nn.Conv2d (anything else falls back to the eager composition).
        bn: nn.BatchNorm2d or FrozenBatchNorm2d over Cout channels.
        residual: [N, Cout, Ho, Wo] added before the activation, or None.
        relu: apply ReLU at the end.
        backend: a backend name, or None for the global choice (see fusedres.backend).
        name: the unit's name in error messages.

    Returns:
        [N, Cout, Ho, Wo] in x's dtype (the autocast dtype under autocast).
    """
    plan_key = _inference_plan_key(x, conv, bn, residual, relu, backend)
    if plan_key is not None:
        if holds_nonfinite_on_cpu(x, residual):
            return reference.unit_forward(x, conv, bn, residual, relu)
        plan = _INFERENCE_PLANS.get(conv, plan_key[:2])
        if plan is not None and plan.key == plan_key:
            return plan.run(x, residual)
    grad_key = None if plan_key is not None else _grad_plan_key(x, conv, bn, residual, relu,
                                                                backend)
    if grad_key is not None:
        grad_plan = _GRAD_PLANS.get(conv)
        if grad_plan is not None and grad_plan.key == grad_key:
            return grad_plan.run(x, residual)
    check_unit_inputs(x, conv, bn, residual, name)
    autocast = (torch.get_autocast_dtype(x.device.type)
                if torch.is_autocast_enabled(x.device.type) else None)
    be = resolve(backend, x.device, _autocast_dtype(x.dtype, autocast))
    if getattr(be, "uses_reference_composition", False) or unfusable_reason(conv, bn) is not None:
        return reference.unit_forward(x, conv, bn, residual, relu)
    if x.shape[0] == 0:
        # nn.BatchNorm2d on an empty batch returns it, leaves the running statistics alone and
        # still counts the batch; the eager composition is that behaviour exactly.
        return reference.unit_forward(x, conv, bn, residual, relu)
    # What autocast does to the eager unit: conv input and weight in the autocast dtype,
    # BatchNorm parameters and statistics in float32, the output in the autocast dtype.
    # (Inference takes the weight as it is: its fold casts it once per parameter version.)
    cast = None if autocast is None else _autocast_dtype(x.dtype, autocast)
    pads = explicit_padding(x, conv)
    # Beyond-half-span padding on the CPU is done explicitly (oneDNN crashes on some such
    # geometries): the op convolves the padded input with padding 0, F.pad's backward crops dx.
    params = ConvParams(conv.stride, conv.padding if pads is None else (0, 0), conv.dilation,
                        conv.groups)
    weight, gamma, beta = conv.weight, bn.weight, bn.bias
    infer = not (_wants_grad(x, weight, gamma, beta, residual) or torch.compiler.is_compiling())
    if infer and not uses_batch_stats(bn):
        if plan_key is None and holds_nonfinite_on_cpu(x, residual):  # else checked above
            return reference.unit_forward(x, conv, bn, residual, relu)
        if cast is not None:
            x = x.to(cast)
            residual = None if residual is None else residual.to(cast)
        x_conv = x if pads is None else F.pad(x, pads)
        runner = be.infer_runner(conv, x_conv, weight, gamma, beta, residual, bn.running_mean,
                                 bn.running_var, params, relu, bn.eps)
        plan = InferencePlan(plan_key, runner if pads is None else _padding_first(runner, pads),
                             cast)
        if plan_key is not None:
            _INFERENCE_PLANS.put(conv, plan_key[:2], plan_key[2:], plan)
        return plan.run(x, residual)
    run = _unit_runner(be, weight, bn, params, pads, relu, cast)
    if grad_key is not None:
        _GRAD_PLANS[conv] = _GradPlan(grad_key, run)
    return run(x, residual)


def _unit_runner(be, weight: torch.Tensor, bn: nn.Module, params: ConvParams,
                 pads: Optional[tuple[int, int, int, int]], relu: bool,
                 cast: Optional[torch.dtype]) -> Callable:
    """``run(x, residual) -> y``: the unit's ``unit_train`` (batch statistics) or ``unit_eval``
    (running statistics, a gradient wanted) op with its modules' tensors and settings bound;
    it casts x and the residual under autocast and pads x explicitly where ``pads`` says so."""
    gamma, beta = bn.weight, bn.bias
    if uses_batch_stats(bn):
        track = bn.training and bn.track_running_stats
        buffers = ((bn.running_mean, bn.running_var, bn.num_batches_tracked) if track
                   else (None, None, None))
        momentum, eps = bn.momentum, bn.eps

        def op(x, w, residual):
            return be.unit_train(x, w, gamma, beta, residual, *buffers, params, relu, momentum,
                                 eps)
    else:
        # Frozen statistics with something to differentiate (frozen-BN fine-tuning), or a graph
        # being traced (the fold cache's version checks are host logic): one traceable op.
        running_mean, running_var, eps = bn.running_mean, bn.running_var, bn.eps

        def op(x, w, residual):
            return be.unit_eval(x, w, gamma, beta, residual, running_mean, running_var, params,
                                relu, eps)

    def run(x, residual):
        if cast is not None:
            x = x.to(cast)
            residual = None if residual is None else residual.to(cast)
        w = weight.to(x.dtype)
        return op(x if pads is None else F.pad(x, pads), w, residual)
    return run


def _padding_first(runner: Callable, pads: tuple[int, int, int, int]) -> Callable:
    """An inference runner that zero-pads its input by ``pads`` (F.pad's order) first."""
    def run(x, residual, residual_is_dead):
        return runner(F.pad(x, pads), residual, residual_is_dead)
    return run


class InferencePlan(NamedTuple):
    """What :func:`conv_bn_act` decided for an inference call: ``runner``, the backend's
    ``unit_infer`` with every argument but the input and the residual bound
    (:meth:`fusedres.backend.Backend.infer_runner`); ``cast``: the autocast dtype they are cast
    to, or None."""

    key: Optional[tuple]
    runner: Callable
    cast: Optional[torch.dtype]

    def run(self, x: torch.Tensor, residual: Optional[torch.Tensor],
            residual_is_dead: bool = False) -> torch.Tensor:
        """The unit on x [N, Cin, H, W] and residual [N, Cout, Ho, Wo] or None, which must have
        the key's signature. ``residual_is_dead``: the caller never reads ``residual`` again,
        and y may be written into it."""
        cast = self.cast
        if cast is not None:  # under autocast: the activations after the first unit have it
            if x.dtype != cast:
                x = x.to(cast)
            if residual is not None and residual.dtype != cast:
                residual = residual.to(cast)
        return self.runner(x, residual, residual_is_dead)


# conv module -> its InferencePlans by the input's and the residual's signatures (the key's first
# two entries). A plan holds the module's tensors, so no tensor in its key can be freed and its
# id reused.
_INFERENCE_PLANS = PlanCache()


class _GradPlan(NamedTuple):
    """A unit's call with autograd on (training, or frozen statistics with a gradient wanted),
    as a call that passed every check made it (:func:`_unit_runner`), under
    :func:`_grad_plan_key`."""

    key: tuple
    run: Callable


# conv module -> its _GradPlan. Weak keys; no fold.clear_with_fold_cache: the call derives
# nothing from the tensors' values.
_GRAD_PLANS: "weakref.WeakKeyDictionary[nn.Module, _GradPlan]" = weakref.WeakKeyDictionary()


def _grad_signature(t: torch.Tensor) -> tuple:
    return t.shape, t.dtype, t.device, t.requires_grad


def _grad_plan_key(x, conv, bn, residual, relu: bool, backend: Optional[str]) -> Optional[tuple]:
    """The key of :func:`conv_bn_act`'s plan with autograd on: everything its checks and its
    choice of op read (x's and the residual's shape, dtype, device and requires_grad, the backend
    in force and autocast, :func:`unit_train_key`), or None where no plan applies (autograd
    off, a graph being traced, tensor subclasses, modules the key cannot describe, a backend
    setting the checked path must report)."""
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or (residual is not None and type(residual) is not torch.Tensor)):
        return None
    state = unit_train_key(conv, bn)
    if state is None:
        return None
    try:
        context = plan_context(backend, x.device.type)
    except (ValueError, RuntimeError):
        return None  # an unknown backend name: the checked path names it
    return (_grad_signature(x), None if residual is None else _grad_signature(residual), relu,
            context, id(bn), state)


def conv_bn_act_with_plan(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module,
                          residual: Optional[torch.Tensor], relu: bool, backend: Optional[str],
                          name: str) -> tuple[torch.Tensor, Optional[InferencePlan]]:
    """:func:`conv_bn_act`, and the inference plan the call ran from (made or reused), or None
    where it ran none. A caller that repeats the call with tensors of the same signatures and
    unchanged modules (the plan's key) may run the plan directly."""
    key = _inference_plan_key(x, conv, bn, residual, relu, backend)
    y = conv_bn_act(x, conv, bn, residual, relu, backend, name)
    plan = None if key is None else _INFERENCE_PLANS.get(conv, key[:2])
    return y, (plan if plan is not None and plan.key == key else None)


def input_signature(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """What an inference plan keys of a tensor argument: shape, strides, dtype, device."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _inference_plan_key(x, conv, bn, residual, relu: bool, backend: Optional[str]):
    """The key of :func:`conv_bn_act`'s inference plan for this call (module docstring), or None
    where a plan does not apply: autograd on, a graph being traced, or modules and tensors of
    kinds the key cannot describe (they take the checked path every call)."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or (residual is not None and type(residual) is not torch.Tensor)):
        return None
    state = unit_state_key(conv, bn, relu)
    return None if state is None else (input_signature(x), input_signature(residual),
                                       plan_context(backend, x.device.type), state)


def state_watch(root: nn.Module, descendants: Sequence[nn.Module]):
    """A ``fusedres._C.StateWatch`` (csrc/state_watch.h) of everything an inference plan's key
    reads from ``root`` and its ``descendants`` (their ``__dict__``, containers, forward hooks
    and tensors), or None without the extension. ``root``'s own ``__dict__`` is watched without
    ``root``: a plan, the value of a cache weak-keyed by root, must not hold its key.

    Args:
        root: the module the plan belongs to (a FusedResNet, a block).
        descendants: the modules below it whose state the key reads.
    """
    watch_type = getattr(_ext._C, "StateWatch", None)
    if watch_type is None:
        return None
    owned = [(m, m.__dict__) for m in descendants]
    dicts = [root.__dict__]
    tensors = []
    for m in (root, *descendants):
        dicts += [m._parameters, m._buffers, m._modules, m._forward_hooks, m._forward_pre_hooks]
        tensors += [t for t in (*m._parameters.values(), *m._buffers.values())
                    if isinstance(t, torch.Tensor)]
    return watch_type(owned, dicts, tensors)


def plan_context(backend: Optional[str], device_type: str) -> tuple:
    """The global state a plan depends on: the backend in force for ``backend`` (a module's
    choice, or None), the autocast state of ``device_type``, and why nothing may run fused right
    now, if anything (global module hooks, a torch.func transform, forward-mode AD:
    fusedres.fusability.eager_only_reason)."""
    autocast = (torch.get_autocast_dtype(device_type)
                if torch.is_autocast_enabled(device_type) else None)
    return current_backend_name(backend), autocast, eager_only_reason()


# The geometry of an nn.Conv2d an inference plan depends on, read in one C call.
_CONV_GEOMETRY = operator.attrgetter("in_channels", "out_channels", "kernel_size", "stride",
                                     "padding", "dilation", "groups", "padding_mode")


def _unit_members(conv: nn.Module, bn: nn.Module) -> Optional[tuple]:
    """(weight, bias, gamma, beta, running_mean, running_var) of a unit whose modules a plan key
    can describe (exactly nn.Conv2d and nn.BatchNorm2d or a FrozenBatchNorm2d, their forward not
    replaced on the instance), read from ``_parameters``/``_buffers``; None for other modules."""
    if (type(conv) is not nn.Conv2d
            or not (type(bn) is nn.BatchNorm2d or type(bn).__name__ == "FrozenBatchNorm2d")
            or forward_replaced(conv, "_conv_forward") or forward_replaced(bn)):
        return None
    conv_params, bn_params, bn_buffers = conv._parameters, bn._parameters, bn._buffers
    weight = conv_params.get("weight")
    if weight is None:
        return None  # a weight that is no parameter (set as a plain attribute)
    gamma, beta = bn_params.get("weight"), bn_params.get("bias")
    return (weight, conv_params.get("bias"),
            bn_buffers.get("weight") if gamma is None else gamma,
            bn_buffers.get("bias") if beta is None else beta,
            bn_buffers.get("running_mean"), bn_buffers.get("running_var"))


def _hooked(conv: nn.Module, bn: nn.Module) -> bool:
    return bool(conv._forward_hooks or conv._forward_pre_hooks or bn._forward_hooks
                or bn._forward_pre_hooks or conv._backward_hooks or conv._backward_pre_hooks
                or bn._backward_hooks or bn._backward_pre_hooks)


def unit_state_key(conv: nn.Module, bn: nn.Module, relu: bool) -> Optional[tuple]:
    """Everything about the unit's modules that an inference plan depends on: their types,
    geometry, eps, training flag and hooks, their tensors' identities, versions, storages,
    shapes, dtypes and devices; None where the modules are of kinds it cannot describe.

    The modules must be exactly nn.Conv2d and nn.BatchNorm2d (or a FrozenBatchNorm2d): a
    parametrized module computes its weight on every access, which a plan would freeze. Their
    tensors are read from ``_parameters``/``_buffers``, not through nn.Module.__getattr__ (about a
    microsecond a call). A tensor's id stands for the same object only while the plan holds it.
    The versions and storages (:func:`fusedres.backend.contents_key`) make a plan's folded
    weights valid for as long as its key matches: every in-place change (an optimizer step, a
    state_dict load, a running-statistics update) bumps the version, and a swap under ``.data``
    (``.to()`` and ``.half()`` make one) changes the storage. A tensor without a version counter
    (made under torch.inference_mode) gives None.
    """
    members = _unit_members(conv, bn)
    if members is None:
        return None
    try:
        tensors = tuple(None if t is None else (type(t), id(t), *contents_key(t), t.shape,
                                                t.dtype, t.device) for t in members)
    except RuntimeError:  # an inference tensor has no version counter
        return None
    return (relu, _hooked(conv, bn), _CONV_GEOMETRY(conv), type(bn), bn.eps, bn.training,
            getattr(bn, "track_running_stats", None), getattr(bn, "num_features", None), tensors)


def unit_train_key(conv: nn.Module, bn: nn.Module) -> Optional[tuple]:
    """Everything about a unit's modules that a call with autograd on depends on (a block's
    :class:`fusedres.ops.block.BlockCall`, a unit's plan in :func:`conv_bn_act`):
    :func:`unit_state_key`'s module state without the versions (such a call reads the tensors'
    values when it runs, and every step changes them), with BatchNorm's momentum,
    ``num_batches_tracked``, each tensor's ``requires_grad``, and the counts of the norm's
    parameters and children (a FrozenBatchNorm2d is recognised by them); None where the modules
    are of kinds it cannot describe."""
    members = _unit_members(conv, bn)
    if members is None:
        return None
    members += (bn._buffers.get("num_batches_tracked"),)
    tensors = tuple(None if t is None else (type(t), id(t), t.shape, t.dtype, t.device,
                                            t.requires_grad) for t in members)
    eps = getattr(bn, "eps", None)
    return (_hooked(conv, bn), _CONV_GEOMETRY(conv), type(bn), type(eps), eps,
            getattr(bn, "momentum", None), bn.training, getattr(bn, "track_running_stats", None),
            getattr(bn, "num_features", None), len(bn._parameters), len(bn._modules), tensors)
