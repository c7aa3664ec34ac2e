"""Backend choice: argument > set_backend > FUSEDRES_BACKEND > auto, and clear refusals."""

import subprocess
import sys
import types

import pytest
import torch

import fusedres
from fusedres import _ext
from fusedres._sources import UNFINISHED, csrc_fingerprint
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


def test_an_extension_from_other_sources_is_refused(tmp_path):
    """_ext.stale_sources compares setup.py's record with csrc/'s fingerprint: any change to a
    source's bytes, name or set refuses the library; files the build does not read do not."""
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "ops.cpp").write_text("int f() { return 1; }\n")
    (csrc / "cpu" / "kernels.h").write_text("#pragma once\n")
    record = csrc_fingerprint(str(csrc))
    assert _ext.stale_sources(record, str(csrc)) is None

    (csrc / "cpu" / "kernels.h").write_text("#pragma once  \n")
    why = _ext.stale_sources(record, str(csrc))
    assert why is not None and str(csrc) in why and "rebuild it with" in why
    (csrc / "cpu" / "kernels.h").write_text("#pragma once\n")
    assert _ext.stale_sources(record, str(csrc)) is None

    (csrc / "new.cu").write_text("")
    assert _ext.stale_sources(record, str(csrc)) is not None
    (csrc / "new.cu").unlink()
    (csrc / "ops.cpp").rename(csrc / "cpu" / "ops.cpp")
    assert _ext.stale_sources(record, str(csrc)) is not None
    (csrc / "cpu" / "ops.cpp").rename(csrc / "ops.cpp")
    for not_built in ("notes.txt", "ops.cpp~", ".ops.cpp.swp"):
        (csrc / not_built).write_text("x")
    assert _ext.stale_sources(record, str(csrc)) is None

    # setup.py's record until its build succeeds
    assert _ext.stale_sources(UNFINISHED, str(csrc)) is not None
    # nothing to compare: no record (an older setup.py), no csrc/ (an installed wheel)
    assert _ext.stale_sources(None, str(csrc)) is None
    assert _ext.stale_sources(record, str(tmp_path / "absent")) is None


def test_the_build_records_the_sources_it_was_built_from():
    if not _ext.extension_loaded():
        pytest.skip(f"needs the extension: {_ext.EXTENSION_ERROR}")
    assert _ext.BUILT_FROM == csrc_fingerprint(_ext._CSRC)


def test_a_library_from_other_sources_is_not_loaded():
    """With csrc/ changed since the build (here: its fingerprint), the library is not loaded, so
    that none of its ops are registered, and the backends say why and how to fix it."""
    if not _ext.extension_loaded():
        pytest.skip(f"needs the extension: {_ext.EXTENSION_ERROR}")
    code = """
import sys, types
changed = types.ModuleType("fusedres._sources")
changed.csrc_fingerprint = lambda csrc: "sources changed since the build"
sys.modules["fusedres._sources"] = changed
import torch, fusedres
from fusedres import _ext
assert _ext._C is None, "loaded"
assert not hasattr(torch.ops.fusedres, "unit_train"), "ops registered"
ok, why = fusedres.available_backends()["cpu"]
assert not ok and why == _ext.EXTENSION_ERROR, (ok, why)
print(why)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fusedres._C was not built from the sources in" in out.stdout
    assert "rebuild it with `pip install -e . --no-build-isolation`" in out.stdout


def test_the_extension_is_built_with_torchs_string_abi():
    if not _ext.extension_loaded():
        pytest.skip(f"needs the extension: {_ext.EXTENSION_ERROR}")
    assert _ext._C.glibcxx_use_cxx11_abi == int(torch._C._GLIBCXX_USE_CXX11_ABI)
