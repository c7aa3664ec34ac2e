"""Bad input gets a clear error naming the argument (or eager's exact behaviour), and a failing
call leaves the running statistics untouched."""

import copy

import pytest
import torch

from conftest import CPU_FUSED_BACKENDS
from fusedres import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_untouched(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failing call"


@pytest.fixture(params=CPU_FUSED_BACKENDS)
def block(request):
    torch.manual_seed(0)
    return FusedBottleneck(16, 4, backend=request.param).train()


@pytest.mark.parametrize("bad,error,match", [
    (torch.randn(16, 8, 8), ValueError, r"input must be 4-D \[N, C, H, W\], got shape \(16, 8, 8\)"),
    (torch.randn(2, 16, 8, 8, 1), ValueError, r"input must be 4-D"),
    (torch.randn(2, 15, 8, 8), ValueError, r"input has 15 channels but the convolution expects in_channels=16"),
    (torch.randn(2, 16, 8, 8, dtype=torch.float64), TypeError, r"input dtype torch.float64 does not match the convolution weight dtype torch.float32"),
    (torch.randint(0, 3, (2, 16, 8, 8)), TypeError, r"input must be a floating-point tensor"),
    ([[1.0]], TypeError, r"input must be a torch.Tensor, got list"),
])
def test_bad_input_is_named_and_state_untouched(block, bad, error, match):
    before = _snapshot(block)
    with pytest.raises(error, match=match):
        block(bad)
    _assert_untouched(block, before)


def test_device_mismatch_names_both_devices(block):
    before = _snapshot(block)
    with pytest.raises(RuntimeError, match=r"input is on meta but the convolution weight is on cpu"):
        block(torch.empty(2, 16, 8, 8, device="meta"))
    _assert_untouched(block, before)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_batchnorm_parameter_dtype_mismatch(backend):
    unit = FusedConvBNReLU(4, 8, backend=backend).train()
    unit.bn.half()
    before = _snapshot(unit)
    with pytest.raises(TypeError, match=r"BatchNorm weight has dtype torch.float16; it must match"):
        unit(torch.randn(2, 4, 6, 6))
    _assert_untouched(unit, before)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("make_block,x,match", [
    (lambda b: FusedBottleneck(16, 8, backend=b), torch.randn(2, 16, 8, 8),
     r"FusedBottleneck: the identity branch has shape \(2, 16, 8, 8\) but the block's output has "
     r"shape \(2, 32, 8, 8\); a block that changes the channel count or the resolution needs a "
     r"matching downsample"),
    (lambda b: FusedBasicBlock(8, 8, stride=2, backend=b), torch.randn(2, 8, 8, 8),
     r"FusedBasicBlock: the identity branch has shape \(2, 8, 8, 8\) but the block's output has "
     r"shape \(2, 8, 4, 4\)"),
    (lambda b: FusedBottleneck(16, 4, stride=2, backend=b), torch.randn(1, 16, 2, 2),
     r"^Expected more than 1 value per channel when training, got input size "
     r"torch.Size\(\[1, 4, 1, 1\]\)$"),
], ids=["bottleneck-without-downsample", "basic-stride2-without-downsample",
        "one-value-per-channel-after-stride"])
def test_block_fails_before_any_unit_runs(backend, make_block, x, match):
    """Input that only a later unit of a block would refuse is refused before the first unit
    updates its running statistics (eager would leave bn1 updated)."""
    torch.manual_seed(0)
    block = make_block(backend).train()
    before = _snapshot(block)
    with pytest.raises(ValueError, match=match):
        block(x)
    _assert_untouched(block, before)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_single_value_per_channel_in_training_is_eagers_error(backend):
    """N*H*W == 1 after the conv: the ValueError nn.BatchNorm2d raises, word for word."""
    unit = FusedConvBNReLU(4, 8, kernel_size=1, backend=backend).train()
    # A copy for eager: nn.BatchNorm2d counts the batch before it raises, fusedres does not.
    eager = copy.deepcopy(torch.nn.Sequential(unit.conv, unit.bn))
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError) as eager_error:
        eager(x)
    before = _snapshot(unit)
    with pytest.raises(ValueError) as fused_error:
        unit(x)
    assert str(fused_error.value) == str(eager_error.value)
    _assert_untouched(unit, before)
    unit.eval()
    assert unit(x).shape == (1, 8, 1, 1)   # eval with N=1 is fine, as in eager


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_residual_mismatches_are_named(backend):
    unit = FusedConvBNReLU(4, 8, stride=2, backend=backend).train()
    x = torch.randn(2, 4, 9, 9)
    before = _snapshot(unit)
    with pytest.raises(ValueError, match=r"residual has shape \(2, 8, 9, 9\) but the unit's output has shape \(2, 8, 5, 5\)"):
        unit(x, torch.randn(2, 8, 9, 9))
    with pytest.raises(TypeError, match=r"residual is torch.float64 on cpu but the input is torch.float32"):
        unit(x, torch.randn(2, 8, 5, 5, dtype=torch.float64))
    _assert_untouched(unit, before)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_input_too_small_for_the_kernel(backend):
    unit = FusedConvBNReLU(4, 8, kernel_size=7, padding=0, backend=backend).train()
    before = _snapshot(unit)
    with pytest.raises(ValueError, match=r"too small for the \(7, 7\) convolution"):
        unit(torch.randn(2, 4, 5, 5))
    _assert_untouched(unit, before)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cudnn'"):
        FusedConvBNReLU(4, 8, backend="cudnn")
