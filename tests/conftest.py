"""Shared test machinery: the tolerance rule of docs/design.md section 6, backends under test, seeds.

The rule: a fused result passes when its max error against the float64 oracle is at most twice
the error of eager PyTorch in the same dtype, plus a small atol scaled by the oracle's magnitude.

``FUSEDRES_REQUIRE_EXTENSION=1`` (set by .ci/run) turns "extension not built" from a skip into a
failure, so CI cannot pass with the C++ backend silently untested. ``FUSEDRES_REQUIRE_MODULES``
(e.g. "torchvision timm", set by .ci/run where it installs them) does the same for optional test
dependencies: the session stops at once, naming the module, instead of their tests skipping.
"""

import importlib
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which reads this variable once,
# when triton is first imported: it must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, so an element a Triton kernel fails to write cannot pass as stale
# memory that happens to be right.
os.environ.setdefault("FUSEDRES_POISON_OUTPUTS", "1")
# On a GPU the test matrix runs each kernel's first config for this architecture instead of
# autotuning every new shape (minutes of compiling and timing); tests/kernels/test_gpu_resnet50.py
# runs every config, and the autotuner, at real shapes.
os.environ.setdefault("FUSEDRES_TRITON_CONFIG", "0")

# MKL's sgemm (nn.Linear, im2col convolutions) may sum in an order that depends on how its
# buffers happen to be aligned, so two identical runs in one process can differ in the last bit;
# bitwise tests (resume, determinism) need its strict reproducible mode. MKL reads this at its
# first call, after import.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# Under pytest-xdist (the README's `-n auto`: one worker per core) each worker takes its share of
# the cores for torch's intra-op threads; by default every worker would take them all. Most
# tests are small and leave a second intra-op thread idle, so workers fill the cores better.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))

for _module in os.environ.get("FUSEDRES_REQUIRE_MODULES", "").replace(",", " ").split():
    try:
        importlib.import_module(_module)
    except Exception as exc:  # a torchvision built for another torch raises more than ImportError
        raise RuntimeError(f"FUSEDRES_REQUIRE_MODULES names {_module}, which does not import: {exc!r}") from exc

import torch.nn.functional as F  # noqa: E402

import fusedres  # noqa: E402
from fusedres import reference  # noqa: E402
from fusedres.backend import Backend, BlockOps, register_backend  # noqa: E402
from fusedres.ops import python_unit, unit_schema  # noqa: E402

# atol per dtype, relative to max(1, |oracle|_max).
ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _reference_train(x, weight, gamma, beta, residual, running_mean, running_var,
                     num_batches_tracked, stride, padding, dilation, groups, relu, momentum, eps):
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    mean, var = reference.bn_stats(z, upcast=False)
    invstd = torch.rsqrt(var + eps)
    scale, shift = python_unit.eval_coefficients(gamma, beta, mean, var, eps, x.dtype)
    y = reference.bn_act_fwd(z, scale, shift, residual, relu, upcast=False)
    python_unit.update_running_stats(mean, var, z.numel() // z.shape[1], running_mean,
                                     running_var, num_batches_tracked, momentum)
    return y, z, mean, invstd


def _reference_eval(x, weight, gamma, beta, residual, running_mean, running_var, stride, padding,
                    dilation, groups, relu, eps):
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    scale, shift = python_unit.eval_coefficients(gamma, beta, running_mean, running_var, eps,
                                                 x.dtype)
    return reference.bn_act_fwd(z, scale, shift, residual, relu, upcast=False)


def _reference_backward(dy, x, weight, y, z, mean, invstd, gamma, stride, padding, dilation,
                        groups, relu, training, output_mask):
    if z is None:
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups) if output_mask[2] else dy
    sdt = reference.stats_dtype(dy.dtype)
    gamma_s = gamma.to(sdt) if gamma is not None else dy.new_ones(weight.shape[0], dtype=sdt)
    dz, dgamma, dbeta, dres = reference.bn_act_bwd(dy, y if relu else dy, z, mean, invstd, gamma_s,
                                                   relu, output_mask[4], training, upcast=False)
    dx, dw = python_unit.conv_backward(dz, x, weight, stride, padding, dilation, groups,
                                       output_mask[0], output_mask[1])
    # A [0] placeholder per output not asked for: op outputs may not alias one another.
    return tuple(t if need and t is not None else dy.new_empty((0,))
                 for t, need in zip((dx, dw, dgamma, dbeta, dres), output_mask))


_REFERENCE_OPS = python_unit.define_unit_ops(
    "fusedres_test", python_unit.PhaseImpls(_reference_train, _reference_eval, _reference_backward),
    unit_schema.ATEN_LAYOUT)


class TorchOpsBackend(Backend):
    """The unit ops over the reference kernels in the activations' precision.

    Not a user-facing backend: it runs the Python unit-op machinery (schemas, autograd on the op,
    running-statistics update; fusedres.ops.python_unit, which the Triton backend also uses) and
    the module wiring against the eager composition on any machine, extension or not.
    """

    name = "torch_ops"
    device_types = ("cpu", "cuda")

    def unit_train(self, x, weight, gamma, beta, residual, running_mean, running_var,
                   num_batches_tracked, conv, relu, momentum, eps):
        return _REFERENCE_OPS.train(x, weight, gamma, beta, residual, running_mean, running_var,
                                    num_batches_tracked, conv.stride, conv.padding, conv.dilation,
                                    conv.groups, relu, momentum, eps)[0]

    def unit_eval(self, x, weight, gamma, beta, residual, running_mean, running_var, conv, relu,
                  eps):
        return _REFERENCE_OPS.eval(x, weight, gamma, beta, residual, running_mean, running_var,
                                   conv.stride, conv.padding, conv.dilation, conv.groups, relu, eps)

    def block_ops(self):
        return BlockOps(_REFERENCE_OPS.train, _REFERENCE_OPS.backward, _reference_bn_act_fwd,
                        _reference_conv)


def _reference_bn_act_fwd(z, scale, shift, residual, relu):
    return reference.bn_act_fwd(z, scale, shift, residual, relu, upcast=False)


def _reference_conv(x, weight, stride, padding, dilation, groups):
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


register_backend(TorchOpsBackend())


def _cpu_backend_param():
    ok, why = fusedres.available_backends()["cpu"]
    if ok:
        return pytest.param("cpu")
    if os.environ.get("FUSEDRES_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"FUSEDRES_REQUIRE_EXTENSION=1 but the cpu backend is unusable: {why}")
    return pytest.param("cpu", marks=pytest.mark.skip(reason=f"cpu backend unusable: {why}"))


#: The fused backends that run on CPU tensors here (parametrize tests over these).
CPU_FUSED_BACKENDS = ["torch_ops", _cpu_backend_param()]


def onednn_takes(dtype: torch.dtype) -> bool:
    """Whether the cpu backend's inference hands ``dtype``'s units to oneDNN on this CPU (folded
    convolutions, matrix products). oneDNN runs bfloat16 only with AVX512 or AMX: on an AVX2 CPU
    (an AMD EPYC Zen 3, for one) a bfloat16 unit runs its float32 plan on widened values
    instead (csrc/cpu/conv_precision.h), and falls back to the unfolded op where that switch is
    off, as eager's bfloat16 convolution falls back to ATen's own code."""
    from fusedres.backends.extension import CpuBackend, _convolves_in_float32
    return CpuBackend._onednn_takes(torch.float32 if _convolves_in_float32(dtype) else dtype)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| over entries where the expected value is finite."""
    a, e = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(e)
    if not finite.any():
        return 0.0
    return (a[finite] - e[finite]).abs().max().item()


def rel_l2_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (0 when both vanish)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_oracle_close(actual, eager, oracle, name="tensor", atol=None, norm="max", scale=None):
    """docs/design.md's rule: err(actual) <= 2 * err(eager in the same dtype) + atol.

    Args:
        actual: the fused result; eager: eager PyTorch's result in the same dtype;
        oracle: the float64 result. NaN/inf positions must match the oracle's.
        norm: ``"max"`` (max abs error, atol scaled by max(1, |oracle|)) or ``"rel_l2"``
            (relative L2 error). Whole deep networks in training use rel_l2: there a ReLU mask
            flip deep in the net moves single gradient entries by O(1) in eager and fused alike,
            so the max error is noise while the relative L2 error is stable.
        scale: with ``"max"``, the magnitude atol is relative to, where the oracle's own values
            understate it (a sum that cancels to about 0 carries rounding of its terms' size);
            default max(1, |oracle|).
    """
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert torch.equal(torch.isnan(actual), torch.isnan(oracle.to(actual.dtype))), \
        f"{name}: NaN positions differ from the oracle's"
    if scale is None:
        scale = max(1.0, oracle.detach().double().abs().nan_to_num(0.0, 0.0, 0.0).max().item()) \
            if oracle.numel() else 1.0
    tol = ATOL[actual.dtype] if atol is None else atol
    if norm == "rel_l2":
        scale = 1.0
        err, err_eager = rel_l2_err(actual, oracle), rel_l2_err(eager, oracle)
    else:
        err, err_eager = max_abs_err(actual, oracle), max_abs_err(eager, oracle)
    bound = 2 * err_eager + tol * scale
    assert err <= bound, (f"{name}: error {err:.3e} vs the fp64 oracle exceeds 2 x eager's "
                          f"{err_eager:.3e} + atol {tol * scale:.3e}")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    fusedres.set_backend(None)
    yield
    fusedres.set_backend(None)


# -- hypothesis (property-based tests: tests/test_unit_properties.py) --------------------------
#
# HYPOTHESIS_PROFILE picks the profile; the default, "ci", is what CI and a plain `pytest` run:
# a bounded number of examples, derandomized (the same examples on every run, so a red CI is
# reproducible on any machine) and no example database (nothing written into the work tree).
# "explore" draws fresh random examples, more of them; "quick" is a smoke run. A failure prints
# the falsifying example and its @reproduce_failure blob in every profile.
try:
    from hypothesis import HealthCheck, settings as _hypothesis_settings
except ImportError:  # the property tests skip themselves, with the reason, without hypothesis
    HYPOTHESIS_EXAMPLES = 0
else:
    _HYPOTHESIS_COMMON = dict(
        deadline=None,         # shared 2-core machines: a slow example is not a failure
        print_blob=True,       # the @reproduce_failure line of every falsifying example
        database=None,
        # Tiny tensors are drawn from a seed, so data generation is cheap, but each example runs
        # three forward + backward passes: hypothesis' too_slow check only measures that noise.
        suppress_health_check=[HealthCheck.too_slow],
    )
    _hypothesis_settings.register_profile("ci", max_examples=30, derandomize=True,
                                          **_HYPOTHESIS_COMMON)
    _hypothesis_settings.register_profile("quick", max_examples=8, derandomize=True,
                                          **_HYPOTHESIS_COMMON)
    _hypothesis_settings.register_profile("explore", max_examples=300, derandomize=False,
                                          **_HYPOTHESIS_COMMON)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    #: Examples per property test under the loaded profile (tests scale their own counts by it).
    HYPOTHESIS_EXAMPLES = _hypothesis_settings.default.max_examples
