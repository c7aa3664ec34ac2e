"""Triton kernel tests: on a machine without CUDA the kernels run in Triton's CPU interpreter.

Triton decides when a ``@triton.jit`` function is *decorated* whether it is interpreted, so
``TRITON_INTERPRET=1`` must be set before ``fusedres.kernels`` is first imported. pytest imports
this file while collecting tests/kernels, before any test runs; fusedres imports the kernels only
when the triton backend first runs, so setting the variable here is early enough. Should a test
module collected earlier have imported the kernels already, they are dropped from sys.modules
here and re-imported (interpreted) on next use; should triton itself have been imported already,
collection stops with the line to add to tests/conftest.py.

With CUDA present nothing is set here: the same tests run on the GPU (each kernel's first config,
see tests/conftest.py), plus the ``cuda``-marked ones. The variable stays set for the rest of the session; other backends do not
read it (``auto`` never picks triton for CPU tensors).
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        # triton's own library functions (tl.zeros, ...) were decorated for a GPU already;
        # the interpreter would fail on them in every test. Say how to fix it instead.
        raise pytest.UsageError(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
            "set it earlier: in the environment, or at the top of tests/conftest.py with "
            "`if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')`")
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("fusedres.kernels")]:
        del sys.modules[_name]

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: where the kernels run: the GPU, or the CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: dtypes tested on this device: bf16 tl.dot is wrong in the interpreter (triton 3.9), GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

try:
    import triton  # noqa: F401
    _TRITON_ERROR = None
except ImportError as e:  # pragma: no cover - triton is a test dependency
    _TRITON_ERROR = str(e)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    skip = None
    if _TRITON_ERROR is not None:
        skip = pytest.mark.skip(reason=f"triton is not importable: {_TRITON_ERROR}")
    elif DEVICE == "cpu" and not INTERPRETING:
        skip = pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET is explicitly off")
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if "static_compile" in item.nodeid:
            continue  # compiles for sm_80/sm_90 in a subprocess: needs neither GPU nor interpreter
        if skip is not None:
            item.add_marker(skip)
        elif DEVICE == "cpu":
            item.add_marker(pytest.mark.triton_interp)
        else:
            item.add_marker(pytest.mark.cuda)  # `pytest -m cuda` selects what runs on the GPU


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _full_precision_fp32_convolutions():
    """On a GPU, fp32 convolutions run in full fp32 on both sides of every comparison.

    With TF32 allowed (PyTorch's default for cuDNN) the triton conv always uses TF32 (~1e-3
    relative error) while cuDNN picks TF32 or plain fp32 kernels by shape (~1e-7), so the 2x-eager
    rule would compare unlike roundings. With the flag off both are fp32 (the triton conv's
    ``ieee`` dot); TF32's rounding is the fp16/bf16 path's tl.dot, tested in those dtypes.
    """
    if DEVICE != "cuda":
        yield
        return
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed
