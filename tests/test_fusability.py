"""fusedres.fusability: which conv + norm pairs a unit can fuse, and the reason for the others."""

import pytest
import torch
import torch.nn as nn

from fusedres.fusability import (activation_reason, eager_only_reason, is_frozen_norm,
                                 unfusable_reason)


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d, written out (torchvision is optional here)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1)
                                                    + self.eps).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1)
                            - self.running_mean.reshape(1, -1, 1, 1) * scale)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d in short: a BatchNorm2d subclass that applies its activation."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm's FrozenBatchNormAct2d in short: frozen buffers plus an activation child."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()


def _conv(**kw):
    args = dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, bias=False)
    args.update(kw)
    return nn.Conv2d(**args)


def test_frozen_norm_is_recognised_by_name_and_buffers():
    assert is_frozen_norm(FrozenBatchNorm2d(8))
    assert is_frozen_norm(FrozenBatchNorm2d(8, eps=0.0))  # COCO detection checkpoints use 0
    assert not is_frozen_norm(nn.BatchNorm2d(8))
    assert not is_frozen_norm(FrozenBatchNormAct2d(8)), "an activation child is not a plain norm"
    odd = FrozenBatchNorm2d(8)
    odd.running_var = torch.ones(7)  # buffers of different lengths
    assert not is_frozen_norm(odd)
    trained = FrozenBatchNorm2d(8)
    del trained.weight
    trained.weight = nn.Parameter(torch.ones(8))  # a parameter: not frozen
    assert not is_frozen_norm(trained)
    no_eps = FrozenBatchNorm2d(8)
    no_eps.eps = None
    assert not is_frozen_norm(no_eps)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(8), nn.BatchNorm2d(8, affine=False),
                                  nn.BatchNorm2d(8, track_running_stats=False),
                                  nn.BatchNorm2d(8).eval(), FrozenBatchNorm2d(8)],
                         ids=["bn", "bn-no-affine", "bn-no-running-stats", "bn-eval", "frozen"])
def test_fusable_pairs(norm):
    assert unfusable_reason(_conv(), norm) is None
    assert unfusable_reason(_conv(stride=2, dilation=2, padding=2, groups=2), norm) is None


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame in short: its forward pads dynamically."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


@pytest.mark.parametrize("conv,norm,reason", [
    (_conv(bias=True), nn.BatchNorm2d(8), "conv has a bias"),
    (_conv(padding_mode="reflect"), nn.BatchNorm2d(8), "padding_mode='reflect'"),
    (_conv(padding="same"), nn.BatchNorm2d(8), "padding='same'"),
    (Conv2dSame(4, 8, 3, bias=False), nn.BatchNorm2d(8),
     "conv is Conv2dSame, whose forward is not nn.Conv2d's"),
    (nn.Conv1d(4, 8, 3, bias=False), nn.BatchNorm2d(8), "conv is Conv1d, not nn.Conv2d"),
    (nn.LazyConv2d(8, 3, bias=False), nn.BatchNorm2d(8), "conv is an uninitialised lazy module"),
    (_conv(), nn.GroupNorm(2, 8), "norm is GroupNorm"),
    (_conv(), nn.SyncBatchNorm(8), "SyncBatchNorm (statistics across processes)"),
    (_conv(), BatchNormAct2d(8), "norm is BatchNormAct2d, whose forward is not nn.BatchNorm2d's"),
    (_conv(), FrozenBatchNormAct2d(8), "norm is FrozenBatchNormAct2d"),
    (_conv(), nn.BatchNorm2d(6), "norm has 6 channels, conv has out_channels=8"),
    (_conv(), FrozenBatchNorm2d(6), "norm has 6 channels, conv has out_channels=8"),
])
def test_unfusable_pairs_say_why(conv, norm, reason):
    assert unfusable_reason(conv, norm) == reason


@pytest.mark.parametrize("which", ["conv", "norm"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_forward_hooks_keep_a_unit_eager(which, kind):
    """A fused unit never calls the modules' forward, so their hooks would silently not run."""
    conv, norm = _conv(), FrozenBatchNorm2d(8)
    module = conv if which == "conv" else norm
    hook = (module.register_forward_hook(lambda *a: None) if kind == "forward"
            else module.register_forward_pre_hook(lambda *a: None))
    assert unfusable_reason(conv, norm) == f"{which} has forward hooks"
    hook.remove()
    assert unfusable_reason(conv, norm) is None



@pytest.mark.parametrize("which,norm_kind", [("conv", "batch"), ("conv_forward_impl", "batch"),
                                             ("norm", "batch"), ("norm", "frozen")])
def test_a_forward_set_on_the_instance_keeps_a_unit_eager(which, norm_kind):
    """Tools that wrap a module's forward in place set it on the instance: a fused unit would
    not call it. (Which attribute: nn.Conv2d.forward calls _conv_forward.)"""
    conv = _conv()
    norm = nn.BatchNorm2d(8) if norm_kind == "batch" else FrozenBatchNorm2d(8)
    module, attribute = {"conv": (conv, "forward"), "conv_forward_impl": (conv, "_conv_forward"),
                         "norm": (norm, "forward")}[which]
    setattr(module, attribute, getattr(module, attribute))  # the class's own, bound: same result
    what = "conv" if module is conv else "norm"
    assert unfusable_reason(conv, norm) == f"{what}'s forward is replaced on the instance"
    delattr(module, attribute)
    assert unfusable_reason(conv, norm) is None



@pytest.mark.parametrize("which", ["conv", "norm"])
def test_backward_hooks_keep_a_unit_eager(which):
    conv, norm = _conv(), nn.BatchNorm2d(8)
    module = conv if which == "conv" else norm
    hook = module.register_full_backward_hook(lambda *a: None)
    assert unfusable_reason(conv, norm) == f"{which} has backward hooks"
    hook.remove()
    assert unfusable_reason(conv, norm) is None


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_global_module_hooks_keep_every_unit_eager(kind):
    """Hooks registered for every module fire only for modules that are called."""
    conv, norm = _conv(), nn.BatchNorm2d(8)
    register = getattr(nn.modules.module, f"register_module_{kind}_hook")
    hook = register(lambda *a: None)
    try:
        assert eager_only_reason() == "global module hooks are registered"
        assert unfusable_reason(conv, norm) == "global module hooks are registered"
        assert activation_reason(nn.ReLU()) is None  # the blocks ask eager_only_reason too
    finally:
        hook.remove()
    assert eager_only_reason() is None and unfusable_reason(conv, norm) is None


def test_autograd_transforms_keep_every_unit_eager():
    """Under a torch.func transform or a forward-mode AD dual level, for which the fused ops have
    no rules (tests/test_ecosystem.py checks the models against eager there)."""
    conv, norm = _conv(), nn.BatchNorm2d(8)
    seen = []

    def record(x):
        seen.append((eager_only_reason(), unfusable_reason(conv, norm)))
        return x

    torch.func.vmap(record)(torch.ones(2, 3))
    torch.func.jvp(record, (torch.ones(3),), (torch.ones(3),))
    torch.func.grad(lambda x: record(x).sum())(torch.ones(3))
    with torch.autograd.forward_ad.dual_level():
        record(None)
    transform, forward_ad = "a torch.func transform is active", "forward-mode AD is active"
    assert seen == [(transform, transform)] * 3 + [(forward_ad, forward_ad)]
    assert eager_only_reason() is None and unfusable_reason(conv, norm) is None


def test_activation_reason():
    """A block's or stem's activation, which the fused kernels apply as ReLU."""
    assert activation_reason(nn.ReLU()) is None
    assert activation_reason(nn.ReLU(inplace=True)) is None
    assert activation_reason(nn.SiLU()) == "activation is SiLU, not nn.ReLU"
    assert activation_reason(None) == "activation is NoneType, not nn.ReLU"

    class MyReLU(nn.ReLU):
        pass

    assert activation_reason(MyReLU()) == "activation is MyReLU, not nn.ReLU"
    relu = nn.ReLU()
    hook = relu.register_forward_hook(lambda *a: None)
    assert activation_reason(relu) == "activation has hooks"
    hook.remove()
    relu.forward = relu.forward
    assert activation_reason(relu) == "activation's forward is replaced on the instance"

def test_fusability_imports_torch_only():
    """fusedres.ops imports it: it must not import torchvision, timm or the rest of fusedres
    (``sys``: the ONNX exporter's flag is read from ``sys.modules``, never imported)."""
    import ast
    import fusedres.fusability as module
    with open(module.__file__) as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "sys", "typing", "torch", "torch.nn"}, imported
