#!/usr/bin/env python
"""Compile every csrc/cuda/*.cu with nvcc for real GPU targets and report ptxas resource usage.

No GPU is needed: nvcc builds the cubins and ``-Xptxas -v`` prints, per kernel and architecture,
the registers, spill stores/loads, stack frame and static shared memory. The PTX of the same build
(kept with ``-keep``) shows the width of every global access. The command prints one table row per
(kernel, arch) and exits non-zero on a compile error, on any spill (a spill in a memory-bound
kernel costs local-memory traffic on every element), or on a vector kernel (one instantiated with
a vector width > 1) whose activation loads, or stores where it writes activations, are not 128-bit
(``ld/st.global*.v4`` of 32-bit elements or ``.v2`` of 64-bit ones): a silent fallback to narrower
accesses would cost a large part of the bandwidth these kernels live on.

The flags mirror what ``setup.py`` gives nvcc (-O3, --use_fast_math, ...) plus the flags
torch.utils.cpp_extension always adds (``COMMON_NVCC_FLAGS``: no implicit half/bfloat16
conversions or operators), so a kernel that passes here also compiles in the extension build.

Usage:
    python scripts/check_cuda_compile.py [--arch 80 90] [--json report.json] [file.cu ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCHS = ("80", "90")
# setup.py's nvcc flags, with the -std=c++20 that torch.utils.cpp_extension (2.13, 2.14) appends to them.
SETUP_NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-DFUSEDRES_WITH_CUDA"]
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS of torch 2.13, fixed here so that the check needs no torch.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]

_COMPILING = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
_PROPERTIES = re.compile(r"Function properties for (?P<name>\S+)")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<spill_st>\d+) bytes spill stores, (?P<spill_ld>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")
_PTX_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(?P<name>[\w$]+)", re.MULTILINE)
# A global load or store with its qualifiers, e.g. ld.global.nc.L1::no_allocate.v4.f32 or st.global.v2.f64.
_PTX_GLOBAL_ACCESS = re.compile(r"\b(?P<op>ld|st)\.global(?P<quals>(?:\.[\w:]+)+)")
_PTX_VECTOR_TYPE = re.compile(r"^\.v(?P<n>\d)\.[a-z]+(?P<bits>\d+)$")

# Vector kernels that write activations, by base name: a predicate on the template arguments
# (strings, e.g. ["float", "4", "true", "false"]) saying whether this instantiation stores any.
# The others (bn_stats_partial_kernel, bn_bwd_reduce_kernel without residual or eval dz) only
# read activations and write per-channel partials, which are scalar by nature.
WRITES_ACTIVATIONS = {
    "bn_act_fwd_kernel": lambda args: True,
    "bn_act_fwd_mask_kernel": lambda args: True,
    "bn_bwd_dz_kernel": lambda args: True,
    # <T, VEC, GATE, HAS_RESIDUAL, WRITE_DZ>
    "bn_bwd_reduce_kernel": lambda args: "true" in args[3:5],
}


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir(nvcc: str) -> str | None:
    """The toolkit's include directory (cuda_runtime.h), also when `nvcc` is a wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True)
    here = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    if here:
        candidates.append(os.path.dirname(here.group(1).strip()))
    for root in filter(None, candidates):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


def nvcc_command(nvcc: str, source: str, archs, output: str, keep_dir: str | None = None) -> list[str]:
    """The nvcc command line; with ``keep_dir`` the intermediate files, among them one
    ``<stem>.compute_<arch>.ptx`` per architecture, stay there."""
    cmd = [nvcc, *SETUP_NVCC_FLAGS, *TORCH_NVCC_FLAGS, "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-v"]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if keep_dir is not None:
        cmd += ["-keep", "-keep-dir", keep_dir]
    return cmd + ["-c", source, "-o", output]


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable kernel names (c++filt when present, else the mangled name)."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    readable = out.stdout.splitlines()
    return dict(zip(names, readable)) if len(readable) == len(names) else {n: n for n in names}


def short_name(readable: str) -> str:
    """'void fusedres::cuda::(anonymous namespace)::k<__half, 8>(const __half *, ...)' -> 'k<__half, 8>'."""
    name = readable[5:] if readable.startswith("void ") else readable
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut]
    name = name.replace("fusedres::cuda::(anonymous namespace)::", "").replace("fusedres::cuda::", "")
    return name.replace("(fusedres::cuda::(anonymous namespace)::GradSource)", "")


def base_name(short: str) -> str:
    return short.split("<", 1)[0]


def template_args(short: str) -> list[str]:
    """'k<__half, 8, (GradSource)1>' -> ['__half', '8', '(GradSource)1'] (top-level arguments only)."""
    if "<" not in short:
        return []
    inner = short[short.index("<") + 1:short.rindex(">")]
    args, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(inner[start:i].strip())
            start = i + 1
    return args + [inner[start:].strip()]


def vector_width(short: str) -> int:
    """The VEC template argument of a per-element kernel (the second one, by convention), else 1."""
    args = template_args(short)
    return int(args[1]) if len(args) > 1 and args[1].isdigit() else 1


def parse_ptx(ptx: str) -> dict[str, dict]:
    """Per .entry (mangled name) of a PTX module, the count of 128-bit global loads and stores."""
    counts, starts = {}, list(_PTX_ENTRY.finditer(ptx))
    for i, m in enumerate(starts):
        body = ptx[m.end():starts[i + 1].start() if i + 1 < len(starts) else len(ptx)]
        wide = {"ld": 0, "st": 0}
        for access in _PTX_GLOBAL_ACCESS.finditer(body):
            for qual in re.findall(r"\.v\d\.[a-z]+\d+", access.group("quals")):
                v = _PTX_VECTOR_TYPE.match(qual)
                if int(v.group("n")) * int(v.group("bits")) == 128:
                    wide[access.group("op")] += 1
        counts[m.group("name")] = {"wide_loads": wide["ld"], "wide_stores": wide["st"]}
    return counts


def vector_access_errors(kernels: list[dict]) -> list[str]:
    """What is wrong with the global access widths of ptxas rows annotated by parse_ptx's counts."""
    errors = []
    for k in kernels:
        if vector_width(k["kernel"]) <= 1:
            continue
        if k.get("wide_loads") is None:
            errors.append(f"{k['kernel']} on {k['arch']}: no PTX found for it")
            continue
        if k["wide_loads"] == 0:
            errors.append(f"{k['kernel']} on {k['arch']}: no 128-bit global loads")
        writes = WRITES_ACTIVATIONS.get(k["base"], lambda args: False)(template_args(k["kernel"]))
        if writes and k["wide_stores"] == 0:
            errors.append(f"{k['kernel']} on {k['arch']}: no 128-bit global stores")
    return errors


def parse_ptxas(log: str) -> list[dict]:
    """One dict per (kernel, arch) from nvcc -Xptxas -v output."""
    rows, current = [], None
    for line in log.splitlines():
        m = _COMPILING.search(line)
        if m:
            current = {"mangled": m.group("name"), "arch": m.group("arch"), "registers": None,
                       "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current["stack"] = int(m.group("stack"))
            current["spill_stores"] = int(m.group("spill_st"))
            current["spill_loads"] = int(m.group("spill_ld"))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group("regs"))
            s = _SMEM.search(line)
            current["smem"] = int(s.group("smem")) if s else 0
    names = demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["kernel"] = short_name(names[r["mangled"]])
        r["base"] = base_name(r["kernel"])
    return rows


def compile_one(nvcc: str, source: str, archs, tmpdir: str) -> dict:
    stem = os.path.splitext(os.path.basename(source))[0]
    keep_dir = os.path.join(tmpdir, stem)
    os.makedirs(keep_dir, exist_ok=True)
    cmd = nvcc_command(nvcc, source, archs, os.path.join(keep_dir, stem + ".o"), keep_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    warnings = [ln for ln in log.splitlines() if "warning" in ln.lower()]
    kernels = parse_ptxas(log) if proc.returncode == 0 else []
    for arch in archs if proc.returncode == 0 else ():
        ptx_path = os.path.join(keep_dir, f"{stem}.compute_{arch}.ptx")
        if os.path.exists(ptx_path):
            with open(ptx_path) as f:
                counts = parse_ptx(f.read())
            for k in kernels:
                if k["arch"] == f"sm_{arch}" and k["mangled"] in counts:
                    k.update(counts[k["mangled"]])
    return {"file": os.path.relpath(source, ROOT), "returncode": proc.returncode, "command": cmd,
            "log": log, "warnings": warnings, "kernels": kernels}


def format_table(results: list[dict]) -> str:
    header = ("file", "kernel", "arch", "regs", "spill st", "spill ld", "stack", "smem", "ld128", "st128")
    lines = [header]
    for res in results:
        for k in sorted(res["kernels"], key=lambda r: (r["kernel"], r["arch"])):
            lines.append((res["file"], k["kernel"], k["arch"], str(k["registers"]), str(k["spill_stores"]),
                          str(k["spill_loads"]), str(k["stack"]), str(k["smem"]), str(k.get("wide_loads", "-")),
                          str(k.get("wide_stores", "-"))))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="the .cu files (default: csrc/cuda/*.cu)")
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS),
                        help="compute capabilities without the dot (default: 80 90)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    args = parser.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_compile: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not files:
        print("check_cuda_compile: no .cu files found", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="fusedres_nvcc_") as tmp:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda f: compile_one(nvcc, os.path.abspath(f), args.arch, tmp), files))

    failed = False
    for res in results:
        if res["returncode"] != 0:
            failed = True
            print(f"COMPILE ERROR in {res['file']}:\n  {' '.join(res['command'])}\n{res['log']}", file=sys.stderr)
        for w in res["warnings"]:
            print(f"{res['file']}: {w}", file=sys.stderr)
        for k in res["kernels"]:
            if k["spill_stores"] or k["spill_loads"]:
                failed = True
                print(f"SPILL in {res['file']}: {k['kernel']} on {k['arch']}: {k['spill_stores']} bytes "
                      f"stores, {k['spill_loads']} bytes loads", file=sys.stderr)
        for error in vector_access_errors(res["kernels"]):
            failed = True
            print(f"NARROW ACCESS in {res['file']}: {error}", file=sys.stderr)
    print(format_table(results))
    n_kernels = sum(len(r["kernels"]) for r in results)
    print(f"\n{len(results)} files, {n_kernels} kernel builds for sm_{', sm_'.join(args.arch)}: "
          f"{'FAILED' if failed else 'ok (no compile errors, no spills, 128-bit accesses in the vector kernels)'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": not failed, "archs": [f"sm_{a}" for a in args.arch],
                       "results": [{k: v for k, v in r.items() if k != "log"} for r in results]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
