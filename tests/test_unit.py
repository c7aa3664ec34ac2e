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
from fusedres.backend import ConvParams, explicit_padding, get_backend

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
        # Built in the test dtype: a view cast with .to() would come back dense.
        t = torch.randn(n, 2 * c, h, w, dtype=torch.float64).to(dtype)[:, ::2]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
        return t
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

    def cast(t):
        """t in the test dtype and layout (a cast alone would make a strided view dense)."""
        if t is None:
            return None
        if layout != "strided_view":
            return t.to(dtype)
        spread = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=dtype)
        spread[:, ::2] = t
        return spread[:, ::2]

    got = run(fused, cast(x64), cast(res64), dy64.to(dtype))
    ref = run(eager, cast(x64), cast(res64), dy64.to(dtype))
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


def _unit_op(backend, training, relu, rmean, rvar):
    """The backend's unit op as a function of the differentiable inputs (float64 geometry of a
    strided, grouped 3x3 unit); training runs without running statistics, so gradcheck's many
    calls leave nothing to update."""
    be = get_backend(backend)
    conv = ConvParams((2, 2), (1, 1), (1, 1), 2)

    def unit(x, w, gamma, beta, res):
        if training:
            return be.unit_train(x, w, gamma, beta, res, None, None, None, conv, relu, 0.1, 1e-5)
        return be.unit_eval(x, w, gamma, beta, res, rmean, rvar, conv, relu, 1e-5)

    return unit


def _gradcheck_inputs(has_residual):
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(6, dtype=torch.float64).add(0.5).requires_grad_()
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True) if has_residual else None
    return x, w, gamma, beta, res


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_gradcheck_float64(backend, training, has_residual, relu):
    """float64 gradcheck of the unit op's registered autograd: x, weight, gamma, beta, residual."""
    torch.manual_seed(1)
    rmean, rvar = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    unit = _unit_op(backend, training, relu, rmean, rvar)
    assert torch.autograd.gradcheck(unit, _gradcheck_inputs(has_residual), eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_float64(backend, training):
    """Double backward (create_graph=True, as gradient penalties use it) is differentiable and
    right: second derivatives of the unit op against finite differences in float64."""
    torch.manual_seed(2)
    rmean, rvar = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    unit = _unit_op(backend, training, True, rmean, rvar)
    assert torch.autograd.gradgradcheck(unit, _gradcheck_inputs(True), eps=1e-6, atol=1e-4,
                                        rtol=1e-3)


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


def _assert_nan_like_eager(fused, eager, x, residual):
    """Twice (the second call from the inference plan): NaN at exactly eager's outputs, the
    other values close."""
    with torch.no_grad():
        y_e = eager(x, residual)
        for _ in range(2):
            y_f = fused(x, residual)
            assert torch.equal(torch.isnan(y_f), torch.isnan(y_e))
            torch.testing.assert_close(y_f, y_e, rtol=1e-4, atol=1e-5, equal_nan=True)


# Inference runners of the cpu backend: oneDNN's convolution with its post-ops (8 channels),
# Winograd (64 channels, channels_last), the matrix product (channels_last, 2x2 map).
NONFINITE_SHAPES = [(8, 6), (64, 8), (64, 2)]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("channels,size", NONFINITE_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
def test_nonfinite_inference_input_propagates_like_eager(backend, channels, size, channels_last,
                                                         with_residual):
    """A NaN or inf in an eval unit's input or residual (before: oneDNN's ReLU post-op turned
    NaN into 0, Winograd spread it over output tiles)."""
    torch.manual_seed(3)
    eager = build_unit(channels, channels, 3, 1, 1, True).eval()
    fused = fused_copy(eager, backend).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, channels, size, size).contiguous(memory_format=fmt)
    residual = torch.randn_like(x) if with_residual else None
    with torch.no_grad():
        fused(x, residual)  # the plan of a finite call exists
    x[1, 2, size // 2, size // 2] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    _assert_nan_like_eager(fused, eager, x, residual)
    if with_residual:
        x = torch.randn_like(x)
        residual[0, 0, 1, 1] = float("nan")
        _assert_nan_like_eager(fused, eager, x, residual)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("channels,size", NONFINITE_SHAPES)
@pytest.mark.parametrize("what", ["running_var_nan", "running_var_negative", "weight_inf",
                                  "gamma_nan", "running_mean_inf"])
def test_nonfinite_state_in_inference_propagates_like_eager(backend, channels, size, what):
    """A diverged checkpoint (NaN or inf in a weight or statistic, a negative running_var)
    evaluates to NaN where eager's does (before: the folded ReLU post-op zeroed them)."""
    torch.manual_seed(4)
    eager = build_unit(channels, channels, 3, 1, 1, True).eval()
    tensor, value = {"running_var_nan": ("bn.running_var", float("nan")),
                     "running_var_negative": ("bn.running_var", -1.0),
                     "weight_inf": ("conv.weight", float("inf")),
                     "gamma_nan": ("bn.weight", float("nan")),
                     "running_mean_inf": ("bn.running_mean", float("inf"))}[what]
    with torch.no_grad():
        t = eager.state_dict()[tensor]
        # A weight's centre tap, which reads no zero padding: where a non-finite tap meets the
        # padding, a direct convolution (eager's oneDNN) skips the product while an im2col
        # matrix product (the cpu backend's small-map path) multiplies it by 0 into a NaN.
        t[(1, 0, 1, 1) if t.dim() == 4 else 1] = value
    fused = fused_copy(eager, backend).eval()
    x = torch.randn(2, channels, size, size).contiguous(memory_format=torch.channels_last)
    _assert_nan_like_eager(fused, eager, x, None)


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
@pytest.mark.parametrize("phase", ["train", "eval_grad", "infer"])
def test_fused_path_is_taken(monkeypatch, backend, phase):
    """The fused modules run exactly one unit op of the backend per call and never the eager
    composition."""
    calls = []
    backend_type = type(get_backend(backend))
    for method in ("unit_train", "unit_eval", "infer_runner"):
        original = getattr(backend_type, method)

        def spy(self, *args, _method=method, _original=original):
            calls.append(_method)
            return _original(self, *args)

        monkeypatch.setattr(backend_type, method, spy)

    def eager(*args):
        raise AssertionError("the eager composition ran")

    monkeypatch.setattr(reference, "unit_forward", eager)
    unit = FusedConvBNReLU(4, 6, backend=backend).train(phase == "train")
    x = torch.randn(2, 4, 5, 5, requires_grad=phase != "infer")
    unit.requires_grad_(phase != "infer")
    unit(x)
    expected = {"train": ["unit_train"], "eval_grad": ["unit_eval"], "infer": ["infer_runner"]}
    # The inference plan's runner falls back to unit_eval where no fused inference convolution
    # takes the dtype.
    assert calls[:1] == expected[phase], calls


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "frozen_params"])
def test_forward_without_autograd(backend, training, grad_mode):
    """Nothing to differentiate: the output records no graph and matches the recorded forward
    (bitwise in training, where the same kernels run; in eval the folded inference path runs),
    with the same running statistics, close to eager's."""
    eager = build_unit(8, 16, 3, 2, 1, True)
    recorded, plain = fused_copy(eager, backend), fused_copy(eager, backend)
    for m in (eager, recorded, plain):
        m.train(training)
    x, res = torch.randn(4, 8, 9, 9), torch.randn(4, 16, 5, 5)
    y_recorded = recorded(x.requires_grad_(), res)
    x = x.detach()
    if grad_mode == "frozen_params":
        plain.requires_grad_(False)
        y_plain = plain(x, res)
    else:
        with getattr(torch, grad_mode)():
            y_plain = plain(x, res)
    assert y_plain.grad_fn is None and not y_plain.requires_grad
    if training:
        assert torch.equal(y_plain, y_recorded.detach())
    else:
        torch.testing.assert_close(y_plain, y_recorded.detach(), rtol=1e-5, atol=1e-5)
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


@pytest.mark.parametrize("arch, dilation", [("resnet50", None), ("resnext50_32x4d", None),
                                            ("resnet50", [False, True, True]), ("resnet18", None)])
def test_resnet_convolutions_pad_implicitly(arch, dilation):
    """The explicit zero padding that keeps oneDNN from crashing (fusedres.backend.explicit_padding,
    a copy of the input) is for padding beyond the kernel's half-span only: no convolution of a
    ResNet, dilated (segmentation backbones) or not, takes it; an over-padded one does."""
    kwargs = {} if dilation is None else {"replace_stride_with_dilation": dilation}
    model = getattr(fusedres.models, arch)(**kwargs)
    x = torch.empty(1, 1, 8, 8)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(explicit_padding(x, conv) is None for conv in convs)
    half_span = torch.nn.Conv2d(1, 1, 3, padding=(1, 2), dilation=(1, 2))
    assert explicit_padding(x, half_span) is None  # 2 == 2 * (3 - 1) // 2
    assert explicit_padding(x, torch.nn.Conv2d(1, 1, 1, padding=(0, 1))) == (1, 1, 0, 0)
