"""Builds fusedres._C.

The C++ CPU kernels are always built. The CUDA kernels (csrc/cuda/*.cu) are added when torch was
built with CUDA and nvcc is found, or when FUSEDRES_FORCE_CUDA=1 (then only nvcc is needed: the .cu
files include no torch headers, so they build and link against a CPU-only torch as well; CI builds
them against torch 2.14.1+cu130 as a GPU user does). FUSEDRES_SKIP_CUDA_BUILD=1 turns the CUDA part
off.
TORCH_CUDA_ARCH_LIST (default "8.0;9.0") and MAX_JOBS are honoured.
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc):
    """The toolkit root of `nvcc`. CUDA_HOME/CUDA_PATH win; otherwise nvcc's own location, asked of
    nvcc itself when the path on PATH is a wrapper script (e.g. /usr/local/bin/nvcc exec-ing
    /usr/local/cuda-13.0/bin/nvcc), whose parent holds no include/cuda_runtime_api.h."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        return cuda_home
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        return cuda_home
    dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True)
    here = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return os.path.dirname(here.group(1).strip()) if here else cuda_home


def _cuda_decision():
    """Returns (build_cuda, reason)."""
    nvcc = _find_nvcc()
    if os.environ.get("FUSEDRES_SKIP_CUDA_BUILD", "0") == "1":
        return False, "FUSEDRES_SKIP_CUDA_BUILD=1"
    if os.environ.get("FUSEDRES_FORCE_CUDA", "0") == "1":
        if nvcc is None:
            raise RuntimeError("FUSEDRES_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        return True, f"FUSEDRES_FORCE_CUDA=1, nvcc at {nvcc}"
    if torch.version.cuda is None:
        return False, "torch has no CUDA (set FUSEDRES_FORCE_CUDA=1 to compile the CUDA kernels anyway)"
    if nvcc is None:
        return False, "nvcc not found"
    return True, f"torch CUDA {torch.version.cuda}, nvcc at {nvcc}"


def _extension():
    build_cuda, reason = _cuda_decision()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch.utils.cpp_extension appends, for both g++ and nvcc, the standard that
    # this torch's headers need (C++20 in 2.13 and 2.14; ATen 2.14 rejects anything older), so the build
    # follows torch across 2.11-2.15 instead of pinning one standard that some release rejects.
    # -g0 overrides the -g in Python's own build flags: debug information for the CPU kernels'
    # template instantiations made a third of their compile time and most of the library's size.
    # torch's std::string ABI, spelled out: cpp_extension no longer passes it and relies on the
    # compiler's default, but some compilers default to the old ABI (Red Hat's gcc-toolset, for
    # one). Built that way the extension fails to load, or loads and crashes where a std::string
    # crosses into libtorch (a TORCH_CHECK message); fusedres/_ext.py refuses such a build.
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cxx_flags = ["-O3", "-g0", "-fopenmp", abi]
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", abi]
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs, libraries, link_args = [], [], ["-fopenmp"]
    arch_list = "none"
    if build_cuda:
        cuda_home = _cuda_home(_find_nvcc())
        os.environ.setdefault("CUDA_HOME", cuda_home)
        # torch.utils.cpp_extension reads CUDA_HOME once at import and leaves it None under a
        # CPU-only torch, then refuses .cu sources; the FORCE_CUDA build points it at this toolkit.
        if cpp_extension.CUDA_HOME is None:
            cpp_extension.CUDA_HOME = cuda_home
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # torch.utils.cpp_extension reads this to emit -gencode flags for every .cu file.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        cxx_flags.append("-DFUSEDRES_WITH_CUDA")
        nvcc_flags.append("-DFUSEDRES_WITH_CUDA")
        include_dirs.append(os.path.join(cuda_home, "include"))
        library_dirs.append(os.path.join(cuda_home, "lib64"))
        libraries.append("cudart")
        link_args.append(f"-Wl,-rpath,{os.path.join(cuda_home, 'lib64')}")
    build_info = {"cuda": build_cuda, "cuda_reason": reason, "cuda_arch_list": arch_list,
                  "torch": torch.__version__}
    # Read by `python -m fusedres.info`; generated, so it is git-ignored.
    with open(os.path.join(ROOT, "fusedres", "_build_info.py"), "w") as f:
        f.write(f"# Generated by setup.py; do not edit.\nBUILD_INFO = {build_info!r}\n")
    print(f"[fusedres] building fusedres._C: CPU kernels yes; CUDA kernels "
          f"{'yes' if build_cuda else 'no'} ({reason}); arch list {arch_list}")
    return CppExtension(
        "fusedres._C",
        sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_args,
    )


setup(
    packages=find_packages(include=["fusedres", "fusedres.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
