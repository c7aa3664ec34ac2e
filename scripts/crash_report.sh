#!/usr/bin/env bash
# What a native crash of a command that loads the fusedres extension needs to be understood
# where nobody can sit at a debugger (a device call): where the extension's C++ runtime
# references bind, whether putting a libstdc++ first in the lookup order changes the outcome,
# and the native backtrace.
#
#   bash scripts/crash_report.sh CMD...    # e.g. python3 -c "from fusedres import _ext; ..."
#
# Why these three (benchmarks/results/nvidia-h200/NOTES.md): on the first H200 runs the
# extension segfaulted only where it built a message with std::ostringstream and handed it to
# libtorch, and an extension compiled by one g++ loads next to libraries that export C++
# runtime functions of their own (libc10 and libtorch_cpu some std::string members; CUDA's
# libcufile hundreds): a reference that binds to such a copy instead of libstdc++'s runs code
# built from other headers.
#
# Sections:
#   bindings  the extension's symbol references that bind outside libstdc++, libgcc_s, libc,
#             libm and itself (LD_DEBUG=bindings), counted per library, then demangled
#   preload   CMD again with LD_PRELOAD of each libstdc++ the compiler and the system have (so
#             every reference binds to it first): its exit status
#   backtrace CMD under cuda-gdb, else gdb (the GPU machines have cuda-gdb only)
# Environment: CXX, the compiler that built the extension (default: the build's ninja file's,
# else c++); CRASH_REPORT_TIMEOUT, seconds per run of CMD (default 90).
# Exit status 0: this is a report, not a check.
set -u
if (($# == 0)); then
  echo "usage: bash scripts/crash_report.sh CMD..." >&2
  exit 64
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIMIT="${CRASH_REPORT_TIMEOUT:-90}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# The compiler the extension was built with: the `cxx = ...` line of torch's ninja file.
compiler() {
  if [[ -n "${CXX:-}" ]]; then
    echo "$CXX"
    return
  fi
  local ninja
  ninja="$(ls "$ROOT"/build/temp.*/build.ninja 2>/dev/null | head -n 1)"
  if [[ -n "$ninja" ]] && grep -q '^cxx = ' "$ninja"; then
    sed -n 's/^cxx = //p' "$ninja" | head -n 1
  else
    echo c++
  fi
}

demangle() {
  if command -v c++filt >/dev/null; then c++filt; else cat; fi
}

echo "== bindings: the extension's C++ runtime references (std::, __cxa_*, _Unwind_*)"
LD_DEBUG=bindings LD_DEBUG_OUTPUT="$TMP/bind" timeout "$LIMIT" "$@" >"$TMP/out" 2>&1
echo "(CMD exit status under LD_DEBUG: $?)"
# ld.so's lines: "PID: binding file FROM [0] to TO [0]: normal symbol `NAME' [VERSION]".
cat "$TMP"/bind.* 2>/dev/null |
  awk '$2 == "binding" && $4 ~ /fusedres\/_C/ {
         sym = $0; sub(/.*symbol `/, "", sym); sub(/'"'"'.*/, "", sym)
         if (sym !~ /^(_ZN?K?S[tsoid]|_ZT[VIS]N?St|_ZGVN?St|__cxa_|__gxx_|_Unwind_|__dynamic_cast)/) next
         n = split($7, parts, "/"); print parts[n] "\t" sym
       }' | sort -u >"$TMP/runtime"
if [[ -s "$TMP/runtime" ]]; then
  echo "-- how many bind to each library:"
  cut -f1 "$TMP/runtime" | sort | uniq -c | sort -rn
  echo "-- those bound outside libstdc++ and libgcc_s, demangled (first 60):"
  grep -Pv '^(libstdc\+\+|libgcc_s)\.so' "$TMP/runtime" | grep -Fv "$(basename "$(ls "$ROOT"/fusedres/_C*.so 2>/dev/null | head -n 1)")" |
    head -n 60 | awk -F'\t' '{print $1 ": " $2}' | demangle
else
  echo "(none: ld.so wrote no bindings of the extension)"
fi

echo "== preload: CMD with each libstdc++ first in the lookup order"
cxx="$(compiler)"
candidates=()
from_cxx="$("$cxx" -print-file-name=libstdc++.so.6 2>/dev/null)"
[[ "$from_cxx" == /* && -e "$from_cxx" ]] && candidates+=("$(readlink -f "$from_cxx")")
from_system="$(ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 .*x86-64/ {print $NF; exit}')"
[[ -n "$from_system" && -e "$from_system" ]] && candidates+=("$(readlink -f "$from_system")")
if ((${#candidates[@]} == 0)); then
  echo "(no libstdc++ found: $cxx -print-file-name gave '$from_cxx', ldconfig nothing)"
fi
for lib in $(printf '%s\n' "${candidates[@]}" | sort -u); do
  LD_PRELOAD="$lib" timeout "$LIMIT" "$@" >"$TMP/out" 2>&1
  echo "exit $? with LD_PRELOAD=$lib ($(basename "$(readlink -f "$lib")"); compiler $cxx)"
done

echo "== backtrace"
debugger="$(command -v cuda-gdb || command -v gdb)"
program="$(command -v "$1")"
# A debugger needs the ELF file: a Python behind a wrapper script (pyenv's shims) is resolved.
if [[ -n "$program" && "$(head -c 4 "$program" | tr -d '\0')" != $'\x7fELF' && "$1" == *python* ]]; then
  program="$("$1" -c 'import sys; print(sys.executable)')"
fi
if [[ -z "$debugger" ]]; then
  echo "(neither cuda-gdb nor gdb is installed)"
else
  timeout "$LIMIT" "$debugger" -q -batch -ex run -ex bt -ex "info sharedlibrary" \
    --args "$program" "${@:2}" >"$TMP/gdb" 2>&1
  # The signal and the stack (its first 60 frames), then which C++ runtimes were loaded from
  # where (the whole library list runs to hundreds of lines with torch and CUDA).
  awk '/received signal|^#[0-9]/ && n++ < 61' "$TMP/gdb"
  grep -E 'libstdc\+\+|libgcc_s|libgomp|libc10\.so|libtorch_cpu|libcufile|fusedres/_C' "$TMP/gdb" |
    grep -v '^#'
fi
exit 0
