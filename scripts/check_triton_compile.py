#!/usr/bin/env python
"""Compiles every Triton kernel of fusedres in every autotune config for sm_80 and sm_90.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs
the whole pipeline down to a cubin (ptxas included). For each kernel variant and config the
table gives registers per thread, spill stores (``ptxas -v``), shared memory per block and, for the
convolution, whether the PTX holds tensor-core instructions (``mma``; ``wgmma`` or ``mma`` on
sm_90). Exit status 1 on a spill, shared memory over the device's per-block limit, a conv
without tensor-core instructions, or a compile error.

Usage:
    python scripts/check_triton_compile.py            # everything
    python scripts/check_triton_compile.py --quick    # the first config of each table (CI)
    python scripts/check_triton_compile.py --arch 90

TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset

#: Opt-in shared memory per block (bytes) on A100 (sm_80) and H100 (sm_90).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_ARG_COMMENT = re.compile(r"^\s*(\w+),?\s*#\s*\*(\w+)")


def _pointer_types(fn, dtype: str) -> dict:
    """Pointer argument -> triton type, read from the kernel's ``# *T`` / ``# *fp32`` comments."""
    import inspect
    types = {}
    for line in inspect.getsource(fn.fn if hasattr(fn, "fn") else fn).splitlines():
        m = _ARG_COMMENT.match(line)
        if m and m.group(1).endswith("_ptr"):
            types[m.group(1)] = "*" + (dtype if m.group(2) == "T" else m.group(2))
    return types


def _source(kernel, dtype: str, constexprs: dict, aligned_ints: set):
    """An ASTSource for ``kernel`` with 16-byte aligned pointers and the given constexprs."""
    from triton.compiler import ASTSource
    ptrs = _pointer_types(kernel, dtype)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in aligned_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n in kernel.arg_names if n not in signature]
    assert not missing, missing
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _variants():
    """(label, kernel, dtype, constexpr flags, {arch: configs}, aligned ints, is_conv)."""
    from fusedres.kernels import bn, conv
    chan = {"C"}
    conv_chan = {"Cin", "Cout", "CIN_G", "COUT_G", "w_stride_co", "w_stride_r", "w_stride_s"}
    flags_fwd = dict(HAS_RESIDUAL=True, RELU=True, CHANNELS_LAST=True)
    yield ("bn_stats_partial", bn._bn_stats_partial_kernel, "bf16", dict(CHANNELS_LAST=True),
           bn.REDUCE_CONFIGS, chan, False)
    yield ("bn_stats_finalize", bn._bn_stats_finalize_kernel, "fp32",
           dict(HAS_AFFINE=True, PARTIAL=False), bn.FINALIZE_CONFIGS, chan, False)
    yield ("bn_stats_finalize_chunks", bn._bn_stats_finalize_kernel, "fp32",
           dict(HAS_AFFINE=False, PARTIAL=True), bn.FINALIZE_CONFIGS, chan, False)
    yield ("bn_act_fwd", bn._bn_act_fwd_kernel, "bf16", flags_fwd, bn.ELEMENTWISE_CONFIGS, chan,
           False)
    yield ("bn_bwd_reduce", bn._bn_act_bwd_reduce_kernel, "bf16",
           dict(RELU=True, HAS_RESIDUAL=True, NEED_DWEIGHT=True, WRITE_DZ=False,
                CHANNELS_LAST=True), bn.REDUCE_CONFIGS, chan, False)
    yield ("bn_bwd_finalize", bn._bn_bwd_finalize_kernel, "fp32", dict(NEED_DWEIGHT=True),
           bn.FINALIZE_CONFIGS, chan, False)
    yield ("bn_bwd_dz", bn._bn_act_bwd_dz_kernel, "bf16",
           dict(RELU=True, G_FROM_DRES=True, CHANNELS_LAST=True), bn.ELEMENTWISE_CONFIGS, chan,
           False)
    # Weights in channels_last: ci is the unit stride, which triton's launcher specializes to
    # the constant 1 (as it does every int argument equal to 1).
    base = dict(FLAT_K=False, POINTWISE=False, AFFINE=False, HAS_RESIDUAL=False, RELU=False,
                STATS=True, DOT_PRECISION="tf32", w_stride_ci=1)
    yield ("conv3x3_train_fp16", conv._conv_fwd_kernel, "fp16", dict(base, KH=3, KW=3),
           conv.CONV_CONFIGS, conv_chan, True)
    yield ("conv3x3_train_fp32", conv._conv_fwd_kernel, "fp32", dict(base, KH=3, KW=3),
           conv.CONV_CONFIGS, conv_chan, True)
    yield ("conv7x7_stem_flat_fp16", conv._conv_fwd_kernel, "fp16",
           dict(base, KH=7, KW=7, FLAT_K=True), conv.CONV_FLAT_CONFIGS, {"Cout", "COUT_G"}, True)
    yield ("conv3x3_groups_flat_bf16", conv._conv_fwd_kernel, "bf16",
           dict(base, KH=3, KW=3, FLAT_K=True), conv.CONV_FLAT_CONFIGS, {"Cin", "Cout"}, True)
    yield ("conv1x1_eval_bf16", conv._conv_fwd_kernel, "bf16",
           dict(base, KH=1, KW=1, POINTWISE=True, AFFINE=True, HAS_RESIDUAL=True, RELU=True,
                STATS=False), conv.CONV_CONFIGS, conv_chan, True)


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for ``arch`` (triton 3.9 picks one per arch; 3.6 has one)."""
    from triton.backends.nvidia import compiler as nvc
    try:
        tool = nvc.get_ptxas(arch)
    except TypeError:
        tool = nvc.get_ptxas()
    return tool.path


def _resources(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill store bytes) from ``ptxas -v`` on the kernel's PTX.

    The same ptxas that produced the cubin, run again for its report (the cubin's resource
    summary shows spills only indirectly, as stack frame).
    """
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    tool = _ptxas(int(re.match(r"sm_(\d+)", arch).group(1)))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([tool, "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spills


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT),
                        help="compute capability (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="first config of each table only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget

    from fusedres.kernels._launch import arch_configs

    archs = args.arch or sorted(SMEM_LIMIT)
    failures = []
    print(f"triton {triton.__version__}")
    print(f"{'arch':<5} {'kernel':<24} {'config':<34} {'regs':>4} {'spill':>5} {'smem KB':>8} "
          f"{'mma':>6} {'s':>5}")
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for label, kernel, dtype, flags, table, aligned, is_conv in _variants():
            configs = arch_configs(table, arch)
            for config in configs[:1] if args.quick else configs:
                meta = dict(config.kwargs, **flags)
                desc = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}"
                                for k, v in config.kwargs.items())
                desc += f" w{config.num_warps} s{config.num_stages}"
                t0 = time.time()
                try:
                    compiled = triton.compile(
                        _source(kernel, dtype, meta, aligned), target=target,
                        options={"num_warps": config.num_warps, "num_stages": config.num_stages})
                except Exception as e:  # noqa: BLE001 - report every failing variant
                    failures.append(f"sm_{arch} {label} {desc}: compile error {e!r}"[:400])
                    print(f"sm_{arch:<2} {label:<24} {desc:<34} COMPILE ERROR")
                    continue
                ptx = compiled.asm["ptx"]
                regs, spills = _resources(ptx)
                smem = compiled.metadata.shared
                mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.", ptx) else "-")
                print(f"sm_{arch:<2} {label:<24} {desc:<34} {regs:>4} {spills:>5} "
                      f"{smem / 1024:>8.1f} {mma:>6} {time.time() - t0:>5.1f}", flush=True)
                if spills:
                    failures.append(f"sm_{arch} {label} {desc}: {spills} bytes of spill stores")
                if smem > SMEM_LIMIT[arch]:
                    failures.append(f"sm_{arch} {label} {desc}: {smem} B shared memory > "
                                    f"{SMEM_LIMIT[arch]} B")
                if is_conv and mma == "-":
                    failures.append(f"sm_{arch} {label} {desc}: no tensor-core (mma) instructions")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall kernels compiled: no spills, shared memory within limits, conv uses tensor cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
