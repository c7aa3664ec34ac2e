"""Shared test machinery: the tolerance rule of DESIGN.md section 6, backends under test, seeds.

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

for _module in os.environ.get("FUSEDRES_REQUIRE_MODULES", "").replace(",", " ").split():
    try:
        importlib.import_module(_module)
    except Exception as exc:  # a torchvision built for another torch raises more than ImportError
        raise RuntimeError(f"FUSEDRES_REQUIRE_MODULES names {_module}, which does not import: {exc!r}") from exc

import fusedres  # noqa: E402
from fusedres.backend import register_backend  # noqa: E402
from fusedres.backends.eager import EagerBackend  # noqa: E402

# atol per dtype, relative to max(1, |oracle|_max).
ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class TorchOpsBackend(EagerBackend):
    """The fused autograd Function over the reference ops in the activations' precision.

    Not a user-facing backend: it lets the Function, the running-statistics logic and the
    module wiring be tested against the eager composition on any machine, extension or not.
    """

    name = "torch_ops"
    uses_reference_composition = False


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


def assert_oracle_close(actual, eager, oracle, name="tensor", atol=None, norm="max"):
    """DESIGN.md's rule: err(actual) <= 2 * err(eager in the same dtype) + atol.

    Args:
        actual: the fused result; eager: eager PyTorch's result in the same dtype;
        oracle: the float64 result. NaN/inf positions must match the oracle's.
        norm: ``"max"`` (max abs error, atol scaled by max(1, |oracle|)) or ``"rel_l2"``
            (relative L2 error). Whole deep networks in training use rel_l2: there a ReLU mask
            flip deep in the net moves single gradient entries by O(1) in eager and fused alike,
            so the max error is noise while the relative L2 error is stable.
    """
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert torch.equal(torch.isnan(actual), torch.isnan(oracle.to(actual.dtype))), \
        f"{name}: NaN positions differ from the oracle's"
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
