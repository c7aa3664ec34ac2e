"""Backend choice: argument > set_backend > FUSEDRES_BACKEND > auto, and clear refusals."""

import subprocess
import sys
import types

import pytest
import torch

import fusedres
from fusedres import _ext
from fusedres.backend import BACKEND_NAMES, resolve


def test_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FUSEDRES_BACKEND", "eager")
    assert resolve(None, cpu).name == "eager"
    fusedres.set_backend("torch_ops")
    assert resolve(None, cpu).name == "torch_ops"
    assert resolve("eager", cpu).name == "eager"
    fusedres.set_backend(None)
    monkeypatch.setenv("FUSEDRES_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable FUSEDRES_BACKEND must be one of"):
        resolve(None, cpu)


def test_auto_on_cpu_prefers_the_cpp_kernels():
    ok, _ = fusedres.available_backends()["cpu"]
    assert resolve("auto", torch.device("cpu")).name == ("cpu" if ok else "eager")


def test_auto_skips_a_backend_whose_kernels_do_not_take_the_dtype(monkeypatch):
    """As auto on a GPU skips triton (fp16/bf16/fp32 kernels) for float64 input."""
    cpu_backend = fusedres.get_backend("cpu")
    if not cpu_backend.availability()[0]:
        pytest.skip("the cpu backend is unusable here; auto would pick eager for every dtype")
    monkeypatch.setattr(cpu_backend, "dtypes", (torch.float32,))
    cpu = torch.device("cpu")
    assert resolve("auto", cpu, torch.float32) is cpu_backend
    assert resolve("auto", cpu, torch.float64).name == "eager"
    assert resolve("auto", cpu).name == "cpu"


def test_auto_order_on_cuda_tensors(monkeypatch):
    """auto on a CUDA tensor: the cuda kernels first, then triton for its dtypes, eager last;
    CPU tensors never go to triton, even when the interpreter lets it run them.

    Availability is faked (nothing runs), so the order is tested on any machine: with both GPU
    backends usable, float16 can only land on cuda if ``_AUTO_ORDER["cuda"]`` lists it first.
    """
    triton_backend, cuda_backend = fusedres.get_backend("triton"), fusedres.get_backend("cuda")
    # As under TRITON_INTERPRET=1: triton claims CPU tensors too.
    monkeypatch.setattr(type(triton_backend), "device_types", ("cuda", "cpu"))
    monkeypatch.setattr(triton_backend, "availability", lambda: (True, "faked for the test"))
    monkeypatch.setattr(cuda_backend, "availability", lambda: (True, "faked for the test"))
    cuda = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, None):
        assert resolve("auto", cuda, dtype).name == "cuda", dtype
    monkeypatch.setattr(cuda_backend, "availability", lambda: (False, "faked for the test"))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, None):
        assert resolve("auto", cuda, dtype).name == "triton", dtype
    assert resolve("auto", cuda, torch.float64).name == "eager"

    cpu_ok, _ = fusedres.available_backends()["cpu"]
    for dtype in (torch.float16, torch.float32, None):
        assert resolve("auto", torch.device("cpu"), dtype).name == ("cpu" if cpu_ok else "eager")


def test_named_backend_on_the_wrong_device_is_refused():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not usable here|runs on cuda tensors"):
        resolve("cuda", torch.device("cpu"))


def test_available_backends_lists_every_name_with_a_reason():
    table = fusedres.available_backends()
    assert set(table) == set(BACKEND_NAMES)
    assert table["eager"][0] is True
    assert all(isinstance(reason, str) and reason for _, reason in table.values())


def test_info_command_prints_versions_build_and_backends():
    out = subprocess.run([sys.executable, "-m", "fusedres.info"], capture_output=True, text=True,
                         check=True).stdout
    assert f"torch {torch.__version__}" in out
    for name in BACKEND_NAMES:
        assert f"  {name}" in out
    assert "extension" in out


def test_an_extension_of_another_string_abi_is_refused():
    torch_abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    other = types.SimpleNamespace(glibcxx_use_cxx11_abi=1 - torch_abi)
    why = _ext.abi_mismatch(other)
    assert why is not None and f"_GLIBCXX_USE_CXX11_ABI={1 - torch_abi}" in why
    assert "rebuild it with" in why
    assert _ext.abi_mismatch(types.SimpleNamespace(glibcxx_use_cxx11_abi=torch_abi)) is None
    # a build that does not say (older ones, libc++) is taken as it is
    assert _ext.abi_mismatch(types.SimpleNamespace()) is None


def test_the_extension_is_built_with_torchs_string_abi():
    if not _ext.extension_loaded():
        pytest.skip(f"needs the extension: {_ext.EXTENSION_ERROR}")
    assert _ext._C.glibcxx_use_cxx11_abi == int(torch._C._GLIBCXX_USE_CXX11_ABI)
