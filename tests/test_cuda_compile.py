"""Static checks of the CUDA kernels (csrc/cuda) that need nvcc but no GPU.

- scripts/check_cuda_compile.py builds every .cu for sm_80 and sm_90 with ``-Xptxas -v``: no
  compile error, no register spill, and every kernel variant the launchers dispatch to is present
  for both architectures (its table of registers per kernel is printed with ``pytest -s``).
- The .cu/.cuh/.h files include no torch header (DESIGN.md section 4: plain nvcc builds them).
- The ptxas parser of the script recognises spills (so the check can fail).
- csrc/common/bn_math.h, which the CUDA kernels share with the CPU kernels, matches
  fusedres.reference when compiled by the host compiler (cheap: one small g++ program).
"""

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fusedres import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_cuda_compile.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_cuda_compile  # noqa: E402

ARCHS = ("sm_80", "sm_90")

# Kernel variants the launchers can pick: (storage type, vector width) pairs, fp64 scalar only.
_TYPE_VECS = [("float", 1), ("float", 4), ("__half", 1), ("__half", 8), ("__nv_bfloat16", 1),
              ("__nv_bfloat16", 8), ("double", 1)]
_BOOLS = ("false", "true")
EXPECTED_KERNELS = (
    {f"bn_stats_partial_kernel<{t}, {v}>" for t, v in _TYPE_VECS}
    | {f"bn_stats_finalize_kernel<{a}>" for a in ("float", "double")}
    | {f"bn_act_fwd_kernel<{t}, {v}, {r}, {h}>" for t, v in _TYPE_VECS for r in _BOOLS for h in _BOOLS}
    | {f"bn_bwd_reduce_kernel<{t}, {v}, {r}, {h}, {e}>"
       for t, v in _TYPE_VECS for r in _BOOLS for h in _BOOLS for e in _BOOLS}
    | {f"bn_bwd_finalize_kernel<{a}>" for a in ("float", "double")}
    | {f"bn_bwd_dz_kernel<{t}, {v}, (GradSource){g}>" for t, v in _TYPE_VECS for g in range(3)}
)

needs_nvcc = pytest.mark.skipif(check_cuda_compile.find_nvcc() is None,
                                reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("nvcc") / "report.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--json", str(out)], capture_output=True, text=True,
                          env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")})
    print(proc.stdout)  # the register table, shown with pytest -s
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


@needs_nvcc
def test_every_cu_compiles_without_spills(compile_report):
    proc, report = compile_report
    assert proc.returncode == 0, f"check_cuda_compile failed:\n{proc.stderr[-6000:]}\n{proc.stdout[-3000:]}"
    assert report is not None and report["ok"]
    files = {r["file"] for r in report["results"]}
    expected_files = {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))}
    assert files == expected_files
    for res in report["results"]:
        for k in res["kernels"]:
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, k
            assert k["registers"] is not None and 0 < k["registers"] <= 255, k


@needs_nvcc
def test_every_kernel_variant_is_built_for_both_archs(compile_report):
    _, report = compile_report
    assert report is not None, "the compile check wrote no report"
    built = {(k["kernel"], k["arch"]) for r in report["results"] for k in r["kernels"]}
    missing = sorted((name, arch) for name in EXPECTED_KERNELS for arch in ARCHS if (name, arch) not in built)
    assert not missing, f"kernels missing from the cubins: {missing[:10]} ({len(missing)} in all)"
    unexpected = sorted({name for name, _ in built} - EXPECTED_KERNELS)
    assert not unexpected, f"kernels this test does not know (update EXPECTED_KERNELS): {unexpected}"


def test_cuda_sources_include_no_torch_headers():
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*"))
    assert sources, "csrc/cuda is empty"
    torch_include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|caffe2)/')
    for path in sources:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                assert not torch_include.search(line), f"{os.path.relpath(path, ROOT)}:{lineno}: {line.strip()}"


def test_ptxas_parser_reports_spills():
    log = """ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function '_Z7kernel2Pf' for 'sm_80'
ptxas info    : Function properties for _Z7kernel2Pf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 380 bytes cmem[0]
"""
    rows = check_cuda_compile.parse_ptxas(log)
    assert [(r["arch"], r["registers"], r["spill_stores"], r["spill_loads"], r["stack"], r["smem"]) for r in rows] \
        == [("sm_90", 255, 8, 12, 16, 4096), ("sm_80", 32, 0, 0, 0, 0)]
    assert rows[0]["kernel"].startswith("kernel")


_MATH_PROGRAM = r"""
#include <cstdio>
#include "common/bn_math.h"
using namespace fusedres::math;
int main() {
  // bn_act / relu_keep_nan
  const double zs[] = {-2.0, -0.25, 0.0, 0.5, 3.0};
  for (double z : zs) std::printf("act %.17g %.17g\n", bn_act(z, 1.5, -0.5, 0.25, true), bn_act(z, 1.5, -0.5, 0.25, false));
  std::printf("nan %d\n", (int)std::isnan(relu_keep_nan(std::nan(""))));
  // relu_grad on y = {-1, 0, 2}
  std::printf("grad %.17g %.17g %.17g %.17g\n", relu_grad(3.0, -1.0, true), relu_grad(3.0, 0.0, true),
              relu_grad(3.0, 2.0, true), relu_grad(3.0, -1.0, false));
  // Chan merge of two halves of a large-mean sequence vs the whole (float: the GPU's precision)
  float n = 0, m = 0, m2 = 0, n2 = 0, mb = 0, m2b = 0;
  for (int i = 0; i < 1000; ++i) { float x = 10000.0f + (i % 7) - 3.0f; n += 1; float d = x - m; m += d / n; m2 += d * (x - m); }
  for (int i = 1000; i < 3000; ++i) { float x = 10000.0f + (i % 7) - 3.0f; n2 += 1; float d = x - mb; mb += d / n2; m2b += d * (x - mb); }
  welford_merge(n, m, m2, n2, mb, m2b);
  std::printf("welford %.9g %.9g %.9g\n", n, m, m2 / n);
  // bwd coefficients (training, eval) applied to one element
  BwdCoefficients<double> kt = bwd_coefficients(1.25, 0.5, 2.0, 3.0, -1.5, 8.0, true);
  BwdCoefficients<double> ke = bwd_coefficients(1.25, 0.5, 2.0, 3.0, -1.5, 8.0, false);
  std::printf("coef %.17g %.17g %.17g %.17g %.17g %.17g\n", kt.a, kt.b, kt.c, ke.a, ke.b, ke.c);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_shared_math_header_matches_reference(tmp_path):
    src, exe = tmp_path / "math.cpp", tmp_path / "math"
    src.write_text(_MATH_PROGRAM)
    subprocess.run(["g++", "-std=c++17", "-O2", "-I", os.path.join(ROOT, "csrc"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        key, *vals = line.split()
        out.setdefault(key, []).append([float(v) for v in vals])

    z = torch.tensor([-2.0, -0.25, 0.0, 0.5, 3.0], dtype=torch.float64).view(1, 1, 1, 5)
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    for relu, col in ((True, 0), (False, 1)):
        ref = reference.bn_act_fwd(z, one(1.5), one(-0.5), torch.full_like(z, 0.25), relu).flatten()
        assert [row[col] for row in out["act"]] == pytest.approx(ref.tolist(), abs=1e-15)
    assert out["nan"] == [[1.0]]
    assert out["grad"] == [[0.0, 0.0, 3.0, 3.0]]

    n, m, var = out["welford"][0]
    xs = torch.tensor([10000.0 + (i % 7) - 3.0 for i in range(3000)], dtype=torch.float64)
    assert n == 3000 and m == pytest.approx(xs.mean().item(), rel=1e-7)
    assert var == pytest.approx(xs.var(correction=0).item(), rel=1e-3)  # ~4; naive fp32 sums lose it all

    # The coefficients reproduce reference.bn_act_bwd's dz for a channel with the given sums: build
    # g, z of M=8 elements whose sums are sum_g=3, sum_g*(z-mean)=-1.5 and compare dz elementwise.
    a, b, c, ae, be, ce = out["coef"][0]
    g = torch.tensor([1.0, -0.5, 0.25, 0.75, 0.5, 1.0, -0.25, 0.25], dtype=torch.float64)
    zc = torch.tensor([0.1, 0.2, -0.3, 0.4, -0.2, -0.35, 0.15, 0.0], dtype=torch.float64)
    zc = zc - zc.mean()
    zc = zc * (-1.5 / (g * zc).sum())  # scale so that sum g*(z-mean) = -1.5
    zz = (zc + 0.5).view(1, 1, 1, 8)
    assert math.isclose(g.sum().item(), 3.0) and math.isclose((g * (zz.flatten() - 0.5)).sum().item(), -1.5)
    y = torch.ones_like(zz)  # all positive: no ReLU masking
    for training, (ka, kb, kc) in ((True, (a, b, c)), (False, (ae, be, ce))):
        dz, *_ = reference.bn_act_bwd(g.view(1, 1, 1, 8), y, zz, one(0.5), one(2.0), one(1.25), True, False, training)
        assert (ka * g + kb * zz.flatten() + kc).tolist() == pytest.approx(dz.flatten().tolist(), abs=1e-12)
