"""bf16 autocast on the CPU: no casts beyond eager autocast's, statistics in float32,
channels_last from end to end.

Casts are counted over one training step (forward, backward) and one inference forward, as the
``aten::copy_`` calls between two dtypes that torch.profiler records (every ``_to_copy`` to a
new dtype ends in one), wherever they are called: from Python, inside composite ops, or inside
a C++ kernel of fusedres's unit ops, of a fused ResNet and of the eager model with the same
weights. (A TorchDispatchMode, which counted before, sees no call inside a C++ kernel: the mode
is off while the op it intercepted runs.) Where this CPU's oneDNN runs no bfloat16 the cpu
backend convolves bfloat16 in float32 (csrc/cpu/conv_precision.h, tests/test_conv_precision.py):
by design that adds casts, so the count runs with that switch off and again with it on.
"""


import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from conftest import CPU_FUSED_BACKENDS, onednn_takes
import fusedres
from fusedres import reference
from fusedres._ext import _C
from fusedres.ops import fold


def _cast_count(fn) -> int:
    """Calls fn once; the ``aten::copy_`` calls whose destination and source dtypes differ."""
    # acc_events: torch 2.11 and 2.12 warn without it (fusedres.report.cpu_peak_memory).
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, acc_events=True) as prof:
        fn()
    return sum(1 for e in prof.profiler.kineto_results.events()
               if e.name() == "aten::copy_" and len(set(e.dtypes()[:2])) == 2)


def _models(backend):
    torch.manual_seed(0)
    fused = fusedres.models.resnet18(num_classes=10, backend=backend)
    eager = reference.ResNet(reference.BasicBlock, [2, 2, 2, 2], num_classes=10)
    eager.load_state_dict(fused.state_dict())
    return [m.to(memory_format=torch.channels_last) for m in (fused, eager)]


def _train_step(model, x, target):
    def step():
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
    return step


def _infer(model, x):
    def forward():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            model(x)
    return forward


@pytest.fixture
def float32_convolutions():
    """``set(on)``: the cpu backend's bfloat16 convolutions in float32 or not, for one test."""
    before = _C.cpu_conv_in_float32(True), _C.cpu_conv_in_float32(False)
    yield lambda on: _C.set_cpu_conv_in_float32(on, before[1])
    _C.set_cpu_conv_in_float32(*before)


@pytest.mark.parametrize("backend", [b for b in CPU_FUSED_BACKENDS if b != "torch_ops"])
def test_no_casts_beyond_eager_autocast(backend, float32_convolutions):
    float32_convolutions(False)
    fused, eager = _models(backend)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,))
    for model in (fused, eager):
        model.train()
        _train_step(model, x, target)()  # warm-up: first-call allocations and lazy init
    train = {name: _cast_count(_train_step(m, x, target))
             for name, m in (("fused", fused), ("eager", eager))}
    assert train["eager"] > 0, "the profiler saw no casts: the count could not fail"
    assert train["fused"] <= train["eager"], train
    for model in (fused, eager):
        model.eval()
        _infer(model, x)()  # folds and caches the weights once
    infer = {name: _cast_count(_infer(m, x)) for name, m in (("fused", fused), ("eager", eager))}
    assert infer["fused"] <= infer["eager"], infer


@pytest.mark.parametrize("backend", [b for b in CPU_FUSED_BACKENDS if b != "torch_ops"])
def test_float32_convolutions_add_only_their_own_casts(backend, float32_convolutions):
    """With bfloat16 convolved in float32, each convolution adds at most its own casts: in
    training x, the weight and z forward, dz, x, the weight, dx and dweight backward; in
    inference x and the residual widened, y rounded back."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available: inference runs the unfolded op")
    float32_convolutions(True)
    fused, eager = _models(backend)
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    residual_units = sum(isinstance(m, fusedres.FusedBasicBlock) for m in fused.modules())
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,))
    for model in (fused, eager):
        model.train()
        _train_step(model, x, target)()
    train = {name: _cast_count(_train_step(m, x, target))
             for name, m in (("fused", fused), ("eager", eager))}
    assert train["fused"] > train["eager"], train  # the widening is seen: the count can fail
    assert train["fused"] <= train["eager"] + 8 * convolutions, train
    for model in (fused, eager):
        model.eval()
        _infer(model, x)()
    infer = {name: _cast_count(_infer(m, x)) for name, m in (("fused", fused), ("eager", eager))}
    assert infer["fused"] > infer["eager"], infer  # the widening is seen: the count can fail
    assert infer["fused"] <= infer["eager"] + 2 * convolutions + residual_units, infer


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_statistics_stay_float32_and_layout_channels_last(backend):
    fused, _ = _models(backend)
    fused.train()
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    layouts = []
    hooks = [m.register_forward_hook(lambda mod, i, out: layouts.append(
        (type(mod).__name__, out.dtype, out.is_contiguous(memory_format=torch.channels_last))))
        for m in fused.modules() if isinstance(m, fusedres.FusedBasicBlock)]
    with torch.autocast("cpu", torch.bfloat16):
        fused(x)
    for h in hooks:
        h.remove()
    assert layouts and all(dtype == torch.bfloat16 and cl for _, dtype, cl in layouts), layouts
    for m in fused.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean.dtype == m.running_var.dtype == torch.float32
    # The unit op's batch statistics (what backward reads) are float32 for bf16 activations.
    be = fusedres.get_backend(backend)
    conv = fusedres.backend.ConvParams((1, 1), (1, 1), (1, 1), 1)
    xb = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16)
    wb = torch.randn(6, 4, 3, 3, dtype=torch.bfloat16)
    ns = torch.ops.fusedres if backend == "cpu" else torch.ops.fusedres_test
    _, _, mean, invstd = ns.unit_train(xb, wb, None, None, None, None, None, None, *conv[:3],
                                       conv.groups, True, 0.1, 1e-5)
    assert mean.dtype == invstd.dtype == torch.float32
    assert be.name == backend


def test_folded_weights_cast_once(monkeypatch):
    """Inference under autocast folds and casts each weight once, then reuses it."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is not built")
    if not onednn_takes(torch.bfloat16):
        pytest.skip("this CPU's oneDNN takes no bfloat16 and its float32 convolutions are off: "
                    "inference runs the unfolded op, whose casts "
                    "test_no_casts_beyond_eager_autocast counts")
    fused, eager = _models("cpu")
    fused.eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    folds = []
    real = fold.FoldedConv
    monkeypatch.setattr(fold, "FoldedConv", lambda *a: folds.append(1) or real(*a))
    _infer(fused, x)()
    first = len(folds)
    _infer(fused, x)()
    assert first == sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    assert len(folds) == first
