#!/usr/bin/env bash
# One-command validation of fusedres on a CUDA machine (no internet needed):
#
#   bash scripts/gpu_validate.sh            # results in $OUT, else ./gpu_validation/
#
# Stages, each under its own `timeout` so one hang cannot eat the budget; a failing stage is
# recorded and the next one runs:
#   env           nvidia-smi, versions
#   build         pip install -e . --no-build-isolation --no-deps (MAX_JOBS=16, this GPU's arch)
#   peaks         device peaks: copy of a 1 GiB tensor (GB/s, read + write) and a bf16
#                 8192^3 matmul (TFLOP/s) -> peaks.json, the reference of the benchmarks' ratios
#   tests         pytest tests/ -x -q, junit xml
#   main          python -m fusedres (fused vs eager error check, timing table, JSON, PNG)
#   bench_models  pytest benchmarks/test_bench_models.py --benchmark-only --benchmark-json
#   bench_blocks  pytest benchmarks/ (everything but the models) --benchmark-only --benchmark-json
#   main_compile  python -m fusedres with torch.compile beside eager channels_last (last: the
#                 inductor compile of ResNet-50 takes a minute or more)
# and prints a short table last. The whole run is held under GPU_VALIDATE_BUDGET seconds
# (default 530, for a 9-minute slot on an H100): each stage's limit is cut to what is left.
# The benchmarks skip torch.compile here (FUSEDRES_BENCH_COMPILE=0) for the same reason;
# main_compile carries that comparison. GPU_VALIDATE_SKIP="build tests" (say) skips stages by name,
# e.g. when the extension is already built.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTDIR="${OUT:-$ROOT/gpu_validation}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
BUDGET="${GPU_VALIDATE_BUDGET:-530}"
START=$(date +%s)
STAGES=()

# stage NAME LIMIT_SECONDS CMD...: runs CMD with stdout+stderr in $OUTDIR/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  if [[ " ${GPU_VALIDATE_SKIP:-} " == *" $name "* ]]; then
    STAGES+=("$name|skipped|0|GPU_VALIDATE_SKIP")
    echo "== $name: skipped (GPU_VALIDATE_SKIP)"
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  if ((left < 10)); then
    STAGES+=("$name|skipped|0|no time left in the ${BUDGET}s budget")
    echo "== $name: skipped (budget spent)"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s) -> $OUTDIR/$name.log"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0)) note="ok"
  if ((rc == 124 || rc == 137)); then
    note="TIMEOUT after ${limit}s"
  elif ((rc != 0)); then
    note="FAILED (exit $rc)"
  fi
  STAGES+=("$name|$rc|$dt|$note")
  echo "   $note in ${dt}s"
  tail -n 3 "$OUTDIR/$name.log" | sed 's/^/   | /'
}

env_info() {
  nvidia-smi
  echo
  python - <<'EOF'
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
  python -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|matplotlib|fusedres)" || true
}

build() {
  local arch
  arch="$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
  # Only this GPU's architecture: a quarter of the default build's nvcc time.
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}" \
    python -m pip install -e . --no-build-isolation --no-deps -v
  python -c "import fusedres; [print(k, v) for k, v in fusedres.available_backends().items()]"
}

peaks() {
  python - "$OUTDIR/peaks.json" <<'EOF'
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

# `timeout` runs programs, not shell functions: export them to a child bash.
export -f env_info build peaks
export OUTDIR FUSEDRES_DEVICE_PEAKS="$OUTDIR/peaks.json"
# Every finished benchmark case appends a line here, so a stage cut by its timeout keeps results.
export FUSEDRES_BENCH_LOG="$OUTDIR/bench_cases.jsonl"
rm -f "$FUSEDRES_BENCH_LOG"
stage env 15 bash -c env_info
stage build 100 bash -c build
stage peaks 30 bash -c peaks
stage tests 110 python -m pytest tests/ -x -q -ra --junitxml="$OUTDIR/junit.xml"
stage main 100 python -m fusedres --device cuda --out "$OUTDIR/main"
stage bench_models 90 env FUSEDRES_BENCH_COMPILE=0 python -m pytest benchmarks/test_bench_models.py \
  --benchmark-only -q --benchmark-json="$OUTDIR/bench_models.json"
stage bench_blocks 90 env FUSEDRES_BENCH_COMPILE=0 python -m pytest benchmarks/ \
  --ignore=benchmarks/test_bench_models.py --benchmark-only -q \
  --benchmark-json="$OUTDIR/bench_blocks.json"
stage main_compile 120 python -m fusedres --device cuda --backends eager,eager_cl,compile \
  --out "$OUTDIR/main_compile"

printf '%s\n' "${STAGES[@]}" >"$OUTDIR/stages.txt"
python - "$OUTDIR" <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET
out = sys.argv[1]
print("\n==================== fusedres GPU validation ====================")
print(f"{'stage':14s} {'rc':>7s} {'seconds':>8s}  result")
for line in open(os.path.join(out, "stages.txt")).read().splitlines():
    name, rc, dt, note = line.split("|", 3)
    print(f"{name:14s} {rc:>7s} {dt:>8s}  {note}")
p = os.path.join(out, "peaks.json")
if os.path.exists(p):
    pk = json.load(open(p))
    print(f"\npeaks on {pk['device']}: copy {pk['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {pk['matmul_TFLOPs']:.0f} TFLOP/s")
p = os.path.join(out, "junit.xml")
if os.path.exists(p):
    s = ET.parse(p).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    print(f"tests: {s.get('tests')} run, {s.get('failures')} failures, {s.get('errors')} errors, "
          f"{s.get('skipped')} skipped, {float(s.get('time', 0)):.0f}s")
for name in ("main", "main_compile"):
    p = os.path.join(out, name, "report.json")
    if os.path.exists(p):
        from fusedres.report import format_table
        print(f"\n[{name}]", format_table(json.load(open(p))))
p = os.path.join(out, "bench_cases.jsonl")
if os.path.exists(p):
    groups = {}
    for line in open(p):
        case = json.loads(line)
        groups.setdefault(case["group"], {})[case["extra_info"]["provider"]] = case
    print("\n[benchmarks] median ms per call (GB/s by the traffic model), speedup over eager")
    for g, provs in groups.items():
        eager = provs.get("eager", {}).get("median_s")
        cells = [f"{k} {v['median_s'] * 1e3:.2f}"
                 + (f" ({v['extra_info']['GB/s']:.3g})" if v["extra_info"].get("GB/s") else "")
                 + (f" {eager / v['median_s']:.2f}x" if eager and k != "eager" else "")
                 for k, v in provs.items()]
        print(f"  {g}: " + ", ".join(cells))
EOF
echo "all logs, JSON and plots: $OUTDIR (total $(($(date +%s) - START))s)"
