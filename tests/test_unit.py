"""One fused unit against the eager composition: outputs, gradients, running statistics.

Each case runs the same unit three times: fused in the test dtype, eager in the test dtype, and
eager in float64 (the oracle), then applies the tolerance rule to y, dx, dresidual, dW, dgamma,
dbeta and the running statistics.
"""

import copy

import pytest
import torch

from conftest import CPU_FUSED_BACKENDS, assert_oracle_close
import fusedres
from fusedres import FusedConvBNReLU, reference
from fusedres.backend import ConvParams, get_backend
from fusedres.ops.unit import ConvBNActFunction

# (N, Cin, H, W, Cout, kernel, stride, groups): ResNet-real and awkward.
SHAPES = [
    (2, 16, 12, 12, 32, 3, 1, 1),    # 3x3, like a BasicBlock unit
    (2, 16, 13, 11, 24, 3, 2, 1),    # stride 2, odd H and W
    (3, 7, 9, 9, 5, 1, 1, 1),        # 1x1, odd channel counts
    (2, 3, 17, 17, 8, 7, 2, 1),      # the stem's 7x7/2
    (2, 32, 8, 8, 32, 3, 1, 8),      # grouped 3x3 (ResNeXt)
    (2, 64, 14, 14, 256, 1, 1, 1),   # a Bottleneck's expanding 1x1
    (1, 8, 6, 6, 8, 3, 1, 1),        # N=1 (trains: H*W > 1)
]
LAYOUTS = ["contiguous", "channels_last", "strided_view"]


def make_input(shape, dtype, layout):
    """Random [N, C, H, W] in the requested layout (a strided view skips every other channel)."""
    n, c, h, w = shape
    if layout == "strided_view":
        t = torch.randn(n, 2 * c, h, w, dtype=torch.float64)[:, ::2]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
    else:
        t = torch.randn(n, c, h, w, dtype=torch.float64)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    return t.to(dtype)


def randomize_bn(bn):
    """Non-trivial gamma, beta and running statistics, so no term of the formulas hides."""
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(3)


def build_unit(cin, cout, k, stride, groups, relu, **bn_kwargs):
    eager = reference.ConvBNAct(cin, cout, k, stride, groups=groups, relu=relu, **bn_kwargs)
    randomize_bn(eager.bn)
    return eager


def run(module, x, residual, dy):
    """Forward + backward; returns every output, gradient and BN state tensor by name."""
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    y = module(x, residual)
    y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad}
    if residual is not None:
        out["dresidual"] = residual.grad
    out["dW"] = module.conv.weight.grad
    bn = module.bn
    if bn.affine:
        out["dgamma"], out["dbeta"] = bn.weight.grad, bn.bias.grad
    if bn.running_mean is not None:
        out["running_mean"], out["running_var"] = bn.running_mean.clone(), bn.running_var.clone()
        out["num_batches_tracked"] = bn.num_batches_tracked.clone()
    return out


def fused_copy(eager_unit, backend):
    fused = FusedConvBNReLU(eager_unit.conv.in_channels, eager_unit.conv.out_channels,
                            eager_unit.conv.kernel_size[0], eager_unit.conv.stride[0],
                            groups=eager_unit.conv.groups, relu=eager_unit.relu,
                            eps=eager_unit.bn.eps, momentum=eager_unit.bn.momentum,
                            affine=eager_unit.bn.affine,
                            track_running_stats=eager_unit.bn.track_running_stats,
                            backend=backend)
    fused.to(eager_unit.conv.weight.dtype).load_state_dict(eager_unit.state_dict())
    return fused


# Half-width of the band around the ReLU kink where dy is zeroed: a pre-activation that close to
# 0 may round to either side in this dtype, and the mask (a step function) then flips.
KINK_BAND = {torch.float64: 0.0, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def away_from_kink(dy, oracle, x, residual, dtype):
    """dy with zeros where the oracle's pre-activation lies within KINK_BAND of the ReLU kink."""
    probe = copy.deepcopy(oracle)
    probe.relu = False
    with torch.no_grad():
        pre = probe(x, residual)
    return dy.masked_fill(pre.abs() < KINK_BAND[dtype], 0.0)


def compare_unit(backend, shape, dtype, layout, has_residual, relu, training, **bn_kwargs):
    n, cin, h, w, cout, k, stride, groups = shape
    # Parameters and inputs are rounded to the test dtype first, so the oracle differs from the
    # tested runs only by the rounding inside the computation.
    eager = build_unit(cin, cout, k, stride, groups, relu, **bn_kwargs).to(dtype)
    fused = fused_copy(eager, backend)
    oracle = reference.upcast(eager)
    for m in (eager, fused, oracle):
        m.train(training)
    x64 = make_input((n, cin, h, w), dtype, layout).double()
    ho = (h + 2 * (k // 2) - k) // stride + 1
    wo = (w + 2 * (k // 2) - k) // stride + 1
    res64 = make_input((n, cout, ho, wo), dtype, layout).double() if has_residual else None
    dy64 = torch.randn(n, cout, ho, wo, dtype=dtype).double()
    if relu:
        dy64 = away_from_kink(dy64, oracle, x64, res64, dtype)

    cast = (lambda t: None if t is None else t.to(dtype))
    got = run(fused, cast(x64), cast(res64), cast(dy64))
    ref = run(eager, cast(x64), cast(res64), cast(dy64))
    exact = run(oracle, x64, res64, dy64)
    assert got.keys() == exact.keys()
    for key in exact:
        if key == "num_batches_tracked":
            assert torch.equal(got[key], exact[key]), key
            continue
        assert got[key] is not None, f"{key} was not computed"
        assert got[key].dtype == ref[key].dtype, f"{key}: dtype {got[key].dtype} != eager's {ref[key].dtype}"
        assert_oracle_close(got[key], ref[key], exact[key], name=key)
    if layout == "channels_last":
        assert got["y"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_unit_fp32(backend, shape, layout, has_residual, relu, training):
    compare_unit(backend, shape, torch.float32, layout, has_residual, relu, training)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_unit_other_dtypes(backend, dtype, shape, layout, training):
    compare_unit(backend, shape, dtype, layout, True, True, training)


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch):
    """The ``cuda`` backend object, let run on CPU tensors: its composition (layouts, the
    channels_last convolutions) then runs with the CPU kernels behind the same torch.ops.fusedres
    ops, which the dispatcher picks from the tensors' device."""
    backend = get_backend("cuda")
    if not fusedres.available_backends()["cpu"][0]:
        pytest.skip("the cpu kernels behind torch.ops.fusedres are not built")
    monkeypatch.setattr(backend, "device_types", ("cuda", "cpu"))
    monkeypatch.setattr(backend, "availability", lambda: (True, "test: CPU kernels"))
    seen_z_layouts = []
    bn_stats = backend.bn_stats

    def spy(z):
        seen_z_layouts.append(z.is_contiguous(memory_format=torch.channels_last))
        return bn_stats(z)

    monkeypatch.setattr(backend, "bn_stats", spy)
    return seen_z_layouts


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_backend_composition_on_cpu(cuda_backend_on_cpu, shape, layout, dtype, training):
    """The cuda backend convolves in channels_last (z never needs a layout copy in the BN ops)
    and returns y in the input's layout, with the oracle's values, gradients and statistics."""
    compare_unit("cuda", shape, dtype, layout, True, True, training)
    if training:
        assert cuda_backend_on_cpu == [True]


def test_cuda_backend_returns_the_input_layout(cuda_backend_on_cpu):
    unit = FusedConvBNReLU(4, 6, backend="cuda")
    assert unit(torch.randn(2, 4, 5, 5)).is_contiguous()
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert unit(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("bn_kwargs", [
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_unit_batchnorm_options(backend, bn_kwargs, training):
    compare_unit(backend, SHAPES[0], torch.float32, "channels_last", True, True, training,
                 **bn_kwargs)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_running_stats_over_steps(backend):
    """Five training steps with momentum=None (cumulative average), then eval: all track eager."""
    eager = build_unit(8, 16, 3, 1, 1, True, momentum=None)
    fused = fused_copy(eager, backend)
    for step in range(5):
        x = torch.randn(4, 8, 10, 10) * (step + 1) + step
        fused(x).sum().backward()
        eager(x).sum().backward()
        torch.testing.assert_close(fused.bn.running_mean, eager.bn.running_mean)
        torch.testing.assert_close(fused.bn.running_var, eager.bn.running_var)
        assert int(fused.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == 4 + step
    fused.eval(), eager.eval()
    x = torch.randn(1, 8, 10, 10)
    torch.testing.assert_close(fused(x), eager(x))


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_gradcheck_float64(backend, training, has_residual, relu):
    """float64 gradcheck of ConvBNActFunction: x, weight, gamma, beta and residual."""
    torch.manual_seed(1)
    be = get_backend(backend)
    conv = ConvParams((2, 2), (1, 1), (1, 1), 2)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(6, dtype=torch.float64).add(0.5).requires_grad_()
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True) if has_residual else None
    rmean = torch.randn(6, dtype=torch.float64)
    rvar = torch.rand(6, dtype=torch.float64) + 0.5

    def unit(x, w, gamma, beta, res):
        y, _, _ = ConvBNActFunction.apply(x, w, gamma, beta, res, None if training else rmean,
                                          None if training else rvar, be, conv, relu, training,
                                          1e-5)
        return y

    assert torch.autograd.gradcheck(unit, (x, w, gamma, beta, res), eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_nan_input_propagates_like_eager(backend):
    eager = build_unit(4, 6, 3, 1, 1, True)
    fused = fused_copy(eager, backend)
    x = torch.randn(3, 4, 5, 5)
    x[1, 2, 3, 3] = float("nan")
    y_f, y_e = fused(x), eager(x)
    assert torch.equal(torch.isnan(y_f), torch.isnan(y_e))
    assert torch.equal(torch.isnan(fused.bn.running_mean), torch.isnan(eager.bn.running_mean))
    assert torch.isnan(fused.bn.running_mean).any()


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_like_eager(backend, training):
    """N=0: eager returns an empty output, keeps the running statistics, counts the batch."""
    eager = build_unit(4, 6, 3, 1, 1, True).train(training)
    fused = fused_copy(eager, backend).train(training)
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    y_f, y_e = fused(x), eager(x)
    assert y_f.shape == y_e.shape == (0, 6, 5, 5)
    y_f.sum().backward()
    assert x.grad.shape == x.shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fused.bn, name), getattr(eager.bn, name)), name


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_fused_path_is_taken(monkeypatch, backend):
    """The fused modules must really run ConvBNActFunction and the backend's kernels, not fall
    back to the eager composition."""
    calls, kernel_calls = [], []
    original = ConvBNActFunction.apply
    backend_type = type(get_backend(backend))
    original_fwd = backend_type.bn_act_fwd

    def spy(*args):
        calls.append(args[7].name)
        return original(*args)

    def kernel_spy(self, *args):
        kernel_calls.append(self.name)
        return original_fwd(self, *args)

    monkeypatch.setattr(ConvBNActFunction, "apply", spy)
    monkeypatch.setattr(backend_type, "bn_act_fwd", kernel_spy)
    unit = FusedConvBNReLU(4, 6, backend=backend)
    unit(torch.randn(2, 4, 5, 5))
    assert calls == [backend] and kernel_calls == [backend]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "frozen_params"])
def test_forward_without_autograd(monkeypatch, backend, training, grad_mode):
    """Nothing to differentiate: the fused forward runs without the autograd.Function and gives
    bitwise the output and running statistics of the recorded forward, close to eager's."""
    import fusedres.ops.unit as unit_mod
    eager = build_unit(8, 16, 3, 2, 1, True)
    recorded, plain = fused_copy(eager, backend), fused_copy(eager, backend)
    for m in (eager, recorded, plain):
        m.train(training)
    x, res = torch.randn(4, 8, 9, 9), torch.randn(4, 16, 5, 5)
    y_recorded = recorded(x.requires_grad_(), res)
    x = x.detach()
    applied = []
    monkeypatch.setattr(unit_mod.ConvBNActFunction, "apply", lambda *a: applied.append(a))
    if grad_mode == "frozen_params":
        plain.requires_grad_(False)
        y_plain = plain(x, res)
    else:
        with getattr(torch, grad_mode)():
            y_plain = plain(x, res)
    assert applied == [] and not y_plain.requires_grad
    assert torch.equal(y_plain, y_recorded.detach())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(plain.bn, name), getattr(recorded.bn, name)), name
    with torch.no_grad():
        torch.testing.assert_close(y_plain, eager(x, res), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.bn.running_var, eager.bn.running_var)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_output_kept_for_backward_only_with_relu(backend, relu):
    """y is saved only as the ReLU mask's source: a downsample unit (no ReLU) must not hold its
    output, the block's identity branch, until backward."""
    unit = fused_copy(build_unit(8, 16, 1, 2, 1, relu), backend)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = unit(torch.randn(2, 8, 6, 6, requires_grad=True))
    kept = {t.untyped_storage().data_ptr() for t in saved}
    assert (y.untyped_storage().data_ptr() in kept) == relu
    y.sum().backward()
    assert unit.conv.weight.grad is not None


def test_norm_layer_other_than_batchnorm_keeps_eager_semantics():
    """A GroupNorm unit cannot be fused: the module still computes the eager result."""
    fused = FusedConvBNReLU(4, 8, backend="torch_ops")
    fused.bn = torch.nn.GroupNorm(2, 8)
    eager = reference.ConvBNAct(4, 8)
    eager.bn = torch.nn.GroupNorm(2, 8)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(fused(x), eager(x))
