"""What one unit ``act(norm(conv(x)) + residual)`` can run fused: the single source of truth.

:func:`fusedres.ops.conv_bn_act` decides with it whether a unit runs on a fused backend or keeps
its eager composition, and :func:`fusedres.convert` reports with it how many units of a model
run fused and why the others do not. The rule is exactly what the kernels implement:

- the conv is a bias-free, zero-padded ``nn.Conv2d`` with numeric padding, whose forward is
  nn.Conv2d's own (a subclass that changes it, e.g. timm's ``Conv2dSame``, is not the same op);
- the norm is an ``nn.BatchNorm2d`` (batch statistics in training, running statistics in eval) or
  a FrozenBatchNorm2d (torchvision's, which timm re-exports, or any module of that name with its
  buffers: a fixed per-channel scale and shift, the eval fold);
- neither module has forward or backward hooks nor a ``forward`` set on the instance, and no
  global module hooks are registered (the fused unit never calls their forward, so any of them
  would silently stop running), nor is a ``torch.func`` transform, forward-mode AD,
  ``torch.fx`` tracing, ``torch.jit.trace`` or ``torch.onnx.export`` active
  (:func:`eager_only_reason`);
- a block's or stem's activation is exactly ``nn.ReLU``, without hooks or an instance
  ``forward`` (:func:`activation_reason`): the fused kernels apply ReLU whatever module sits
  there, so a block whose activation was swapped (``block.relu = nn.SiLU()``) runs eagerly.

Not fusable, and why: ``nn.SyncBatchNorm`` (statistics across processes), ``GroupNorm`` and the
other norms, timm's ``BatchNormAct2d`` / ``FrozenBatchNormAct2d`` (their activation and drop
layers act before the residual add, inside the norm), an uninitialised lazy module.

Import-light on purpose (torch only): fusedres.ops imports it, and it must never import
torchvision or timm.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["activation_reason", "eager_only_reason", "forward_replaced", "is_frozen_norm",
           "refuse_scripting", "unfusable_reason"]

_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a FrozenBatchNorm2d: ``x * scale + shift`` from fixed buffers.

    Recognised without importing torchvision: the class name ``FrozenBatchNorm2d`` (torchvision's
    ``torchvision.ops.misc.FrozenBatchNorm2d``, which timm uses too, or detectron2's, computing the
    same), the four 1-D buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` of one
    length (buffers, not parameters: nothing of it trains), a float ``eps``, and no submodules
    (timm's ``FrozenBatchNormAct2d`` has ``act``/``drop`` children and another name).

    Args:
        norm: any module.

    Returns:
        True when a fused unit may apply it as the eval fold
        ``scale = weight * rsqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.
    """
    # The module's own dicts, not named_parameters()/named_buffers(): every unit of a frozen-BN
    # block asks this several times per call, and those generators cost about 15 us a question.
    if (type(norm).__name__ != "FrozenBatchNorm2d"
            or any(m is not None for m in norm._modules.values())
            or any(p is not None for p in norm._parameters.values())):
        return False
    tensors = [norm._buffers.get(name) for name in _FROZEN_BUFFERS]
    if any(t is None or t.dim() != 1 for t in tensors):
        return False
    return (len({t.shape[0] for t in tensors}) == 1
            and isinstance(getattr(norm, "eps", None), float))


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _backward_hooked(module: nn.Module) -> bool:
    return bool(module._backward_hooks or module._backward_pre_hooks)


def eager_only_reason() -> Optional[str]:
    """Why nothing may run fused right now, or None:

    - module hooks registered for every module
      (``torch.nn.modules.module.register_module_forward_hook`` and its pre and backward kinds,
      as tools that watch every layer register), which fire only for modules that are called;
    - a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...) or a forward-mode
      AD dual level (``torch.autograd.forward_ad``) is active: the fused ops have neither batching
      rules nor forward derivatives, where the eager composition has both (MAML-style
      ``torch.func.grad``, Jacobian-vector products);
    - ``torch.fx.symbolic_trace`` is tracing: the trace records the eager composition's module
      calls, where the fused ops would be handed proxies;
    - ``torch.jit.trace`` is tracing (also the TorchScript-based ONNX export): the trace records
      the eager composition's aten ops, so that the saved module runs without fusedres, on any
      device, where it would record oneDNN's prepacked convolutions (which the tracer cannot
      take in eval: "unsupported input list type") or fusedres's own ops;
    - ``torch.onnx.export`` (its default, dynamo exporter) is exporting: ONNX has no operator for
      fusedres's ops ("Failed to convert the exported program to an ONNX model"), and the eager
      composition's are ONNX's Conv, BatchNormalization, Add and Relu. (``torch.export`` alone
      keeps the fused ops: the exported program runs them.)
    """
    hooks = nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks
            or hooks._global_backward_hooks or hooks._global_backward_pre_hooks):
        return "global module hooks are registered"
    if _onnx_exporting():  # before the next check: its torch.export capture is compiling
        return "torch.onnx.export is exporting"
    if torch.compiler.is_compiling():
        # The graph holds the ops themselves; and while dynamo traces, peek_interpreter_stack
        # answers as if a transform were active (measured on torch 2.13).
        return None
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return "torch.fx is tracing"
    if torch.jit.is_tracing():
        return "torch.jit.trace is tracing"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform is active"
    if torch.autograd.forward_ad._current_level >= 0:
        return "forward-mode AD is active"
    return None


def _onnx_exporting() -> bool:
    """Whether torch.onnx's (dynamo) exporter is exporting a model; its TorchScript exporter
    traces with torch.jit.trace, which :func:`eager_only_reason` asks about too.

    ``torch.onnx.is_in_onnx_export()`` imports two modules on every call (2.5-3 us, where this is
    asked per unit and call, and torchvision imports torch.onnx): its exporter's flag is read
    directly, only where that exporter is loaded.
    """
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return flags is not None and bool(getattr(flags, "_is_onnx_exporting", False))


def refuse_scripting(module: nn.Module):
    """``__prepare_scriptable__`` of the fused modules: ``torch.jit.script`` calls it on every
    module before compiling any, and would otherwise fail on their forward (Python TorchScript
    does not take) with an error that names neither the module nor a way out.

    Raises:
        RuntimeError: always, naming the module and the remedies.
    """
    raise RuntimeError(
        f"torch.jit.script cannot compile fusedres's {type(module).__name__}: its forward runs "
        "Python that TorchScript does not take. Script the eager twin, which has the same "
        "weights and computes the same: torch.jit.script(fusedres.to_eager(copy.deepcopy("
        "model))); or record the eager composition with torch.jit.trace, or export with "
        "torch.export.")


def forward_replaced(module: nn.Module, *names: str) -> bool:
    """Whether ``forward`` (or another of ``names``) was set on the instance, as tools that wrap
    a module's forward in place do: calling the module runs that, not its class's."""
    return any(name in module.__dict__ for name in ("forward",) + names)


def activation_reason(act: Optional[nn.Module], name: str = "activation") -> Optional[str]:
    """Why a block's or stem's activation module cannot be applied as the fused ReLU, or None
    when it can: exactly ``nn.ReLU`` (``inplace`` either way), no forward or backward hooks, no
    instance ``forward``.

    Args:
        act: the module the eager forward calls as the activation (``block.relu``), or None.
        name: what the reason calls it, e.g. ``"activation relu"``.
    """
    if type(act) is not nn.ReLU:
        return f"{name} is {type(act).__name__}, not nn.ReLU"
    if _hooked(act) or _backward_hooked(act):
        return f"{name} has hooks"
    if forward_replaced(act):
        return f"{name}'s forward is replaced on the instance"
    return None


def _conv_reason(conv: nn.Module) -> Optional[str]:
    if not isinstance(conv, nn.Conv2d):
        return f"conv is {type(conv).__name__}, not nn.Conv2d"
    cls = type(conv)
    if cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward:
        return f"conv is {cls.__name__}, whose forward is not nn.Conv2d's"
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        return "conv is an uninitialised lazy module"
    if conv.bias is not None:
        return "conv has a bias"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if _hooked(conv):
        return "conv has forward hooks"
    if _backward_hooked(conv):
        return "conv has backward hooks"
    if forward_replaced(conv, "_conv_forward"):
        return "conv's forward is replaced on the instance"
    return None


def _norm_reason(norm: nn.Module) -> Optional[str]:
    if forward_replaced(norm):
        return "norm's forward is replaced on the instance"
    if _backward_hooked(norm):
        return "norm has backward hooks"
    if is_frozen_norm(norm):
        return "norm has forward hooks" if _hooked(norm) else None
    name = type(norm).__name__
    if isinstance(norm, nn.SyncBatchNorm):
        return "SyncBatchNorm (statistics across processes)"
    if not isinstance(norm, nn.BatchNorm2d):
        return f"norm is {name}"
    if type(norm).forward is not nn.BatchNorm2d.forward:
        # timm's BatchNormAct2d is a BatchNorm2d subclass whose forward adds drop + activation.
        return f"norm is {name}, whose forward is not nn.BatchNorm2d's"
    if _hooked(norm):
        return "norm has forward hooks"
    return None


def unfusable_reason(conv: nn.Module, norm: nn.Module) -> Optional[str]:
    """Why the unit ``act(norm(conv(x)) + residual)`` cannot run fused, or None when it can.

    Structural only (the modules' types and settings): what the input looks like (dtype, device,
    shape) is checked per call by :func:`fusedres.ops.unit.check_unit_inputs`.

    Args:
        conv: the unit's convolution module.
        norm: the normalisation module that follows it.

    Returns:
        None when the pair runs fused; otherwise a short human-readable reason, e.g.
        ``"conv has a bias"``, ``"padding_mode='reflect'"``, ``"norm is GroupNorm"``,
        ``"SyncBatchNorm (statistics across processes)"``.
    """
    global_reason = eager_only_reason()
    if global_reason is not None:
        return global_reason
    conv_reason = _conv_reason(conv)
    if conv_reason is not None:
        return conv_reason
    norm_reason = _norm_reason(norm)
    if norm_reason is not None:
        return norm_reason
    channels = getattr(norm, "num_features", None)
    if channels is None and is_frozen_norm(norm):
        channels = norm.weight.shape[0]
    if channels != conv.out_channels:
        return f"norm has {channels} channels, conv has out_channels={conv.out_channels}"
    return None
