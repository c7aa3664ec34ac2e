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


# ---------------------------------------------------------------------------------------------
# The CUDA kernels themselves, run on the CPU by a host emulation of the device features they use.
#
# Without a GPU this is the only way the kernels' indexing, tiling, vector/scalar choice, two-level
# reductions and workspace layout execute. g++ compiles the .cu sources with each `k<<<...>>>(...)`
# launch rewritten to emu::launch: every block runs as blockDim std::threads, __syncthreads is a
# block barrier, __shfl_xor_sync a warp barrier plus an exchange buffer, and __shared__ variables
# are statics (blocks run one after another). cuda_fp16.h/cuda_bf16.h conversions have host
# implementations. What it cannot show: races that only real warps expose, fast-math rounding,
# performance.

_EMU_PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <memory>
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
inline void* last_kernel = nullptr;  // what launch ran last, for tests of the kernel choice
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
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t, cudaStream_t, A... args) {
  last_kernel = reinterpret_cast<void*>(kernel);
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

cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
"""

_EMU_ENTRY_POINTS = r"""
using namespace fusedres::cuda;
// The vector width of the last kernel launched, when it was fp16 bn_act_fwd with ReLU and no
// residual (the misaligned-buffer test's call); -1 for any other kernel.
extern "C" int emu_last_fp16_fwd_vector_width() {
  if (::emu::last_kernel == reinterpret_cast<void*>(&bn_act_fwd_kernel<__half, 1, true, false>)) return 1;
  if (::emu::last_kernel == reinterpret_cast<void*>(&bn_act_fwd_kernel<__half, 8, true, false>)) return 8;
  return -1;
}
extern "C" int emu_bn_stats(const void* z, void* mean, void* var, int64_t rows, int64_t channels,
                            int kind, int num_sms) {
  StatsParams p;
  p.z = z; p.mean = mean; p.var = var; p.rows = rows; p.channels = channels; p.num_sms = num_sms;
  p.kind = ScalarKind(kind);
  std::vector<double> ws(bn_stats_workspace_bytes(p) / sizeof(double) + 1);
  p.workspace = ws.data();
  return int(bn_stats(p, nullptr).error);
}
extern "C" int emu_bn_act_fwd(const void* z, const void* residual, const void* scale, const void* shift,
                              void* y, int64_t rows, int64_t channels, int kind, int num_sms, int relu) {
  FwdParams p;
  p.z = z; p.residual = residual; p.scale = scale; p.shift = shift; p.y = y; p.rows = rows;
  p.channels = channels; p.num_sms = num_sms; p.kind = ScalarKind(kind); p.relu = relu;
  return int(bn_act_fwd(p, nullptr).error);
}
extern "C" int emu_bn_act_bwd(const void* dy, const void* y, const void* z, const void* mean,
                              const void* invstd, const void* weight, void* dz, void* dres, void* dweight,
                              void* dbias, int64_t rows, int64_t channels, int kind, int num_sms, int relu,
                              int training) {
  BwdParams p;
  p.dy = dy; p.y = y; p.z = z; p.mean = mean; p.invstd = invstd; p.weight = weight; p.dz = dz;
  p.dresidual = dres; p.dweight = dweight; p.dbias = dbias; p.rows = rows; p.channels = channels;
  p.num_sms = num_sms; p.kind = ScalarKind(kind); p.relu = relu; p.training = training;
  std::vector<double> ws(bn_act_bwd_workspace_bytes(p) / sizeof(double) + 1);
  p.workspace = ws.data();
  return int(bn_act_bwd(p, nullptr).error);
}
"""

# `name<template args>  <<<config>>>(` -> `::emu::launch(name<template args>, config, ` (args and ')' stay).
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
        src, n = _LAUNCH.subn(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)}, ", open(path).read())
        launches += n
        parts.append(f'#line 1 "{path}"\n{src}')
    assert launches >= 9, f"expected the launches of the 3 .cu files, rewrote {launches}"
    parts.append(_EMU_ENTRY_POINTS)
    tmp = tmp_path_factory.mktemp("emu")
    src, lib = tmp / "emu.cpp", tmp / "emu.so"
    src.write_text("\n".join(parts))
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-I", os.path.join(ROOT, "csrc"), "-I", include,
           *check_cuda_compile.TORCH_NVCC_FLAGS[:4], str(src), "-o", str(lib), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"host emulation build failed:\n{proc.stderr[-6000:]}"
    so = ctypes.CDLL(str(lib))
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    so.emu_bn_stats.argtypes = [P, P, P, I64, I64, I, I]
    so.emu_bn_act_fwd.argtypes = [P, P, P, P, P, I64, I64, I, I, I]
    so.emu_bn_act_bwd.argtypes = [P, P, P, P, P, P, P, P, P, P, I64, I64, I, I, I, I]
    so.emu_last_fp16_fwd_vector_width.argtypes = []
    return so


def _ptr(t):
    return None if t is None else t.data_ptr()


def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _rand(shape, dtype, offset=0.0, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)


def _vec(c, dtype, lo, hi):
    return (torch.rand(c, dtype=torch.float64) * (hi - lo) + lo).to(reference.stats_dtype(dtype))


# num_sms=1 keeps the emulated grids small; it still gives several row chunks (partials to merge).
# (4, 64, 9, 9): 16-byte vectors for every 16/32-bit dtype, two trips of the grid-stride row loop.
# (5, 7, 11, 13): odd C, the scalar kernels, two trips as well.
_EMU_SHAPES = [(4, 64, 9, 9), (5, 7, 11, 13)]
_EMU_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_EMU_DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


@pytest.mark.parametrize("dtype", _EMU_DTYPES, ids=_EMU_DTYPE_IDS)
@pytest.mark.parametrize("shape", _EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_kernels_match_the_oracle(emulated, shape, dtype):
    from conftest import assert_oracle_close

    torch.manual_seed(0)
    c, rows = shape[1], shape[0] * shape[2] * shape[3]
    kind = _KIND[dtype]
    sdt = reference.stats_dtype(dtype)
    z = _nhwc(_rand(shape, dtype, offset=0.5, scale=2.0))

    mean = torch.full((c,), float("nan"), dtype=sdt)
    var = torch.full((c,), float("nan"), dtype=sdt)
    assert emulated.emu_bn_stats(_ptr(z), _ptr(mean), _ptr(var), rows, c, kind, 1) == 0
    for name, got, o, e in zip(("mean", "var"), (mean, var), reference.bn_stats(z), reference.bn_stats(z, upcast=False)):
        assert_oracle_close(got, e, o, name)

    scale, shift = _vec(c, dtype, -1.5, 1.5), _vec(c, dtype, -1.5, 1.5)
    residual = _nhwc(_rand(shape, dtype))
    for res, relu in ((residual, True), (None, False)):
        y = torch.full_like(z, float("nan"))
        assert emulated.emu_bn_act_fwd(_ptr(z), _ptr(res), _ptr(scale), _ptr(shift), _ptr(y), rows, c, kind, 1,
                                       int(relu)) == 0
        assert_oracle_close(y, reference.bn_act_fwd(z, scale, shift, res, relu, upcast=False),
                            reference.bn_act_fwd(z, scale, shift, res, relu), "y")

    mu, invstd, weight = _vec(c, dtype, -0.5, 0.5), _vec(c, dtype, 0.2, 2.0), _vec(c, dtype, -1.5, 1.5)
    y = _nhwc(reference.bn_act_fwd(z, weight * invstd, -mu * weight * invstd, None, True, upcast=False))
    dy = _nhwc(_rand(shape, dtype))
    for relu, has_res, training in ((True, True, True), (False, False, False), (True, False, True),
                                    (False, True, False)):
        dz = torch.full_like(z, float("nan"))
        dres = torch.full_like(z, float("nan")) if has_res else None
        dweight, dbias = torch.full_like(mu, float("nan")), torch.full_like(mu, float("nan"))
        assert emulated.emu_bn_act_bwd(_ptr(dy), _ptr(y), _ptr(z), _ptr(mu), _ptr(invstd), _ptr(weight), _ptr(dz),
                                       _ptr(dres), _ptr(dweight), _ptr(dbias), rows, c, kind, 1, int(relu),
                                       int(training)) == 0
        args = (dy, y, z, mu, invstd, weight, relu, has_res, training)
        oracle, eager = reference.bn_act_bwd(*args), reference.bn_act_bwd(*args, upcast=False)
        for name, got, o, e in zip(("dz", "dweight", "dbias"), (dz, dweight, dbias), oracle, eager):
            assert_oracle_close(got, e, o, f"{name} (relu={relu}, residual={has_res}, training={training})")
        if has_res:
            assert torch.equal(dres, oracle[3].to(dtype))


def test_emulated_misaligned_buffers_use_the_scalar_kernels(emulated):
    # fp16 with C % 8 == 0 but data one element past a 16-byte boundary: vector loads would be
    # misaligned, so the launcher must choose the scalar kernel (and get the same result).
    from conftest import assert_oracle_close

    torch.manual_seed(0)
    shape = (2, 16, 5, 5)
    n, c, h, w = shape
    flat = _rand(n * c * h * w + 1, torch.float16)
    scale, shift = _vec(c, torch.float16, -1, 1), _vec(c, torch.float16, -1, 1)
    # On x86 a misaligned vector load still reads the right values, so the result alone cannot
    # tell the kernels apart: the emulator reports which instantiation ran.
    for z, vector_width in ((flat[1:].as_strided(shape, (h * w * c, 1, w * c, c)), 1),
                            (_nhwc(flat[:-1].view(shape)), 8)):
        assert (z.data_ptr() % 16 == 0) == (vector_width == 8)
        y = torch.full_like(_nhwc(z), float("nan"))
        assert emulated.emu_bn_act_fwd(_ptr(z), None, _ptr(scale), _ptr(shift), _ptr(y), n * h * w, c,
                                       1, 1, 1) == 0
        assert emulated.emu_last_fp16_fwd_vector_width() == vector_width
        assert_oracle_close(y, reference.bn_act_fwd(z, scale, shift, None, True, upcast=False),
                            reference.bn_act_fwd(z, scale, shift, None, True), "y")
