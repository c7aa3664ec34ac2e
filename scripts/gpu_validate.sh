#!/usr/bin/env bash
# One call on a CUDA machine (no internet needed) that answers two questions: is every backend
# (eager, triton, cuda) correct there, and how fast is it against eager PyTorch and torch.compile.
#
#   bash scripts/gpu_validate.sh             # results in $OUT when set, else ./gpu_validation/
#   bash scripts/gpu_validate.sh --dry-run   # the same stages on a CPU: Triton interpreted, tiny
#                                            # shapes, no torch.compile (CI runs it, ~1.5 min)
#
# Results (7 files; a device call brings back at most 8, no folders needed):
#   results.jsonl  every check and measurement, one JSON line each, appended the moment it exists
#                  (a call cut off at any point returns everything measured until then)
#   README.md      the summary tables, rewritten at the end; with results.jsonl it is ready to be
#                  committed as benchmarks/results/<gpu>/ (the folder name is in it)
#   info.log build.log warmup.log check.log bench.log    each stage's own output
# The summary is printed LAST on stdout (what a 12,000-character tail shows).
#
# Exit status: 0 when every correctness check passed (and the build and check stages ran to
# their end); 1 otherwise; 2 when torch sees no CUDA device (nothing else runs then). Benchmark
# errors and skips are listed in the summary but do not change it.
#
# Stages: each one's budget (its deadline is its start plus that, cut to what the run has left)
# and the time it is expected to take on an H200 with 16 host cores (guessed from FLOPs, bytes,
# compile counts and launch costs; the stage records in results.jsonl say what they took).
# Inside a stage an item (a unit, a block, a measurement) starts only when its own estimate
# (Plan.estimates in gpu_validate_common.py, kept on the safe side) fits in what is left, else
# it is skipped and recorded; `timeout` at the deadline is only the last resort.
#
#   stage           budget  expected  what
#   info               30      5      machine record first (GPU, driver, versions, CPU, commit)
#   build             280     80      setup.py build_ext --inplace: csrc for this GPU's arch only,
#                                     MAX_JOBS = the host's cores; no pip, nothing downloaded;
#                                     after a crash (a crash report) or a failed build, a second build
#                                     (~180 s more)
#   warmup_triton     150     60      beside the build: 8 processes compile every Triton kernel
#                                     variant the check (config 0) and bench (every config, for
#                                     the autotuner) run, into Triton's on-disk cache (~150
#                                     compiles of 0.3-1.4 s)
#   warmup_compile    240    150      beside build and check, niced: 4 processes compile the
#                                     graphs bench times with torch.compile into inductor's
#                                     on-disk caches (cold 20-40 s a block, ~90 s the model;
#                                     with them warm, bench's compiles take seconds)
#   check             150     70      correctness, FUSEDRES_TRITON_CONFIG=0 (autotuning every
#                                     case would time every config of every shape): 17 units,
#                                     7 blocks, ResNet-50 train + eval; bf16 and fp32; eager,
#                                     triton, cuda; float64 oracle (~1 TFLOP in all)
#   bench            rest    210      peaks 3, 8 blocks x (train 7 + eval 4), model train 30 +
#                                     eval 15 (the first H200 run: 127 s for all of it), each
#                                     provider also as a CUDA graph (~+50%), BN kernels 10, conv
#                                     6, profile 5, autotuning included; then torch.compile beside
#                                     eager_cl, triton and cuda: 16 block cases x 1-5 s (caches
#                                     warm) and the model's train and eval, as many as fit
#   summary            15      1      README.md, the printed tables, the exit status
#
# Whole run: GPU_VALIDATE_BUDGET seconds (default 520: a 9-minute call, with a minute of the
# device tool's 10 to spare). Expected: info 5 | build 80 (warm-ups beside it) | check 70 |
# waiting for the compile warm-up until ~200 | bench without compile 210 | compile cases until
# the budget ends (~500). GPU_VALIDATE_SKIP="warmup_compile ..." skips stages by name.
# Environment: OUT (results folder), PYTHON (default python3), MAX_JOBS, TORCH_CUDA_ARCH_LIST
# (default: the GPU's own).
set -u
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
gpu_script_setup gpu_validation "$@"
rm -f "$OUTDIR"/results.jsonl "$OUTDIR"/README.md "$OUTDIR"/*.log
RESULTS="$OUTDIR/results.jsonl"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
GV="$ROOT/scripts/gpu_validate.py"
START=$(date +%s)
# The dry run's budget only guards against a hang: on a CI machine nothing may be skipped.
BUDGET="${GPU_VALIDATE_BUDGET:-$( ((DRY)) && echo 900 || echo 520)}"
END=$((START + BUDGET))
RESERVE=15  # kept for the summary
GRACE=10    # past a stage's deadline before `timeout` kills it
DRYFLAG=()
if ((DRY)); then
  DRYFLAG=(--dry-run)
  # Read once, when triton is first imported; before every Python process here.
  export TRITON_INTERPRET=1
fi
# PYTHONFAULTHANDLER: a crashing process prints its Python stack into its stage's log.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export GPU_VALIDATE_START=$START PY DRY

# record_stage NAME STATUS RC SECONDS BUDGET ESTIMATE NOTE: one `stage` line in results.jsonl.
record_stage() {
  local fmt='{"kind":"stage","stage":"%s","status":"%s","rc":"%s","seconds":%s,'
  fmt+='"budget_s":%s,"estimate_s":%s,"t":%s,"note":"%s"}\n'
  # shellcheck disable=SC2059
  printf "$fmt" "$1" "$2" "$3" "$4" "$5" "$6" "$(($(date +%s) - START))" "$7" >>"$RESULTS"
}

# run_stage NAME BUDGET ESTIMATE CMD...: runs CMD with its output in $OUTDIR/${LOG:-NAME}.log,
# GPU_VALIDATE_DEADLINE = now + BUDGET (cut to what the whole run has left), and `timeout` at
# that deadline plus GRACE; records the stage. Returns CMD's exit status.
run_stage() {
  local name=$1 budget=$2 estimate=$3
  shift 3
  local log="$OUTDIR/${LOG:-$name}.log" now deadline limit
  if [[ " ${GPU_VALIDATE_SKIP:-} " == *" $name "* ]]; then
    record_stage "$name" skipped - 0 "$budget" "$estimate" "GPU_VALIDATE_SKIP"
    echo "== $name: skipped (GPU_VALIDATE_SKIP)"
    return 0
  fi
  now=$(date +%s)
  deadline=$((now + budget))
  ((deadline > END - RESERVE)) && deadline=$((END - RESERVE))
  limit=$((deadline - now))
  if ((limit < 5)); then
    record_stage "$name" skipped - 0 "$budget" "$estimate" "budget: ${limit}s left of the run"
    echo "== $name: skipped (${limit}s left)"
    return 0
  fi
  echo "== $name: up to ${limit}s (estimate ${estimate}s) -> $log"
  GPU_VALIDATE_DEADLINE=$deadline timeout -k 5 $((limit + GRACE)) "$@" >>"$log" 2>&1
  local rc=$? status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  [[ $rc -ne 0 && $status == ok ]] && status=fail
  local took=$(($(date +%s) - now))
  record_stage "$name" "$status" "$rc" "$took" "$budget" "$estimate" ""
  echo "   $name: $status (exit $rc) in ${took}s"
  return $rc
}

# The extension: csrc for this GPU's arch only (a quarter of the default two-arch nvcc time),
# in place, no pip (the GPU machines cannot download, and install.sh would try to). Then the
# backend the checks need must be usable, and an op call the extension must refuse must raise.
build() {
  local cmd=(env MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$GPU_ARCH}" "$PY" setup.py build_ext --inplace)
  local rc=0 reason backend
  backend="$( ((DRY)) && echo cpu || echo cuda)"
  if ((DRY)); then
    echo "dry run: CI built the extension already; a GPU run would run: ${cmd[*]}"
  else
    "${cmd[@]}"
    rc=$?
  fi
  if ((rc == 0)); then
    post_build_checks "$backend" && return 0
    rc=$?
    ((rc > 128)) || return $rc
    reason="killed by a signal"
  else
    reason="failed to build (exit $rc)"
  fi
  # Killed by a signal, as the first H200 runs were (build_info() and the first failing
  # TORCH_CHECK segfaulted with /opt/gcc's g++), or not built at all (that g++ 13 and its
  # libstdc++ headers are not what CI builds with): the same build with the system's g++, in
  # place, so that the stages after this one run the cuda backend if that one works. The stage
  # still fails: the default build did.
  local used system=/usr/bin/g++
  used="$(sed -n 's/^cxx = //p' build/temp.*/build.ninja 2>/dev/null | head -n 1)"
  if ((DRY)) || [[ ! -x "$system" || "$(readlink -f "$(command -v "$used")")" == "$(readlink -f "$system")" ]]; then
    echo "== no other compiler to try (built with '$used')"
    return $rc
  fi
  echo "== built with $used, $reason: building again with $system"
  # CC is also nvcc's host compiler (-ccbin) under cpp_extension.
  local cc=/usr/bin/gcc
  [[ -x "$cc" ]] || cc="$system"
  env CC="$cc" CXX="$system" LDSHARED="$system -shared" "${cmd[@]}" \
    --build-temp "build/temp.system-gxx" || return $rc
  post_build_checks "$backend"
  echo "== with $system: exit $? (the first build's was $rc)"
  return $rc
}
# post_build_checks BACKEND: BUILD_CHECK, then OP_ERROR_CHECK, each in its own process; the
# first killed by a signal gets scripts/crash_report.sh (the native backtrace and where the
# extension's C++ runtime references bind; one report fits the stage's budget). Returns the
# first non-zero exit status.
post_build_checks() {
  local check rc first=0 reported=0
  for check in "$BUILD_CHECK" "$OP_ERROR_CHECK"; do
    "$PY" -c "$check" "$1"
    rc=$?
    if ((rc > 128 && !reported)); then
      echo "== exit $rc: crash report"
      CRASH_REPORT_TIMEOUT=45 bash "$ROOT/scripts/crash_report.sh" "$PY" -c "$check" "$1"
      reported=1
    fi
    ((first == 0)) && first=$rc
  done
  return $first
}
# After the build: versions, the build, every backend and why it is usable or not; fails when
# the backend the checks need is not usable.
BUILD_CHECK='
import sys

import fusedres
from fusedres import info

info.main()
ok, why = fusedres.available_backends()[sys.argv[1]]
sys.exit(0 if ok else f"the {sys.argv[1]} backend is unusable after the build: {why}")
'
# An op call the extension must refuse (a scale of 2 values for 3 channels): its TORCH_CHECK
# must raise a RuntimeError naming the argument, on the device the checks run on.
OP_ERROR_CHECK='
import sys

import torch

from fusedres import _ext  # registers torch.ops.fusedres

device = "cuda" if sys.argv[1] == "cuda" else "cpu"
z = torch.zeros(2, 3, 4, 4, device=device)
try:
    torch.ops.fusedres.bn_act_fwd(z, torch.ones(2, device=device), torch.zeros(3, device=device),
                                  None, True)
except RuntimeError as e:
    message = str(e).splitlines()[0]
    print(f"an op error on {device} raised as it should: {message}")
    sys.exit(0 if "scale" in message else f"the error does not name scale: {message}")
sys.exit(f"bn_act_fwd on {device} accepted a scale of 2 values for 3 channels")
'
export -f build post_build_checks
export BUILD_CHECK OP_ERROR_CHECK ROOT

run_stage info 30 5 "$PY" "$GV" info --out "$OUTDIR" --env-file "$WORK/env" "${DRYFLAG[@]}"
if (($? == 2)); then
  "$PY" "$GV" summary --out "$OUTDIR"
  echo "NO CUDA: torch sees no CUDA device; nothing was built or run (see $OUTDIR/info.log)."
  exit 2
fi
GPU_ARCH=
# shellcheck disable=SC1091
[[ -f "$WORK/env" ]] && source "$WORK/env"
export GPU_ARCH

run_stage build 280 80 bash -c build &
BUILD_PID=$!
LOG=warmup run_stage warmup_triton 150 60 "$PY" "$GV" warmup --out "$OUTDIR" "${DRYFLAG[@]}" &
WARM_PID=$!
COMPILE_PID=
if ((DRY)); then
  record_stage warmup_compile skipped - 0 0 0 "dry run: no torch.compile"
else
  # Niced: it must not slow the build or the check, and 4 inductor threads each, not 16.
  LOG=warmup TORCHINDUCTOR_COMPILE_THREADS=4 run_stage warmup_compile 240 150 \
    nice -n 10 "$PY" "$GV" warmup-compile --out "$OUTDIR" &
  COMPILE_PID=$!
fi
wait "$BUILD_PID"
# The check's kernels are the warm-up's first tasks: compiled by now, while the benchmarks'
# other configs may still be compiling beside it.
FUSEDRES_TRITON_CONFIG=0 run_stage check 150 70 "$PY" "$GV" check --out "$OUTDIR" "${DRYFLAG[@]}"
# Nothing is timed while a warm-up still compiles beside it.
wait "$WARM_PID"
[[ -n "$COMPILE_PID" ]] && wait "$COMPILE_PID"
run_stage bench "$BUDGET" 210 "$PY" "$GV" bench --out "$OUTDIR" "${DRYFLAG[@]}"

echo "== total $(($(date +%s) - START))s; results in $OUTDIR"
"$PY" "$GV" summary --out "$OUTDIR"
