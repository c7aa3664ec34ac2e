"""torch.library.opcheck of the triton backend's ops (``torch.ops.fusedres_triton.*``): schema,
fake kernels against the real launchers (shapes, dtypes, strides) and tracing through AOT
dispatch, on the GPU or in Triton's interpreter."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_oracle_close
from fusedres import reference
from fusedres.ops import triton_library  # noqa: F401  (defines torch.ops.fusedres_triton)

from .conftest import DEVICE

ops = torch.ops.fusedres_triton
FORMATS = pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                                  ids=["contiguous", "channels_last"])


def _act(shape, fmt=torch.channels_last, dtype=torch.float32):
    return torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)


def _vec(c, lo=0.5, hi=1.5):
    return torch.rand(c, device=DEVICE) * (hi - lo) + lo


# (x shape, weight shape, stride, padding, groups): 3x3 stride 2 with odd sizes; grouped 1x1.
CONVS = [((2, 5, 7, 6), (6, 5, 3, 3), [2, 2], [1, 1], 1),
         ((2, 8, 5, 5), (8, 2, 1, 1), [1, 1], [0, 0], 4)]


@pytest.mark.parametrize("case", CONVS, ids=["3x3s2", "1x1g4"])
@FORMATS
@pytest.mark.parametrize("epilogue", ["plain", "affine_residual_relu"])
def test_opcheck_conv2d(case, fmt, epilogue):
    xs, ws, stride, padding, groups = case
    x, w = _act(xs, fmt), _act(ws) / 3
    scale = shift = residual = None
    if epilogue != "plain":
        out = ops.conv2d(x, w, stride, padding, [1, 1], groups, None, None, None, False)
        scale, shift, residual = _vec(ws[0]), _vec(ws[0], -1, 1), torch.randn_like(out)
    torch.library.opcheck(ops.conv2d.default,
                          (x, w, stride, padding, [1, 1], groups, scale, shift, residual,
                           epilogue != "plain"))


@pytest.mark.parametrize("case", CONVS, ids=["3x3s2", "1x1g4"])
@FORMATS
@pytest.mark.parametrize("epilogue", ["plain", "affine_residual_relu"])
def test_opcheck_conv2d_with_prologue(case, fmt, epilogue):
    """F3's optional arguments, appended to the schema: the previous unit's scale and shift."""
    xs, ws, stride, padding, groups = case
    x, w = _act(xs, fmt), _act(ws) / 3
    scale = shift = residual = None
    if epilogue != "plain":
        out = ops.conv2d(x, w, stride, padding, [1, 1], groups, None, None, None, False)
        scale, shift, residual = _vec(ws[0]), _vec(ws[0], -1, 1), torch.randn_like(out)
    torch.library.opcheck(ops.conv2d.default,
                          (x, w, stride, padding, [1, 1], groups, scale, shift, residual,
                           epilogue != "plain", _vec(xs[1]), _vec(xs[1], -1, 1)))


@pytest.mark.parametrize("case", CONVS, ids=["3x3s2", "1x1g4"])
def test_opcheck_conv2d_bn_train_with_prologue(case):
    xs, ws, stride, padding, groups = case
    cout = ws[0]
    args = (_act(xs), _act(ws) / 3, stride, padding, [1, 1], groups, _vec(cout),
            _vec(cout, -1, 1), 1e-5, _vec(cout), _vec(cout, 0.5, 2.0),
            torch.tensor(3, device=DEVICE), 0.1, _vec(xs[1]), _vec(xs[1], -1, 1))
    torch.library.opcheck(ops.conv2d_bn_train.default, args)


@pytest.mark.parametrize("case", CONVS, ids=["3x3s2", "1x1g4"])
def test_conv2d_bn_train_prologue_matches_the_unfused_ops(case):
    """The training forward of a unit fed by the previous unit's z (F3): z against the fp64
    oracle conv2d(relu(z_prev*in_scale + in_shift)), and z and the batch statistics against the
    unfused composition (bn_act_fwd writes y, conv2d_bn_train reads it)."""
    xs, ws, stride, padding, groups = case
    z_prev, w = _act(xs), _act(ws) / 3
    in_scale, in_shift = _vec(xs[1]), _vec(xs[1], -0.2, 1)
    gamma, beta = _vec(ws[0]), _vec(ws[0], -1, 1)
    y_prev = ops.bn_act_fwd(z_prev, in_scale, in_shift, None, True)
    z_ref, stats_ref = ops.conv2d_bn_train(y_prev, w, stride, padding, [1, 1], groups, gamma, beta,
                                           1e-5)
    z, stats = ops.conv2d_bn_train(z_prev, w, stride, padding, [1, 1], groups, gamma, beta, 1e-5,
                                   in_scale=in_scale, in_shift=in_shift)
    y_exact = reference.bn_act_fwd(z_prev.double(), in_scale, in_shift, None, True)
    exact = F.conv2d(y_exact, w.double(), None, stride, padding, 1, groups)
    eager = F.conv2d(reference.bn_act_fwd(z_prev, in_scale, in_shift, None, True, upcast=False),
                     w, None, stride, padding, 1, groups)
    assert_oracle_close(z.cpu(), eager.cpu(), exact.cpu(), name="z")
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, stats_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("momentum", [None, 0.1, "untracked"])
@pytest.mark.parametrize("case", CONVS, ids=["3x3s2", "1x1g4"])
def test_opcheck_conv2d_bn_train(case, momentum):
    """Also with the running statistics it updates in place (declared mutable in the schema):
    a momentum, the cumulative average (None, read from num_batches_tracked) or none tracked."""
    xs, ws, stride, padding, groups = case
    args = (_act(xs), _act(ws) / 3, stride, padding, [1, 1], groups, _vec(ws[0]),
            _vec(ws[0], -1, 1), 1e-5)
    if momentum != "untracked":
        cout = ws[0]
        args += (_vec(cout), _vec(cout, 0.5, 2.0), torch.tensor(3, device=DEVICE), momentum)
    torch.library.opcheck(ops.conv2d_bn_train.default, args)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_conv2d_bn_train_updates_running_stats_like_nn(momentum):
    """The finalize's update against nn.BatchNorm2d on the same convolution output."""
    xs, ws, stride, padding, groups = CONVS[0]
    x, w = _act(xs), _act(ws) / 3
    bn = torch.nn.BatchNorm2d(ws[0], momentum=momentum).to(DEVICE)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    bn.num_batches_tracked.fill_(3)
    mine = {k: v.clone() for k, v in bn.state_dict().items()}
    z, _ = ops.conv2d_bn_train.default(x, w, stride, padding, [1, 1], groups, bn.weight.detach(),
                                       bn.bias.detach(), bn.eps, mine["running_mean"],
                                       mine["running_var"], mine["num_batches_tracked"],
                                       momentum)
    bn.train()(z.detach())
    for name, value in bn.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(mine[name], value), name
        elif name.startswith("running"):
            torch.testing.assert_close(mine[name], value, rtol=1e-5, atol=1e-6, msg=name)


@FORMATS
def test_opcheck_bn_stats(fmt):
    torch.library.opcheck(ops.bn_stats.default, (_act((2, 6, 5, 7), fmt),))


@FORMATS
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_bn_act_fwd(fmt, residual):
    z = _act((2, 6, 5, 7), fmt)
    res = torch.randn_like(z) if residual else None
    torch.library.opcheck(ops.bn_act_fwd.default, (z, _vec(6), _vec(6, -1, 1), res, residual))


@FORMATS
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("has_residual", [True, False])
def test_opcheck_bn_act_bwd(fmt, training, has_residual):
    z, dy = _act((2, 6, 5, 7), fmt), _act((2, 6, 5, 7), fmt)
    y = torch.relu(z)
    args = (dy, y, z, _vec(6, -0.2, 0.2), _vec(6), _vec(6), True, has_residual, training, True)
    torch.library.opcheck(ops.bn_act_bwd.default, args)


def test_opcheck_bn_act_bwd_without_z():
    """Eval backward without dgamma: the forward never wrote z, and the op does not need it."""
    dy = _act((2, 6, 5, 7))
    args = (dy, torch.relu(_act((2, 6, 5, 7))), None, _vec(6, -0.2, 0.2), _vec(6), _vec(6), True,
            False, False, False)
    torch.library.opcheck(ops.bn_act_bwd.default, args)
