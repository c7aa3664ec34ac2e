"""timm's ResNet family through fusedres.convert, against the unconverted timm model.

timm's blocks carry optional parts (attention ``se``, anti-aliasing ``aa``, DropBlock,
stochastic depth); convert fuses a block only where all of them are absent (or drop nothing)
and leaves the others eager with the reason in fusion_summary. Stems: the 7x7 one and
resnet50d's deep stem (three conv + BN + ReLU); resnet50d's average-pool downsample (AvgPool2d,
1x1 conv, BN) runs as a FusedSequential. Small inputs (32-64 px) keep the module near 40 s of
CPU time on 2 cores.
"""

import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from conftest import assert_oracle_close
from fusedres import reference
from fusedres.convert import FusedSequential, fusion_summary
from test_models import _randomize_bn

timm = pytest.importorskip("timm", reason="timm is optional (pip install timm; CI's torchvision "
                                          "leg has it)")

BACKEND = "cpu" if fusedres.available_backends()["cpu"][0] else "torch_ops"

# name -> conv + norm units: stem (1, or 3 for the deep stem) + blocks x units + downsamples.
FAMILY = {"resnet18": 1 + 8 * 2 + 3, "resnet34": 1 + 16 * 2 + 3, "resnet50": 1 + 16 * 3 + 4,
          "resnet101": 1 + 33 * 3 + 4, "resnet152": 1 + 50 * 3 + 4, "resnet50d": 3 + 16 * 3 + 4,
          "resnext50_32x4d": 1 + 16 * 3 + 4, "wide_resnet50_2": 1 + 16 * 3 + 4}


def _create(name, **kwargs):
    torch.manual_seed(0)
    return _randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))


def _eval_outputs_close(fused, eager, size=32):
    """Eval outputs within 2x eager's float32 error of the float64 oracle."""
    oracle = reference.upcast(eager)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), reference.oracle_convolutions("cpu"):
        outs = [m.eval()(x.to(dt)) for m, dt in ((fused, torch.float32), (eager, torch.float32),
                                                 (oracle, torch.float64))]
    assert_oracle_close(*outs, "eval output")


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_fully_fused_and_matches_timm(name):
    eager = _create(name)
    keys = list(eager.state_dict())
    fused = fusedres.convert(copy.deepcopy(eager), backend=BACKEND)
    summary = fusion_summary(fused)
    assert (summary.fused, len(summary.units)) == (FAMILY[name], FAMILY[name]), str(summary)
    assert isinstance(fused, timm.models.resnet.ResNet)
    assert list(fused.state_dict()) == keys
    _eval_outputs_close(fused, eager)
    back = fusedres.to_eager(fused)
    assert type(back) is timm.models.resnet.ResNet
    assert not any(type(m).__module__.startswith("fusedres") for m in back.modules())
    assert list(back.state_dict()) == keys


def test_resnet50d_deep_stem_and_avg_down_train_step():
    """resnet50d in training (batch statistics): the deep stem's three units and the AvgPool2d +
    1x1 conv + BN downsample fused; outputs and running statistics in float32 with the rule,
    gradients in float64 against timm's model."""
    eager = _create("resnet50d")
    fused = fusedres.convert(copy.deepcopy(eager), backend=BACKEND)
    names = {u.name for u in fusion_summary(fused).units if u.reason is None}
    assert {"conv1.0", "conv1.3", "conv1.6", "layer2.0.downsample.1"} <= names
    assert type(fused.layer2[0].downsample) is FusedSequential
    assert type(fused.layer2[0].downsample[0]) is nn.AvgPool2d
    x = torch.randn(2, 3, 64, 64)
    oracle = reference.upcast(eager)
    with reference.oracle_convolutions("cpu"):
        outs = [m.train()(x.to(dt)) for m, dt in ((fused, torch.float32), (eager, torch.float32),
                                                   (oracle, torch.float64))]
    assert_oracle_close(*outs, "train output")
    states = [m.state_dict() for m in (fused, eager, oracle)]
    for k in states[2]:
        if states[2][k].is_floating_point():
            assert_oracle_close(*(sd[k] for sd in states), k)
        else:
            assert all(torch.equal(sd[k], states[2][k]) for sd in states), k
    fused64, eager64 = fused.double(), eager.double()
    target = torch.randint(0, 10, (2,))
    grads = []
    for m in (fused64, eager64):
        m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x.double()), target).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for k in grads[1]:
        # float64 on both sides: eager is its own oracle, the bound the float64 atol.
        assert_oracle_close(grads[0][k], grads[1][k], grads[1][k], f"grad {k}", norm="rel_l2")


def test_grad_checkpointing_path(monkeypatch):
    """timm's set_grad_checkpointing: the fused forward_features takes timm's checkpoint path
    and computes what timm does (float64: batch statistics over 2 values per channel in
    layer4 would make float32 rounding the whole difference)."""
    from timm.models import _manipulate
    calls = []
    original = _manipulate.checkpoint_seq
    monkeypatch.setattr(_manipulate, "checkpoint_seq",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    eager = _create("resnet18").double()
    fused = fusedres.convert(copy.deepcopy(eager), backend=BACKEND)
    for m in (eager, fused):
        m.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y_f = fused.train()(x)
    assert calls, "the fused forward_features did not checkpoint"
    y_e = eager.train()(x)
    assert_oracle_close(y_f, y_e, y_e, "output")
    y_f.sum().backward()
    y_e.sum().backward()
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        assert_oracle_close(p.grad, q.grad, q.grad, f"grad {name}", norm="rel_l2")


# (model, kwargs, fused units, {reason: units left eager})
OPTIONAL_PARTS = [
    ("seresnet18", {}, 1 + 3, {"attention: se is SEModule": 16}),
    ("resnet18", {"drop_path_rate": 0.1}, 1 + 2 + 3,
     {"stochastic depth: drop_path is DropPath": 14}),
    ("resnet50d", {"drop_block_rate": 0.1}, 3 + 7 * 3 + 4,
     {"DropBlock: drop_block is DropBlock2d": 9 * 3}),
    ("resnetblur18", {}, 1 + 5 * 2 + 3, {"anti-aliasing: aa is BlurPool2d": 3 * 2}),
]


@pytest.mark.parametrize("name,kwargs,fused_units,eager_reasons", OPTIONAL_PARTS,
                         ids=[c[0] + ("-" + "-".join(c[1]) if c[1] else "")
                              for c in OPTIONAL_PARTS])
def test_blocks_with_optional_parts_stay_eager(name, kwargs, fused_units, eager_reasons):
    """A block with an attention module, anti-aliasing or a drop layer that can drop keeps timm's
    forward (its downsample still fuses); the summary says why; outputs are timm's."""
    eager = _create(name, **kwargs)
    fused = fusedres.convert(copy.deepcopy(eager), backend=BACKEND)
    summary = fusion_summary(fused)
    assert summary.fused == fused_units, str(summary)
    assert summary.reasons() == eager_reasons
    _eval_outputs_close(fused, eager)


def test_frozen_batchnorm_from_timm():
    """timm.layers.freeze_batch_norm_2d (torchvision's FrozenBatchNorm2d): every unit counts as
    fusable, and the model computes what timm's does."""
    pytest.importorskip("torchvision", reason="timm's FrozenBatchNorm2d is torchvision's")
    eager = timm.layers.freeze_batch_norm_2d(_create("resnet50d"))
    fused = fusedres.convert(copy.deepcopy(eager), backend=BACKEND)
    summary = fusion_summary(fused)
    assert summary.fused == len(summary.units) == FAMILY["resnet50d"], str(summary)
    _eval_outputs_close(fused, eager)


def test_failing_training_call_changes_no_statistics():
    """Batch 1 at 32x32: layer4 sees one value per channel. timm's model raises there after 15
    BatchNorms updated their statistics; the converted one raises the same error first."""
    eager = _create("resnet18").train()
    fused = fusedres.convert(copy.deepcopy(eager), backend=BACKEND)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError) as eager_error:
        eager(x)
    with pytest.raises(ValueError) as fused_error:
        fused(x)
    assert str(fused_error.value) == str(eager_error.value)
    assert [k for k, v in fused.state_dict().items() if not torch.equal(v, before[k])] == []
