"""Static checks of the CUDA kernels (csrc/cuda) that need nvcc but no GPU.

- scripts/check_cuda_compile.py builds every .cu for sm_80 and sm_90 with ``-Xptxas -v``: no
  compile error, no register spill, and every kernel variant the launchers dispatch to is present
  for both architectures (its table of registers per kernel is printed with ``pytest -s``).
- The .cu/.cuh/.h files include no torch header (docs/design.md section 4: plain nvcc builds them).
- The ptxas parser of the script recognises spills (so the check can fail).
- Every kernel instantiated with a vector width > 1 uses 128-bit global loads (and stores, where
  it writes activations) in the PTX of that build; the PTX check fails on scalar-only code.
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
from fusedres.ops.library import pack_relu_mask, relu_mask_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_cuda_compile.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_cuda_compile  # noqa: E402

# One worker runs the whole module under pytest-xdist, so its module fixtures (nvcc builds) run
# once.
pytestmark = pytest.mark.xdist_group("cuda_compile")

ARCHS = ("sm_80", "sm_90")

# Kernel variants the launchers can pick: (storage type, vector width) pairs, fp64 scalar only.
_TYPE_VECS = [("float", 1), ("float", 4), ("__half", 1), ("__half", 8), ("__nv_bfloat16", 1),
              ("__nv_bfloat16", 8), ("double", 1)]
_BOOLS = ("false", "true")
_STORAGE_TYPES = ("float", "__half", "__nv_bfloat16", "double")
EXPECTED_KERNELS = (
    {f"bn_stats_partial_kernel<{t}, {v}>" for t, v in _TYPE_VECS}
    | {f"bn_stats_finalize_kernel<{a}>" for a in ("float", "double")}
    | {f"bn_act_fwd_kernel<{t}, {v}, {r}, {h}>" for t, v in _TYPE_VECS for r in _BOOLS for h in _BOOLS}
    # The mask's vector kernel exists only in the 16-byte widths; the flat kernel covers the rest.
    | {f"bn_act_fwd_mask_kernel<{t}, {v}, {h}>" for t, v in _TYPE_VECS if v > 1 for h in _BOOLS}
    | {f"bn_act_fwd_mask_flat_kernel<{t}, {h}>" for t in ("float", "__half", "__nv_bfloat16", "double")
       for h in _BOOLS}
    | {f"bn_bwd_reduce_kernel<{t}, {v}, (ReluGate){g}, {h}, {e}>"
       for t, v in _TYPE_VECS for g in range(3) for h in _BOOLS for e in _BOOLS}
    | {f"bn_bwd_finalize_kernel<{a}>" for a in ("float", "double")}
    | {f"bn_bwd_dz_kernel<{t}, {v}, (GradSource){g}>" for t, v in _TYPE_VECS for g in range(4)}
    # accumulation dtype x batch-statistics dtype x running-statistics dtype
    | {f"bn_coefficients_kernel<{a}, {s}, {r}>" for a in ("float", "double")
       for s in _STORAGE_TYPES for r in _STORAGE_TYPES}
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
        assert check_cuda_compile.vector_access_errors(res["kernels"]) == []
    vector_kernels = [k for r in report["results"] for k in r["kernels"]
                      if check_cuda_compile.vector_width(k["kernel"]) > 1]
    expected_vector = {name for name in EXPECTED_KERNELS if check_cuda_compile.vector_width(name) > 1}
    assert {k["kernel"] for k in vector_kernels} == expected_vector and len(vector_kernels) == 2 * len(expected_vector)
    assert all(k["wide_loads"] > 0 for k in vector_kernels)


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


_PTX = """
.visible .entry _Z6scalarPf(
	.param .u64 _Z6scalarPf_param_0
)
{
	ld.global.nc.f32 	%f1, [%rd4];
	ld.global.nc.v2.f32 	{%f2, %f3}, [%rd4];
	st.global.f32 	[%rd5], %f1;
	ld.global.v4.u16 	{%rs1, %rs2, %rs3, %rs4}, [%rd6];
	ret;
}
.visible .entry _Z6vectorPf(
	.param .u64 _Z6vectorPf_param_0
)
{
	ld.global.nc.L1::no_allocate.v4.f32 	{%f1, %f2, %f3, %f4}, [%rd4];
	ld.global.nc.v4.u32 	{%r1, %r2, %r3, %r4}, [%rd7];
	st.global.v2.f64 	[%rd5], {%fd1, %fd2};
	ld.shared.v4.f32 	{%f1, %f2, %f3, %f4}, [%r9];
	ret;
}
"""


def test_ptx_parser_counts_128_bit_global_accesses():
    counts = check_cuda_compile.parse_ptx(_PTX)
    # v2.f32 (64-bit), v4.u16 (64-bit) and shared accesses do not count.
    assert counts == {"_Z6scalarPf": {"wide_loads": 0, "wide_stores": 0},
                      "_Z6vectorPf": {"wide_loads": 2, "wide_stores": 1}}


@pytest.mark.parametrize("kernel, ptx_entry, problems", [
    ("bn_act_fwd_kernel<float, 4, true, false>", "_Z6scalarPf", ["loads", "stores"]),
    ("bn_act_fwd_kernel<float, 4, true, false>", "_Z6vectorPf", []),
    ("bn_act_fwd_kernel<float, 1, true, false>", "_Z6scalarPf", []),  # scalar by design
    # Reduce kernels store activations only with a residual (g) or in eval (dz).
    ("bn_bwd_reduce_kernel<__half, 8, true, false, false>", "_Z6scalarPf", ["loads"]),
    ("bn_bwd_reduce_kernel<__half, 8, true, true, false>", "_Z6scalarPf", ["loads", "stores"]),
    ("bn_bwd_dz_kernel<__nv_bfloat16, 8, (GradSource)1>", "_Z6scalarPf", ["loads", "stores"]),
    ("bn_stats_partial_kernel<float, 4>", "_Z6scalarPf", ["loads"]),
])
def test_vector_access_check_fails_on_scalar_ptx(kernel, ptx_entry, problems):
    row = {"kernel": kernel, "base": check_cuda_compile.base_name(kernel), "arch": "sm_90",
           **check_cuda_compile.parse_ptx(_PTX)[ptx_entry]}
    errors = check_cuda_compile.vector_access_errors([row])
    assert [e.rsplit(" ", 1)[1] for e in errors] == problems, errors
    assert all(e.startswith(f"{kernel} on sm_90: no 128-bit global") for e in errors)


def test_vector_access_check_fails_without_ptx():
    row = {"kernel": "bn_act_fwd_kernel<float, 4, true, false>", "base": "bn_act_fwd_kernel", "arch": "sm_80"}
    assert check_cuda_compile.vector_access_errors([row]) == [
        "bn_act_fwd_kernel<float, 4, true, false> on sm_80: no PTX found for it"]


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


# ---------------------------------------------------------------------------------------------
# The CUDA kernels themselves, run on the CPU by a host emulation of the device features they use.
#
# Without a GPU this is the only way the kernels' indexing, tiling, vector/scalar choice, two-level
# reductions and workspace layout execute. g++ compiles the .cu sources with each `k<<<...>>>(...)`
# launch rewritten to emu::launch: every block runs as blockDim std::threads, __syncthreads is a
# block barrier, __shfl_xor_sync a warp barrier plus an exchange buffer, and __shared__ variables
# are statics (blocks run one after another). cuda_fp16.h/cuda_bf16.h conversions have host
# implementations. emu::launch logs every launch with the kernel's template arguments and grid, so
# tests can see which instantiation ran, and can make the Nth launch fail (cudaGetLastError then
# reports it). What it cannot show: races that only real warps expose, fast-math rounding,
# performance.

_EMU_PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__

namespace emu {
// What the launches did, for the tests: one entry per launch ("name grid.x grid.y block.x block.y",
// name with its template arguments), and an injectable launch failure.
inline std::vector<std::string> launch_log;
inline int fail_launch = -1;                  // index into launch_log of the launch that fails
inline cudaError_t fail_error = cudaSuccess;  // the error that launch reports
inline cudaError_t pending_error = cudaSuccess;  // what cudaGetLastError returns next

template <auto KERNEL>
std::string kernel_name() {
  // g++: "std::string emu::kernel_name() [with auto KERNEL = fusedres::cuda::{anonymous}::k<float, 4>; ...]"
  std::string s = __PRETTY_FUNCTION__;
  s = s.substr(s.find("KERNEL = ") + 9);
  s = s.substr(0, s.find_first_of(";]"));
  for (const std::string ns : {"fusedres::cuda::{anonymous}::", "fusedres::cuda::<unnamed>::"}) {
    for (size_t at; (at = s.find(ns)) != std::string::npos;) s.erase(at, ns.size());
  }
  return s;
}

struct Block {
  explicit Block(int n) : bar(n), xchg(n) {
    for (int w = 0; w < (n + 31) / 32; ++w) warp_bars.emplace_back(new std::barrier<>(std::min(32, n - 32 * w)));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<double> xchg;
};
inline thread_local dim3 t_thread, t_block, t_bdim, t_gdim;
inline thread_local Block* t_blk = nullptr;
inline void syncthreads() { t_blk->bar.arrive_and_wait(); }
template <class T>
T shfl_xor(T v, int off) {
  const int tid = t_thread.x + t_bdim.x * (t_thread.y + t_bdim.y * t_thread.z);
  const int warp = tid / 32, lane = tid % 32;
  auto& bar = *t_blk->warp_bars[warp];
  t_blk->xchg[tid] = static_cast<double>(v);
  bar.arrive_and_wait();
  const T r = static_cast<T>(t_blk->xchg[warp * 32 + (lane ^ off)]);
  bar.arrive_and_wait();
  return r;
}
template <class... P, class... A>
void launch(const std::string& name, void (*kernel)(P...), dim3 grid, dim3 block, size_t, cudaStream_t,
            A... args) {
  const bool fails = int(launch_log.size()) == fail_launch;
  launch_log.push_back(name + " " + std::to_string(grid.x) + " " + std::to_string(grid.y) + " " +
                       std::to_string(block.x) + " " + std::to_string(block.y));
  if (fails) {  // a launch that fails runs nothing
    pending_error = fail_error;
    return;
  }
  const int n = int(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(n);
        std::vector<std::thread> threads;
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx)
              threads.emplace_back([&, tx, ty, tz] {
                t_thread = dim3(tx, ty, tz);
                t_block = dim3(bx, by, bz);
                t_bdim = block;
                t_gdim = grid;
                t_blk = &blk;
                kernel(P(args)...);
              });
        for (auto& t : threads) t.join();
      }
}
}  // namespace emu

#define threadIdx emu::t_thread
#define blockIdx emu::t_block
#define blockDim emu::t_bdim
#define gridDim emu::t_gdim
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, off) emu::shfl_xor(v, off)

namespace emu {
inline cudaError_t get_last_error() {
  const cudaError_t err = pending_error;
  pending_error = cudaSuccess;
  return err;
}
}  // namespace emu
// A macro, not a definition of cudaGetLastError: a CUDA build of torch loads libcudart into the
// global symbol scope, and a global definition here would lose to that one (which reports
// "insufficient driver" without a GPU). The library is linked with -z defs, so a CUDA runtime call
// the emulator does not provide fails its build instead of reaching a real libcudart.
#define cudaGetLastError ::emu::get_last_error
"""

_EMU_ENTRY_POINTS = r"""
using namespace fusedres::cuda;
namespace emu {
inline std::string log_text;
inline const char* status_kernel = "";  // LaunchStatus::kernel of the last entry point's call
}  // namespace emu
// Clears the launch log and makes launch number `fail_launch` (0-based; -1: none) fail with `error`.
extern "C" void emu_reset(int fail_launch, int error) {
  ::emu::launch_log.clear();
  ::emu::fail_launch = fail_launch;
  ::emu::fail_error = cudaError_t(error);
  ::emu::pending_error = cudaSuccess;
}
extern "C" const char* emu_launch_log() {
  ::emu::log_text.clear();
  for (const std::string& entry : ::emu::launch_log) ::emu::log_text += entry + "\n";
  return ::emu::log_text.c_str();
}
extern "C" const char* emu_status_kernel() { return ::emu::status_kernel; }
extern "C" int emu_error_launch_out_of_resources() { return int(cudaErrorLaunchOutOfResources); }
static int emu_status(const LaunchStatus& st) {
  ::emu::status_kernel = st.kernel;
  return int(st.error);
}
extern "C" int emu_bn_stats(const void* z, void* mean, void* var, int64_t rows, int64_t channels,
                            int kind, int num_sms) {
  StatsParams p;
  p.z = z; p.mean = mean; p.var = var; p.rows = rows; p.channels = channels; p.num_sms = num_sms;
  p.kind = ScalarKind(kind);
  std::vector<double> ws(bn_stats_workspace_bytes(p) / sizeof(double) + 1);
  p.workspace = ws.data();
  return emu_status(bn_stats(p, nullptr));
}
extern "C" int emu_bn_act_fwd(const void* z, const void* residual, const void* scale, const void* shift,
                              void* y, int64_t rows, int64_t channels, int kind, int num_sms, int relu) {
  FwdParams p;
  p.z = z; p.residual = residual; p.scale = scale; p.shift = shift; p.y = y; p.rows = rows;
  p.channels = channels; p.num_sms = num_sms; p.kind = ScalarKind(kind); p.relu = relu;
  return emu_status(bn_act_fwd(p, nullptr));
}
extern "C" int emu_bn_act_fwd_mask(const void* z, const void* residual, const void* scale, const void* shift,
                                   void* y, void* mask, int64_t numel, int64_t channels, int64_t channel_run,
                                   int kind, int num_sms) {
  FwdMaskParams p;
  p.z = z; p.residual = residual; p.scale = scale; p.shift = shift; p.y = y;
  p.mask = static_cast<uint8_t*>(mask); p.numel = numel; p.channels = channels; p.channel_run = channel_run;
  p.num_sms = num_sms; p.kind = ScalarKind(kind);
  return emu_status(bn_act_fwd_mask(p, nullptr));
}
extern "C" int emu_bn_act_bwd(const void* dy, const void* y, const void* mask, const void* z, const void* mean,
                              const void* invstd, const void* weight, void* dz, void* dres, void* dweight,
                              void* dbias, int64_t rows, int64_t channels, int kind, int num_sms, int relu,
                              int training) {
  BwdParams p;
  p.dy = dy; p.y = y; p.mask = static_cast<const uint8_t*>(mask); p.z = z; p.mean = mean; p.invstd = invstd; p.weight = weight; p.dz = dz;
  p.dresidual = dres; p.dweight = dweight; p.dbias = dbias; p.rows = rows; p.channels = channels;
  p.num_sms = num_sms; p.kind = ScalarKind(kind); p.relu = relu; p.training = training;
  std::vector<double> ws(bn_act_bwd_workspace_bytes(p) / sizeof(double) + 1);
  p.workspace = ws.data();
  return emu_status(bn_act_bwd(p, nullptr));
}
"""

# `name<template args>  <<<config>>>(` ->
# `::emu::launch(::emu::kernel_name<&name<template args>>(), name<template args>, config, ` (args and ')' stay).
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<(?:[^<>;]|<(?:[^<>;]|<[^<>;]*>)*>)*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    import ctypes

    nvcc = check_cuda_compile.find_nvcc()
    include = check_cuda_compile.cuda_include_dir(nvcc) if nvcc else None
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h)")
    parts = [_EMU_PRELUDE]
    launches = 0
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        src, n = _LAUNCH.subn(lambda m: f"::emu::launch(::emu::kernel_name<&{m.group(1)}>(), {m.group(1)}, {m.group(2)}, ", open(path).read())
        launches += n
        parts.append(f'#line 1 "{path}"\n{src}')
    assert launches >= 12, f"expected the launches of the 3 .cu files, rewrote {launches}"
    parts.append(_EMU_ENTRY_POINTS)
    tmp = tmp_path_factory.mktemp("emu")
    src, lib = tmp / "emu.cpp", tmp / "emu.so"
    src.write_text("\n".join(parts))
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-I", os.path.join(ROOT, "csrc"), "-I", include,
           *check_cuda_compile.TORCH_NVCC_FLAGS[:4], str(src), "-o", str(lib), "-lpthread", "-Wl,-z,defs"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"host emulation build failed:\n{proc.stderr[-6000:]}"
    so = ctypes.CDLL(str(lib))
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    so.emu_bn_stats.argtypes = [P, P, P, I64, I64, I, I]
    so.emu_bn_act_fwd.argtypes = [P, P, P, P, P, I64, I64, I, I, I]
    so.emu_bn_act_fwd_mask.argtypes = [P, P, P, P, P, P, I64, I64, I64, I, I]
    so.emu_bn_act_bwd.argtypes = [P, P, P, P, P, P, P, P, P, P, P, I64, I64, I, I, I, I]
    so.emu_reset.argtypes = [I, I]
    so.emu_launch_log.restype = ctypes.c_char_p
    so.emu_status_kernel.restype = ctypes.c_char_p
    return so


def _ptr(t):
    return None if t is None else t.data_ptr()


def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _rand(shape, dtype, offset=0.0, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)


def _vec(c, dtype, lo, hi):
    return (torch.rand(c, dtype=torch.float64) * (hi - lo) + lo).to(reference.stats_dtype(dtype))


class _Launch:
    """One entry of the emulator's launch log."""

    def __init__(self, line):
        name, gx, gy, bx, by = line.rsplit(" ", 4)
        self.kernel, self.grid, self.block = name, (int(gx), int(gy)), (int(bx), int(by))
        self.base = name.split("<", 1)[0]

    def __repr__(self):
        return f"{self.kernel} grid={self.grid} block={self.block}"


def _call(emulated, entry, *args, fail_launch=-1, error=0):
    """Runs an entry point of the emulation library.

    Returns:
        (cudaError_t value it returned, LaunchStatus::kernel, [_Launch] in launch order).
    """
    emulated.emu_reset(fail_launch, error)
    err = getattr(emulated, entry)(*args)
    log = emulated.emu_launch_log().decode()
    return err, emulated.emu_status_kernel().decode(), [_Launch(line) for line in log.splitlines()]


def _stats_args(z, mean, var, kind):
    n, c, h, w = z.shape
    return _ptr(z), _ptr(mean), _ptr(var), n * h * w, c, kind, 1


def _fwd_args(z, res, scale, shift, y, kind, relu):
    n, c, h, w = z.shape
    return _ptr(z), _ptr(res), _ptr(scale), _ptr(shift), _ptr(y), n * h * w, c, kind, 1, int(relu)


def _bwd_args(dy, y, z, mu, invstd, weight, dz, dres, dweight, dbias, kind, relu, training, mask=None):
    n, c, h, w = z.shape
    return (_ptr(dy), _ptr(y), _ptr(mask), _ptr(z), _ptr(mu), _ptr(invstd), _ptr(weight), _ptr(dz), _ptr(dres), _ptr(dweight),
            _ptr(dbias), n * h * w, c, kind, 1, int(relu), int(training))


def _check_stats(emulated, z):
    """bn_stats of NHWC z in the emulator against the oracle; returns the launches."""
    from conftest import assert_oracle_close

    sdt = reference.stats_dtype(z.dtype)
    mean = torch.full((z.shape[1],), float("nan"), dtype=sdt)
    var = torch.full_like(mean, float("nan"))
    err, _, launches = _call(emulated, "emu_bn_stats", *_stats_args(z, mean, var, _KIND[z.dtype]))
    assert err == 0
    for name, got, o, e in zip(("mean", "var"), (mean, var), reference.bn_stats(z), reference.bn_stats(z, upcast=False)):
        assert_oracle_close(got, e, o, name)
    return launches


def _check_fwd(emulated, z, res, relu):
    from conftest import assert_oracle_close

    c = z.shape[1]
    scale, shift = _vec(c, z.dtype, -1.5, 1.5), _vec(c, z.dtype, -1.5, 1.5)
    y = torch.full_like(z, float("nan"))
    err, _, launches = _call(emulated, "emu_bn_act_fwd", *_fwd_args(z, res, scale, shift, y, _KIND[z.dtype], relu))
    assert err == 0
    assert_oracle_close(y, reference.bn_act_fwd(z, scale, shift, res, relu, upcast=False),
                        reference.bn_act_fwd(z, scale, shift, res, relu), "y")
    return launches


def _check_bwd(emulated, z, relu, has_res, training):
    from conftest import assert_oracle_close

    c = z.shape[1]
    mu, invstd, weight = _vec(c, z.dtype, -0.5, 0.5), _vec(c, z.dtype, 0.2, 2.0), _vec(c, z.dtype, -1.5, 1.5)
    y = _nhwc(reference.bn_act_fwd(z, weight * invstd, -mu * weight * invstd, None, True, upcast=False))
    dy = _nhwc(_rand(tuple(z.shape), z.dtype))
    dz = torch.full_like(z, float("nan"))
    dres = torch.full_like(z, float("nan")) if has_res else None
    dweight, dbias = torch.full_like(mu, float("nan")), torch.full_like(mu, float("nan"))
    err, _, launches = _call(emulated, "emu_bn_act_bwd", *_bwd_args(dy, y, z, mu, invstd, weight, dz, dres, dweight,
                                                                    dbias, _KIND[z.dtype], relu, training))
    assert err == 0
    args = (dy, y, z, mu, invstd, weight, relu, has_res, training)
    oracle, eager = reference.bn_act_bwd(*args), reference.bn_act_bwd(*args, upcast=False)
    for name, got, o, e in zip(("dz", "dweight", "dbias"), (dz, dweight, dbias), oracle, eager):
        assert_oracle_close(got, e, o, f"{name} (relu={relu}, residual={has_res}, training={training})")
    if has_res:
        assert torch.equal(dres, oracle[3].to(z.dtype))
    return launches


# num_sms=1 keeps the emulated grids small; it still gives several row chunks (partials to merge).
# (4, 64, 9, 9): 16-byte vectors for every 16/32-bit dtype, two trips of the grid-stride row loop.
# (5, 7, 11, 13): odd C, the scalar kernels, two trips as well.
_EMU_SHAPES = [(4, 64, 9, 9), (5, 7, 11, 13)]
_EMU_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_EMU_DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
# More channel vectors than a block's 32 columns, so grid.x == 2 and blocks split the channels:
# fp32 136 = 34 vectors of 4, fp16 264 = 33 vectors of 8, bf16 37 (scalar: C % 8 != 0) = 37 columns.
_WIDE_CASES = [((2, 136, 3, 5), torch.float32), ((2, 264, 3, 3), torch.float16), ((2, 37, 3, 5), torch.bfloat16)]
_EMU_CASES = [pytest.param(s, d, id=f"{'x'.join(map(str, s))}-{i}") for s in _EMU_SHAPES
              for d, i in zip(_EMU_DTYPES, _EMU_DTYPE_IDS)]
_EMU_CASES += [pytest.param(s, d, id=f"{'x'.join(map(str, s))}-{_EMU_DTYPE_IDS[_EMU_DTYPES.index(d)]}-wide")
               for s, d in _WIDE_CASES]


@pytest.mark.parametrize("shape, dtype", _EMU_CASES)
def test_emulated_kernels_match_the_oracle(emulated, shape, dtype):
    torch.manual_seed(0)
    z = _nhwc(_rand(shape, dtype, offset=0.5, scale=2.0))
    launches = _check_stats(emulated, z)
    if (shape, dtype) in _WIDE_CASES:
        assert all(launch.grid[0] == 2 for launch in launches if launch.base == "bn_stats_partial_kernel"), launches
    residual = _nhwc(_rand(shape, dtype))
    for res, relu in ((residual, True), (None, False)):
        launches += _check_fwd(emulated, z, res, relu)
    for relu, has_res, training in ((True, True, True), (False, False, False), (True, False, True),
                                    (False, True, False)):
        launches += _check_bwd(emulated, z, relu, has_res, training)
    if (shape, dtype) in _WIDE_CASES:
        elementwise = [launch for launch in launches if "finalize" not in launch.base]
        assert elementwise and all(launch.grid[0] == 2 for launch in elementwise), elementwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_EMU_DTYPE_IDS[:3])
def test_emulated_stats_are_stable_at_a_large_mean(emulated, dtype):
    # mean 256, std 1: E[z^2] - E[z]^2 in fp32 loses the variance to the rounding of two numbers
    # near 65536 (ulp 2^-7); Welford/Chan never form them. The naive formula, even with torch's
    # pairwise fp32 sums, must fail the same bound, or this case could not tell the two apart.
    from conftest import ATOL

    torch.manual_seed(0)
    z = _nhwc(_rand((4, 64, 9, 9), dtype, offset=256.0))
    _check_stats(emulated, z)
    o_var = reference.bn_stats(z)[1].double()
    eager_err = (reference.bn_stats(z, upcast=False)[1].double() - o_var).abs().max().item()
    bound = 2 * eager_err + ATOL[torch.float32] * max(1.0, o_var.abs().max().item())
    zf = z.float()
    count = zf.numel() // zf.shape[1]
    mean = zf.sum((0, 2, 3)) / count
    naive_var = (zf * zf).sum((0, 2, 3)) / count - mean * mean
    naive_err = (naive_var.double() - o_var).abs().max().item()
    assert naive_err > 10 * bound, f"naive error {naive_err:.3e} vs bound {bound:.3e}"


def test_emulated_misaligned_buffers_use_the_scalar_kernels(emulated):
    # fp16 with C % 8 == 0 but data one element past a 16-byte boundary: vector accesses would be
    # misaligned, so every launcher must choose the scalar kernels (and get the same result). On
    # x86 a misaligned vector load still reads the right values, so the result alone cannot tell
    # the kernels apart: the launch log names the instantiations that ran.
    torch.manual_seed(0)
    shape = (2, 16, 5, 5)
    n, c, h, w = shape
    flat = _rand(n * c * h * w + 1, torch.float16, offset=0.5)
    for z, vector_width in ((flat[1:].as_strided(shape, (h * w * c, 1, w * c, c)), 1),
                            (_nhwc(flat[:-1].view(shape)), 8)):
        assert (z.data_ptr() % 16 == 0) == (vector_width == 8)
        launches = _check_stats(emulated, z) + _check_fwd(emulated, z, None, True)
        for relu, has_res, training in ((True, True, True), (True, False, True), (False, False, False)):
            launches += _check_bwd(emulated, z, relu, has_res, training)
        per_element = [launch for launch in launches if launch.kernel.startswith(f"{launch.base}<__half, ")]
        assert {launch.base for launch in per_element} == {
            "bn_stats_partial_kernel", "bn_act_fwd_kernel", "bn_bwd_reduce_kernel", "bn_bwd_dz_kernel"}
        for launch in per_element:
            assert launch.kernel.startswith(f"{launch.base}<__half, {vector_width}>") or \
                launch.kernel.startswith(f"{launch.base}<__half, {vector_width},"), launch


# ---------------------------------------------------------------------------------------------
# Launch failures. The emulator's cudaGetLastError reports an injected error for the Nth launch
# (which then runs nothing); every launcher must return that error with the name of the kernel
# whose launch failed, and launch nothing after it.


def _failure_cases():
    """(id, entry point, arguments, expected launch sequence) for every launcher and mode, and the
    tensors behind the arguments' pointers (keep them alive while the cases run)."""
    shape, dtype = (2, 16, 3, 3), torch.float16
    c, kind = shape[1], _KIND[dtype]
    z, dy = _nhwc(_rand(shape, dtype)), _nhwc(_rand(shape, dtype))
    y, out, out2 = torch.relu(z), torch.empty_like(z), torch.empty_like(z)
    mask = pack_relu_mask(y, _NHWC)
    vec = _vec(c, dtype, 0.5, 1.5)
    stat, stat2 = torch.empty_like(vec), torch.empty_like(vec)
    reduce_finalize = ["bn_bwd_reduce_kernel", "bn_bwd_finalize_kernel"]

    def fwd_mask_args(channel_run):
        return _ptr(z), None, _ptr(vec), _ptr(vec), _ptr(out), _ptr(out2), z.numel(), c, channel_run, kind, 1

    cases = [
        ("stats", "emu_bn_stats", _stats_args(z, stat, stat2, kind),
         ["bn_stats_partial_kernel", "bn_stats_finalize_kernel"]),
        ("fwd", "emu_bn_act_fwd", _fwd_args(z, z, vec, vec, out, kind, True), ["bn_act_fwd_kernel"]),
        ("bwd-train", "emu_bn_act_bwd", _bwd_args(dy, y, z, vec, vec, vec, out, out2, stat, stat2, kind, True, True),
         reduce_finalize + ["bn_bwd_dz_kernel"]),
        ("bwd-eval", "emu_bn_act_bwd", _bwd_args(dy, y, z, vec, vec, vec, out, None, stat, stat2, kind, True, False),
         reduce_finalize),
        ("fwd-mask", "emu_bn_act_fwd_mask", fwd_mask_args(1), ["bn_act_fwd_mask_kernel"]),
        ("fwd-mask-flat", "emu_bn_act_fwd_mask", fwd_mask_args(shape[2] * shape[3]), ["bn_act_fwd_mask_flat_kernel"]),
        ("bwd-mask-train", "emu_bn_act_bwd",
         _bwd_args(dy, None, z, vec, vec, vec, out, None, stat, stat2, kind, True, True, mask=mask),
         reduce_finalize + ["bn_bwd_dz_kernel"]),
    ]
    return cases, (z, dy, y, mask, out, out2, vec, stat, stat2)


def test_emulated_launch_failures_name_their_kernel_and_stop(emulated):
    cases, _buffers = _failure_cases()
    out_of_resources = emulated.emu_error_launch_out_of_resources()
    assert out_of_resources != 0
    for case_id, entry, args, sequence in cases:
        err, kernel, launches = _call(emulated, entry, *args)
        assert (err, kernel) == (0, ""), case_id
        assert [launch.base for launch in launches] == sequence, case_id
        for n, name in enumerate(sequence):
            err, kernel, launches = _call(emulated, entry, *args, fail_launch=n, error=out_of_resources)
            assert err == out_of_resources and kernel == name, (case_id, n, err, kernel)
            assert [launch.base for launch in launches] == sequence[:n + 1], (case_id, n, launches)


def test_emulator_errors_hold_beside_a_global_libcudart(emulated):
    """A CUDA build of torch loads libcudart into the global symbol scope; the emulator's launch
    errors must still be its own (a real cudaGetLastError without a GPU reports
    cudaErrorInsufficientDriver after every launch). In a subprocess that loads the toolkit's
    libcudart globally first, so this leg's torch, CPU or CUDA, makes no difference."""
    include = check_cuda_compile.cuda_include_dir(check_cuda_compile.find_nvcc())
    cudart = sorted(glob.glob(os.path.join(os.path.dirname(include), "lib*", "libcudart.so*")))
    if not cudart:
        pytest.skip(f"no libcudart.so next to {include}")
    out_of_resources = emulated.emu_error_launch_out_of_resources()
    program = f"""
import ctypes
ctypes.CDLL({cudart[0]!r}, mode=ctypes.RTLD_GLOBAL)
so = ctypes.CDLL({emulated._name!r})
P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
so.emu_bn_stats.argtypes = [P, P, P, I64, I64, I, I]
so.emu_reset.argtypes = [I, I]
z, mean, var = (ctypes.c_float * 16)(*range(16)), (ctypes.c_float * 4)(), (ctypes.c_float * 4)()
for fail_launch in (-1, 0):
    so.emu_reset(fail_launch, {out_of_resources})
    print(so.emu_bn_stats(z, mean, var, 4, 4, 0, 1))
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0", str(out_of_resources)]


_LAUNCH_CHECK_MODULE = r"""
#include <pybind11/pybind11.h>
#include "common/cuda_launch.h"

PYBIND11_MODULE(fusedres_launch_check, m) {
  m.def("check_launch", [](int error, const char* kernel, const char* op) {
    fusedres::check_launch(fusedres::cuda::LaunchStatus{cudaError_t(error), kernel}, op);
  });
}
"""


@pytest.fixture(scope="module")
def launch_check(tmp_path_factory):
    """The binding's check_launch (csrc/common/cuda_launch.h) in a module of its own: c10 and the
    CUDA runtime library, no GPU, no torch extension build."""
    import importlib.util
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = check_cuda_compile.find_nvcc()
    include = check_cuda_compile.cuda_include_dir(nvcc) if nvcc else None
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit (cuda_runtime_api.h, libcudart)")
    cuda_lib = next((d for d in (os.path.join(os.path.dirname(include), sub) for sub in ("lib64", "lib"))
                     if glob.glob(os.path.join(d, "libcudart.so*"))), None)
    if cuda_lib is None:
        pytest.skip(f"no libcudart.so next to {include}")
    tmp = tmp_path_factory.mktemp("launch_check")
    src = tmp / "launch_check.cpp"
    src.write_text(_LAUNCH_CHECK_MODULE)
    lib = tmp / f"fusedres_launch_check{sysconfig.get_config_var('EXT_SUFFIX')}"
    torch_lib = cpp_extension.library_paths()[0]
    # C++20: what torch.utils.cpp_extension builds extensions with (ATen 2.14's headers require it).
    cmd = ["g++", "-std=c++20", "-O0", "-shared", "-fPIC", "-w", "-I", os.path.join(ROOT, "csrc"), "-I", include,
           "-I", sysconfig.get_paths()["include"], *[f"-I{p}" for p in cpp_extension.include_paths()],
           str(src), "-o", str(lib), f"-L{torch_lib}", "-lc10", f"-L{cuda_lib}", "-lcudart",
           f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cuda_lib}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"launch-check module build failed:\n{proc.stderr[-6000:]}"
    spec = importlib.util.spec_from_file_location("fusedres_launch_check", lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_launch_raises_a_runtime_error_naming_kernel_and_cuda_error(emulated, launch_check):
    launch_check.check_launch(0, "", "fusedres::bn_stats")  # success: no exception
    out_of_resources = emulated.emu_error_launch_out_of_resources()
    with pytest.raises(RuntimeError) as info:
        launch_check.check_launch(out_of_resources, "bn_bwd_dz_kernel", "fusedres::bn_act_bwd")
    assert ("fusedres::bn_act_bwd: CUDA kernel bn_bwd_dz_kernel failed: too many resources requested for launch "
            "(cudaErrorLaunchOutOfResources)") in str(info.value)


def test_binding_checks_every_launch():
    # The module above tests the helper; this ties it to every launcher call of the binding.
    with open(os.path.join(ROOT, "csrc", "fusedres.cpp")) as f:
        binding = f.read()
    assert '#include "common/cuda_launch.h"' in binding
    launcher_calls = re.findall(r"cuda::(bn_\w+)\(p, call\.stream\)", binding)
    checked = re.findall(r"check_launch\(cuda::(bn_\w+)\(p, call\.stream\), op\)", binding)
    assert launcher_calls and sorted(checked) == sorted(launcher_calls)


# ---------------------------------------------------------------------------------------------
# The ReLU bit mask: bn_act_fwd_mask writes y and its packed mask, the backward gates with it.


def _check_fwd_mask(emulated, z, res, memory_format):
    """bn_act_fwd_mask of z (dense in memory_format) in the emulator: y against the oracle, the
    mask bit-exact against pack_relu_mask of the y it wrote. Returns (y, mask, launches)."""
    from conftest import assert_oracle_close

    n, c, h, w = z.shape
    scale, shift = _vec(c, z.dtype, -1.5, 1.5), _vec(c, z.dtype, -1.5, 1.5)
    y = torch.full_like(z, float("nan"))
    mask = torch.full((relu_mask_bytes(z.numel()),), 0xA5, dtype=torch.uint8)  # poison: bits of both values
    channel_run = 1 if memory_format == torch.channels_last else h * w
    err, _, launches = _call(emulated, "emu_bn_act_fwd_mask", _ptr(z), _ptr(res), _ptr(scale), _ptr(shift), _ptr(y),
                             _ptr(mask), z.numel(), c, channel_run, _KIND[z.dtype], 1)
    assert err == 0
    assert_oracle_close(y, reference.bn_act_fwd(z, scale, shift, res, True, upcast=False),
                        reference.bn_act_fwd(z, scale, shift, res, True), "y")
    assert torch.equal(mask, pack_relu_mask(y, memory_format))
    return y, mask, launches


_NHWC, _NCHW = torch.channels_last, torch.contiguous_format
# (shape, dtype, memory format, storage offset in elements, kernel expected)
_MASK_FWD_CASES = [
    ((4, 64, 9, 9), torch.float32, _NHWC, 0, "bn_act_fwd_mask_kernel<float, 4"),
    ((4, 64, 9, 9), torch.float16, _NHWC, 0, "bn_act_fwd_mask_kernel<__half, 8"),
    ((4, 64, 9, 9), torch.bfloat16, _NHWC, 0, "bn_act_fwd_mask_kernel<__nv_bfloat16, 8"),
    ((2, 264, 3, 3), torch.float16, _NHWC, 0, "bn_act_fwd_mask_kernel<__half, 8"),  # grid.x == 2
    ((4, 64, 9, 9), torch.float64, _NHWC, 0, "bn_act_fwd_mask_flat_kernel<double"),
    ((5, 7, 11, 13), torch.float32, _NHWC, 0, "bn_act_fwd_mask_flat_kernel<float"),  # odd C, 5005 % 8 = 5
    ((2, 12, 3, 5), torch.float32, _NHWC, 0, "bn_act_fwd_mask_flat_kernel<float"),  # C % 8 = 4
    ((2, 16, 5, 5), torch.float16, _NHWC, 1, "bn_act_fwd_mask_flat_kernel<__half"),  # misaligned
    ((3, 5, 3, 7), torch.float32, _NCHW, 0, "bn_act_fwd_mask_flat_kernel<float"),  # 315 % 8 = 3
    ((2, 16, 5, 5), torch.bfloat16, _NCHW, 0, "bn_act_fwd_mask_flat_kernel<__nv_bfloat16"),
]


def _dense(shape, dtype, memory_format, offset_elems, **kw):
    """A random tensor dense in memory_format whose data starts offset_elems past an allocation."""
    n, c, h, w = shape
    flat = _rand(n * c * h * w + offset_elems, dtype, **kw)[offset_elems:]
    if memory_format == _NHWC:
        return flat.as_strided(shape, (h * w * c, 1, w * c, c))
    return flat.view(shape)


@pytest.mark.parametrize("shape, dtype, memory_format, offset, kernel", _MASK_FWD_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{'nhwc' if c[2] == _NHWC else 'nchw'}"
                              f"{'-misaligned' if c[3] else ''}" for c in _MASK_FWD_CASES])
def test_emulated_fwd_mask_matches_the_oracle(emulated, shape, dtype, memory_format, offset, kernel):
    torch.manual_seed(0)
    z = _dense(shape, dtype, memory_format, offset, offset=0.3, scale=2.0)
    z.as_strided((1,), (1,), z.storage_offset() + 3).fill_(float("nan"))  # NaN passes the gradient: bit 1
    for res in (_dense(shape, dtype, memory_format, offset), None):
        _, mask, launches = _check_fwd_mask(emulated, z, res, memory_format)
        assert [launch.kernel.startswith(kernel) for launch in launches] == [True], launches
        if shape == (2, 264, 3, 3):
            assert launches[0].grid[0] == 2
        # Both bit values occur, so neither a zeroed nor an all-ones mask could pass.
        assert 0 < sum(bin(b).count("1") for b in mask.tolist()) < z.numel()


# (shape, dtype, vector width the backward kernels run at)
_MASK_BWD_CASES = [((4, 64, 9, 9), torch.float32, 4), ((4, 64, 9, 9), torch.float16, 8),
                   ((4, 64, 9, 9), torch.bfloat16, 8), ((5, 7, 11, 13), torch.float32, 1),
                   ((2, 37, 3, 5), torch.bfloat16, 1), ((3, 6, 5, 7), torch.float64, 1)]


@pytest.mark.parametrize("shape, dtype, vector_width", _MASK_BWD_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}" for c in _MASK_BWD_CASES])
def test_emulated_bwd_with_mask_equals_bwd_with_y(emulated, shape, dtype, vector_width):
    # The gate is the only difference between the two backward variants, and the mask holds
    # exactly y's gate, so every output must agree bit for bit.
    torch.manual_seed(0)
    z = _nhwc(_rand(shape, dtype, offset=0.3, scale=2.0))
    z[0, 1, 0, 0] = float("nan")
    y, mask, _ = _check_fwd_mask(emulated, z, None, _NHWC)
    c, kind = shape[1], _KIND[dtype]
    mu, invstd, weight = _vec(c, dtype, -0.5, 0.5), _vec(c, dtype, 0.2, 2.0), _vec(c, dtype, -1.5, 1.5)
    dy = _nhwc(_rand(shape, dtype))
    for has_res, training in ((True, True), (False, True), (True, False), (False, False)):
        results = []
        for y_arg, mask_arg in ((y, None), (None, mask)):
            outs = [torch.full_like(z, float("nan")), torch.full_like(z, float("nan")) if has_res else None,
                    torch.full_like(mu, float("nan")), torch.full_like(mu, float("nan"))]
            err, _, launches = _call(emulated, "emu_bn_act_bwd", *_bwd_args(dy, y_arg, z, mu, invstd, weight, *outs,
                                                                            kind, True, training, mask=mask_arg))
            assert err == 0
            results.append((outs, launches))
        (with_y, y_launches), (with_mask, mask_launches) = results
        for name, a, b in zip(("dz", "dresidual", "dweight", "dbias"), with_y, with_mask):
            if a is not None:
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), \
                    f"{name} (residual={has_res}, training={training})"
        # g++ names enum template arguments (ReluGate::kBitMask) where nvcc writes (ReluGate)2.
        assert not any("ReluGate::kOutput" in launch.kernel or "GradSource::kReluMask" in launch.kernel
                       for launch in mask_launches), mask_launches
        assert mask_launches[0].kernel.startswith(f"bn_bwd_reduce_kernel<{mask_launches[0].kernel[21:].split(',')[0]}, "
                                                  f"{vector_width}, ReluGate::kBitMask,"), mask_launches
        if training and not has_res:
            assert mask_launches[-1].kernel.endswith(f", {vector_width}, GradSource::kBitMask>"), mask_launches
        assert [launch.base for launch in y_launches] == [launch.base for launch in mask_launches]
    # And against the oracle, once (the y variant is covered by test_emulated_kernels_match_the_oracle).
    from conftest import assert_oracle_close

    args = (dy, y, z, mu, invstd, weight, True, True, True)
    oracle, eager = reference.bn_act_bwd(*args), reference.bn_act_bwd(*args, upcast=False)
    outs = [torch.full_like(z, float("nan")), torch.full_like(z, float("nan")), torch.full_like(mu, float("nan")),
            torch.full_like(mu, float("nan"))]
    assert _call(emulated, "emu_bn_act_bwd", *_bwd_args(dy, None, z, mu, invstd, weight, *outs, kind, True, True,
                                                         mask=mask))[0] == 0
    for name, got, o, e in zip(("dz", "dweight", "dbias"), (outs[0], outs[2], outs[3]), oracle, eager):
        assert_oracle_close(got, e, o, name)
