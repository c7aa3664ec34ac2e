"""Blocks and whole ResNets against the eager oracle; state_dicts, checkpoints, convert/to_eager."""

import copy
import json
import os
import types

import pytest
import torch
import torch.nn as nn

import fusedres
from conftest import CPU_FUSED_BACKENDS, assert_oracle_close
from fusedres import FusedBasicBlock, FusedBottleneck, convert, models, reference, to_eager
from fusedres.models import ARCHITECTURES

MANIFEST = os.path.join(os.path.dirname(__file__), "data", "torchvision_resnet_state_dicts.json")


def _randomize_bn(model):
    """Non-trivial BN parameters and statistics (fresh models start at gamma=1, beta=0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _forward_backward(model, x):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    # A fixed random projection, so every output element gets a different gradient.
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(g.to(y.dtype))
    grads = {n: p.grad for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    return y.detach(), x.grad, grads, bufs


def without_onednn():
    """Convolutions the fp64 oracle agrees with (see reference.oracle_convolutions)."""
    return reference.oracle_convolutions("cpu")


def _compare_models(fused, eager, x, training, norm="max", gradients=True):
    """Output, gradients (unless ``gradients`` is False) and buffers of a forward and backward
    of ``fused`` and ``eager`` against the float64 oracle under the tolerance rule."""
    oracle = reference.upcast(eager)
    for m in (fused, eager, oracle):
        m.train(training)
    y_f, dx_f, g_f, b_f = _forward_backward(fused, x)
    y_e, dx_e, g_e, b_e = _forward_backward(eager, x)
    y_o, dx_o, g_o, b_o = _forward_backward(oracle, x.double())
    assert_oracle_close(y_f, y_e, y_o, "output")
    assert g_f.keys() == g_o.keys()
    if gradients:
        assert_oracle_close(dx_f, dx_e, dx_o, "dx", norm=norm)
        if norm == "rel_l2":
            # One rule for all parameter gradients together: in a whole network trained on a
            # tiny batch, BN over a handful of values per channel leaves single small gradient
            # tensors ill-conditioned (eager fp32 itself is percents off on some), so per-tensor
            # ratios are noise; the unit and block tests check every tensor separately.
            flat = [torch.cat([g[name].flatten().double() for name in g_o])
                    for g in (g_f, g_e, g_o)]
            assert_oracle_close(*flat, "all parameter gradients", norm=norm)
        else:
            for name in g_o:
                assert_oracle_close(g_f[name], g_e[name], g_o[name], f"grad {name}")
    for name in b_o:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b_f[name], b_o[name]), name
        else:
            assert_oracle_close(b_f[name], b_e[name], b_o[name], f"buffer {name}")


# (block, inplanes, planes, stride, groups, base_width, H): every structural case of a block.
BLOCK_CASES = [
    ("basic", 16, 16, 1, 1, 64, 8),
    ("basic", 16, 32, 2, 1, 64, 9),       # downsample, odd H
    ("bottleneck", 64, 16, 1, 1, 64, 8),  # identity shortcut
    ("bottleneck", 32, 16, 2, 1, 64, 7),  # v1.5 stride on the 3x3, downsample
    ("bottleneck", 64, 16, 2, 8, 4, 6),   # ResNeXt groups
]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_matches_eager(backend, case, training, channels_last):
    kind, inplanes, planes, stride, groups, base_width, h = case
    eager_cls, fused_cls = {"basic": (reference.BasicBlock, FusedBasicBlock),
                            "bottleneck": (reference.Bottleneck, FusedBottleneck)}[kind]
    out = planes * eager_cls.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(reference.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    eager = _randomize_bn(eager_cls(inplanes, planes, stride, downsample, groups, base_width))
    fused = fused_cls(inplanes, planes, stride,
                      None if downsample is None else nn.Sequential(
                          reference.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out)),
                      groups, base_width, backend=backend)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, inplanes, h, h + 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _compare_models(fused, eager, x, training)


# -- what the eager forward calls, swapped or wrapped after the model was built ---------------

def _scaled_forward(scale):
    """A forward to set on an instance (as tools that wrap a module's forward in place do): the
    class's own, scaled."""
    def forward(self, x):
        return type(self).forward(self, x) * scale
    return forward


def _halved_stem(self, x):
    return type(self).stem(self, x) * 0.5


def _halve_output(module, args, out):
    return out * 0.5


class _HalvedSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 0.5


def _swap(model, what):
    """Changes what ``model``'s eager forward calls, the way users and tools do."""
    if what == "block_activation":
        model.layer2[0].relu = nn.SiLU()
    elif what == "stem_activation":
        model.relu = nn.Tanh()
    elif what == "activation_hook":
        model.layer3[1].relu.register_forward_hook(_halve_output)
    elif what in ("conv_forward", "norm_forward", "block_forward", "stage_forward",
                  "maxpool_forward"):
        module = {"conv_forward": model.layer1[0].conv1, "norm_forward": model.layer3[0].bn2,
                  "block_forward": model.layer2[1], "stage_forward": model.layer3,
                  "maxpool_forward": model.maxpool}[what]
        module.forward = types.MethodType(_scaled_forward(1.5), module)
    elif what == "stem_forward":
        model.stem = types.MethodType(_halved_stem, model)
    elif what == "downsample_hook":
        model.layer3[0].downsample.register_forward_hook(_halve_output)
    elif what == "downsample_forward":
        downsample = model.layer2[0].downsample
        downsample.forward = types.MethodType(_scaled_forward(1.5), downsample)
    elif what == "downsample_subclass":
        model.layer4[0].downsample = _HalvedSequential(*model.layer4[0].downsample)
    else:
        raise ValueError(what)


def _resnet18_that_has_run(backend, training):
    """(fused resnet18, its eager twin, x [2, 3, 64, 64]) after two calls of the fused model
    under no_grad (in eval the second runs the whole-model plan); the twin gets the statistics
    those calls updated in training."""
    fused = _randomize_bn(models.resnet18(backend=backend, num_classes=10)).train(training)
    eager = to_eager(copy.deepcopy(fused))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):
            fused(x)
    eager.load_state_dict(fused.state_dict())
    return fused, eager, x


def _assert_inference_matches(fused, eager, x):
    """Inference proper (no autograd: the path with plans), twice (the second from a plan),
    against eager and the float64 oracle."""
    with torch.no_grad():
        expected, oracle = eager(x), reference.upcast(eager)(x.double())
        for _ in range(2):
            assert_oracle_close(fused(x), expected, oracle, "inference output")


SWAPS = ["block_activation", "stem_activation", "activation_hook", "conv_forward", "norm_forward",
         "block_forward", "stage_forward", "maxpool_forward", "stem_forward", "downsample_hook",
         "downsample_forward", "downsample_subclass"]


# The cpu backend only: what is checked lives above the backends (fusedres.modules, the model),
# and a whole resnet18 in float32 and float64 per case costs CI time: 3 s a case, 75 s in all,
# hence slow (CI runs it once, with torch 2.14; the module logic it checks is fusedres' own
# Python, the same under every torch release).
@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS[1:])
@pytest.mark.parametrize("what", SWAPS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_model_follows_what_its_eager_forward_calls(backend, what, training):
    """A fused model whose activation was swapped or hooked, whose downsample was hooked or
    subclassed, or one of whose modules had its forward set on the instance, after it had run
    (and, in eval, made its plans), computes what the eager twin with the same change computes:
    the fused units apply ReLU and never call the modules' forwards, so such a part runs
    eagerly (the fused path gave 10-130% errors)."""
    fused, eager, x = _resnet18_that_has_run(backend, training)
    _swap(fused, what)
    _swap(eager, what)
    if what == "downsample_hook":
        assert ("downsample has forward hooks or a forward set on the instance"
                in fusedres.fusion_summary(fused).reasons())
    fused64, eager64 = copy.deepcopy(fused).double(), copy.deepcopy(eager).double()
    with without_onednn():
        if not training:
            _assert_inference_matches(fused, eager, x)
        _compare_models(fused, eager, x, training, norm="rel_l2", gradients=False)
        _compare_models(fused64, eager64, x.double(), training, norm="rel_l2")


# No global backward hook: eager itself refuses one on a BatchNorm whose output an in-place
# ReLU modifies (autograd's view + in-place rule), and so does the fused model, which runs
# eagerly then.
HOOKS = ["global_forward", "global_forward_pre", "conv_backward", "norm_backward"]


def _register_hook(model, kind, calls):
    """A hook of ``kind`` that counts its calls in ``calls`` (and halves conv outputs, for the
    global forward hook); returns its handle."""
    module_hooks = nn.modules.module

    def forward_hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            calls.append(kind)
            return out * 0.5
        return None

    def count(*args):
        calls.append(kind)

    if kind == "global_forward":
        return module_hooks.register_module_forward_hook(forward_hook)
    if kind == "global_forward_pre":
        return module_hooks.register_module_forward_pre_hook(count)
    # bn2: a BasicBlock adds the identity to its output out of place.
    module = model.layer2[0].conv2 if kind == "conv_backward" else model.layer3[1].bn2
    return module.register_full_backward_hook(count)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS[1:])  # above the backends, as SWAPS
@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_model_runs_the_hooks_eager_runs(backend, kind, training):
    """Global module hooks (as tools that watch every layer register) and backward hooks on a
    conv or norm fire only for modules that are called: while any is there, the parts they
    would watch run eagerly, so the hooks fire as often as in eager and the results match (the
    fused units called none of them: a halving global hook on every conv was ignored)."""
    fused, eager, x = _resnet18_that_has_run(backend, training)
    calls = {"fused": [], "eager": []}
    handles = [_register_hook(fused, kind, calls["fused"])]
    if not kind.startswith("global"):
        handles.append(_register_hook(eager, kind, calls["eager"]))
    try:
        for name, model in (("fused", fused), ("eager", eager)):
            if kind.startswith("global"):
                handles[0].remove()
                handles[0] = _register_hook(model, kind, calls[name])
            model(x).sum().backward()
        assert len(calls["fused"]) == len(calls["eager"]) > 0, calls
        with without_onednn():
            if not training and kind == "global_forward":
                _assert_inference_matches(fused, eager, x)
            _compare_models(fused, eager, x, training, norm="rel_l2", gradients=False)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_with_a_swapped_activation_runs_eagerly(backend, kind, training):
    """A fused block whose ``relu`` is another module runs its eager forward (which calls it),
    and fusion_summary says why its units are not fused."""
    eager_cls, fused_cls = {"basic": (reference.BasicBlock, FusedBasicBlock),
                            "bottleneck": (reference.Bottleneck, FusedBottleneck)}[kind]
    inplanes = 16 * eager_cls.expansion
    eager = _randomize_bn(eager_cls(inplanes, 16))
    fused = fused_cls(inplanes, 16, backend=backend)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, inplanes, 8, 9)
    with torch.no_grad():
        fused.train(training)(x)
        fused(x)  # in eval, a plan made with the ReLU
    eager.load_state_dict(fused.state_dict())  # the statistics those calls updated in training
    fused.relu = nn.GELU()
    eager.train(training).relu = nn.GELU()
    if not training:
        _assert_inference_matches(fused, eager, x)
    _compare_models(fused, eager, x, training)
    summary = fusedres.fusion_summary(fused)
    assert summary.fused == 0
    assert summary.reasons() == {"activation relu is GELU, not nn.ReLU": len(summary.units)}


MODEL_CASES = [("resnet18", 64), ("resnet50", 64), ("resnext50_32x4d", 64)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS[1:])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nonfinite_input_in_inference_propagates_like_eager(backend, value, dtype):
    """A NaN or inf in one image, through a resnet18 that has run and made its plans, and
    through its blocks called alone (their own plans): NaN at exactly eager's outputs (before:
    the fused model's logits were finite)."""
    fused, eager, x = _resnet18_that_has_run(backend, False)
    fused, eager, x = fused.to(dtype), eager.to(dtype), x.to(dtype)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0.05,
                                                                            "atol": 0.05}
    with torch.no_grad():
        fused(x)  # the plans of this dtype, from a finite input
        x[1, 0, 20, 30] = value
        expected = eager(x)
        assert torch.isnan(expected[1]).all() and not torch.isnan(expected[0]).any()
        for _ in range(2):
            torch.testing.assert_close(fused(x), expected, equal_nan=True, **tolerance)
        features = eager.maxpool(eager.relu(eager.bn1(eager.conv1(x))))
        for fused_block, eager_block in ((fused.layer1[0], eager.layer1[0]),
                                         (fused.layer2[0], eager.layer2[0])):
            block_expected = eager_block(features)
            assert torch.isnan(block_expected).any()
            for _ in range(3):  # the third call from the block's watched plan
                torch.testing.assert_close(fused_block(features), block_expected,
                                           equal_nan=True, **tolerance)
            features = block_expected


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("arch,size", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_model_matches_eager(backend, arch, size, training):
    fused = getattr(models, arch)(backend=backend, num_classes=10)
    _randomize_bn(fused)
    eager = to_eager(getattr(models, arch)(num_classes=10))
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    fused64, eager64 = copy.deepcopy(fused).double(), copy.deepcopy(eager).double()
    with without_onednn():
        # float32 outputs and statistics; the gradients in float64 through the fused kernels: a
        # float32 pre-activation within rounding of a ReLU's kink takes either side, and in a
        # whole network that moves every gradient upstream of it (docs/design.md section 6;
        # seen: 1% in resnet50's eval dx on an AMD EPYC, where float64 agrees to 3e-15).
        _compare_models(fused, eager, x, training, norm="rel_l2", gradients=False)
        _compare_models(fused64, eager64, x.double(), training, norm="rel_l2")


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_three_sgd_steps_track_eager(backend):
    """Training a fused resnet18 tracks eager: parameters and statistics after 3 SGD steps."""
    fused = models.resnet18(backend=backend, num_classes=10)
    eager = to_eager(models.resnet18(num_classes=10))
    eager.load_state_dict(fused.state_dict())
    oracle = reference.upcast(eager)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
            for m in (fused, eager, oracle)]
    labels = torch.randint(0, 10, (4,))
    with without_onednn():
        _sgd_steps((fused, eager, oracle), opts, labels)
    sd_f, sd_e, sd_o = fused.state_dict(), eager.state_dict(), oracle.state_dict()
    counters = [k for k in sd_o if k.endswith("num_batches_tracked")]
    assert all(torch.equal(sd_f[k], sd_o[k]) for k in counters)
    # Training amplifies rounding differences step by step, so the whole state is compared at
    # once (see _compare_models).
    floats = [k for k in sd_o if k not in counters]
    flat = [torch.cat([sd[k].flatten().double() for k in floats]) for sd in (sd_f, sd_e, sd_o)]
    assert_oracle_close(*flat, "parameters and running statistics", norm="rel_l2")


def _sgd_steps(models_, opts, labels, steps=3):
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32)
        for model, opt in zip(models_, opts):
            opt.zero_grad()
            xx = x.to(next(model.parameters()).dtype)
            nn.functional.cross_entropy(model(xx), labels).backward()
            opt.step()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_state_dict_matches_torchvision(arch):
    """Keys, order and shapes equal torchvision's (a manifest read off torchvision's resnet.py)."""
    with open(MANIFEST) as f:
        expected = json.load(f)["architectures"][arch]
    with torch.device("meta"):
        model = getattr(models, arch)()
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == expected


def test_torchvision_model_when_importable():
    """Where torchvision imports (the GPU machines), its ResNet-50 is the oracle too."""
    try:
        import torchvision
    except Exception as exc:  # torchvision built for another torch raises more than ImportError
        pytest.skip(f"torchvision is not importable here: {exc!r}")
    tv = _randomize_bn(torchvision.models.resnet50(num_classes=10))
    fused = convert(torchvision.models.resnet50(num_classes=10))
    fused.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    _compare_models(fused, tv, x, training=True, norm="rel_l2")


def test_checkpoint_file_round_trip(tmp_path):
    """A torchvision-format checkpoint file loads unchanged, plain or wrapped in {"state_dict"}."""
    src = _randomize_bn(models.resnet18(num_classes=7))
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    loaded = models.resnet18(weights=str(path), num_classes=7)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, wrapped)
    loaded_wrapped = models.resnet18(weights=wrapped, num_classes=7)
    for model in (loaded, loaded_wrapped):
        for (k, a), (_, b) in zip(src.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), k
    with pytest.raises(RuntimeError, match="size mismatch"):
        models.resnet18(weights=str(path), num_classes=10)
    with pytest.raises(TypeError, match="never downloads"):
        models.resnet18(weights=object())


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_convert_shares_parameters_and_round_trips(arch):
    eager = to_eager(getattr(models, arch)(num_classes=5))
    assert not any(isinstance(m, (FusedBasicBlock, FusedBottleneck)) for m in eager.modules())
    ptrs = {n: p.data_ptr() for n, p in eager.named_parameters()}
    bufs = {n: b.data_ptr() for n, b in eager.named_buffers()}
    fused = convert(eager, backend="torch_ops")
    assert isinstance(fused, models.FusedResNet) and fused.backend == "torch_ops"
    blocks = [m for m in fused.modules() if isinstance(m, (FusedBasicBlock, FusedBottleneck))]
    assert blocks and all(b.backend == "torch_ops" for b in blocks)
    assert {n: p.data_ptr() for n, p in fused.named_parameters()} == ptrs
    assert {n: b.data_ptr() for n, b in fused.named_buffers()} == bufs
    back = to_eager(fused)
    assert type(back) is reference.ResNet
    assert {n: p.data_ptr() for n, p in back.named_parameters()} == ptrs
    x = torch.randn(2, 3, 32, 32)
    for m in (eager, fused, back):
        m.eval()
    torch.testing.assert_close(fused(x), back(x))


def test_convert_inside_a_container_and_optimizer_keeps_training():
    """Blocks nested in another module are swapped in place; an existing optimizer still works."""
    wrapper = nn.Sequential(to_eager(models.resnet18(num_classes=3)), nn.Softmax(dim=1))
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    before = wrapper[0].fc.weight.detach().clone()
    converted = convert(wrapper, backend="torch_ops")
    assert converted is wrapper and isinstance(wrapper[0], models.FusedResNet)
    wrapper(torch.randn(2, 3, 32, 32))[:, 0].sum().backward()
    opt.step()
    assert not torch.equal(wrapper[0].fc.weight, before)


def test_zero_init_residual_and_width():
    m = models.resnet50(zero_init_residual=True)
    assert all(b.bn3.weight.abs().sum() == 0 for b in m.modules() if isinstance(b, FusedBottleneck))
    wide = models.wide_resnet50_2()
    assert wide.layer1[0].conv2.weight.shape == (128, 128, 3, 3)
    rx = models.resnext50_32x4d()
    assert rx.layer1[0].conv2.groups == 32 and rx.layer1[0].conv2.weight.shape == (128, 4, 3, 3)


def test_backend_argument_reaches_every_unit(monkeypatch):
    seen = set()
    from fusedres.ops import unit

    original = unit.resolve

    def spy(requested, device, dtype=None):
        seen.add(requested)
        return original(requested, device, dtype)

    monkeypatch.setattr(unit, "resolve", spy)
    fusedres.models.resnet18(backend="torch_ops", num_classes=2)(torch.randn(2, 3, 32, 32))
    assert seen == {"torch_ops"}
