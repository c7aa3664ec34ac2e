"""Fused ResNets: torchvision's architectures, state_dict keys and initialisation, fused units.

Every builder takes ``weights`` (a path to a local torchvision-format checkpoint, or a
state_dict; nothing is ever downloaded), ``backend`` and torchvision's keyword arguments
(``num_classes``, ``zero_init_residual``, ``norm_layer``, ...).
"""

from __future__ import annotations

import operator
import os
from typing import Iterable, NamedTuple, Optional, Union

import torch
import torch.nn as nn

from fusedres import reference
from fusedres.backend import current_backend_name
from fusedres.fusability import (activation_reason, eager_only_reason, forward_replaced,
                                 is_frozen_norm, refuse_scripting)
from fusedres.modules import (FusedBasicBlock, FusedBottleneck, block_forward_with_plan,
                              block_state_key)
from fusedres.ops.plans import PlanCache
from fusedres.ops.pool import inference_max_pool, max_pool_geometry, max_pool_output_hw
from fusedres.ops.unit import (InferencePlan, conv_bn_act, conv_bn_act_with_plan,
                               holds_nonfinite_on_cpu, input_signature, plan_context,
                               single_value_error, state_watch, unit_state_key, uses_batch_stats)

__all__ = [
    "FusedResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
    "wide_resnet101_2", "load_checkpoint", "block_units", "check_chain",
]

Weights = Union[None, str, os.PathLike, dict]


class FusedResNet(reference.ResNet):
    """torchvision's ResNet with a fused stem and fused blocks.

    Args:
        block: FusedBasicBlock or FusedBottleneck.
        layers, num_classes, zero_init_residual, groups, width_per_group,
        replace_stride_with_dilation, norm_layer: as torchvision.models.ResNet.
        backend: the backend of every unit (None: the global choice).

    Shapes: [N, 3, H, W] -> [N, num_classes].
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, block, layers: list, num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[list] = None, norm_layer=None,
                 backend: Optional[str] = None) -> None:
        super().__init__(block, layers, num_classes, zero_init_residual, groups, width_per_group,
                         replace_stride_with_dilation, norm_layer,
                         block_kwargs={"backend": backend})
        self.backend = None if backend is None else current_backend_name(backend)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        if (activation_reason(self._modules.get("relu")) is not None
                or eager_only_reason() is not None):
            # A swapped activation (or one with hooks), or global module hooks or an autograd
            # transform (eager_only_reason): eager, calling the modules.
            return super().stem(x)
        return conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend,
                           name="ResNet.conv1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A NaN or inf in the input: through the modules, whose units and blocks take their
        # eager composition then (holds_nonfinite_on_cpu); the plans run their units unchecked.
        finite = torch.is_grad_enabled() or not holds_nonfinite_on_cpu(x)
        x_inside = None
        if (type(x) is torch.Tensor and not torch.is_grad_enabled() and finite
                and not torch.compiler.is_compiling() and eager_only_reason() is None):
            x_inside = self._activation_layout(x)
            plan = _MODEL_PLANS.get(self, input_signature(x_inside))
            # Nothing the plan's key reads has changed since it last matched: the key would
            # match again (the watch is its cheaper stand-in; the key below remains the rule).
            if plan is not None and plan.watch is not None and plan.unchanged_for(self, x_inside):
                return self._head(plan.run(x_inside, self.maxpool))
        stays_inside = type(x) is torch.Tensor and self._activations_stay_inside()
        inference = stays_inside and not torch.is_grad_enabled() and finite
        if inference:
            x = self._activation_layout(x) if x_inside is None else x_inside
            key = self._inference_key(x)
            plan = None if key is None else _MODEL_PLANS.get(self, key[0])
            if plan is not None and plan.key == key:
                # The same signatures and module state as a call that passed check_chain and
                # made these plans: neither can tell anything new.
                # Only a call whose watch failed (or that has none) gets here: watch from now on.
                watch = self._state_watch()
                if watch is not None:
                    plan = plan._replace(global_context=plan_context(None, x.device.type),
                                         watch=watch)
                    _MODEL_PLANS.put(self, key[0], key[1:], plan)
                return self._head(plan.run(x, self.maxpool))
        check_chain(x, [("conv1", self.conv1), ("bn1", self.bn1), ("relu", self.relu),
                        ("maxpool", self.maxpool), ("layer1", self.layer1),
                        ("layer2", self.layer2), ("layer3", self.layer3), ("layer4", self.layer4)])
        if not inference:
            return super().forward(self._activation_layout(x) if stays_inside else x)
        # Inference: every activation from the stem on is made here and read by the next block
        # only, so each block may write its output into its input (oneDNN's in-place
        # convolution + sum on the CPU, as inductor does), one activation less streamed
        # through the caches per block. The max pool writes no indices (fusedres/ops/pool.py).
        x, stem_plan = conv_bn_act_with_plan(x, self.conv1, self.bn1, None, True, self.backend,
                                             "ResNet.conv1")
        x = inference_max_pool(self.maxpool, x)
        block_plans = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer._modules.values():
                x, block_plan = block_forward_with_plan(block, x, x_is_dead=True)
                block_plans.append(block_plan)
        if key is not None and stem_plan is not None and None not in block_plans:
            _MODEL_PLANS.put(self, key[0], key[1:],
                             _ModelPlan(key, stem_plan, tuple(block_plans), type(self),
                                        plan_context(None, x.device.type), self._state_watch()))
        return self._head(x)

    def _state_watch(self):
        """A state watch (:func:`fusedres.ops.unit.state_watch`) of every module up to the
        pooled features, or None without the extension."""
        return state_watch(self, [m for name, child in self._modules.items() if name not in _HEAD
                                  for m in child.modules()])

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    @staticmethod
    def _activation_layout(x: torch.Tensor) -> torch.Tensor:
        # On the CPU the activations are channels_last whatever the input's layout (inductor's
        # layout choice too), since no one outside sees them: in inference oneDNN's
        # convolutions take prepacked weights and the residual add only there, in training the
        # cpu backend's GEMM convolutions (docs/design.md section 4) apply only there.
        if x.device.type == "cpu" and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _inference_key(self, x: torch.Tensor) -> Optional[tuple]:
        """The key of the whole model's inference plan for input x: its signature, the stem's
        and every block's state keys (:func:`fusedres.modules.block_state_key`), the max pool's
        geometry; None where some part has no plan. It holds everything check_chain reads."""
        if torch.compiler.is_compiling():
            return None
        device_type = x.device.type
        pool = self.maxpool
        mods = self._modules
        key = [input_signature(x), plan_context(self.backend, device_type), id(mods["conv1"]),
               unit_state_key(mods["conv1"], mods["bn1"], True), id(pool),
               _POOL_GEOMETRY(pool) if type(pool) is nn.MaxPool2d else None]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for block in mods[name]._modules.values():
                key += [id(block), block_state_key(block, block_units(block), device_type)]
        key = tuple(key)
        return None if key[3] is None or None in key[7::2] else key

    def _activations_stay_inside(self) -> bool:
        """Whether no one but the next block can see a block's input or output: no hooks (a hook
        may keep the tensor it is shown) on the model, the stages, the blocks or the max pool,
        nor global ones; the stem (with its ReLU), max pool and stages of the kinds that make a
        new tensor; the blocks fusedres's own (a subclass, or a forward set on the instance, may
        keep its input). Else the call runs through the modules, as nn's forward does."""
        if (eager_only_reason() is not None
                or type(self).stem is not FusedResNet.stem or forward_replaced(self, "stem")
                or activation_reason(self._modules.get("relu")) is not None
                or type(self.maxpool) not in (nn.MaxPool2d, nn.Identity)
                or forward_replaced(self.maxpool)):
            return False
        modules = [self, self.maxpool]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if type(layer) is not nn.Sequential or forward_replaced(layer):
                return False
            modules.append(layer)
            for block in layer._modules.values():
                if type(block) not in (FusedBasicBlock, FusedBottleneck) or forward_replaced(block):
                    return False
                modules.append(block)
        return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class _ModelPlan(NamedTuple):
    """A FusedResNet's inference up to the pooled features, as its last call ran it: the stem's
    plan and every block's, under :meth:`FusedResNet._inference_key`; and a watch of the state
    that key was read from, valid while nothing it watches changed (csrc/state_watch.h), so that
    a call need not read the key again."""

    key: tuple
    stem: InferencePlan
    blocks: tuple  # BlockPlan per block, in order
    model_type: type
    global_context: tuple  # plan_context(None, ...): what blocks without a backend of their own use
    watch: object  # fusedres._C.StateWatch, or None

    def unchanged_for(self, model: "FusedResNet", x: torch.Tensor) -> bool:
        """Whether the key would still match for ``model`` on x (already in the activation
        layout): the same input signature, the same backend choices (the model's and the global
        one), autocast state and eager-only state (plan_context), the model's class and stem,
        and every watched object unchanged."""
        model_type = type(model)
        device_type = x.device.type
        return (model_type is self.model_type and model_type.stem is FusedResNet.stem
                and input_signature(x) == self.key[0]
                and plan_context(model.backend, device_type) == self.key[1]
                and plan_context(None, device_type) == self.global_context
                and self.watch.unchanged())

    def run(self, x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
        x = inference_max_pool(pool, self.stem.run(x, None))
        for block in self.blocks:
            x = block.run(x, True)
        return x


# model -> its _ModelPlans by input signature (the key's first entry).
_MODEL_PLANS = PlanCache()
# FusedResNet's children that run after the plan, as ordinary modules.
_HEAD = ("avgpool", "fc")
# nn.MaxPool2d's geometry, read in one C call.
_POOL_GEOMETRY = operator.attrgetter("kernel_size", "stride", "padding", "dilation",
                                     "return_indices", "ceil_mode")

_BLOCK_UNITS = {reference.BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
                reference.Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))}


def block_units(block: nn.Module) -> Optional[list]:
    """The main-path units of a BasicBlock or Bottleneck (eager or fused), in order.

    Returns:
        ``[(conv name, conv, norm), ...]``, or None when ``block`` is no such block.
    """
    for cls, names in _BLOCK_UNITS.items():
        if isinstance(block, cls):
            # _modules directly: nn.Module.__getattr__ costs a microsecond a call, and the
            # pre-check below runs on every forward.
            mods = block._modules
            return [(conv, mods[conv], mods[norm]) for conv, norm in names]
    return None


def _conv_hw(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (conv.kernel_size, conv.stride, conv.padding,
                                              conv.dilation)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _maxpool_hw(pool: nn.MaxPool2d, h: int, w: int) -> tuple[int, int]:
    """nn.MaxPool2d's output size (ATen's formula, ceil_mode included)."""
    return max_pool_output_hw(h, w, *max_pool_geometry(pool), pool.ceil_mode)


def check_chain(x: torch.Tensor, modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Raises, before anything runs, for input that a later layer of a chain would refuse.

    A training call that fails in layer4 (one value per channel, a feature map smaller than a
    kernel) would otherwise leave every BatchNorm before it with updated running statistics and
    ``num_batches_tracked``. This walks the shapes through the chain with integer arithmetic and
    raises what the failing layer would raise, once some earlier BatchNorm would have updated its
    statistics; a failure before that is left to the layer itself. It follows what it knows
    exactly (nn.Conv2d, BatchNorm, FrozenBatchNorm2d, ReLU, Identity, nn.MaxPool2d,
    BasicBlock/Bottleneck blocks, nn.Sequential stages of these) and stops, silently, at the
    first module it does not: what that returns is known only once it has run.

    Args:
        x: the chain's input [N, C, H, W]; anything else is left to the first layer.
        modules: ``(name, module)`` in the order the chain runs them.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return
    n, c, h, w = x.shape
    updated = False  # whether a BatchNorm before this point updates its running statistics
    stack = [((name,), m) for name, m in reversed(list(modules))]
    while stack:
        path, m = stack.pop()
        kind = type(m)
        if kind is nn.Sequential:
            stack += [(path + (k,), v) for k, v in reversed(m._modules.items())]
            continue
        if kind is nn.MaxPool2d:
            h, w = _maxpool_hw(m, h, w)
            if h <= 0 or w <= 0:
                return  # nn.MaxPool2d raises, and it changes no state
            continue
        if kind in (nn.ReLU, nn.Identity) or is_frozen_norm(m):
            continue
        if kind is nn.Conv2d and not isinstance(m.padding, str):
            units = [(path, m, None)]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            units = [(path, None, m)]
        else:
            units = block_units(m)
            if units is None:
                return
            # The main path only, as the blocks' own check: a failure there is what torchvision's
            # blocks raise too (they run the downsample last).
            units = [(path + (unit,), conv, norm) for unit, conv, norm in units]
        state = _walk_units(units, n, c, h, w, updated)
        if state is None:
            return
        c, h, w, updated = state


def _walk_units(units: list, n: int, c: int, h: int, w: int, updated: bool) -> Optional[tuple]:
    """Steps (c, h, w) through ``[(path, conv or None, norm or None), ...]``; raises the error a
    unit would raise once ``updated`` (some earlier BatchNorm updated its statistics).

    Returns:
        (c, h, w, updated) after the units; None where the walk must stop: a channel mismatch
        or a failure before any statistics changed, which the layer itself reports.
    """
    for path, conv, norm in units:
        if conv is not None:
            if c != conv.in_channels:
                return None
            ho, wo = _conv_hw(conv, h, w)
            if ho <= 0 or wo <= 0:
                if not updated:
                    return None
                raise ValueError(f"{'.'.join(path)}: its input {(n, c, h, w)} is too small for "
                                 f"the {tuple(conv.kernel_size)} convolution (output would be "
                                 f"{(n, conv.out_channels, ho, wo)})")
            c, h, w = conv.out_channels, ho, wo
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            if n * h * w == 1 and uses_batch_stats(norm):
                if not updated:
                    return None
                raise single_value_error((n, c, h, w))
            updated = updated or (norm.training and norm.track_running_stats)
    return c, h, w, updated


def load_checkpoint(model: torch.nn.Module, weights: Weights, strict: bool = True) -> None:
    """Loads a torchvision-format checkpoint (a local path or a state_dict) into ``model``.

    A file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (common training-script
    layouts) is unwrapped first.
    """
    if weights is None:
        return
    if isinstance(weights, (str, os.PathLike)):
        state = torch.load(weights, map_location="cpu", weights_only=True)
    elif isinstance(weights, dict):
        state = weights
    else:
        raise TypeError("weights must be None, a path to a local checkpoint file or a state_dict, "
                        f"got {type(weights).__name__} (fusedres never downloads weights)")
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    model.load_state_dict(state, strict=strict)


def _build(block, layers, weights: Weights, backend: Optional[str], **kwargs) -> FusedResNet:
    model = FusedResNet(block, layers, backend=backend, **kwargs)
    load_checkpoint(model, weights)
    return model


def resnet18(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-18: BasicBlock [2, 2, 2, 2]."""
    return _build(FusedBasicBlock, [2, 2, 2, 2], weights, backend, **kwargs)


def resnet34(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-34: BasicBlock [3, 4, 6, 3]."""
    return _build(FusedBasicBlock, [3, 4, 6, 3], weights, backend, **kwargs)


def resnet50(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-50 (v1.5): Bottleneck [3, 4, 6, 3]."""
    return _build(FusedBottleneck, [3, 4, 6, 3], weights, backend, **kwargs)


def resnet101(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-101: Bottleneck [3, 4, 23, 3]."""
    return _build(FusedBottleneck, [3, 4, 23, 3], weights, backend, **kwargs)


def resnet152(*, weights: Weights = None, backend: Optional[str] = None, **kwargs) -> FusedResNet:
    """ResNet-152: Bottleneck [3, 8, 36, 3]."""
    return _build(FusedBottleneck, [3, 8, 36, 3], weights, backend, **kwargs)


def resnext50_32x4d(*, weights: Weights = None, backend: Optional[str] = None,
                    **kwargs) -> FusedResNet:
    """ResNeXt-50 32x4d: Bottleneck [3, 4, 6, 3], 32 groups of width 4."""
    return _build(FusedBottleneck, [3, 4, 6, 3], weights, backend, groups=32, width_per_group=4,
                  **kwargs)


def resnext101_32x8d(*, weights: Weights = None, backend: Optional[str] = None,
                     **kwargs) -> FusedResNet:
    """ResNeXt-101 32x8d: Bottleneck [3, 4, 23, 3], 32 groups of width 8."""
    return _build(FusedBottleneck, [3, 4, 23, 3], weights, backend, groups=32, width_per_group=8,
                  **kwargs)


def resnext101_64x4d(*, weights: Weights = None, backend: Optional[str] = None,
                     **kwargs) -> FusedResNet:
    """ResNeXt-101 64x4d: Bottleneck [3, 4, 23, 3], 64 groups of width 4."""
    return _build(FusedBottleneck, [3, 4, 23, 3], weights, backend, groups=64, width_per_group=4,
                  **kwargs)


def wide_resnet50_2(*, weights: Weights = None, backend: Optional[str] = None,
                    **kwargs) -> FusedResNet:
    """Wide ResNet-50-2: Bottleneck [3, 4, 6, 3] with twice the inner width."""
    return _build(FusedBottleneck, [3, 4, 6, 3], weights, backend, width_per_group=128, **kwargs)


def wide_resnet101_2(*, weights: Weights = None, backend: Optional[str] = None,
                     **kwargs) -> FusedResNet:
    """Wide ResNet-101-2: Bottleneck [3, 4, 23, 3] with twice the inner width."""
    return _build(FusedBottleneck, [3, 4, 23, 3], weights, backend, width_per_group=128, **kwargs)
