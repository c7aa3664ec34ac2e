"""torchvision's detection and segmentation models through fusedres.convert.

Built the way their pretrained versions are (no weights can be downloaded): detection backbones
with ``norm_layer=FrozenBatchNorm2d`` and ``trainable_layers=3`` (torchvision's builders do this
only when weights are given), the COCO checkpoints' ``eps=0`` on one of them; segmentation
backbones dilated (``replace_stride_with_dilation=[False, True, True]``) with trainable
nn.BatchNorm2d. Norm statistics and affine parameters are randomised so no check is trivial.

What is compared, after docs/design.md section 6: a whole detection model's losses, proposals and
detections are discrete functions of the features (top-k, NMS, sampling), so a rounding
difference can swap a proposal; its training step (losses, every gradient) and eval outputs
are compared in float64 against the unconverted model (where fused and eager agree to ~1e-13),
and the float32 kernels are checked on the backbone's FPN features, which are continuous, with
the 2x rule against the float64 oracle (float32 gradients are not: one ReLU-mask flip, a draw
in fused and eager alike, moves every gradient below it).

Images are 64-96 px and the RPN/ROI sizes small, so the module runs in about a minute on 2 cores.
"""

import copy
import io

import pytest
import torch
import torch.nn as nn

import fusedres
from conftest import assert_oracle_close
from fusedres import reference
from fusedres.convert import fusion_summary

torchvision = pytest.importorskip(
    "torchvision", reason="the detection and segmentation models are torchvision's "
                          "(pip install torchvision; CI's torchvision leg runs these)")
from torchvision.models import detection, segmentation  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

#: The backend under test: the C++ one users get on a CPU, else the fused path over torch ops.
BACKEND = "cpu" if fusedres.available_backends()["cpu"][0] else "torch_ops"
#: Units of a ResNet-50 body: the stem, 16 Bottlenecks x 3, 4 downsample pairs.
RESNET50_UNITS = 53
_RCNN = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
             rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32, box_batch_size_per_image=16,
             box_detections_per_img=10)


def _randomize_norms(model):
    """Random statistics and affine parameters (fresh ones are the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _frozen_backbone(**extractor_kwargs):
    """resnet50 + FPN exactly as torchvision builds it for pretrained detection models."""
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return _resnet_fpn_extractor(body, 3, **extractor_kwargs)


def _fasterrcnn():
    model = detection.FasterRCNN(_frozen_backbone(), num_classes=5, **_RCNN)
    # What torchvision does after loading the COCO_V1 checkpoints of its detection models.
    detection._utils.overwrite_eps(model, 0.0)
    return model


def _maskrcnn():
    return detection.MaskRCNN(_frozen_backbone(), num_classes=5, **_RCNN)


def _keypointrcnn():
    return detection.KeypointRCNN(_frozen_backbone(), num_classes=2, num_keypoints=5, **_RCNN)


def _retinanet():
    backbone = _frozen_backbone(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return detection.RetinaNet(backbone, num_classes=5, min_size=64, max_size=96,
                               topk_candidates=50, detections_per_img=10)


DETECTORS = {"fasterrcnn_resnet50_fpn": _fasterrcnn, "maskrcnn_resnet50_fpn": _maskrcnn,
             "retinanet_resnet50_fpn": _retinanet, "keypointrcnn_resnet50_fpn": _keypointrcnn}


_SIZES = ((80, 90), (72, 96))

#: Parameters whose gradient vanishes analytically. KeypointRCNN's loss is a cross-entropy over
#: the heatmap positions of each keypoint; kps_score_lowres (a ConvTranspose2d) adds its bias to
#: every position of a keypoint's channel, and the bilinear upsampling after it keeps a constant
#: constant, so the softmax over positions, and the loss, do not depend on that bias.
_VANISHING_GRADS = {"roi_heads.keypoint_predictor.kps_score_lowres.bias"}


def _targets(name, dtype, generator):
    """Two boxes per image (and masks or keypoints where the model needs them)."""
    targets = []
    for h, w in _SIZES:
        xy = torch.rand(2, 2, generator=generator, dtype=torch.float64) * 30
        wh = 10 + torch.rand(2, 2, generator=generator, dtype=torch.float64) * 30
        boxes = torch.cat([xy, xy + wh], 1).to(dtype)
        t = {"boxes": boxes, "labels": torch.tensor([1, 1 if name.startswith("key") else 3])}
        if name.startswith("mask"):
            t["masks"] = (torch.rand(2, h, w, generator=generator) > 0.5).to(torch.uint8)
        if name.startswith("key"):
            kp = boxes[:, None, :2] + torch.rand(2, 5, 2, generator=generator).to(dtype) * 10
            # float32 whatever the model's dtype: torchvision's roi_heads insists on it.
            t["keypoints"] = torch.cat([kp, torch.ones(2, 5, 1, dtype=dtype)], 2).float()
        targets.append(t)
    return targets


def _images(dtype, generator):
    return [torch.rand(3, h, w, generator=generator, dtype=torch.float64).to(dtype)
            for h, w in _SIZES]


def _train_step(model, images, targets):
    """Losses and every parameter gradient of one training step (sampling seeded alike)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    losses = model(images, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _assert_same_f64(fused, eager, what, norm="max"):
    # In float64 eager is its own oracle: the rule's bound is then the float64 atol.
    assert_oracle_close(fused, eager, eager, what, norm=norm)


def _assert_state_dict_round_trip(original_keys, converted, eager_twin):
    """Keys unchanged; to_eager gives back torchvision's classes; checkpoints load both ways."""
    assert list(converted.state_dict()) == original_keys
    back = fusedres.to_eager(copy.deepcopy(converted))
    assert list(back.state_dict()) == original_keys
    assert not any(type(m).__module__.startswith("fusedres") for m in back.modules())
    eager_twin.load_state_dict(converted.state_dict(), strict=True)
    converted.load_state_dict(eager_twin.state_dict(), strict=True)


class _CalledModules:
    """The convolutions whose forward ran inside the context: nn.Conv2d.forward itself records
    them. Not a hook: one on a module keeps its unit eager, and a global one every unit
    (fusedres.fusability), which would change what is observed."""

    def __enter__(self):
        self.called = set()
        self._forward = forward = torch.nn.Conv2d.forward

        def recorded(module, x):
            self.called.add(id(module))
            return forward(module, x)

        torch.nn.Conv2d.forward = recorded
        return self

    def __exit__(self, *exc):
        torch.nn.Conv2d.forward = self._forward


def _assert_fused_units_ran_fused(model, run):
    """No fused unit of ``model`` calls its conv's forward: the unit ran as one fused op."""
    summary = fusion_summary(model)
    convs = {name: model.get_submodule(name) for name in (u.name for u in summary.units
                                                          if u.reason is None)}
    with _CalledModules() as seen:
        run()
    eager = sorted(name for name, conv in convs.items() if id(conv) in seen.called)
    assert not eager, f"{len(eager)} units the summary counts as fused ran eagerly: {eager[:6]}"


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_converts_and_matches_unconverted(name):
    torch.manual_seed(0)
    model = _randomize_norms(DETECTORS[name]())
    eager = copy.deepcopy(model).double()
    keys = list(model.state_dict())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    converted = fusedres.convert(model, backend=BACKEND)
    summary = fusion_summary(converted)
    assert (summary.fused, len(summary.units)) == (RESNET50_UNITS, RESNET50_UNITS), str(summary)
    body = converted.backbone.body
    assert isinstance(body, torchvision.models._utils.IntermediateLayerGetter)
    assert type(body).__module__ == "fusedres.convert"
    assert {n: p.data_ptr() for n, p in converted.named_parameters()} == ptrs
    _assert_state_dict_round_trip(keys, converted, copy.deepcopy(eager))

    converted.double()
    g = torch.Generator().manual_seed(2)
    images, targets = _images(torch.float64, g), _targets(name, torch.float64, g)
    losses_f, grads_f = _train_step(converted, images, targets)
    losses_e, grads_e = _train_step(eager, images, targets)
    assert losses_f.keys() == losses_e.keys()
    for k in losses_e:
        _assert_same_f64(losses_f[k], losses_e[k], k)
    assert grads_f.keys() == grads_e.keys()
    # trainable_layers=3: the stem and layer1 are frozen, FrozenBatchNorm2d has no parameters.
    assert not any(k.startswith(("backbone.body.conv1", "backbone.body.layer1")) for k in grads_e)
    assert any(k.startswith("backbone.body.layer2") for k in grads_e)
    for k in grads_e:
        if k in _VANISHING_GRADS:
            # Zero in exact arithmetic: both sides hold rounding residue (~1e-17), whose relative
            # L2 difference is noise of order 1. The rule's max norm checks it at the float64 atol.
            assert grads_e[k].abs().max() < 1e-12, f"grad {k} is not zero to rounding in eager"
            _assert_same_f64(grads_f[k], grads_e[k], f"grad {k}")
            continue
        _assert_same_f64(grads_f[k], grads_e[k], f"grad {k}", norm="rel_l2")

    converted.eval()
    eager.eval()
    with torch.no_grad():
        out_f, out_e = converted(images), eager(images)
    for det_f, det_e in zip(out_f, out_e):
        assert det_f.keys() == det_e.keys()
        assert torch.equal(det_f["labels"], det_e["labels"])
        for k in det_e:
            _assert_same_f64(det_f[k].double(), det_e[k].double(), f"eval {k}")


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"])
def test_frozen_bn_backbone_float32(name):
    """The float32 kernels on the FPN backbone in training mode (FrozenBatchNorm2d, layers 2-4
    trainable): features within 2x eager's error against float64.

    Its parameter gradients are compared in float64, in
    test_detector_converts_and_matches_unconverted, not here (docs/design.md section 6): a
    pre-activation within float32 rounding of 0 takes either side of the ReLU in fused and
    eager, and one such flip moves every gradient below it by ~1/sqrt(elements) of its norm.
    At 64x96 that is 4e-3 relative against eager's 2e-6, and which side flips is a draw: over
    six inputs (cpu backend), fused flipped once and eager once (seen: the oracle's
    pre-activation 9e-5 where the outputs are ~75).
    """
    torch.manual_seed(0)
    eager = _randomize_norms(DETECTORS[name]()).backbone
    oracle = reference.upcast(eager)
    fused = fusedres.convert(copy.deepcopy(eager), backend=BACKEND)
    x = torch.randn(2, 3, 64, 96)
    # With autograd on, as in training: the fused units take their training path.
    with reference.oracle_convolutions("cpu"):
        feats_f, feats_e, feats_o = [model.train()(x.to(dtype)) for model, dtype in (
            (fused, torch.float32), (eager, torch.float32), (oracle, torch.float64))]
    assert feats_f.keys() == feats_o.keys()
    for k in feats_o:
        assert_oracle_close(feats_f[k], feats_e[k], feats_o[k], f"features {k}")


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn"])
def test_detector_units_run_fused(name):
    """Every unit the summary counts as fused runs as one fused op, in training and eval."""
    torch.manual_seed(0)
    model = fusedres.convert(_randomize_norms(DETECTORS[name]()), backend=BACKEND).backbone
    x = torch.randn(1, 3, 64, 64)
    _assert_fused_units_ran_fused(model, lambda: model.train()(x)["0"].sum().backward())
    with torch.no_grad():
        _assert_fused_units_ran_fused(model, lambda: model.eval()(x))


SEGMENTERS = {"fcn_resnet50": dict(aux_loss=True), "deeplabv3_resnet50": dict(aux_loss=False)}


def _segmenter(name):
    return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3,
                                       **SEGMENTERS[name])


def _seg_loss(out, target):
    return sum(nn.functional.cross_entropy(v, target) for v in out.values())


# The heads' conv + BN + ReLU units convert(..., sequentials=True) fuses: fcn's FCNHead and its
# auxiliary one; deeplabv3's DeepLabHead, its ASPP's 1x1 and three dilated branches and its
# projection (the ASPPPooling branch has a forward of its own and stays as it is).
HEAD_UNITS = {"fcn_resnet50": 2, "deeplabv3_resnet50": 6}


@pytest.mark.parametrize("sequentials", [False, True], ids=["body", "heads_too"])
@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_segmenter_converts_and_matches_unconverted(name, sequentials):
    """Dilated backbone with nn.BatchNorm2d in training (batch statistics): the training step in
    float64 (losses, gradients, running statistics), eval outputs in float32 with the rule; with
    ``sequentials=True`` the heads' units fused too."""
    torch.manual_seed(0)
    model = _randomize_norms(_segmenter(name))
    eager = copy.deepcopy(model)
    oracle = reference.upcast(model)
    keys = list(model.state_dict())
    converted = fusedres.convert(model, backend=BACKEND, sequentials=sequentials)
    summary = fusion_summary(converted)
    units = RESNET50_UNITS + (HEAD_UNITS[name] if sequentials else 0)
    assert (summary.fused, len(summary.units)) == (units, units), str(summary)
    assert isinstance(converted.classifier, nn.Sequential)
    assert (type(converted.classifier).__module__ == "fusedres.convert") == sequentials
    assert converted.backbone.layer4[1].conv2.dilation == (4, 4)
    _assert_state_dict_round_trip(keys, converted, copy.deepcopy(eager))
    _assert_fused_units_ran_fused(converted, lambda: converted.eval()(torch.randn(1, 3, 48, 48)))

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), reference.oracle_convolutions("cpu"):
        outs = [m.eval()(x.to(dt)) for m, dt in ((converted, torch.float32),
                                                 (eager, torch.float32),
                                                 (oracle, torch.float64))]
    for k in outs[2]:
        assert_oracle_close(outs[0][k], outs[1][k], outs[2][k], f"eval {k}")

    converted64, eager64 = converted.double(), eager.double()
    target = torch.randint(0, 3, (2, 64, 64))
    grads = []
    for m in (converted64, eager64):
        m.train()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the heads' dropout
        loss = _seg_loss(m(x.double()), target)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    _assert_same_f64(grads[0][0], grads[1][0], "loss")
    assert grads[0][1].keys() == grads[1][1].keys()
    for k in grads[1][1]:
        _assert_same_f64(grads[0][1][k], grads[1][1][k], f"grad {k}", norm="rel_l2")
    sd_f, sd_e = converted64.state_dict(), eager64.state_dict()
    for k in sd_e:
        if "running_" in k or "num_batches_tracked" in k:
            _assert_same_f64(sd_f[k].double(), sd_e[k].double(), k)


def test_converted_detector_pickles_and_copies():
    """The fused IntermediateLayerGetter is made at run time from torchvision's class: deepcopy
    and torch.save of the whole model rebuild it, forward and backend included."""
    torch.manual_seed(0)
    model = fusedres.convert(_randomize_norms(_fasterrcnn()), backend=BACKEND).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(model)
    x = [torch.rand(3, 64, 80)]
    with torch.no_grad():
        expected = model.backbone(x[0][None])
        for other in (loaded, copied):
            assert type(other.backbone.body) is type(model.backbone.body)
            assert other.backbone.body.backend == BACKEND
            got = other.backbone(x[0][None])
            for k in expected:
                torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_converted_backbone_body_refuses_scripting_with_the_remedy():
    """torch.jit.script of a converted detection backbone's body (a class convert makes at run
    time from torchvision's IntermediateLayerGetter) fails naming it and the eager twin to
    script, which scripts and computes what the twin computes; the model is left as it was."""
    torch.manual_seed(0)
    body = fusedres.convert(_randomize_norms(_frozen_backbone()), backend=BACKEND).body.eval()
    body_type = type(body)
    with pytest.raises(RuntimeError, match=f"{body_type.__name__}.*to_eager"):
        torch.jit.script(body)
    assert type(body) is body_type and body_type.__name__ == "FusedIntermediateLayerGetter"
    eager = fusedres.to_eager(copy.deepcopy(body))
    scripted = torch.jit.script(eager)
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        expected, got = eager(x), scripted(x)
    assert list(got) == list(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])


@pytest.mark.parametrize("name,size", [("fcn_resnet50", 8), ("resnet50", 32)])
def test_failing_training_call_changes_no_statistics(name, size):
    """Batch 1 leaves a later layer one value per channel (layer2 of fcn's dilated body at 8x8,
    layer4 of resnet50 at 32x32): the converted IntermediateLayerGetter or ResNet raises
    torchvision's error before its stem BatchNorm runs; eager torchvision updates the
    statistics of every BatchNorm before the failing one."""
    torch.manual_seed(0)
    model = (_segmenter(name) if name.startswith("fcn")
             else getattr(torchvision.models, name)(weights=None))
    model = fusedres.convert(model, backend=BACKEND).train()
    eager = fusedres.to_eager(copy.deepcopy(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, size, size)
    with pytest.raises(ValueError) as eager_error:
        eager(x)
    with pytest.raises(ValueError) as fused_error:
        model(x)
    assert str(fused_error.value) == str(eager_error.value)
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])] == []
    assert any(not torch.equal(v, before[k]) for k, v in eager.state_dict().items())
