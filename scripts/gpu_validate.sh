#!/usr/bin/env bash
# One-command validation of fusedres on a CUDA machine (no internet needed):
#
#   bash scripts/gpu_validate.sh       # logs, JSON, plots in ./gpu_validation/ (or $OUT, packed)
#
# Exit status: 0 when every stage that ran passed; 1 when one failed or hit its time limit;
# 2 when torch sees no CUDA device (checked before the build: nothing else can run then).
#
# Stages, each under its own `timeout` so one hang cannot eat the budget; a failing stage is
# recorded and the next one runs. The core stages, in order, with their limits in seconds:
#   env              10  nvidia-smi, versions
#   cuda_check       15  torch.cuda.is_available(), else a message and exit 2
#   build           120  pip install -e . --no-build-isolation --no-deps (MAX_JOBS=16, this GPU's arch)
#   peaks            20  device peaks: copy of a 1 GiB tensor (GB/s, read + write) and a bf16
#                        8192^3 matmul (TFLOP/s) -> peaks.json, the reference of the benchmarks' ratios
#   tests_cuda       90  pytest -m cuda: everything that runs on the GPU (the Triton kernel matrix,
#                        the cuda backend, ResNet-50 shapes), 4 xdist workers when installed, junit xml
#   main             80  python -m fusedres --steps 10 (fused vs eager error check, timing table, JSON, PNG)
#   bench_kernels    60  benchmarks/test_bench_triton.py: eager, triton and cuda per kernel and shape
#   bench_bottleneck 100 the ResNet-50 Bottleneck training step (fwd+bwd, batch 128, bf16
#                        channels_last) at its four stride-1 stage shapes: eager NCHW and
#                        channels_last, torch.compile (inductor, default mode; a compile per shape),
#                        triton, cuda
# Their limits sum to 495 s, inside the default budget of 515 s: each gets its whole limit even
# when every one before it runs to its own. Then, in what the core stages left (each only when
# at least its minimum is left, its limit cut to the rest):
#   bench_bottleneck_ds  min 45, limit 100: the same for the four downsampling stage shapes
#   bench_blocks         min 45, limit 90: every other block case (ResNet-18, eval), no compile
#   main_compile         min 90, limit 120: python -m fusedres with torch.compile beside eager
#                        channels_last on the whole ResNet-50 (its compile takes a minute or more)
#   bench_models         min 45, limit 80: resnet18/50 train and eval per provider, no compile
#   tests_cpu            min 90, limit 300: pytest -m "not cuda" (CI runs it too), 8 workers
# Worst case: every stage ends by GPU_VALIDATE_BUDGET (default 515) seconds after the start,
# `timeout`'s 10 s kill grace included (a stage's limit is cut to the budget left minus that
# grace); the summary (one Python start) and the packing add about 10 s: about 525 s in all,
# under a 9-minute (540 s) slot. GPU_VALIDATE_SKIP="build tests_cpu" (say) skips stages by name,
# e.g. to split the run over two calls of one lease: the extension built by the first stays in
# the tree for the second.
#
# Printed last (also in summary.txt): every benchmark group (provider, median ms, GB/s, images/s,
# speedup over eager, bytes eager moves / bytes the provider moves), the targets measured (not
# asserted: fused Bottleneck train step >= 1.3x the faster eager layout and >= 1.1x
# torch.compile; memory-bound kernels >= 80% of the copy bandwidth), test counts, the main job's
# tables, and the stage table.
#
# Where the results go: ./gpu_validation/ (GPU_VALIDATE_DIR overrides). When $OUT is set (a
# device lease, which returns at most 8 files), the folder is packed into
# $OUT/gpu_validation.tgz after every stage, beside $OUT/stages.txt and, at the end,
# $OUT/summary.txt, so a run cut short still returns what it finished.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${OUT:-}" ]]; then
  OUTDIR="${GPU_VALIDATE_DIR:-/tmp/fusedres_gpu_validation}"
else
  OUTDIR="${GPU_VALIDATE_DIR:-$ROOT/gpu_validation}"
fi
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
# The GPU machines' interpreter with torch is python3 (there may be no `python`).
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${GPU_VALIDATE_BUDGET:-515}"
KILL_GRACE=10
START=$(date +%s)
STAGES=()
FAILED=()
LAST_RC=  # the last stage's exit status, "skipped" when it did not run

# Packs the results folder into $OUT (when set): called after every stage.
pack() {
  printf '%s\n' "${STAGES[@]}" >"$OUTDIR/stages.txt"
  [[ -n "${OUT:-}" ]] || return 0
  cp "$OUTDIR/stages.txt" "$OUT/stages.txt"
  tar czf "$OUT/gpu_validation.tgz.part" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" &&
    mv "$OUT/gpu_validation.tgz.part" "$OUT/gpu_validation.tgz"
}

# stage NAME MIN LIMIT CMD...: runs CMD with stdout+stderr in $OUTDIR/NAME.log under `timeout
# LIMIT`, the limit cut to what is left of the budget; skipped when less than MIN seconds are left.
stage() {
  local name=$1 min=$2 limit=$3
  shift 3
  if [[ " ${GPU_VALIDATE_SKIP:-} " == *" $name "* ]]; then
    STAGES+=("$name|-|0|skipped (GPU_VALIDATE_SKIP)")
    echo "== $name: skipped (GPU_VALIDATE_SKIP)"
    LAST_RC=skipped
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START) - KILL_GRACE))
  if ((left < min)); then
    STAGES+=("$name|-|0|skipped: ${left}s of the ${BUDGET}s budget left, it needs ${min}s")
    echo "== $name: skipped (${left}s left, needs ${min}s)"
    LAST_RC=skipped
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s) -> $OUTDIR/$name.log"
  local t0 rc
  t0=$(date +%s)
  timeout -k "$KILL_GRACE" "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0)) note="ok"
  if ((rc == 124 || rc == 137)); then
    note="TIMEOUT after ${limit}s (partial results kept)"
  elif ((rc != 0)); then
    note="FAILED (exit $rc)"
  fi
  ((rc != 0)) && FAILED+=("$name")
  LAST_RC=$rc
  STAGES+=("$name|$rc|$dt|$note")
  echo "   $note in ${dt}s"
  tail -n 3 "$OUTDIR/$name.log" | cut -c1-200 | sed 's/^/   | /'
  pack
}

env_info() {
  nvidia-smi
  echo
  "$PY" - <<'EOF'
import platform, subprocess, torch
print("python", platform.python_version(), "|", platform.platform())
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn",
      torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| sm", f"{p.major}.{p.minor}", "|", p.total_memory // 2**20, "MiB |",
          p.multi_processor_count, "SMs")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton not importable:", e)
EOF
  nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc not on PATH"
  gcc --version | head -n 1
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|matplotlib|fusedres)" || true
}

cuda_check() {
  "$PY" - <<'EOF'
import sys, torch
print("torch", torch.__version__, "| built with CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit(f"torch.cuda.is_available() is False (torch {torch.__version__}, built with CUDA "
             f"{torch.version.cuda}): no usable CUDA device, driver or CUDA build of torch here")
print("CUDA devices:", torch.cuda.device_count(), "|", torch.cuda.get_device_name(0))
EOF
}

build() {
  local arch
  arch="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
  # Only this GPU's architecture: a quarter of the default build's nvcc time.
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}" \
    "$PY" -m pip install -e . --no-build-isolation --no-deps -v
  "$PY" -c "import fusedres; [print(k, v) for k, v in fusedres.available_backends().items()]"
}

peaks() {
  "$PY" - "$OUTDIR/peaks.json" <<'EOF'
import json, sys, torch
dev = torch.device("cuda")

def timed(fn, n):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n

src = torch.empty(2**30, dtype=torch.uint8, device=dev).random_()
dst = torch.empty_like(src)
t_copy = timed(lambda: dst.copy_(src), 20)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
t_mm = timed(lambda: a @ b, 20)
peaks = {"device": torch.cuda.get_device_name(dev),
         # a copy reads and writes every byte once
         "copy_GBps": 2 * 2**30 / t_copy / 1e9,
         "matmul_TFLOPs": 2 * 8192**3 / t_mm / 1e12,
         "how": "torch copy_ of a 1 GiB tensor; bf16 8192x8192x8192 matmul; 20 runs, CUDA events"}
json.dump(peaks, open(sys.argv[1], "w"), indent=1)
print(json.dumps(peaks, indent=1))
EOF
}

# Prints every benchmark group, the targets, the test counts and the main job's tables (the
# stage table follows, from bash, so that it is printed even where this fails).
summary() {
  "$PY" - "$OUTDIR" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
from fusedres.report import format_bench_cases, format_table, format_targets
out = sys.argv[1]
cases = []
p = os.path.join(out, "bench_cases.jsonl")
if os.path.exists(p):
    cases = [json.loads(line) for line in open(p) if line.strip()]
    print("\n[benchmarks] per group: median ms per call, GB/s (bytes by the suite's count), "
          "images/s, speedup over eager, bytes eager moves / bytes the provider moves")
    print(format_bench_cases(cases))
peaks = {}
p = os.path.join(out, "peaks.json")
if os.path.exists(p):
    peaks = json.load(open(p))
    print(f"\npeaks on {peaks['device']}: copy {peaks['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {peaks['matmul_TFLOPs']:.0f} TFLOP/s")
print()
print(format_targets(cases, peaks.get("copy_GBps")))
for name in ("cuda", "cpu"):
    p = os.path.join(out, f"junit_{name}.xml")
    if os.path.exists(p):
        s = ET.parse(p).getroot()
        s = s if s.tag == "testsuite" else s.find("testsuite")
        print(f"tests_{name}: {s.get('tests')} run, {s.get('failures')} failures, "
              f"{s.get('errors')} errors, {s.get('skipped')} skipped, "
              f"{float(s.get('time', 0)):.0f}s")
for name in ("main_compile", "main"):
    p = os.path.join(out, name, "report.json")
    if os.path.exists(p):
        print(f"\n[{name}]", format_table(json.load(open(p))))
EOF
}

stage_table() {
  echo
  echo "==================== fusedres GPU validation: stages ===================="
  printf '%-20s %4s %8s  %s\n' stage rc seconds result
  local line name rc dt note
  for line in "${STAGES[@]}"; do
    IFS='|' read -r name rc dt note <<<"$line"
    printf '%-20s %4s %8s  %s\n' "$name" "$rc" "$dt" "$note"
  done
}

# Summary, stage table, packing; then exits with $1.
finish() {
  local code=$1
  pack
  {
    ((code == 2)) || summary 2>&1
    stage_table
    if ((code == 2)); then
      echo "NO CUDA: torch sees no CUDA device, nothing was built or run (see cuda_check above)."
    elif ((${#FAILED[@]})); then
      echo "FAILED or cut short: ${FAILED[*]} (logs in $OUTDIR)"
    else
      echo "every stage that ran passed"
    fi
  } | tee "$OUTDIR/summary.txt"
  pack
  [[ -n "${OUT:-}" ]] && cp "$OUTDIR/summary.txt" "$OUT/summary.txt"
  echo "all logs, JSON and plots: $OUTDIR${OUT:+ (packed: $OUT/gpu_validation.tgz)}" \
    "(total $(($(date +%s) - START))s)"
  exit "$code"
}

# `timeout` runs programs, not shell functions: export them to a child bash.
export -f env_info cuda_check build peaks
export OUTDIR PY FUSEDRES_DEVICE_PEAKS="$OUTDIR/peaks.json"
# Every finished benchmark case appends a line here, so a stage cut by its timeout keeps results.
# A run that skips stages (the second call of a split run) adds to the cases of the first.
export FUSEDRES_BENCH_LOG="$OUTDIR/bench_cases.jsonl"
[[ -z "${GPU_VALIDATE_SKIP:-}" ]] && rm -f "$FUSEDRES_BENCH_LOG"
# -v: a stage cut by its timeout writes no junit xml, but its log says how far it got.
PYTEST=("$PY" -m pytest -p no:cacheprovider -v -rfE --maxfail=25)
BENCH=(env FUSEDRES_BENCH_DEVICE=cuda "$PY" -m pytest -p no:cacheprovider -q -rfE --benchmark-only)
XDIST_CUDA=()
XDIST_CPU=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST_CUDA=(-n 4)
  XDIST_CPU=(-n 8)
fi
# The Bottleneck cases of benchmarks/test_bench_blocks.py, in the order they run: node ids.
bottleneck_cases() {
  local block provider
  for block in "$@"; do
    for provider in eager eager_cl compile triton cuda; do
      echo "benchmarks/test_bench_blocks.py::test_block[r50.$block-train-$provider]"
    done
  done
}
mapfile -t PLAIN_BOTTLENECKS < <(bottleneck_cases layer1.1 layer2.1 layer3.1 layer4.1)
mapfile -t DOWNSAMPLING_BOTTLENECKS < <(bottleneck_cases layer1.0 layer2.0 layer3.0 layer4.0)

stage env 10 10 bash -c env_info
stage cuda_check 10 15 bash -c cuda_check
if [[ $LAST_RC != 0 && $LAST_RC != skipped ]]; then
  echo "ERROR: $(tail -n 1 "$OUTDIR/cuda_check.log")" >&2
  finish 2
fi
stage build 10 120 bash -c build
stage peaks 10 20 bash -c peaks
stage tests_cuda 10 90 "${PYTEST[@]}" ${XDIST_CUDA[@]+"${XDIST_CUDA[@]}"} tests -m cuda \
  --junitxml="$OUTDIR/junit_cuda.xml"
stage main 10 80 "$PY" -m fusedres --device cuda --steps 10 --out "$OUTDIR/main"
stage bench_kernels 10 60 "${BENCH[@]}" benchmarks/test_bench_triton.py \
  --benchmark-json="$OUTDIR/bench_kernels.json"
stage bench_bottleneck 10 100 env FUSEDRES_BENCH_COMPILE=1 "${BENCH[@]}" \
  "${PLAIN_BOTTLENECKS[@]}" --benchmark-json="$OUTDIR/bench_bottleneck.json"
# What the core stages left:
stage bench_bottleneck_ds 45 100 env FUSEDRES_BENCH_COMPILE=1 "${BENCH[@]}" \
  "${DOWNSAMPLING_BOTTLENECKS[@]}" --benchmark-json="$OUTDIR/bench_bottleneck_ds.json"
stage bench_blocks 45 90 env FUSEDRES_BENCH_COMPILE=0 "${BENCH[@]}" benchmarks/test_bench_blocks.py \
  -k "not (r50 and train)" --benchmark-json="$OUTDIR/bench_blocks.json"
stage main_compile 90 120 "$PY" -m fusedres --device cuda --steps 10 \
  --backends eager,eager_cl,compile --out "$OUTDIR/main_compile"
stage bench_models 45 80 env FUSEDRES_BENCH_COMPILE=0 "${BENCH[@]}" benchmarks/test_bench_models.py \
  --benchmark-json="$OUTDIR/bench_models.json"
stage tests_cpu 90 300 "${PYTEST[@]}" ${XDIST_CPU[@]+"${XDIST_CPU[@]}"} tests -m "not cuda" \
  --junitxml="$OUTDIR/junit_cpu.xml"

if ((${#FAILED[@]})); then
  finish 1
fi
finish 0
