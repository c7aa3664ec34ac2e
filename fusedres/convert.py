"""Swap ResNets between eager and fused modules, sharing parameters; say what runs fused.

:func:`convert` recognises, by class and attribute names (neither torchvision nor timm is
imported):

- blocks: ``BasicBlock`` / ``Bottleneck`` in torchvision's layout (``conv1``, ``bn1``, ...,
  ``relu``, ``downsample``; fusedres.reference's too) or timm's (``act1``..``act3``,
  ``drop_block``, ``aa``, ``se``, ``drop_path``). A timm block with one of its optional parts
  (attention ``se``, anti-aliasing ``aa``, DropBlock or DropPath that can drop) or an activation
  other than ReLU stays eager, and the summary says why. A downsample that is not a plain
  (conv, norm) pair, e.g. timm's average-pool one (AvgPool2d, 1x1 conv, norm), becomes a
  :class:`FusedSequential`.
- stems: torchvision's ``ResNet`` (it becomes a :class:`fusedres.models.FusedResNet`);
  torchvision's ``IntermediateLayerGetter``, the body of its detection and segmentation models
  (in ``BackboneWithFPN`` or not): ``conv1``/``bn1``/``relu``; timm's ``ResNet``: the 7x7 stem or
  the deep stem (three conv + BN + ReLU) with ``bn1``/``act1``.
- with ``convert(..., sequentials=True)``, any other nn.Sequential (or subclass keeping
  nn.Sequential's forward) outside those that holds a conv + norm (+ ReLU) run: the heads of
  torchvision's segmentation models (FCNHead, DeepLabHead's ASPP branches and projection).

The new modules take over the old ones' submodules (the very same nn.Conv2d and norm objects),
so nothing is copied, state_dict keys do not change, and an optimizer built on the old parameters
keeps training the converted model. :func:`to_eager` gives back the original classes.
Which units then run fused is decided per unit by :mod:`fusedres.fusability`;
:func:`fusion_summary` counts them and gives the reasons for the others.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

from fusedres import reference
from fusedres.backend import current_backend_name
from fusedres.fusability import (activation_reason, forward_replaced, is_frozen_norm,
                                 refuse_scripting, unfusable_reason)
from fusedres.models.resnet import FusedResNet, check_chain
from fusedres.modules import (FusedBasicBlock, FusedBottleneck, FusedConvBNReLU,
                              block_activation_reason)
from fusedres.ops.unit import conv_bn_act

__all__ = ["FusedSequential", "FusionSummary", "UnitReport", "convert", "fusion_summary",
           "to_eager"]

_log = logging.getLogger("fusedres")

_TV_BLOCK = {"BasicBlock": ("conv1", "bn1", "conv2", "bn2", "relu"),
             "Bottleneck": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu")}
_TIMM_BLOCK = {"BasicBlock": ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2",
                              "act2"),
               "Bottleneck": ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa",
                              "conv3", "bn3", "act3")}
# Optional children: None or absent when unused (timm's se, drop_path, a block's downsample).
_TIMM_OPTIONAL = ("downsample", "se", "drop_path")
_RESNET_ATTRS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                 "avgpool", "fc")
_TIMM_RESNET_ATTRS = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
_TO_FUSED = {"BasicBlock": FusedBasicBlock, "Bottleneck": FusedBottleneck}
_TO_EAGER = {FusedBasicBlock: reference.BasicBlock, FusedBottleneck: reference.Bottleneck,
             FusedResNet: reference.ResNet, FusedConvBNReLU: reference.ConvBNAct}
_NOT_CONVERTED = "not converted (call fusedres.convert)"


# -- the summary ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UnitReport:
    """One conv + norm (+ ReLU) unit of a model.

    Attributes:
        name: the qualified name of its convolution, e.g. ``"backbone.body.layer1.0.conv1"``.
        reason: None when it runs fused, else why it runs eagerly.
    """

    name: str
    reason: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class FusionSummary:
    """Which units of a model run fused, and why the others do not.

    Attributes:
        units: every unit found in a recognised block, stem or FusedSequential, in module order.
    """

    units: tuple

    @property
    def fused(self) -> int:
        """How many units run fused."""
        return sum(u.reason is None for u in self.units)

    @property
    def eager(self) -> tuple:
        """The UnitReports of the units left eager."""
        return tuple(u for u in self.units if u.reason is not None)

    def reasons(self) -> dict:
        """``{reason: number of units}`` for the units left eager."""
        return dict(collections.Counter(u.reason for u in self.eager))

    def __str__(self) -> str:
        if not self.units:
            return "no ResNet block, stem or conv + norm unit found"
        text = f"{self.fused} of {len(self.units)} conv + norm units fused"
        if self.eager:
            text += "; left eager: " + "; ".join(f"{n} x {r}" for r, n in self.reasons().items())
        return text


# -- recognising blocks and stems ----------------------------------------------------------------

def _is_noop(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` is absent or returns its input unchanged in training and eval."""
    if module is None or type(module) is nn.Identity:
        return True
    # timm's DropPath and DropBlock2d return their input when drop_prob is 0.
    return (type(module).__name__ in ("DropPath", "DropBlock2d")
            and getattr(module, "drop_prob", None) == 0)


def _is_relu(module: nn.Module) -> bool:
    return activation_reason(module) is None


def _block_layout(module: nn.Module) -> Optional[str]:
    """``"torchvision"`` or ``"timm"`` for a BasicBlock/Bottleneck of that layout, else None."""
    name = type(module).__name__
    if name not in _TV_BLOCK or not hasattr(module, "downsample"):
        return None
    if all(hasattr(module, a) for a in _TIMM_BLOCK[name]):
        return "timm"
    if all(hasattr(module, a) for a in _TV_BLOCK[name]):
        return "torchvision"
    return None


def _block_reason(module: nn.Module, layout: str) -> Optional[str]:
    """Why the block as a whole cannot become a fused block, or None."""
    name = type(module).__name__
    known = _TIMM_BLOCK[name] + _TIMM_OPTIONAL if layout == "timm" else _TV_BLOCK[name] + (
        "downsample",)
    for child, sub in module.named_children():
        if child not in known:
            return f"unknown submodule {child!r} ({type(sub).__name__})"
    acts = [a for a in known if a.startswith(("act", "relu"))]
    for act in acts:
        reason = activation_reason(getattr(module, act), f"activation {act}")
        if reason is not None:
            return reason
    if layout == "timm":
        if getattr(module, "se", None) is not None:
            return f"attention: se is {type(module.se).__name__}"
        for part, what in (("aa", "anti-aliasing"), ("drop_block", "DropBlock"),
                           ("drop_path", "stochastic depth")):
            if not _is_noop(getattr(module, part, None)):
                return f"{what}: {part} is {type(getattr(module, part)).__name__}"
    return None


def _is_norm(module: nn.Module) -> bool:
    return (isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm))
            or is_frozen_norm(module) or "Norm" in type(module).__name__)


def _plan_chain(items: list, keep=()) -> list:
    """How a chain of ``(name, module)`` (run in order) splits into units and single modules.

    Returns:
        ``[(start, length, unit, reason), ...]`` covering ``items``: ``unit`` tells a conv + norm
        (+ ReLU) pair, run fused when ``reason`` is None; a unit never hides the output of a
        module named in ``keep`` (only its last module may be one).
    """
    plan, i = [], 0
    while i < len(items):
        (name, conv), rest = items[i], items[i + 1:]
        if isinstance(conv, nn.Conv2d) and rest and _is_norm(rest[0][1]) and name not in keep:
            reason = unfusable_reason(conv, rest[0][1])
            length = 3 if (reason is None and len(rest) > 1 and _is_relu(rest[1][1])
                           and rest[0][0] not in keep) else 2
            plan.append((i, length, True, reason))
            i += length
        else:
            plan.append((i, 1, False, None))
            i += 1
    return plan


def _run_chain(items: list, x: torch.Tensor, backend: Optional[str], prefix: str = "",
               keep=(), outputs: Optional[dict] = None) -> torch.Tensor:
    """Runs ``(name, module)`` in order, like nn.Sequential, each fusable unit as one op.

    Args:
        items: the chain; x: its input [N, C, H, W].
        backend: the backend of the fused units.
        prefix: prepended to unit names in error messages.
        keep: ``{name: key}``; the output of each module named here goes to ``outputs[key]``.

    Returns:
        The output of the last module.
    """
    for start, length, unit, reason in _plan_chain(items, keep):
        if unit and reason is None:
            (name, conv), (_, norm) = items[start], items[start + 1]
            x = conv_bn_act(x, conv, norm, relu=length == 3, backend=backend,
                            name=f"{prefix}{name}")
        else:
            for _, module in items[start:start + length]:
                x = module(x)
        last = items[start + length - 1][0]
        if last in keep:
            outputs[keep[last]] = x
    return x


def _timm_stem(model: nn.Module) -> list:
    """timm ResNet's stem as a chain: conv1 (a conv, or the deep stem's Sequential), bn1, act1."""
    conv1 = model.conv1
    if type(conv1) is nn.Sequential and not (conv1._forward_hooks or conv1._forward_pre_hooks):
        head = [(f"conv1.{n}", m) for n, m in conv1.named_children()]
    else:
        head = [("conv1", conv1)]
    return head + [("bn1", model.bn1), ("act1", model.act1)]


def _stem_chain(module: nn.Module) -> Optional[list]:
    """The ``(name, module)`` chain of a recognised stem container (torchvision's
    IntermediateLayerGetter: all its children; timm's ResNet: its stem), eager or fused, or
    None."""
    cls = _eager_class(module)
    if (cls.__name__ == "IntermediateLayerGetter" and cls.__module__.startswith("torchvision.")
            and isinstance(module, nn.ModuleDict)):
        return list(module.items())
    if (cls.__name__ == "ResNet" and cls.__module__.startswith("timm.")
            and all(hasattr(module, a) for a in _TIMM_RESNET_ATTRS)):
        return _timm_stem(module)
    return None


def _eager_class(module: nn.Module) -> type:
    return module._fusedres_base if isinstance(module, _FusedSubclass) else type(module)


# -- fused containers ----------------------------------------------------------------------------

class FusedSequential(nn.Sequential):
    """nn.Sequential whose conv + norm (+ ReLU) runs are fused units.

    What :func:`convert` makes of a block's downsample that is not a plain (conv, norm) pair,
    e.g. timm's average-pool downsample (AvgPool2d, 1x1 conv, norm), and, with
    ``sequentials=True``, of any other nn.Sequential holding such a run. Same children, same
    keys.

    Shapes: as the modules it holds, e.g. [N, Cin, H, W] -> [N, Cout, H/2, W/2].
    """

    __prepare_scriptable__ = refuse_scripting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_sequential(self, x)


def _run_sequential(module: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """nn.Sequential's forward of ``module`` with its fusable units as fused ops; unit names in
    errors carry the prefix convert gave it (its qualified name)."""
    return _run_chain(list(module._modules.items()), x, module.backend,
                      module.__dict__.get("_fusedres_prefix", "downsample."))


_MADE: dict = {}


def _new_fused(mixin: type, base: type) -> nn.Module:
    """An empty instance of ``base`` fused by ``mixin`` (pickle's and deepcopy's constructor)."""
    cls = _fused_class(mixin, base)
    return cls.__new__(cls)


def _fused_class(mixin: type, base: type) -> type:
    """``base`` (a torchvision or timm class) with ``mixin``'s fused forward, made once."""
    if (mixin, base) not in _MADE:
        _MADE[mixin, base] = type(f"Fused{base.__name__}", (mixin, base),
                                  {"_fusedres_base": base, "__module__": __name__})
    return _MADE[mixin, base]


class _FusedSubclass:
    """Base of the classes convert makes at run time from a foreign container class.

    The made class subclasses the foreign one (``isinstance`` holds, every other method is
    the foreign class's) and overrides only the forward that runs the stem.
    """

    _fusedres_base: type
    __prepare_scriptable__ = refuse_scripting

    def __reduce_ex__(self, protocol):
        # A class made at run time cannot be pickled by name: pickle and deepcopy rebuild it from
        # this mixin and the foreign class, which can be.
        return _new_fused, (type(self).__mro__[1], self._fusedres_base), self.__getstate__()


class _FusedLayerGetter(_FusedSubclass):
    """torchvision's IntermediateLayerGetter with the stem (conv1, bn1, relu) as one unit."""

    def forward(self, x: torch.Tensor) -> dict:
        items = list(self.items())
        check_chain(x, items)
        out = collections.OrderedDict()
        _run_chain(items, x, self.backend, keep=self.return_layers, outputs=out)
        return out


class _FusedTimmResNet(_FusedSubclass):
    """timm's ResNet with its stem (7x7, or the deep stem's three units) fused."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # timm's ResNet.forward_features, with the stem run as fused units.
        stem = _timm_stem(self)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        check_chain(x, stem + [("maxpool", self.maxpool)]
                    + [(f"layer{i + 1}", s) for i, s in enumerate(stages)])
        x = self.maxpool(_run_chain(stem, x, self.backend))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq  # a timm model: timm imports
            return checkpoint_seq(stages, x, flatten=True)
        for stage in stages:
            x = stage(x)
        return x


class _FusedSequentialSubclass(_FusedSubclass):
    """An nn.Sequential subclass that keeps nn.Sequential's forward (torchvision's FCNHead,
    DeepLabHead, ASPPConv, Conv2dNormActivation) with its conv + norm (+ ReLU) runs fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_sequential(self, x)


def _is_fusable_sequential(module: nn.Module) -> bool:
    """Whether ``module`` runs as nn.Sequential's forward (its class, or a subclass that keeps
    that forward, without hooks or a forward set on the instance) and holds a conv + norm run
    that fuses."""
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and not (module._forward_hooks or module._forward_pre_hooks
                     or forward_replaced(module))
            and any(unit and reason is None
                    for _, _, unit, reason in _plan_chain(list(module.named_children()))))


def _fuse_sequentials(module: nn.Module, backend: Optional[str], name: str = "") -> nn.Module:
    """``module`` with every nn.Sequential below it (itself included) that
    :func:`_is_fusable_sequential` accepts made fused, outside the blocks and stems convert
    recognised (which fuse their own units: a block's (conv, norm) downsample stays the pair it
    fuses)."""
    if isinstance(module, (FusedBasicBlock, FusedBottleneck, FusedResNet, FusedConvBNReLU,
                           FusedSequential, _FusedSubclass)) or _block_layout(module) is not None:
        return module
    for child_name, child in module.named_children():
        new_child = _fuse_sequentials(child, backend, f"{name}{child_name}.")
        if new_child is not child:
            module._modules[child_name] = new_child
    if not _is_fusable_sequential(module):
        return module
    if type(module) is nn.Sequential:
        return _rebuild(module, FusedSequential, backend=backend, _fusedres_prefix=name,
                        _fusedres_eager_class=nn.Sequential)
    return _rebuild(module, _fused_class(_FusedSequentialSubclass, type(module)),
                    backend=backend, _fusedres_prefix=name)


def _rebuild(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """A ``cls`` instance that holds ``module``'s submodules, parameters and buffers themselves."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for table in ("_modules", "_parameters", "_buffers"):
        new.__dict__[table] = dict(module.__dict__[table])
    new.__dict__.update(attributes)
    return new


def _swap(module: nn.Module, transform: Callable) -> nn.Module:
    for child_name, child in module.named_children():
        new_child = _swap(child, transform)
        if new_child is not child:
            module._modules[child_name] = new_child
    return transform(module)


def _fuse_downsample(block: nn.Module, converted: bool, backend: Optional[str]) -> None:
    """Makes the block's downsample a FusedSequential when it holds a unit the block would not
    fuse itself (a fused block fuses a plain (conv, norm) pair)."""
    ds = getattr(block, "downsample", None)
    if type(ds) is not nn.Sequential or ds._forward_hooks or ds._forward_pre_hooks:
        return
    items = list(ds.named_children())
    if converted and len(items) == 2 and isinstance(items[0][1], nn.Conv2d):
        return
    if any(unit for _, _, unit, _ in _plan_chain(items)):
        block._modules["downsample"] = _rebuild(ds, FusedSequential, backend=backend,
                                                _fusedres_eager_class=nn.Sequential)


def convert(model: nn.Module, backend: Optional[str] = None, sequentials: bool = False
            ) -> nn.Module:
    """Makes every ResNet block and stem in ``model`` fused (see the module docstring for which).

    Blocks and stems are swapped in place inside their parents; when ``model`` itself is one,
    the returned object is a new module holding the same submodules, so always use the return
    value. Already-fused modules get the new ``backend``. What it did (units fused, units left
    eager and why: :func:`fusion_summary`) is logged at INFO level on the ``fusedres`` logger;
    it warns when it fused nothing.

    Args:
        model: any module containing torchvision-layout or timm ResNet blocks, a torchvision or
            timm ResNet, or a torchvision detection / segmentation model with a ResNet body.
        backend: the backend name for the fused modules (None: the global choice).
        sequentials: also fuse the conv + norm (+ ReLU) runs of every other nn.Sequential that
            runs as nn.Sequential does (its class, or a subclass keeping its forward: the heads
            of torchvision's segmentation models, Conv2dNormActivation), each becoming a
            :class:`FusedSequential` or a fused subclass of its class. Off by default: such
            modules are not ResNets, and only the segmentation heads were measured.

    Returns:
        The converted model, sharing every parameter and buffer with ``model``: same
        state_dict keys, same call signature and outputs (e.g. [N, 3, H, W] -> [N, classes]).
    """
    backend = None if backend is None else current_backend_name(backend)

    def transform(module):
        if isinstance(module, (FusedBasicBlock, FusedBottleneck, FusedResNet, FusedConvBNReLU,
                               FusedSequential, _FusedSubclass)):
            module.backend = backend
            return module
        layout = _block_layout(module)
        if layout is not None:
            converted = _block_reason(module, layout) is None
            _fuse_downsample(module, converted, backend)
            if not converted:
                return module
            return _rebuild(module, _TO_FUSED[type(module).__name__], backend=backend,
                            _fusedres_eager_class=type(module))
        if (type(module).__name__ == "ResNet" and all(hasattr(module, a) for a in _RESNET_ATTRS)
                and _is_relu(module.relu)):
            return _rebuild(module, FusedResNet, backend=backend,
                            _fusedres_eager_class=type(module))
        chain = _stem_chain(module)
        if chain is not None and any(unit and reason is None
                                     for _, _, unit, reason in _plan_chain(chain)):
            mixin = _FusedLayerGetter if isinstance(module, nn.ModuleDict) else _FusedTimmResNet
            return _rebuild(module, _fused_class(mixin, type(module)), backend=backend)
        return module

    name = type(model).__name__
    model = _swap(model, transform)
    if sequentials:
        model = _fuse_sequentials(model, backend)
    summary = fusion_summary(model)
    _log.info("fusedres.convert(%s): %s", name, summary)
    if summary.fused == 0:
        warnings.warn(f"fusedres.convert fused nothing in {name}: {summary}", stacklevel=2)
    return model


def _block_pairs(block: nn.Module) -> list:
    """``[(conv name, conv, norm), ...]`` of a BasicBlock/Bottleneck's main path."""
    return [(c, getattr(block, c), getattr(block, f"bn{c[-1]}"))
            for c in ("conv1", "conv2", "conv3") if hasattr(block, c)]


def _units_of(name: str, module: nn.Module) -> list:
    """The UnitReports of ``module`` (named ``name``) when it is a block, stem or fused chain."""
    prefix = f"{name}." if name else ""

    def report(unit_name, whole, unit_reason, fused=True):
        # A unit left eager as part of its block or stem gives that reason first; one convert
        # has not swapped gives its own reason, or that it was not converted.
        return UnitReport(prefix + unit_name,
                          whole or unit_reason or (None if fused else _NOT_CONVERTED))

    fused = isinstance(module, (FusedBasicBlock, FusedBottleneck))
    layout = None if fused else _block_layout(module)
    if fused or layout is not None:
        whole = block_activation_reason(module) if fused else _block_reason(module, layout)
        units = [report(conv_name, whole, unfusable_reason(conv, norm), fused)
                 for conv_name, conv, norm in _block_pairs(module)]
        ds = module.downsample
        if type(ds) is nn.Sequential and len(ds) == 2 and isinstance(ds[0], nn.Conv2d):
            # convert fuses the downsample of a block it leaves eager too (a FusedSequential).
            reason = unfusable_reason(ds[0], ds[1])
            if reason is None and (ds._forward_hooks or ds._forward_pre_hooks
                                   or forward_replaced(ds)):
                reason = "downsample has forward hooks or a forward set on the instance"
            units.append(report("downsample.0", None, reason, fused))
        return units
    if isinstance(module, FusedResNet) or (type(module).__name__ == "ResNet"
                                           and all(hasattr(module, a) for a in _RESNET_ATTRS)):
        fused = isinstance(module, FusedResNet)
        whole = activation_reason(module.relu, "activation relu")
        return [report("conv1", whole, unfusable_reason(module.conv1, module.bn1), fused)]
    sequential = isinstance(module, (FusedSequential, _FusedSequentialSubclass))
    chain = list(module.named_children()) if sequential else _stem_chain(module)
    if chain is None:
        return []
    fused = sequential or isinstance(module, _FusedSubclass)
    return [report(chain[start][0], None, reason, fused)
            for start, _, unit, reason in _plan_chain(chain, getattr(module, "return_layers", ()))
            if unit]


def fusion_summary(model: nn.Module) -> FusionSummary:
    """Which conv + norm units of ``model`` run fused, and why the others run eagerly.

    Counts the units of every block and stem that :func:`convert` recognises, converted or not
    (``"not converted"``), by the rule of :func:`fusedres.fusability.unfusable_reason` and the
    block-level reasons (a timm block's attention, anti-aliasing, drop path, a non-ReLU
    activation), and those of the nn.Sequential modules it made fused. Conv + norm pairs
    elsewhere in the model (an FPN, a head left as it is) are not counted.

    Args:
        model: any module.

    Returns:
        A FusionSummary; ``str()`` of it reads e.g. ``"53 of 53 conv + norm units fused"``.
    """
    units = []
    for name, module in model.named_modules():
        units += _units_of(name, module)
    return FusionSummary(tuple(units))


def to_eager(model: nn.Module) -> nn.Module:
    """Makes every fused module in ``model`` plain PyTorch again: the class it had before
    :func:`convert` (torchvision's, timm's), or fusedres.reference's for modules built fused.

    Use the return value (a fused top-level module is replaced). Parameters and buffers are shared.

    Args:
        model: a module containing fused blocks, units, stems or a FusedResNet.

    Returns:
        The model with only eager ops (nn.Conv2d, norms, add, ReLU), ready for export.
    """

    def transform(module):
        if isinstance(module, _FusedSubclass):
            cls = module._fusedres_base
        else:
            cls = module.__dict__.get("_fusedres_eager_class") or _TO_EAGER.get(type(module))
        if cls is None:
            return module
        eager = _rebuild(module, cls)
        for attribute in ("backend", "_fusedres_eager_class", "_fusedres_prefix"):
            eager.__dict__.pop(attribute, None)
        if cls is reference.ResNet:
            eager._block_kwargs = {}
        return eager

    return _swap(model, transform)
