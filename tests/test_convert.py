"""convert's report (fusion_summary, logging, the warning when nothing fused), blocks it must
leave eager, and the whole-model shape pre-check of FusedResNet (a training call bound to fail
fails before any BatchNorm statistics change). No torchvision needed: see test_detection.py and
test_timm.py for torchvision's and timm's models."""

import copy
import importlib
import io
import logging
import warnings

import pytest
import torch
import torch.nn as nn

import fusedres
from conftest import CPU_FUSED_BACKENDS, assert_oracle_close
from fusedres import models, reference
from fusedres.convert import FusedSequential, fusion_summary
from fusedres.models.resnet import _maxpool_hw
from test_unit import randomize_bn


def test_convert_warns_when_it_fuses_nothing():
    linear = nn.Linear(3, 4)
    with pytest.warns(UserWarning, match=r"fused nothing in Linear: no ResNet block, stem or "
                                         r"conv \+ norm unit found"):
        assert fusedres.convert(linear) is linear
    assert fusion_summary(linear).units == ()


def test_convert_warns_when_every_unit_stays_eager():
    """GroupNorm everywhere: the blocks are swapped, but no unit can fuse; the summary says why."""
    eager = fusedres.to_eager(models.resnet18(norm_layer=lambda c: nn.GroupNorm(4, c)))
    with pytest.warns(UserWarning, match=r"0 of 20 conv \+ norm units fused; left eager: "
                                         r"20 x norm is GroupNorm"):
        fused = fusedres.convert(eager, backend="torch_ops")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused(x), fusedres.to_eager(copy.deepcopy(fused))(x))


def test_summary_counts_and_logs(caplog):
    eager = fusedres.to_eager(models.resnet50(num_classes=3))
    before = fusion_summary(eager)
    assert before.fused == 0 and len(before.units) == 53
    assert before.reasons() == {"not converted (call fusedres.convert)": 53}
    with caplog.at_level(logging.INFO, logger="fusedres"), warnings.catch_warnings():
        warnings.simplefilter("error")  # it fused everything: no warning
        fused = fusedres.convert(eager, backend="torch_ops")
    assert "fusedres.convert(ResNet): 53 of 53 conv + norm units fused" in caplog.text
    summary = fusion_summary(fused)
    assert summary.fused == 53 and summary.eager == ()
    assert [u.name for u in summary.units[:5]] == ["conv1", "layer1.0.conv1", "layer1.0.conv2",
                                                   "layer1.0.conv3", "layer1.0.downsample.0"]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert fusion_summary(synced).reasons() == {"SyncBatchNorm (statistics across processes)": 53}


def test_block_with_another_activation_stays_eager():
    """The fused blocks apply ReLU: a block whose activation is something else keeps its forward."""
    torch.manual_seed(0)
    block = reference.BasicBlock(8, 8)
    block.relu = nn.SiLU()
    eager = copy.deepcopy(block)
    net = nn.Sequential(block)
    with pytest.warns(UserWarning, match="2 x activation relu is SiLU"):
        fusedres.convert(net, backend="torch_ops")
    assert net[0] is block and type(block) is reference.BasicBlock
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(net(x), eager(x))



class BasicBlock(nn.Module):
    """timm's BasicBlock as convert recognises it (by its name and children), with timm's
    forward: activations act1 and act2, no relu (timm is optional here)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = reference.conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = reference.conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_converted_timm_block_follows_a_swapped_activation(backend, training):
    """A block convert took from timm keeps act1/act2: fused while they are ReLUs; once one is
    swapped, the block runs timm's own forward (which calls it), and the summary says so."""
    torch.manual_seed(0)
    eager = nn.Sequential(BasicBlock(8)).train(training)
    fused = fusedres.convert(copy.deepcopy(eager), backend=backend)
    x = torch.randn(2, 8, 6, 7)
    assert str(fusion_summary(fused)) == "2 of 2 conv + norm units fused"
    torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-5)
    for model in (fused, eager):
        model[0].act1 = nn.SiLU()
    with torch.no_grad():  # in eval, no autograd: the path with plans
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-5)
    assert fusion_summary(fused).reasons() == {"activation act1 is SiLU, not nn.ReLU": 2}
    for (name, a), b in zip(fused.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

def test_fused_sequential_round_trip():
    """A downsample that is not a plain (conv, norm) pair (here AvgPool2d first, as timm's
    average-pool downsample) becomes a FusedSequential; to_eager makes it nn.Sequential again."""
    torch.manual_seed(0)
    ds = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                       reference.conv1x1(8, 16), nn.BatchNorm2d(16))
    block = reference.BasicBlock(8, 16, stride=2, downsample=ds)
    eager = copy.deepcopy(block)
    fused = fusedres.convert(block, backend="torch_ops")
    assert type(fused.downsample) is FusedSequential and fused.downsample[2] is ds[2]
    assert "downsample.1" in {u.name for u in fusion_summary(fused).units if u.reason is None}
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(fused.train()(x), eager.train()(x))
    back = fusedres.to_eager(fused)
    assert type(back.downsample) is nn.Sequential
    assert list(back.state_dict()) == list(eager.state_dict())


class _Head(nn.Sequential):
    """A segmentation-style head: its own class with nn.Sequential's forward (as torchvision's
    FCNHead): 3x3 conv + BN + ReLU, dropout, 1x1 classifier."""

    def __init__(self, cin: int, classes: int):
        super().__init__(nn.Conv2d(cin, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Conv2d(16, classes, 1))


class _OwnForward(nn.Sequential):
    """An nn.Sequential subclass with a forward of its own: convert cannot know what it runs."""

    def forward(self, x):
        return super().forward(x) * 2


def _noop_hook(module, args, out):
    return None  # a module-level function, so that the model pickles


class _Segmenter(nn.Module):
    """A ResNet-style body (blocks, one with a (conv, BN) downsample) and Sequential heads of
    every kind convert(..., sequentials=True) must tell apart."""

    def __init__(self):
        super().__init__()
        ds = nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
        self.body = nn.Sequential(reference.BasicBlock(8, 8),
                                  reference.BasicBlock(8, 16, stride=2, downsample=ds))
        self.head = _Head(16, 3)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.own = _OwnForward(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.hooked = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.hooked.register_forward_hook(_noop_hook)

    def forward(self, x):
        h = self.body(x)
        return {"out": self.head(h), "aux": self.aux(h), "own": self.own(h),
                "hooked": self.hooked(h)}


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_sequentials_fuse_when_asked(backend, monkeypatch):
    """convert(..., sequentials=True) fuses the conv + norm (+ ReLU) runs of the nn.Sequential
    modules outside the blocks (a subclass keeps its class as a base, plain ones become
    FusedSequential) and leaves alone one with its own forward, one with hooks and a block's
    (conv, BN) downsample (the block fuses that pair itself); by default none is touched. The
    outputs, gradients and running statistics follow eager's (float32 against the float64
    oracle); the units run fused; state_dict keys, pickling and to_eager hold; errors name the
    unit by its qualified name."""
    torch.manual_seed(0)
    model = _Segmenter()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    plain = fusedres.convert(copy.deepcopy(model), backend=backend)
    assert type(plain.head) is _Head and type(plain.aux) is nn.Sequential
    assert str(fusion_summary(plain)) == "5 of 5 conv + norm units fused"

    fused = fusedres.convert(model, backend=backend, sequentials=True)
    assert isinstance(fused.head, _Head) and type(fused.head).__module__ == "fusedres.convert"
    assert type(fused.aux) is FusedSequential
    assert type(fused.own) is _OwnForward and type(fused.hooked) is nn.Sequential
    assert type(fused.body) is nn.Sequential and type(fused.body[1].downsample) is nn.Sequential
    fused_units = {u.name for u in fusion_summary(fused).units if u.reason is None}
    assert fused_units >= {"head.0", "aux.0", "body.1.downsample.0"}
    assert str(fusion_summary(fused)) == "7 of 7 conv + norm units fused"
    assert list(fused.state_dict()) == keys

    calls = []
    convert_module = importlib.import_module("fusedres.convert")  # fusedres.convert: the function
    unit = convert_module.conv_bn_act

    def counting(x, conv, norm, **kwargs):
        calls.append(kwargs["name"])
        return unit(x, conv, norm, **kwargs)

    monkeypatch.setattr(convert_module, "conv_bn_act", counting)
    oracle = reference.upcast(eager)
    x = torch.randn(2, 8, 9, 9)
    for training in (True, False):
        outs, grads = [], []
        for m, dtype in ((fused, torch.float32), (eager, torch.float32), (oracle, torch.float64)):
            m.train(training)
            m.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the head's dropout
            out = m(x.to(dtype))
            sum(v.square().mean() for v in out.values()).backward()
            outs.append(out)
            grads.append({n: p.grad for n, p in m.named_parameters()})
        for k in outs[2]:
            assert_oracle_close(outs[0][k], outs[1][k], outs[2][k], f"{k} (training={training})")
        for k in grads[2]:
            assert_oracle_close(grads[0][k], grads[1][k], grads[2][k], f"grad {k}",
                                norm="rel_l2")
    assert calls == ["head.0", "aux.0"] * 2
    for (name, a), b, c in zip(fused.named_buffers(), eager.buffers(), oracle.buffers()):
        if a.is_floating_point():
            assert_oracle_close(a, b, c, name)
        else:
            assert torch.equal(a, b), name

    with pytest.raises((RuntimeError, ValueError), match=r"head\.0"):
        fused.head(torch.randn(2, 5, 9, 9))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.head) is type(fused.head) and loaded.head.backend == fused.head.backend
    fused.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["out"], fused(x)["out"], rtol=0, atol=0)
    back = fusedres.to_eager(fused)
    assert type(back.head) is _Head and type(back.aux) is nn.Sequential
    assert "_fusedres_prefix" not in back.head.__dict__ and "backend" not in back.aux.__dict__
    assert list(back.state_dict()) == keys


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 2, 1, 1), (2, 2, 0, 1),
                                                           (3, 1, 1, 1), (3, 2, 1, 2)])
def test_maxpool_arithmetic_matches_aten(kernel, stride, padding, dilation, ceil_mode):
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    for h, w in [(1, 1), (2, 3), (5, 8), (7, 7), (16, 17)]:
        try:
            expected = tuple(pool(torch.zeros(1, 1, h, w)).shape[2:])
        except RuntimeError:
            expected = None  # ATen refuses: the pre-check must see an empty output
        got = _maxpool_hw(pool, h, w)
        assert (got if min(got) > 0 else None) == expected, (h, w)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"{len(changed)} buffers changed by a failing call: {changed[:4]}"


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("build", ["resnet18", "resnet50", "converted-resnet50"])
def test_training_call_bound_to_fail_changes_no_statistics(backend, build):
    """Batch 1 at 32x32 leaves layer4 one value per channel: eager PyTorch raises there after 15
    (resnet18) BatchNorms updated their statistics; the fused model raises BatchNorm's error,
    for layer4.0's first unit that would see one value (torchvision's blocks run the main path
    before the downsample; fusedres.reference's run the downsample first), before any runs."""
    torch.manual_seed(0)
    if build.startswith("converted"):
        model = fusedres.convert(fusedres.to_eager(models.resnet50(num_classes=4)), backend)
    else:
        model = getattr(models, build)(num_classes=4, backend=backend)
    model.train()
    before = _snapshot(model)
    eager = fusedres.to_eager(copy.deepcopy(model))
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        eager(x)
    assert any(not torch.equal(v, before[k]) for k, v in eager.state_dict().items())
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when training, "
                                         r"got input size torch.Size\(\[1, 512, 1, 1\]\)$"):
        model(x)
    _assert_untouched(model, before)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)  # batch 2 is fine


@pytest.mark.parametrize("mode", ["eval", "frozen-bn"])
def test_pre_check_does_not_refuse_what_runs(mode):
    """BatchNorm with running statistics (eval, or eval BN inside a training model) normalises
    one value per channel without complaint; the pre-check must let it through."""
    model = models.resnet18(num_classes=4, backend="torch_ops").train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or mode == "eval":
            m.eval()
    before = _snapshot(model)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    _assert_untouched(model, before)


def test_pre_check_stops_at_modules_it_does_not_know():
    """A stage wrapped in an unknown module ends the look-ahead: the call then fails where eager
    PyTorch does (documented in the README), instead of the pre-check guessing."""
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = models.resnet18(num_classes=4, backend="torch_ops").train()
    model.layer3 = Wrapped(model.layer3)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.randn(1, 3, 32, 32))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith(("bn1", "layer1", "layer2", "layer3")) for k in changed)
