"""The cuda backend's inference (its Python: fold, plan runner, layouts) on CPU tensors.

``torch.cudnn_convolution_relu`` and ``torch.cudnn_convolution_add_relu`` run only on a GPU.
Here they are replaced by ATen's convolution + bias (+ alpha * z) + ReLU with the same
signatures, and the cuda backend runs on the CPU under another name (``cudnn_on_cpu``), so that
its inference route is exercised where CI runs: the fold and its cache, the runner a plan keeps,
the arguments and layouts handed to cuDNN, the units cuDNN's entry points cannot take (no ReLU,
float64). What cuDNN itself computes is checked on a GPU (scripts/gpu_validate.sh's block and
network checks, the tests marked ``cuda``).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_oracle_close
from nets import assert_inference_plan_folds_once
from fusedres import FusedBottleneck, FusedConvBNReLU, _ext, backend as backend_module, reference
from fusedres.backends.extension import CudaBackend, ExtensionBackend

if not _ext.extension_loaded():
    if os.environ.get("FUSEDRES_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"FUSEDRES_REQUIRE_EXTENSION=1 but {_ext.EXTENSION_ERROR}")
    pytest.skip(f"C++ extension not built: {_ext.EXTENSION_ERROR}", allow_module_level=True)

NAME = "cudnn_on_cpu"


@pytest.fixture
def cudnn_calls(monkeypatch):
    """Registers the cuda backend as ``cudnn_on_cpu`` (CPU tensors) with cuDNN's fused entry
    points emulated; yields the list of their calls: (entry point, x, weight, z or None)."""
    calls = []

    def convolution_relu(x, weight, bias, stride, padding, dilation, groups):
        calls.append(("relu", x, weight, None))
        return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))

    def convolution_add_relu(x, weight, z, alpha, bias, stride, padding, dilation, groups):
        calls.append(("add_relu", x, weight, z))
        return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + alpha * z)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", convolution_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", convolution_add_relu)
    backend = CudaBackend()
    ExtensionBackend.__init__(backend, NAME, "cpu")
    monkeypatch.setitem(backend_module._REGISTRY, NAME, backend)
    yield calls


def _twins(relu=True, dtype=torch.float32):
    """A fused unit on the emulated backend, eval, random BatchNorm state, and its eager twin."""
    fused = FusedConvBNReLU(8, 12, 3, relu=relu, backend=NAME)
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 1.5)
        fused.bn.bias.uniform_(-0.5, 0.5)
        fused.bn.running_mean.uniform_(-0.5, 0.5)
        fused.bn.running_var.uniform_(0.5, 2.0)
    eager = reference.ConvBNAct(8, 12, 3, relu=relu)
    eager.load_state_dict(fused.state_dict())
    return fused.to(dtype).eval(), eager.to(dtype).eval()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unit_inference_runs_one_cudnn_call(cudnn_calls, layout, residual, dtype):
    """y against eager and the float64 oracle, twice (the plan's second call); one cuDNN call
    per call, with x, the folded weight and the residual channels_last; y in x's layout."""
    fused, eager = _twins(dtype=dtype)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x64 = torch.randn(2, 8, 7, 9, dtype=torch.float64).contiguous(memory_format=fmt)
    res64 = torch.randn(2, 12, 7, 9, dtype=torch.float64).contiguous(memory_format=fmt)
    args64 = (x64, res64) if residual else (x64,)
    args = [a.to(dtype) for a in args64]
    with torch.no_grad():
        exact = reference.upcast(eager)(*args64)
        expected = eager(*args)
        first = fused(*args)
        second = fused(*args)
    assert_oracle_close(first, expected, exact, name="y")
    assert torch.equal(first, second)
    assert first.is_contiguous(memory_format=fmt)
    assert [c[0] for c in cudnn_calls] == ["add_relu" if residual else "relu"] * 2
    for _, x, weight, z in cudnn_calls:
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert weight.is_contiguous(memory_format=torch.channels_last) and weight.dtype == dtype
        assert z is None or z.is_contiguous(memory_format=torch.channels_last)


def test_inference_plan_folds_once_and_follows_state_changes(cudnn_calls, monkeypatch):
    """The plan's runner folds when it is made, not per call (unit_infer had looked the fold up
    on every call); an in-place change of the conv weight, gamma, beta or a running statistic
    makes a new plan whose output follows it; one cuDNN call per call."""
    fused, eager = _twins()
    assert_inference_plan_folds_once(monkeypatch, fused, eager,
                                     torch.randn(2, 8, 7, 9, dtype=torch.float64))
    assert len(cudnn_calls) == 4 + 5  # four calls, then one after each of the five changes


@pytest.mark.parametrize("case", ["norelu", "float64"])
def test_units_cudnn_cannot_fuse_run_the_unit_op(cudnn_calls, case):
    """Without ReLU, or in float64, cuDNN's fused entry points do not apply: the unit's eval op
    runs instead (on the CPU here: its kernels behind the same op), and matches eager."""
    dtype = torch.float64 if case == "float64" else torch.float32
    fused, eager = _twins(relu=case != "norelu", dtype=dtype)
    x = torch.randn(2, 8, 7, 9, dtype=dtype)
    with torch.no_grad():
        got = fused(x)
        again = fused(x)
        expected = eager(x)
    assert cudnn_calls == []
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, again)


def test_bottleneck_inference(cudnn_calls):
    """A Bottleneck without gradients (three runners, the last adding the identity) against eager
    and the float64 oracle, twice (the block plan's second call)."""
    eager = reference.Bottleneck(16, 4)
    for mod in eager.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    eager.eval()
    fused = FusedBottleneck(16, 4, backend=NAME).eval()
    fused.load_state_dict(eager.state_dict())
    x64 = torch.randn(2, 16, 5, 6, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        exact = reference.upcast(eager)(x64)
        expected = eager(x64.float())
        first = fused(x64.float())
        second = fused(x64.float())
    assert_oracle_close(first, expected, exact, name="y")
    assert torch.equal(first, second)
    assert [c[0] for c in cudnn_calls] == ["relu", "relu", "add_relu"] * 2
