"""Drop-in fused modules: one unit, torchvision's BasicBlock and Bottleneck.

The blocks take torchvision's constructor arguments and keep its submodules (``conv1``, ``bn1``,
..., ``downsample``) as parameter holders, so parameter and buffer names, state_dict keys and
checkpoints are torchvision's. Only ``forward`` differs. In training, a block runs as one
block-level op (:mod:`fusedres.ops.block`) that keeps no activation feeding only the next
convolution (y1, y2) and rebuilds it in backward; elsewhere (eval, frozen BatchNorm, a custom
downsample, ``recompute="off"``) each conv + BN (+ add) + ReLU chain runs as one fused unit
(:func:`fusedres.ops.conv_bn_act`). A block's repeated calls run from a plan its last call made:
with autograd off its inference plan (its units' plans under one key), in training its call of
the block-level op, checked once (docs/design.md section 4). A norm layer other
than nn.BatchNorm2d (SyncBatchNorm, GroupNorm, ...) keeps its eager semantics inside the same
block.
"""

from __future__ import annotations

import weakref
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from fusedres import reference
from fusedres.backend import current_backend_name, explicit_padding
from fusedres.fusability import (activation_reason, eager_only_reason, forward_replaced,
                                 is_frozen_norm, refuse_scripting)
from fusedres.ops.block import BlockCall, Unit, prepare_block_train, recompute_mode
from fusedres.ops.plans import PlanCache
from fusedres.ops.unit import (InferencePlan, conv_bn_act, conv_bn_act_with_plan,
                               conv_output_shape, holds_nonfinite_on_cpu, input_signature,
                               plan_context, single_value_error, state_watch, unit_state_key,
                               unit_train_key, uses_batch_stats)

__all__ = ["FusedConvBNReLU", "FusedBasicBlock", "FusedBottleneck"]


def _is_conv_bn_pair(ds: Optional[nn.Module]) -> bool:
    """torchvision's downsample: Sequential(conv, norm), exactly nn.Sequential without hooks or
    an instance forward (the block runs the pair as a unit and never calls ds itself);
    conv_bn_act decides whether the pair fuses."""
    if (not (type(ds) is nn.Sequential and len(ds) == 2) or ds._forward_hooks
            or ds._forward_pre_hooks or forward_replaced(ds)):
        return False
    # Its _modules directly: Sequential's indexing costs a few microseconds, and a block asks
    # this up to four times per call.
    conv, norm = ds._modules.values()
    return (isinstance(conv, nn.Conv2d)
            and (isinstance(norm, nn.BatchNorm2d) or is_frozen_norm(norm)))


def _check_block(block: nn.Module, x: torch.Tensor, units: list, name: str) -> None:
    """Raises, before any unit runs, for input that would fail inside the block.

    Each unit checks its input before it touches running statistics, but an input that passes
    the first unit and fails a later one (an identity branch that does not fit the output, a
    feature map too small for a later convolution, one value per channel after a stride) would
    leave the earlier units' statistics updated. The arithmetic here costs a few microseconds.

    Args:
        x: the block's input [N, Cin, H, W]. Input the first unit refuses is left to it: it
            names the problem, and nothing has run yet.
        units: ``[(unit name, conv, bn), ...]`` in order.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != units[0][1].in_channels:
        return
    shape = x.shape
    for index, (unit_name, conv, bn) in enumerate(units):
        out = conv_output_shape(shape, conv)
        too_small = min(out[2:]) <= 0
        single_value = (isinstance(bn, nn.BatchNorm2d) and uses_batch_stats(bn)
                        and out[0] * out[2] * out[3] == 1)
        if (too_small or single_value) and index == 0:
            return
        if too_small:
            raise ValueError(f"{name}.{unit_name}: its input {tuple(shape)} is too small for the "
                             f"{tuple(conv.kernel_size)} convolution (output would be "
                             f"{tuple(out)})")
        if single_value:
            raise single_value_error(out)
        shape = out
    ds = block.downsample
    if ds is None:
        identity = x.shape
    elif _is_conv_bn_pair(ds):
        identity = conv_output_shape(x.shape, ds[0])
    else:
        return  # a custom downsample module: its output is known only once it has run
    if identity != shape:
        raise ValueError(f"{name}: the identity branch has shape {tuple(identity)} but the block's "
                         f"output has shape {tuple(shape)}; a block that changes the channel count "
                         f"or the resolution needs a matching downsample")


def _block_call(block: nn.Module, x: torch.Tensor, units: list,
                name: str) -> Optional[BlockCall]:
    """The block's call of the block-level op, checked, or None where the op does not apply
    (see :func:`fusedres.ops.block.prepare_block_train`). units: ``[(unit name, conv, bn), ...]``."""
    if not torch.is_grad_enabled():
        return None  # prepare_block_train's first condition, before its arguments are built
    ds = block.downsample
    if ds is not None and not _is_conv_bn_pair(ds):
        return None  # a custom downsample runs as the module it is
    convs = [conv for _, conv, _ in units] + ([] if ds is None else [ds[0]])
    if any(explicit_padding(x, conv) is not None for conv in convs):
        return None  # the units pad those inputs explicitly (fusedres.backend.explicit_padding)
    chain = [Unit(f"{name}.{unit_name}", conv, bn, True) for unit_name, conv, bn in units]
    downsample = None if ds is None else Unit(f"{name}.downsample", ds[0], ds[1], False)
    # Blocks made by fusedres.convert bypass __init__ and carry no recompute attribute.
    return prepare_block_train(x, chain, downsample, block.backend,
                               getattr(block, "recompute", None))


class BlockTrainPlan(NamedTuple):
    """A block's training call of the block-level op, as a call that passed every check
    prepared it, under a key of everything those checks and the preparation read
    (:func:`block_train_key`)."""

    key: tuple
    call: BlockCall
    modules: tuple  # the modules the key names by id, held so that no id is reused meanwhile


# block -> its BlockTrainPlan. Weak keys: a plan dies with its block.
# No fold.clear_with_fold_cache: a training call derives nothing from the tensors' values.
_TRAIN_PLANS: "weakref.WeakKeyDictionary[nn.Module, BlockTrainPlan]" = weakref.WeakKeyDictionary()


def block_train_key(block: nn.Module, units: list, x: torch.Tensor
                    ) -> Optional[tuple[tuple, tuple]]:
    """The key of a block's training plan for input x, with the modules it names by id; None
    where no plan applies (a graph being traced, a tensor subclass, a custom downsample, modules
    a unit key cannot describe, a backend or recompute setting the checked path must report).

    It holds x's shape, dtype, device and requires_grad, the backend in force and the autocast
    state, the recompute mode, and each unit's :func:`~fusedres.ops.unit.unit_train_key`: all
    that the block's checks and :func:`fusedres.ops.block.prepare_block_train` read. Call it
    with autograd on.

    Args:
        block: a FusedBasicBlock or FusedBottleneck.
        units: its ``[(unit name, conv, bn), ...]``.
        x: the block input.
    """
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    ds = block._modules.get("downsample")  # None: no downsample (set as a plain attribute)
    modules = [ds]
    try:
        key = [type(block), x.shape, x.dtype, x.device, x.requires_grad,
               plan_context(block.backend, x.device.type),
               recompute_mode(getattr(block, "recompute", None)), id(ds)]
    except (ValueError, RuntimeError):
        return None  # an unknown backend or recompute setting: the checked path names it
    if ds is not None:
        if type(ds) is not nn.Sequential or len(ds._modules) != 2:
            return None
        ds_conv, ds_bn = ds._modules.values()
        modules += [ds_conv, ds_bn]
        key += [id(ds_conv), id(ds_bn), unit_train_key(ds_conv, ds_bn)]
    for _, conv, bn in units:
        modules += [conv, bn]
        key += [id(conv), id(bn), unit_train_key(conv, bn)]
    return None if None in key else (tuple(key), tuple(modules))


class BlockPlan(NamedTuple):
    """A block's inference, as its last call ran it: each unit's inference plan
    (:mod:`fusedres.ops.unit`), under a key that holds the block input's signature and every
    unit's :func:`~fusedres.ops.unit.unit_state_key`, which together fix every intermediate
    signature and so every unit plan's key.

    With a downsample the residual add and the ReLU belong to the downsample's unit, as in
    :func:`block_forward_with_plan`'s inference order: the last main unit has neither.

    Once its key has matched a second time it also holds a watch of the state that key was read
    from (csrc/state_watch.h), so that later calls need not read the key while nothing it
    watches changed."""

    key: tuple
    downsample: Optional[InferencePlan]  # None: the identity
    units: tuple  # the main path's InferencePlans, in order
    watch: object = None  # fusedres._C.StateWatch, or None

    def unchanged_for(self, block: nn.Module, x: torch.Tensor) -> bool:
        """Whether the key would still match for ``block`` on x: the same block class, input
        signature, backend choice and autocast state (:func:`block_state_key`'s order), and
        every watched object unchanged."""
        return (type(block) is self.key[1] and input_signature(x) == self.key[0]
                and plan_context(block.backend, x.device.type) == self.key[2]
                and self.watch.unchanged())

    def run(self, x: torch.Tensor, x_is_dead: bool) -> torch.Tensor:
        out = x
        for plan in self.units[:-1]:
            out = plan.run(out, None)
        if self.downsample is None:
            # The last unit may write its output into the block's input when no one reads it
            # again (the caller says so).
            return self.units[-1].run(out, x, x_is_dead)
        # The main path's output is read by the downsample's unit only: its sum goes there.
        return self.downsample.run(x, self.units[-1].run(out, None), True)


# block -> its BlockPlans by input signature (the key's first entry).
_BLOCK_PLANS = PlanCache()


def block_state_key(block: nn.Module, units: list, device_type: str) -> Optional[tuple]:
    """Everything about a block's modules its inference plan depends on (the plan's key without
    the input's signature), or None where no plan applies (autograd on, a graph being traced, a
    custom downsample, modules a unit key cannot describe, an activation other than the ReLU the
    fused units apply).

    Args:
        block: a FusedBasicBlock or FusedBottleneck.
        units: its ``[(unit name, conv, bn), ...]``.
        device_type: the input's (its autocast state is part of the key).
    """
    if (torch.is_grad_enabled() or torch.compiler.is_compiling()
            or block_activation_reason(block) is not None):
        return None
    ds = block._modules.get("downsample")  # None: no downsample (set as a plain attribute)
    key = [type(block), plan_context(block.backend, device_type), id(ds)]
    if ds is not None:
        if not _is_conv_bn_pair(ds):
            return None
        key += [id(ds[0]), unit_state_key(ds[0], ds[1], False)]
    for _, conv, bn in units:
        key += [id(conv), unit_state_key(conv, bn, True)]
    return None if None in key else tuple(key)


def block_activation_reason(block: nn.Module) -> Optional[str]:
    """Why a fused block's activations (torchvision's ``relu``; ``act1``..``act3`` of a block
    converted from timm's) are not the ReLU its fused units apply, or None when they are.

    Args:
        block: a FusedBasicBlock or FusedBottleneck.
    """
    acts = [(name, module) for name, module in block._modules.items()
            if name == "relu" or name.startswith("act")]
    if not acts:
        return "no activation module"
    for name, act in acts:
        reason = activation_reason(act, f"activation {name}")
        if reason is not None:
            return reason
    return None


def _eager_forward(block: nn.Module) -> Callable:
    """The forward of the eager class a fused block stands for: the one convert took it from
    (timm's, torchvision's), else fusedres.reference's."""
    eager = block.__dict__.get("_fusedres_eager_class")
    if eager is None:
        eager = (reference.Bottleneck if isinstance(block, reference.Bottleneck)
                 else reference.BasicBlock)
    return eager.forward


def _units(block: nn.Module) -> list:
    """``[(unit name, conv, bn), ...]`` of a fused block's main path."""
    # _modules directly: nn.Module.__getattr__ costs about a microsecond a lookup.
    mods = block._modules
    units = [("conv1", mods["conv1"], mods["bn1"]), ("conv2", mods["conv2"], mods["bn2"])]
    if "conv3" in mods:
        units.append(("conv3", mods["conv3"], mods["bn3"]))
    return units


def block_forward(block: nn.Module, x: torch.Tensor, x_is_dead: bool = False) -> torch.Tensor:
    """A fused BasicBlock's or Bottleneck's forward.

    Args:
        block: a FusedBasicBlock or FusedBottleneck.
        x: [N, inplanes, H, W].
        x_is_dead: the caller never reads x again (nor anything sharing its memory), so an
            inference call may write the block's output into it (:class:`FusedResNet` passes
            it for the activations it made itself).

    Returns:
        [N, planes * expansion, H/stride, W/stride].
    """
    return block_forward_with_plan(block, x, x_is_dead)[0]


def block_forward_with_plan(block: nn.Module, x: torch.Tensor,
                            x_is_dead: bool = False) -> tuple[torch.Tensor, Optional[BlockPlan]]:
    """:func:`block_forward`, and the inference plan the call ran from (made or reused), or None
    where it ran none. A caller that repeats the call with an input of the same signature while
    :func:`block_state_key` is unchanged may run the plan directly."""
    if block_activation_reason(block) is not None or eager_only_reason() is not None:
        # The fused units apply ReLU whatever the block's activations are: a swapped one (or one
        # with hooks) runs the block's eager forward, which calls it; so do global module hooks,
        # which fire only for the modules that are called, and autograd transforms, which the
        # fused ops do not support (eager_only_reason).
        return _eager_forward(block)(block, x), None
    if not torch.is_grad_enabled() and holds_nonfinite_on_cpu(x):
        # A NaN or inf in the input: the eager forward keeps NaN where eager puts it (inside,
        # the units' plans run unchecked: from a finite input and finite folded weights, no
        # NaN arises in float32 or bfloat16).
        return _eager_forward(block)(block, x), None
    name = type(block).__name__
    units = _units(block)
    train_key = None
    # Frozen or running statistics (frozen-BN fine-tuning) never take the block op: no key then.
    if torch.is_grad_enabled() and all(isinstance(bn, nn.BatchNorm2d) and uses_batch_stats(bn)
                                       for _, _, bn in units):
        train_key = block_train_key(block, units, x)
        if train_key is not None:
            train_plan = _TRAIN_PLANS.get(block)
            if train_plan is not None and train_plan.key == train_key[0]:
                # The same signature and module state as a call that passed every check.
                return train_plan.call.run(x), None
    plan = None
    if (type(x) is torch.Tensor and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        signature = input_signature(x)
        plan = _BLOCK_PLANS.get(block, signature)
        if plan is not None and plan.watch is not None and plan.unchanged_for(block, x):
            # Nothing the plan's key reads has changed since it last matched.
            return plan.run(x, x_is_dead), plan
    state = None if type(x) is not torch.Tensor else block_state_key(block, units, x.device.type)
    key = None if state is None else (input_signature(x),) + state
    if plan is not None and plan.key == key:
        # Watch from this second match on (a FusedResNet's own plan makes its blocks' plans
        # once and runs them past this function: no watch for those).
        watch = state_watch(block, list(block.modules())[1:])
        if watch is not None:
            plan = plan._replace(watch=watch)
            _BLOCK_PLANS.put(block, key[0], state, plan)
        return plan.run(x, x_is_dead), plan
    _check_block(block, x, units, name)
    call = _block_call(block, x, units, name)
    if call is not None:
        out = call.run(x)
        if train_key is not None:
            _TRAIN_PLANS[block] = BlockTrainPlan(train_key[0], call, train_key[1])
        return out, None
    ds = block.downsample
    ds_plan = None
    if _is_conv_bn_pair(ds) and not torch.is_grad_enabled():
        # Inference with a conv + BN downsample, in inductor's order: the main path first, its
        # last unit without residual and ReLU, then the downsample's unit adds that output and
        # applies the ReLU, summing into it (BlockPlan.run). The same sum, y = relu(bn(ds(x)) +
        # bn(conv(out))), but oneDNN's sum post-op lands on the 1x1 instead of a resnet18's
        # 3x3, whose sum variant ran slower (docs/design.md section 4).
        out, plans = x, []
        for index, (unit_name, conv, bn) in enumerate(units):
            out, plan = conv_bn_act_with_plan(out, conv, bn, None, index < len(units) - 1,
                                              block.backend, f"{name}.{unit_name}")
            plans.append(plan)
        out, ds_plan = conv_bn_act_with_plan(x, ds[0], ds[1], out, True, block.backend,
                                             f"{name}.downsample")
    else:
        if ds is None:
            identity = x
        elif _is_conv_bn_pair(ds):
            identity, ds_plan = conv_bn_act_with_plan(x, ds[0], ds[1], None, False,
                                                      block.backend, f"{name}.downsample")
        else:
            identity = ds(x)
        out, plans = x, []
        for index, (unit_name, conv, bn) in enumerate(units):
            residual = identity if index == len(units) - 1 else None
            out, plan = conv_bn_act_with_plan(out, conv, bn, residual, True, block.backend,
                                              f"{name}.{unit_name}")
            plans.append(plan)
    if key is not None and None not in plans and (ds is None or ds_plan is not None):
        block_plan = BlockPlan(key, ds_plan, tuple(plans))
        _BLOCK_PLANS.put(block, key[0], state, block_plan)
        return out, block_plan
    return out, None


class FusedConvBNReLU(reference.ConvBNAct):
    """One fused unit ``act(bn(conv(x)) + residual)``.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as nn.Conv2d
            (no bias: BatchNorm follows).
        padding: as nn.Conv2d; default ``dilation * (kernel_size // 2)`` keeps H and W at stride 1.
        relu: apply ReLU at the end.
        eps, momentum, affine, track_running_stats: as nn.BatchNorm2d.
        backend: a backend name (see fusedres.backend), or None for the global choice.

    Shapes:
        x: [N, in_channels, H, W]; residual: [N, out_channels, Ho, Wo] or None;
        output: [N, out_channels, Ho, Wo].
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                 groups: int = 1, relu: bool = True, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, relu, eps, momentum, affine, track_running_stats, device, dtype)
        self.backend = None if backend is None else current_backend_name(backend)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return conv_bn_act(x, self.conv, self.bn, residual, self.relu, self.backend,
                           name=type(self).__name__)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend or 'default'}"


class FusedBasicBlock(reference.BasicBlock):
    """torchvision's BasicBlock with fused units; same arguments plus ``backend`` and
    ``recompute``.

    Args:
        backend: a backend name, or None for the global choice.
        recompute: what a training forward does not keep for backward (see
            :mod:`fusedres.ops.block`): ``"bn_act"`` (y1, y2: rebuilt from z), ``"conv1"``
            (a Bottleneck's z1 too: its 1x1 conv1 runs again in backward), ``"off"`` (the
            per-unit path, which keeps them and supports double backward), or None for
            ``FUSEDRES_BLOCK_RECOMPUTE`` (default ``"bn_act"``).

    Shapes: [N, inplanes, H, W] -> [N, planes, H/stride, W/stride].
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 backend: Optional[str] = None, recompute: Optional[str] = None) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation,
                         norm_layer)
        self.backend = None if backend is None else current_backend_name(backend)
        self.recompute = None if recompute is None else recompute_mode(recompute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_forward(self, x)


class FusedBottleneck(reference.Bottleneck):
    """torchvision's Bottleneck (v1.5) with fused units; same arguments plus ``backend`` and
    ``recompute``.

    Args:
        backend: a backend name, or None for the global choice.
        recompute: what a training forward does not keep for backward (see
            :mod:`fusedres.ops.block`): ``"bn_act"`` (y1, y2: rebuilt from z), ``"conv1"``
            (a Bottleneck's z1 too: its 1x1 conv1 runs again in backward), ``"off"`` (the
            per-unit path, which keeps them and supports double backward), or None for
            ``FUSEDRES_BLOCK_RECOMPUTE`` (default ``"bn_act"``).

    Shapes: [N, inplanes, H, W] -> [N, planes*4, H/stride, W/stride].
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 backend: Optional[str] = None, recompute: Optional[str] = None) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation,
                         norm_layer)
        self.backend = None if backend is None else current_backend_name(backend)
        self.recompute = None if recompute is None else recompute_mode(recompute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_forward(self, x)
