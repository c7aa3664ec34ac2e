"""Inference with BatchNorm folded into the convolution (fusedres.ops.fold, ``unit_infer``).

The folded weights are cached per (conv, BN) pair; these tests change every input of the fold in
place (conv weight, gamma, beta, running mean and variance, eps, a training step, a state_dict
load) and check that the output follows, and check the folded path itself against the float64
oracle over the geometries and layouts of a unit.
"""

import copy

import pytest
import torch

from conftest import CPU_FUSED_BACKENDS, assert_oracle_close, onednn_takes
import fusedres
from fusedres import FusedConvBNReLU, reference
from fusedres.ops import fold


def _unit(backend, cin=6, cout=10, k=3, stride=1, groups=1, dilation=1, relu=True,
          dtype=torch.float32):
    torch.manual_seed(0)
    unit = FusedConvBNReLU(cin, cout, k, stride, dilation=dilation, groups=groups, relu=relu,
                           backend=backend).to(dtype)
    with torch.no_grad():
        unit.bn.weight.uniform_(0.5, 1.5)
        unit.bn.bias.uniform_(-0.5, 0.5)
        unit.bn.running_mean.uniform_(-0.5, 0.5)
        unit.bn.running_var.uniform_(0.5, 2.0)
    return unit.eval()


def _eager_of(unit):
    eager = reference.ConvBNAct(unit.conv.in_channels, unit.conv.out_channels,
                                unit.conv.kernel_size[0], unit.conv.stride[0],
                                padding=unit.conv.padding[0], dilation=unit.conv.dilation[0],
                                groups=unit.conv.groups, relu=unit.relu).to(unit.conv.weight.dtype)
    eager.load_state_dict(unit.state_dict())
    eager.bn.eps = unit.bn.eps
    return eager.eval()


def _change(unit, what):
    """Changes one input of the fold in place, as users and optimizers do."""
    with torch.no_grad():
        if what == "conv_weight":
            unit.conv.weight.mul_(1.5)
        elif what in ("gamma", "beta"):
            getattr(unit.bn, {"gamma": "weight", "beta": "bias"}[what]).add_(0.25)
        elif what in ("running_mean", "running_var"):
            getattr(unit.bn, what).mul_(1.7)
        elif what == "eps":
            unit.bn.eps = 0.3
        elif what in ("conv_weight_data_swapped", "gamma_data_swapped",
                      "running_var_data_swapped"):
            # Same version, new storage: what model-surgery and pruning code does.
            owner, name = {"conv_weight_data_swapped": (unit.conv, "weight"),
                           "gamma_data_swapped": (unit.bn, "weight"),
                           "running_var_data_swapped": (unit.bn, "running_var")}[what]
            t = getattr(owner, name)
            version = t._version
            t.data = t.data * 1.7
            assert t._version == version
        elif what == "load_state_dict":
            state = {k: v * 1.3 if v.is_floating_point() else v for k, v in unit.state_dict().items()}
            unit.load_state_dict(state)
    if what == "training_forward":
        unit.train()
        unit(torch.randn(4, unit.conv.in_channels, 7, 7) * 2 + 1)
        unit.eval()
    if what == "optimizer_step":
        unit.train()
        opt = torch.optim.SGD(unit.parameters(), lr=0.05)
        unit(torch.randn(4, unit.conv.in_channels, 7, 7)).square().sum().backward()
        opt.step()
        unit.eval()


CHANGES = ["conv_weight", "gamma", "beta", "running_mean", "running_var", "eps",
           "conv_weight_data_swapped", "gamma_data_swapped", "running_var_data_swapped",
           "load_state_dict", "training_forward", "optimizer_step"]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("what", CHANGES)
def test_folded_inference_follows_every_change(backend, what):
    unit = _unit(backend)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        before = unit(x)
        torch.testing.assert_close(before, _eager_of(unit)(x), rtol=1e-5, atol=1e-5)
    _change(unit, what)
    with torch.no_grad():
        after = unit(x)
        expected = _eager_of(unit)(x)
    assert not torch.allclose(before, expected, rtol=1e-3, atol=1e-3), "the change changed nothing"
    # The folded weights round differently from conv-then-scale: float32 closeness, not bits.
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_fold_is_cached_until_a_change(monkeypatch):
    """The cpu backend folds once per parameter version, not once per call."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is not built")
    folds = []
    real = fold.FoldedConv
    monkeypatch.setattr(fold, "FoldedConv", lambda *a: folds.append(1) or real(*a))
    unit = _unit("cpu")
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        for _ in range(3):
            unit(x)
        assert len(folds) == 1
        unit.bn.running_var.add_(0.1)
        unit(x)
        unit(x)
    assert len(folds) == 2


def test_folds_kept_per_input_size(monkeypatch):
    """The cpu backend prepares its folded weights for the input size (oneDNN chooses their
    blocked layout for it): a unit called with INPUT_SIZES_KEPT sizes in turn folds once per
    size, whichever layout each takes (oneDNN's linear on a 1x1's small maps, its convolution on
    larger ones), and reads whether the fold is finite, which reads every weight, once; a
    change of a running statistic folds each size again. One size more than it keeps folds
    again on every call, the finiteness still read once."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is not built")
    from fusedres.ops.fold import INPUT_SIZES_KEPT
    folds, finite_reads = [], []
    real_fold, real_isfinite = fold.FoldedConv, torch.isfinite
    monkeypatch.setattr(fold, "FoldedConv", lambda *a: folds.append(1) or real_fold(*a))
    monkeypatch.setattr(torch, "isfinite", lambda t: finite_reads.append(1) or real_isfinite(t))
    unit = _unit("cpu", cin=16, cout=24, k=1)
    eager = _eager_of(unit)
    # 4x4 to 6x6 maps take the linear, 8x8 and 9x9 the convolution (49 pixels at most).
    sizes = (4, 8, 5, 9, 6, 7)[:INPUT_SIZES_KEPT + 1]
    xs = [torch.randn(2, 16, s, s).contiguous(memory_format=torch.channels_last) for s in sizes]

    def call_each(inputs):
        for x in inputs:
            torch.testing.assert_close(unit(x), eager(x), rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        for _ in range(3):
            call_each(xs[:-1])
        assert len(folds) == INPUT_SIZES_KEPT
        assert len(finite_reads) == 5  # weight, gamma, beta, running mean and variance
        unit.bn.running_var.add_(0.1)
        eager.bn.running_var.add_(0.1)
        call_each(xs[:-1])
        assert len(folds) == 2 * INPUT_SIZES_KEPT
        assert len(finite_reads) == 10
        call_each(xs)  # the one size more drops the least recently used one's fold
        folds.clear()
        call_each(xs)
    assert len(folds) == len(xs)
    assert len(finite_reads) == 10


def test_a_computed_weight_is_never_cached(monkeypatch):
    """The cache keys tensors by identity and version, which only the module's own tensors keep:
    a parametrized conv's weight is a new tensor on every access and may reuse a freed one's id
    at version 0 (test_inference_plan_of_a_parametrized_weight_follows_it failed that way, by
    chance of the allocator). Passing one computed tensor twice must fold twice."""
    folds = []
    real = fold.FoldedConv
    monkeypatch.setattr(fold, "FoldedConv", lambda *a: folds.append(1) or real(*a))
    unit = _unit("eager")
    bn = unit.bn
    computed = unit.conv.weight * 1.0  # what a parametrization hands out: not the parameter

    def fold_with(weight):
        return fold.fold_conv_bn(unit.conv, weight, bn.weight, bn.bias, bn.running_mean,
                                 bn.running_var, bn.eps, torch.float32, "test",
                                 lambda w, b: fold.FoldedConv(w, b))
    fold_with(computed)
    fold_with(computed)
    assert len(folds) == 2
    fold_with(unit.conv.weight)
    fold_with(unit.conv.weight)
    assert len(folds) == 3  # the parameter itself is cached


@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_pixel_map_runs_the_folded_convolution(monkeypatch, residual, dtype):
    """[N, C, 1, 1] in and out (layer4 of a 32x32 image) is both layouts at once: it takes the
    folded oneDNN convolution with the residual add, as channels_last activations do, and is
    right; before, it fell back to the unfolded op (as bfloat16 still does where oneDNN takes
    neither it nor, widened, float32: conftest.onednn_takes)."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is not built")
    folds = []
    real = fold.FoldedConv
    monkeypatch.setattr(fold, "FoldedConv", lambda *a: folds.append(1) or real(*a))
    unit = _unit("cpu", cin=24, cout=40, dtype=dtype)
    eager = _eager_of(unit)
    oracle = reference.upcast(eager)
    x = torch.randn(3, 24, 1, 1).to(dtype)
    res = torch.randn(3, 40, 1, 1).to(dtype) if residual else None
    with torch.no_grad():
        got = unit(x, res)
        ref = eager(x, res)
        exact = oracle(x.double(), None if res is None else res.double())
    assert len(folds) == int(onednn_takes(dtype))
    assert got.shape == exact.shape and got.dtype == dtype
    assert_oracle_close(got, ref, exact, name="y")


def test_in_place_edit_through_data_needs_clear_fold_cache():
    """``.data`` bypasses version counters (as it does autograd's checks): the documented remedy
    is fold.clear_fold_cache()."""
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu backend is not built")
    unit = _unit("cpu")
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        stale = unit(x)
        unit.conv.weight.data.mul_(2.0)
        assert torch.equal(unit(x), stale)
        fold.clear_fold_cache()
        torch.testing.assert_close(unit(x), _eager_of(unit)(x), rtol=1e-5, atol=1e-5)


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided_view":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


# (cin, cout, k, stride, groups, dilation): ResNet's and the awkward.
GEOMETRIES = [(6, 10, 3, 1, 1, 1), (8, 12, 3, 2, 2, 1), (5, 7, 1, 1, 1, 1), (3, 8, 7, 2, 1, 1),
              (8, 8, 3, 1, 1, 2)]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_folded_inference_against_the_oracle(backend, geometry, layout, residual, relu, dtype):
    cin, cout, k, stride, groups, dilation = geometry
    unit = _unit(backend, cin, cout, k, stride, groups, dilation, relu, dtype)
    eager = _eager_of(unit)
    oracle = reference.upcast(eager)
    x64 = torch.randn(3, cin, 11, 10, dtype=torch.float64).to(dtype).double()
    with torch.no_grad():
        res64 = (torch.randn_like(oracle.conv(x64)).to(dtype).double() if residual else None)
        exact = oracle(x64, res64)
        cast = (lambda t: None if t is None else _layout(t.to(dtype), layout))
        got = unit(cast(x64), cast(res64))
        ref = eager(cast(x64), cast(res64))
    assert got.dtype == dtype and got.shape == exact.shape
    assert_oracle_close(got, ref, exact, name="y")
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_folded_inference_under_bf16_autocast(backend):
    """Autocast hands the conv bf16 operands; the folded weights are cast once and cached."""
    unit = _unit(backend, 8, 16, 3)
    eager = _eager_of(unit)
    oracle = reference.upcast(eager)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            got, ref = unit(x), eager(x)
        exact = oracle(x.double())
    assert got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_oracle_close(got, ref, exact, name="y")


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_eval_with_gradients_is_exact(backend):
    """Frozen statistics with trainable conv, gamma and beta (frozen-BN fine-tuning): the eval
    path with gradients, in float64 against eager."""
    unit = _unit(backend, dtype=torch.float64)
    eager = copy.deepcopy(_eager_of(unit))
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for m, xi in zip((unit, eager), xs):
        m(xi).square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    for (name, p), q in zip(unit.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# What an inference plan's key holds (fusedres.ops.unit): each change below must send the next
# inference call back through the checked path, whose result eager's module must match.
def _plan_change(unit, x, what):
    """Changes one thing the plan's key holds; returns the input to call with next."""
    if what == "replaced_weight":
        unit.conv.weight = torch.nn.Parameter(unit.conv.weight.detach() * -1.5)
    elif what == "dtype_in_place":
        unit.double()  # swaps each parameter's data: the same Parameter objects, a new dtype
        with pytest.raises(TypeError, match="does not match the convolution weight dtype"):
            unit(x)
        return x.double()
    elif what == "bn_forward_hook":
        unit.bn.register_forward_hook(lambda m, args, out: out * 0.5)
    elif what == "batch_size":
        return torch.randn(5, *x.shape[1:])
    elif what == "layout":
        return x.contiguous(memory_format=torch.channels_last)
    elif what == "training":
        unit.train()  # batch statistics, still under no_grad
    elif what == "eps":
        unit.bn.eps = 0.3
    return x


PLAN_CHANGES = ["replaced_weight", "dtype_in_place", "bn_forward_hook", "batch_size", "layout",
                "training", "eps"]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("what", PLAN_CHANGES)
def test_inference_plan_follows_what_its_key_holds(backend, what):
    unit = _unit(backend)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        before = unit(x)
        unit(x)  # now from the plan
        x = _plan_change(unit, x, what)
        eager = _eager_of(unit)
        eager.train(unit.training)
        if what == "bn_forward_hook":
            eager.bn.register_forward_hook(lambda m, args, out: out * 0.5)
        after, expected = unit(x), eager(x)
    assert after.dtype == expected.dtype and after.shape == expected.shape
    assert after.is_contiguous(memory_format=torch.channels_last) == (what == "layout")
    if what in ("replaced_weight", "bn_forward_hook", "training", "eps"):
        assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3), "the change changed nothing"
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_inference_plan_follows_the_global_backend():
    """A unit built without ``backend=`` follows set_backend: a plan made under one choice is not
    used under another (here one that cannot run on this machine, and says so)."""
    unit = _unit(None)
    x = torch.randn(2, 6, 9, 9)
    try:
        with torch.no_grad():
            unit(x)
            unit(x)
            fusedres.set_backend("cuda")
            with pytest.raises(RuntimeError, match="'cuda' is not usable here"):
                unit(x)
    finally:
        fusedres.set_backend(None)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_inference_plan_of_a_parametrized_weight_follows_it(backend):
    """A parametrized conv computes its weight on each access: no plan may keep one."""
    unit = _unit(backend)
    eager = _eager_of(unit)
    torch.nn.utils.parametrizations.weight_norm(unit.conv)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        unit(x)
        before = unit(x)
        unit.conv.parametrizations.weight.original0.mul_(-2.0)
        after = unit(x)
        eager.conv.weight.copy_(unit.conv.weight)
        expected = eager(x)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3), "the change changed nothing"
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_inference_plan_skips_the_checks(monkeypatch):
    """Repeated inference calls of one shape run from the plan: the checks run once; a call with
    gradients, or of another shape, runs them again."""
    from fusedres.ops import unit as unit_module

    checks = []
    real = unit_module.check_unit_inputs
    monkeypatch.setattr(unit_module, "check_unit_inputs", lambda *a: checks.append(1) or real(*a))
    unit = _unit("torch_ops")
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        first = unit(x)
        for _ in range(3):
            assert torch.equal(unit(x), first)
    assert len(checks) == 1
    unit(x)
    with torch.no_grad():
        unit(x[:1])
    assert len(checks) == 3
